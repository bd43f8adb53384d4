//! What every call goes through, in order: a request id and a span, authorization by
//! role, the handler, the metrics, and the one mapping of its error to a status. The
//! request id goes back in `x-request-id` metadata, as vault-server does.

use std::time::Instant;

use runtime::grpc::REQUEST_ID_HEADER;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use super::KeyServiceImpl;
use crate::error::ServiceError;

#[derive(Debug, Clone, Copy)]
pub(super) enum Role {
    /// Vault identities: key material and budgets.
    Vault,
    /// Admin identities: metadata and lifecycle operations.
    Admin,
}

impl KeyServiceImpl {
    /// Runs one unary call. Handlers are synchronous: they hold the keyring's mutex
    /// and do short, synced file writes.
    pub(super) fn call<Req, Resp>(
        &self,
        method: &'static str,
        role: Role,
        request: Request<Req>,
        handler: impl FnOnce(String, Req) -> Result<Resp, ServiceError>,
    ) -> Result<Response<Resp>, Status> {
        let request_id = new_request_id();
        span(method, &request_id).in_scope(|| {
            let started = Instant::now();
            let result = self
                .authorize(&request, role)
                .and_then(|caller| handler(caller, request.into_inner()))
                .map_err(|error| error.into_status(&request_id));
            self.count(method, &result, started);
            with_request_id(result.map(Response::new), &request_id)
        })
    }

    /// Opens a stream for an authorized caller. Counted when it opens (or is refused);
    /// it then lasts for hours.
    pub(super) fn open_stream<Req, S>(
        &self,
        method: &'static str,
        role: Role,
        request: &Request<Req>,
        open: impl FnOnce() -> Result<S, ServiceError>,
    ) -> Result<Response<S>, Status> {
        let request_id = new_request_id();
        span(method, &request_id).in_scope(|| {
            let started = Instant::now();
            let result = self
                .authorize(request, role)
                .and_then(|_| open())
                .map_err(|error| error.into_status(&request_id));
            self.count(method, &result, started);
            with_request_id(result.map(Response::new), &request_id)
        })
    }

    /// The caller's identity, if its certificate names one that `role` allows.
    fn authorize<T>(&self, request: &Request<T>, role: Role) -> Result<String, ServiceError> {
        let Some(identity) = runtime::accept::peer_identity(request).map(str::to_owned) else {
            tracing::warn!("refused a call without a client certificate identity");
            return Err(ServiceError::Unauthenticated);
        };
        let allowed = match role {
            Role::Vault => &self.vault_identities,
            Role::Admin => &self.admin_identities,
        };
        if allowed.contains(&identity) {
            tracing::Span::current().record("caller", identity.as_str());
            Ok(identity)
        } else {
            tracing::warn!(caller = %identity, "permission denied");
            Err(ServiceError::PermissionDenied)
        }
    }

    fn count<T>(&self, method: &'static str, result: &Result<T, Status>, started: Instant) {
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.shared.metrics.call(method, code, started.elapsed());
    }
}

fn span(method: &'static str, request_id: &str) -> tracing::Span {
    tracing::info_span!("rpc", method, request_id, caller = tracing::field::Empty)
}

fn new_request_id() -> String {
    let mut bytes = [0u8; 8];
    // A request id is for correlation only; an all-zero id on RNG failure is harmless.
    let _ = envelope::fill_random(&mut bytes);
    hex::encode(bytes)
}

fn with_request_id<T>(
    result: Result<Response<T>, Status>,
    request_id: &str,
) -> Result<Response<T>, Status> {
    let Ok(value) = MetadataValue::try_from(request_id) else {
        return result;
    };
    match result {
        Ok(mut response) => {
            response.metadata_mut().insert(REQUEST_ID_HEADER, value);
            Ok(response)
        }
        Err(mut status) => {
            status.metadata_mut().insert(REQUEST_ID_HEADER, value);
            Err(status)
        }
    }
}
