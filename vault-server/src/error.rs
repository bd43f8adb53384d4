//! Every way a vault call can fail, and the one mapping to gRPC statuses. Client
//! mistakes get precise codes and static messages that never carry a value; internal
//! failures get a request id for the caller and the detail in the server log.

use tonic::{Code, Status};

use crate::card::Violation;
use crate::forward::ForwardError;
use crate::record::RecordError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("invalid {}: {} (rule: {})", .0.field, .0.description, .0.rule)]
    Invalid(Violation),
    #[error("cards: at most {max} cards per batch (rule: max_items)")]
    BatchTooLarge { max: usize },
    #[error("token not found")]
    NotFound,
    /// The token's retention ended: answered exactly like an unknown token, but not a
    /// caller's mistake (it does not count towards lockout).
    #[error("token not found")]
    Expired,
    /// The token was deleted (its tombstone is kept `tombstone_days`): answered exactly
    /// like an unknown token, but a caller that held it is not probing (it does not
    /// count towards lockout).
    #[error("token not found")]
    Deleted,
    #[error("a client certificate is required")]
    Unauthenticated,
    #[error("permission denied")]
    PermissionDenied,
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("card-data key version {0} is not available to this vault")]
    KeyUnavailable(u32),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("randomness failure: {0}")]
    Crypto(#[from] envelope::Error),
    /// No free opaque token after a few draws: with 128 random bits, a sign of a
    /// broken random number generator, not of a full vault.
    #[error("no free token after several draws")]
    TokenSpace,
    /// No free card-shaped token for the card after `attempts` draws: the tokens that
    /// keep its digits are (nearly) all taken. A real condition where the first six are
    /// kept (the space is small), so the caller is told.
    #[error(
        "no free card-shaped token for this card after {attempts} draws: the tokens that \
         keep its digits are nearly all taken; tokenize it with format \
         TOKEN_FORMAT_OPAQUE; nothing was stored"
    )]
    CardTokenSpace { attempts: usize },
    #[error(transparent)]
    Forward(crate::forward::ForwardError),
    #[error("the CVC of this token has expired or was already used")]
    CvcUnavailable,
    #[error("idempotency_key was already used for a different request")]
    IdempotencyConflict,
    #[error("a forward with this idempotency_key is in progress")]
    IdempotencyInFlight,
    #[error(
        "an earlier forward with this idempotency_key may have reached the processor but its \
         outcome is unknown; check with the processor before retrying with a new key"
    )]
    IdempotencyUnknown,
    #[error("this vault has no backup_dir configured")]
    BackupsDisabled,
    #[error("backup not found")]
    BackupNotFound,
    #[error(transparent)]
    Keys(#[from] crate::keys::KeysError),
    #[error(transparent)]
    Audit(crate::audit::AuditError),
    #[error("the policy file is invalid, the previous policy stays in force: {0}")]
    PolicyInvalid(String),
    #[error("no such block: the identity or address is not blocked")]
    NoSuchBlock,
    #[error("the audit checkpoint could not be read from the keyservice: {0}")]
    CheckpointUnavailable(String),
    #[error("the erasures could not be read from the keyservice: {0}")]
    Erasures(String),
    #[error(
        "refused: this identity brought too many different cards with the same first six \
         and last four digits; an admin must lift the flag (vaultctl blocks list)"
    )]
    Guessing,
    #[error("too many FindSubject calls from this identity; retry in a minute")]
    SubjectRateLimited,
    #[error(
        "refused: the vault holds as many CVCs as it may (for this tenant or in all); \
         send the card without its CVC, or retry later; nothing was stored"
    )]
    CvcStoreFull,
    #[error(
        "the audit log is missing entries {first}..={last}: card data is refused until two \
         admins acknowledge the gap (`vaultctl audit verify` says how)"
    )]
    AuditGap { first: u64, last: u64 },
    #[error("forward refused: too many forwards for this caller or card; retry later")]
    VelocityExceeded,
    #[error("{}", .0.message())]
    Sealed(crate::intake::Refusal),
    #[error(
        "sealed intake is unavailable: the keyservice holds no intake key (upgrade the \
         keyservice; it creates one at start)"
    )]
    NoIntakeKey,
    #[error("{0}")]
    Import(crate::ops::ImportError),
    #[error("{0}")]
    Export(crate::ops::ExportError),
}

impl VaultError {
    /// The status a caller sees. Logs what a human must look at, once, here.
    pub fn into_status(self, request_id: &str) -> Status {
        let internal =
            |code: Code, what: &str| Status::new(code, format!("{what} (request id {request_id})"));
        match self {
            VaultError::Invalid(_) | VaultError::BatchTooLarge { .. } => {
                tracing::info!(error = %self, "invalid argument");
                Status::invalid_argument(self.to_string())
            }
            VaultError::NotFound | VaultError::Expired | VaultError::Deleted => {
                Status::not_found("token not found")
            }
            VaultError::BackupNotFound => Status::not_found("backup not found"),
            VaultError::Unauthenticated => {
                tracing::warn!("refused: no client certificate identity");
                Status::unauthenticated("a client certificate is required")
            }
            VaultError::PermissionDenied => {
                tracing::warn!("refused: permission denied");
                Status::permission_denied("permission denied")
            }
            VaultError::Record(e) => {
                tracing::error!(error = %e, "stored record is corrupt or was tampered with");
                internal(
                    Code::DataLoss,
                    "the stored record failed its integrity check",
                )
            }
            VaultError::KeyUnavailable(version) => {
                tracing::error!(
                    version,
                    "record needs a card-data key version this vault does not hold"
                );
                internal(
                    Code::FailedPrecondition,
                    &format!(
                        "the record's card-data key version {version} is not available: it was \
                         retired or destroyed"
                    ),
                )
            }
            VaultError::Store(StoreError::Closed) => {
                Status::unavailable("the vault is shutting down")
            }
            VaultError::Store(StoreError::Reopening) => {
                Status::unavailable("the vault's storage is being reopened; retry")
            }
            VaultError::Store(e @ StoreError::Unavailable(_)) => {
                tracing::error!(error = %e, "storage unavailable");
                internal(
                    Code::Unavailable,
                    "the vault's database is unavailable; retry (no token was issued)",
                )
            }
            VaultError::Store(StoreError::Unsupported(why)) => {
                Status::failed_precondition(why.to_string())
            }
            VaultError::Store(e @ StoreError::NotWritable(_)) => {
                tracing::error!(error = %e, "storage not writable");
                internal(
                    Code::Unavailable,
                    "the vault's storage is not writable; nothing was stored",
                )
            }
            VaultError::Store(e @ StoreError::NoSpace(_)) => {
                tracing::error!(error = %e, "storage full");
                internal(
                    Code::ResourceExhausted,
                    "the vault's storage is full; nothing was stored",
                )
            }
            VaultError::Store(e) => {
                tracing::error!(error = %e, "storage failure");
                internal(Code::Internal, "internal error")
            }
            VaultError::Forward(ForwardError::Denied(why)) => {
                // The reason is for the log; the caller gets no help with probing.
                tracing::warn!(reason = why, "refused: forward not allowed");
                Status::permission_denied("permission denied")
            }
            VaultError::Forward(ForwardError::Unreachable { detail, .. }) => {
                tracing::warn!(%detail, "processor unreachable");
                Status::unavailable("the processor could not be reached")
            }
            VaultError::Forward(ForwardError::Timeout) => {
                tracing::warn!("processor timed out");
                Status::deadline_exceeded("the processor did not answer within its timeout")
            }
            VaultError::Forward(e @ ForwardError::TooLarge { .. }) => {
                tracing::warn!(error = %e, "processor response too large");
                Status::failed_precondition(e.to_string())
            }
            VaultError::Forward(e @ ForwardError::Unreadable { .. }) => {
                Status::failed_precondition(e.to_string())
            }
            VaultError::Forward(e @ ForwardError::BadHeader) => {
                Status::failed_precondition(e.to_string())
            }
            VaultError::CvcUnavailable
            | VaultError::IdempotencyConflict
            | VaultError::BackupsDisabled => Status::failed_precondition(self.to_string()),
            VaultError::IdempotencyInFlight | VaultError::IdempotencyUnknown => {
                Status::aborted(self.to_string())
            }
            VaultError::Keys(e) => {
                tracing::error!(error = %e, "no encryption key available");
                internal(
                    Code::Unavailable,
                    "no encryption key is available right now (keyservice unreachable and the \
                     leased encryption budget is used up); nothing was stored",
                )
            }
            VaultError::Audit(e) => {
                tracing::error!(error = %e, "call refused: its audit event could not be written");
                if matches!(
                    e,
                    crate::audit::AuditError::Store(crate::store::StoreError::NoSpace(_))
                ) {
                    return internal(
                        Code::ResourceExhausted,
                        "storage is full: the call's audit event could not be written, so the \
                         call was refused",
                    );
                }
                internal(
                    Code::Unavailable,
                    "the audit log could not be written, so the call was refused",
                )
            }
            VaultError::AuditGap { .. } => Status::failed_precondition(self.to_string()),
            VaultError::Guessing => Status::permission_denied(self.to_string()),
            VaultError::SubjectRateLimited | VaultError::CvcStoreFull => {
                Status::resource_exhausted(self.to_string())
            }
            VaultError::Erasures(_) => internal(
                Code::Unavailable,
                "the erasures could not be read from the keyservice; try again",
            ),
            VaultError::CheckpointUnavailable(_) => internal(
                Code::Unavailable,
                "the audit log's checkpoint could not be read from the keyservice; try again",
            ),
            VaultError::VelocityExceeded | VaultError::CardTokenSpace { .. } => {
                Status::resource_exhausted(self.to_string())
            }
            VaultError::Sealed(refusal) => sealed_refusal(refusal),
            VaultError::NoIntakeKey => {
                tracing::error!(error = %self, "sealed intake refused");
                Status::failed_precondition(self.to_string())
            }
            VaultError::PolicyInvalid(_) | VaultError::NoSuchBlock => {
                Status::failed_precondition(self.to_string())
            }
            VaultError::Crypto(_) | VaultError::TokenSpace => {
                tracing::error!(error = %self, "internal failure");
                internal(Code::Internal, "internal error")
            }
            VaultError::Import(e) => import_refusal(e, request_id),
            VaultError::Export(e) => export_refusal(e, request_id),
        }
    }
}

/// An export call's refusal; the keyservice's refusals (dual control) keep their code.
fn export_refusal(error: crate::ops::ExportError, request_id: &str) -> Status {
    use crate::ops::ExportError as E;
    let message = error.to_string();
    match error {
        E::Invalid { .. } => Status::invalid_argument(message),
        E::NoTarget(_) | E::NoJob(_) => Status::not_found(message),
        E::NotApproved(_) | E::Selection | E::Done(_) | E::NotConfigured => {
            Status::failed_precondition(message)
        }
        E::Keyservice(status) => {
            import_refusal(crate::ops::ImportError::Keyservice(status), request_id)
        }
        E::Refused(_) | E::Unreachable(_) => {
            tracing::error!(error = %message, "export not delivered");
            Status::unavailable(message)
        }
        E::Write(detail) => {
            tracing::error!(detail = %detail, "export file could not be written");
            Status::internal(format!("internal error (request id {request_id})"))
        }
    }
}

/// An import call's refusal. The texts name rules, job ids, row numbers and counts;
/// the keyservice's refusals (dual control) are passed on with their code.
fn import_refusal(error: crate::ops::ImportError, request_id: &str) -> Status {
    use crate::ops::ImportError as E;
    let message = error.to_string();
    match error {
        E::Invalid { .. } | E::TooLarge { .. } | E::Open(_) | E::File(_) | E::Crowded { .. } => {
            Status::invalid_argument(message)
        }
        E::NoJob(_) => Status::not_found(message),
        E::NotConfigured
        | E::NotApproved(_)
        | E::RowCount { .. }
        | E::NotVerified
        | E::FileDigest
        | E::SenderKey(_)
        | E::NoFileDigest(_)
        | E::Swept(_) => Status::failed_precondition(message),
        E::Audit(e) => e.into_status(request_id),
        E::Gap { .. } | E::Skips { .. } => Status::out_of_range(message),
        E::NoKey => Status::unavailable(message),
        E::Keyservice(status) => match status.code() {
            Code::PermissionDenied
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::AlreadyExists => Status::new(status.code(), status.message().to_owned()),
            code => {
                tracing::error!(code = ?code, "the keyservice failed an import job call");
                Status::unavailable(format!(
                    "the keyservice could not be reached for the import job; retry (request id \
                     {request_id})"
                ))
            }
        },
        E::Spool(e) => {
            tracing::error!(error = %e, "import spool failure");
            Status::internal(format!("internal error (request id {request_id})"))
        }
    }
}

/// A sealed card's refusal, with a `google.rpc.ErrorInfo` whose reason a caller can act
/// on (docs/sealed-intake.md). Never anything of the card.
fn sealed_refusal(refusal: crate::intake::Refusal) -> Status {
    use crate::intake::Refusal;
    use tonic_types::{ErrorDetails, StatusExt};
    let code = match refusal {
        Refusal::UnknownKey | Refusal::Expired => Code::FailedPrecondition,
        Refusal::Unopenable => Code::InvalidArgument,
        Refusal::Replayed => Code::AlreadyExists,
        Refusal::InFlight => Code::Aborted,
        Refusal::TokenDeleted => Code::NotFound,
    };
    tracing::info!(reason = refusal.reason(), "sealed card refused");
    Status::with_error_details(
        code,
        refusal.message(),
        ErrorDetails::with_error_info(
            refusal.reason(),
            "tokenvault.dev",
            std::collections::HashMap::<String, String>::new(),
        ),
    )
}
