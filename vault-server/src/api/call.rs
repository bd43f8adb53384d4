//! The envelope of every call: a request id and a span; the lockout check and the
//! authorization; the handler; the call's audit event (written before the answer, and
//! by a guard if the caller goes away mid-call); RPC metrics; the request id in the
//! response or error metadata. A caller refused for being unlisted or blocked gets no
//! audit event of its own: it is counted, and summed up periodically (`refusals`).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use runtime::admin::code_name;
use runtime::grpc::REQUEST_ID_HEADER;
use runtime::now_unix_ms;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::audited::Audited;
use crate::audit::{AuditEvent, Auditor, CallEvent, Gaps};
use crate::error::VaultError;
use crate::lockout::{Failure, Lockout, Tripped};
use crate::ops::Journal;
use crate::policy::{Caller, Denied, Permission, SharedPolicy};
use crate::refusals::{Reason, Refusals};

/// Who may call, and what is recorded of each call.
#[derive(Debug)]
pub struct Guards {
    pub policy: Arc<SharedPolicy>,
    pub lockout: Arc<Lockout>,
    /// Calls refused for being unlisted or blocked, counted instead of audited.
    pub refusals: Arc<Refusals>,
    pub journal: Arc<Journal>,
    /// While the audit log has a gap nobody acknowledged, card data is refused.
    pub gaps: Arc<Gaps>,
}

/// The calls whose event the one durable write that finishes them carries (see
/// `Auditor::riding`): each ends with that write, and its event reads the same
/// whichever writes it. Any other call's event is written after its handler, even if
/// the handler tokenizes or deletes as one step of more (an import's batch, a subject's
/// erasure), whose writes must not carry it.
const RIDING: &[&str] = &["Tokenize", "TokenizeBatch", "TokenizeSealed", "DeleteToken"];

/// Whether a call touches card data: every call but reading and verifying the audit
/// log and operating the vault, except the operations that open or copy the records
/// (a rewrap decrypts them all, a backup copies them).
fn touches_card_data(method: &str, permission: &Permission) -> bool {
    !matches!(permission, Permission::Audit | Permission::Admin)
        || matches!(method, "StartRewrap" | "CreateBackup" | "VerifyBackup")
}

/// Records a call whose future was dropped (the caller cancelled or its deadline
/// passed) before its audit event was written.
struct CancelGuard {
    auditor: Option<Auditor>,
    /// The call's event, once authorized; taken when the call's event is written.
    call_event: Option<Arc<CallEvent>>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let (Some(auditor), Some(call_event)) = (self.auditor.take(), self.call_event.take())
        else {
            return;
        };
        // The write that finished the call carried its event: the call happened.
        if call_event.written() {
            return;
        }
        let event = call_event.cancelled();
        let record = async move {
            if let Err(e) = auditor.record(event).await {
                tracing::error!(error = %e, "a cancelled call could not be audited");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(record)),
            Err(_) => tracing::error!("a call cancelled at shutdown could not be audited"),
        }
    }
}

impl Guards {
    /// Runs one RPC: `handler` gets the authorized caller and the request.
    pub async fn call<Req, Resp, Fut>(
        &self,
        method: &'static str,
        permission: impl FnOnce(&Req) -> Permission,
        request: Request<Req>,
        handler: impl FnOnce(Caller, Req) -> Fut,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Audited,
        Resp: Audited,
        Fut: Future<Output = Result<Resp, VaultError>>,
    {
        let request_id = new_request_id();
        let identity = runtime::accept::peer_identity(&request).map(str::to_owned);
        let peer = runtime::accept::peer_addr(&request)
            .map_or_else(|| "-".to_owned(), |addr| addr.ip().to_string());
        let span = tracing::info_span!(
            "rpc",
            method,
            request_id = %request_id,
            caller = identity.as_deref().unwrap_or("-"),
        );
        async move {
            let started = Instant::now();
            let mut event = AuditEvent {
                at_unix_ms: now_unix_ms(),
                actor: identity.clone().unwrap_or_else(|| "-".into()),
                peer: peer.clone(),
                action: method.into(),
                request_id: request_id.clone(),
                ..AuditEvent::default()
            };
            // What the request names goes into the event only if the call succeeds.
            let mut described = AuditEvent::default();
            request.get_ref().describe(&mut described);
            let permission = permission(request.get_ref());
            let policy = self.policy.current();
            // If the caller goes away mid-call (the future is dropped), the guard
            // still records the call.
            let mut guard = CancelGuard {
                auditor: self.journal.auditor(),
                call_event: None,
            };
            let blocked = self.lockout.is_blocked(
                identity.as_deref(),
                &peer,
                || {
                    policy
                        .authorize(identity.as_deref(), &Permission::Admin)
                        .is_ok()
                },
                started,
            );
            let (authorized, refused_as) = if blocked {
                tracing::debug!("refused: caller blocked after repeated failures");
                (Err(VaultError::PermissionDenied), Some(Reason::Blocked))
            } else {
                match policy.authorize(identity.as_deref(), &permission) {
                    Ok(caller) => (Ok(caller), None),
                    Err(Denied::Unauthenticated) => {
                        (Err(VaultError::Unauthenticated), Some(Reason::Unlisted))
                    }
                    Err(Denied::Unlisted) => {
                        (Err(VaultError::PermissionDenied), Some(Reason::Unlisted))
                    }
                    Err(Denied::PermissionDenied) => (Err(VaultError::PermissionDenied), None),
                }
            };
            let gap = self
                .gaps
                .unacknowledged()
                .filter(|_| touches_card_data(method, &permission));
            let authorized = match (authorized, gap) {
                (Ok(_), Some((first, last))) => Err(VaultError::AuditGap { first, last }),
                (authorized, _) => authorized,
            };
            let result = match authorized {
                Ok(mut caller) => {
                    event.tenant = caller.tenant.as_str().to_owned();
                    caller.request_id = request_id.clone();
                    // The event as it reads if the call succeeds, for the write that
                    // finishes the call to carry (one commit for data and event).
                    let mut succeeded = AuditEvent {
                        outcome: "ok".into(),
                        ..event.clone()
                    };
                    described.clone().merge_into(&mut succeeded);
                    let call_event = Arc::new(CallEvent::new(succeeded));
                    guard.call_event = Some(Arc::clone(&call_event));
                    if RIDING.contains(&method) {
                        caller.event = Some(call_event);
                    }
                    handler(caller, request.into_inner()).await
                }
                Err(refused) => {
                    // A refused caller's card goes no further, and is not left in memory.
                    request.into_inner().erase_card_data();
                    Err(refused)
                }
            };
            let elapsed = started.elapsed();
            // A deleted or expired token is not unknown: looking one up is not probing.
            let failure = match &result {
                Err(VaultError::PermissionDenied | VaultError::Unauthenticated) => {
                    Some(Failure::Denied)
                }
                Err(VaultError::NotFound) => Some(Failure::UnknownToken),
                _ => None,
            };
            let result = result.map_err(|error| error.into_status(&request_id));
            match &result {
                Ok(body) => {
                    event.outcome = "ok".into();
                    described.merge_into(&mut event);
                    body.describe(&mut event);
                }
                Err(status) => {
                    event.outcome = code_name(status.code()).into();
                    // A blocked caller's refusals do not extend its block.
                    if let Some(failure) = failure.filter(|_| !blocked) {
                        self.count_failure(
                            identity.as_deref(),
                            &peer,
                            failure,
                            &request_id,
                            started,
                        )
                        .await;
                    }
                }
            }
            let code = result
                .as_ref()
                .map_or_else(|status| status.code(), |_| tonic::Code::Ok);
            self.journal.metrics().rpc.call(method, code, elapsed);
            let audited = match refused_as {
                Some(reason) => {
                    self.journal.metrics().event(match reason {
                        Reason::Unlisted => "refused_unlisted",
                        Reason::Blocked => "refused_blocked",
                    });
                    self.refusals
                        .count(reason, &event.actor, &peer, event.at_unix_ms);
                    Ok(())
                }
                // A write of the call carried its event already.
                None if result.is_ok()
                    && guard.call_event.as_ref().is_some_and(|e| e.written()) =>
                {
                    Ok(())
                }
                None => self.journal.audit(event).await,
            };
            guard.call_event = None;
            let result = match (audited, result) {
                (Ok(()), result) => result,
                // No unaudited access: the answer is withheld.
                (Err(refused), _) => Err(refused.into_status(&request_id)),
            };
            let request_id_value = MetadataValue::try_from(request_id.as_str()).ok();
            match result {
                Ok(body) => {
                    tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "ok");
                    let mut response = Response::new(body);
                    if let Some(value) = request_id_value {
                        response.metadata_mut().insert(REQUEST_ID_HEADER, value);
                    }
                    Ok(response)
                }
                Err(mut status) => {
                    if let Some(value) = request_id_value {
                        status.metadata_mut().insert(REQUEST_ID_HEADER, value);
                    }
                    Err(status)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Counts a failed call against the caller; audits the blocks (and alert-only
    /// flags) it causes.
    async fn count_failure(
        &self,
        identity: Option<&str>,
        peer: &str,
        failure: Failure,
        request_id: &str,
        now: Instant,
    ) {
        for tripped in self.lockout.failure(identity, peer, failure, now) {
            let Tripped {
                kind,
                subject,
                failure,
                blocked,
            } = tripped;
            let what = match failure {
                Failure::Denied => "permission denials",
                Failure::UnknownToken => "unknown tokens",
            };
            let (action, detail) = if blocked {
                self.journal.metrics().event("lockout");
                tracing::warn!(kind = kind.name(), %subject, what, "blocked after repeated failures");
                (
                    "Lockout",
                    format!("{} {subject} blocked after repeated {what}", kind.name()),
                )
            } else {
                self.journal.metrics().event("lockout_alert");
                tracing::warn!(kind = kind.name(), %subject, what, "alert-only caller reached a lockout threshold; not blocked");
                (
                    "LockoutAlert",
                    format!(
                        "{} {subject} flagged after repeated {what} (alert only, not blocked)",
                        kind.name()
                    ),
                )
            };
            let event = AuditEvent {
                at_unix_ms: now_unix_ms(),
                actor: identity.unwrap_or("-").to_owned(),
                peer: peer.to_owned(),
                action: action.into(),
                outcome: "ok".into(),
                request_id: request_id.to_owned(),
                detail,
                ..AuditEvent::default()
            };
            if let Err(e) = self.journal.audit(event).await {
                tracing::error!(error = %e, "lockout not audited");
            }
        }
    }
}

fn new_request_id() -> String {
    let mut bytes = [0u8; 8];
    // A request id is for correlation only; an all-zero id on RNG failure is harmless.
    let _ = envelope::fill_unique(&mut bytes);
    hex::encode(bytes)
}
