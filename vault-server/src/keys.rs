//! The vault's data keys: fetched from the keyservice at start-up, held in memory
//! only (zeroized on drop), never written anywhere. There is no local fallback key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envelope::SecretKey;
use runtime::shutdown::Shutdown;
use tonic::Code;
use vault_proto::keys::v1 as pb;

use crate::config::KeyserviceSettings;

/// The versions of one key purpose that the vault may use, and which one encrypts.
#[derive(Debug)]
pub struct Versions {
    active: u32,
    keys: BTreeMap<u32, Arc<SecretKey>>,
}

impl Versions {
    /// The active version: the one new records use.
    pub fn active(&self) -> (u32, &Arc<SecretKey>) {
        // `from_wire` guarantees the active version is present.
        let key = &self.keys[&self.active];
        (self.active, key)
    }

    pub fn get(&self, version: u32) -> Option<&Arc<SecretKey>> {
        self.keys.get(&version)
    }
}

/// Every key the vault holds.
#[derive(Debug)]
pub struct KeySet {
    pub card_data: Versions,
    pub fingerprint: Versions,
    /// Seals CVCs held in memory (`cvc.rs`).
    pub cvc: Versions,
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error(
        "the keyservice refused this vault's identity ({0}); check its access.vault_identities"
    )]
    Refused(String),
    #[error("the keyservice answered with an unusable keyring: {0}")]
    Unusable(&'static str),
    #[error("shutdown requested before the keys were fetched")]
    ShutDown,
    #[error("invalid keyservice endpoint: {0}")]
    Endpoint(String),
}

impl KeySet {
    pub fn from_wire(response: pb::GetKeysResponse) -> Result<Self, KeysError> {
        let mut card_data = BTreeMap::new();
        let mut fingerprint = BTreeMap::new();
        let mut cvc = BTreeMap::new();
        let mut card_active = None;
        let mut fingerprint_active = None;
        let mut cvc_active = None;
        for mut key in response.keys {
            // Into a zeroizing buffer first, so that no path below drops it in the clear.
            let material = zeroize::Zeroizing::new(std::mem::take(&mut key.material));
            let purpose = pb::KeyPurpose::try_from(key.purpose).ok();
            let (map, active) = match purpose {
                Some(pb::KeyPurpose::CardData) => (&mut card_data, &mut card_active),
                Some(pb::KeyPurpose::Fingerprint) => (&mut fingerprint, &mut fingerprint_active),
                Some(pb::KeyPurpose::Cvc) => (&mut cvc, &mut cvc_active),
                // Purposes this build does not know are not used.
                _ => continue,
            };
            let secret = SecretKey::from_slice(&material)
                .map_err(|_| KeysError::Unusable("a key is not 32 bytes"))?;
            if key.state == pb::KeyState::Active as i32 {
                if active.replace(key.version).is_some() {
                    return Err(KeysError::Unusable("two active versions of one purpose"));
                }
            } else if key.state != pb::KeyState::DecryptOnly as i32 {
                continue;
            }
            map.insert(key.version, Arc::new(secret));
        }
        Ok(Self {
            card_data: Versions {
                active: card_active.ok_or(KeysError::Unusable("no active card-data key"))?,
                keys: card_data,
            },
            fingerprint: Versions {
                active: fingerprint_active
                    .ok_or(KeysError::Unusable("no active fingerprint key"))?,
                keys: fingerprint,
            },
            cvc: Versions {
                active: cvc_active.ok_or(KeysError::Unusable("no active cvc key"))?,
                keys: cvc,
            },
        })
    }
}

/// Fetches the keys, retrying with exponential backoff while the keyservice is
/// unreachable or unavailable. A refusal of our identity is final.
pub async fn fetch_with_retry(
    settings: &KeyserviceSettings,
    tls: tonic::transport::ClientTlsConfig,
    shutdown: Shutdown,
) -> Result<KeySet, KeysError> {
    let endpoint = tonic::transport::Endpoint::from_shared(settings.endpoint.clone())
        .map_err(|e| KeysError::Endpoint(e.to_string()))?
        .connect_timeout(settings.connect_timeout())
        .timeout(settings.connect_timeout())
        .tls_config(tls)
        .map_err(|e| KeysError::Endpoint(e.to_string()))?;
    let mut backoff = Duration::from_millis(200);
    let mut attempt = 1u32;
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        match fetch_once(&endpoint).await {
            Ok(response) => {
                let keys = KeySet::from_wire(response)?;
                tracing::info!(
                    card_data_version = keys.card_data.active().0,
                    fingerprint_version = keys.fingerprint.active().0,
                    "fetched keys from the keyservice"
                );
                return Ok(keys);
            }
            Err(Retry::No(refused)) => return Err(refused),
            Err(Retry::Yes(reason)) => {
                tracing::warn!(
                    endpoint = %settings.endpoint,
                    attempt,
                    retry_in_ms = backoff.as_millis() as u64,
                    %reason,
                    "keyservice unreachable; not serving until keys are fetched"
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut stop => return Err(KeysError::ShutDown),
        }
        backoff = (backoff * 2).min(settings.max_retry_backoff());
        attempt += 1;
    }
}

enum Retry {
    Yes(String),
    No(KeysError),
}

async fn fetch_once(endpoint: &tonic::transport::Endpoint) -> Result<pb::GetKeysResponse, Retry> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Retry::Yes(format!("cannot connect: {}", runtime::error_chain(&e))))?;
    pb::key_service_client::KeyServiceClient::new(channel)
        .get_keys(pb::GetKeysRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| match status.code() {
            Code::PermissionDenied | Code::Unauthenticated => {
                Retry::No(KeysError::Refused(status.message().to_owned()))
            }
            code => Retry::Yes(format!("keyservice answered {code:?}")),
        })
}
