//! The KeyService gRPC API. Deny by default: material only to vault identities,
//! metadata only to admin identities.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use tonic::{Request, Response, Status};
use tracing::Instrument;
use vault_proto::keys::v1 as pb;

use crate::keyring::{Keyring, Purpose, State};

#[derive(Debug)]
pub struct KeyServiceImpl {
    keyring: Arc<RwLock<Keyring>>,
    vault_identities: HashSet<String>,
    admin_identities: HashSet<String>,
}

enum Role {
    Vault,
    Admin,
}

impl KeyServiceImpl {
    pub fn new(keyring: Keyring, access: &crate::config::Access) -> Self {
        Self {
            keyring: Arc::new(RwLock::new(keyring)),
            vault_identities: access.vault_identities.iter().cloned().collect(),
            admin_identities: access.admin_identities.iter().cloned().collect(),
        }
    }

    fn authorize<T>(&self, request: &Request<T>, role: Role) -> Result<String, Status> {
        let Some(identity) = runtime::tls::peer_identity(request) else {
            tracing::warn!("refused a call without a client certificate identity");
            return Err(Status::unauthenticated("a client certificate is required"));
        };
        let allowed = match role {
            Role::Vault => &self.vault_identities,
            Role::Admin => &self.admin_identities,
        };
        if allowed.contains(&identity) {
            Ok(identity)
        } else {
            tracing::warn!(caller = %identity, "permission denied");
            Err(Status::permission_denied(
                "this identity may not call this method",
            ))
        }
    }

    fn read_keyring(&self) -> Result<std::sync::RwLockReadGuard<'_, Keyring>, Status> {
        self.keyring
            .read()
            .map_err(|_| Status::internal("keyring lock poisoned"))
    }
}

fn purpose_to_wire(purpose: Purpose) -> pb::KeyPurpose {
    match purpose {
        Purpose::CardData => pb::KeyPurpose::CardData,
        Purpose::Fingerprint => pb::KeyPurpose::Fingerprint,
        Purpose::Cvc => pb::KeyPurpose::Cvc,
    }
}

fn state_to_wire(state: State) -> pb::KeyState {
    match state {
        State::Active => pb::KeyState::Active,
        State::DecryptOnly => pb::KeyState::DecryptOnly,
        State::Retired => pb::KeyState::Retired,
        State::Destroyed => pb::KeyState::Destroyed,
    }
}

#[tonic::async_trait]
impl pb::key_service_server::KeyService for KeyServiceImpl {
    async fn get_keys(
        &self,
        request: Request<pb::GetKeysRequest>,
    ) -> Result<Response<pb::GetKeysResponse>, Status> {
        let span = tracing::info_span!("rpc", method = "GetKeys", caller = tracing::field::Empty);
        async {
            let caller = self.authorize(&request, Role::Vault)?;
            tracing::Span::current().record("caller", caller.as_str());
            let keyring = self.read_keyring()?;
            let keys = keyring
                .versions()
                .iter()
                .filter(|v| matches!(v.state, State::Active | State::DecryptOnly))
                .filter_map(|v| {
                    Some(pb::KeyMaterial {
                        purpose: purpose_to_wire(v.purpose) as i32,
                        version: v.version,
                        state: state_to_wire(v.state) as i32,
                        material: v.material.as_ref()?.expose_secret().to_vec(),
                    })
                })
                .collect::<Vec<_>>();
            tracing::info!(versions = keys.len(), "served key versions");
            Ok(Response::new(pb::GetKeysResponse { keys }))
        }
        .instrument(span)
        .await
    }

    async fn list_key_versions(
        &self,
        request: Request<pb::ListKeyVersionsRequest>,
    ) -> Result<Response<pb::ListKeyVersionsResponse>, Status> {
        let span = tracing::info_span!(
            "rpc",
            method = "ListKeyVersions",
            caller = tracing::field::Empty
        );
        async {
            let caller = self.authorize(&request, Role::Admin)?;
            tracing::Span::current().record("caller", caller.as_str());
            let keyring = self.read_keyring()?;
            let versions = keyring
                .versions()
                .iter()
                .map(|v| pb::KeyVersionInfo {
                    purpose: purpose_to_wire(v.purpose) as i32,
                    version: v.version,
                    state: state_to_wire(v.state) as i32,
                    created_at_unix_ms: v.created_at_unix_ms,
                })
                .collect();
            Ok(Response::new(pb::ListKeyVersionsResponse { versions }))
        }
        .instrument(span)
        .await
    }
}
