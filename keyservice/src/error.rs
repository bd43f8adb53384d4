//! Every way a keyservice call can fail, and the one mapping to gRPC statuses.
//!
//! Caller mistakes get precise codes and messages that name the field or the rule
//! (never key material). Internal failures get a short static message and the call's
//! request id; their detail (an I/O or keyring error's text) goes to the server log,
//! once, here, and never to the caller.

use tonic::{Code, Status};

use crate::keyring::KeyringError;
use crate::lifecycle::{LeaseError, Refusal};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ServiceError {
    // Caller mistakes.
    #[error("invalid {field}: {rule}")]
    InvalidArgument {
        field: &'static str,
        rule: &'static str,
    },
    #[error("a client certificate is required")]
    Unauthenticated,
    #[error("this identity may not call this method")]
    PermissionDenied,
    /// A lifecycle rule refused the operation (not found, dual control, wrong state...).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The root key file an admin named cannot be used.
    #[error("cannot use the new root key: {0}")]
    NewRootKey(KeyringError),

    // Internal failures: the detail is for the log only.
    #[error("the keyring could not be sealed: {0}")]
    Seal(KeyringError),
    #[error("the keyring could not be saved (the change was undone): {0}")]
    Save(KeyringError),
    #[error("the root key change failed (nothing was changed): {0}")]
    RootKeyChange(KeyringError),
    /// The operation was carried out but its history event could not be written.
    #[error("the key history could not be written after the operation: {0}")]
    HistoryAfter(std::io::Error),
    /// An irreversible operation was not carried out: its intent could not be recorded.
    #[error("the key history could not be written, so the operation was not done: {0}")]
    HistoryBefore(std::io::Error),
    #[error("the key history could not be read: {0}")]
    HistoryRead(std::io::Error),
    #[error("the audit checkpoint could not be saved: {0}")]
    Checkpoint(std::io::Error),
    #[error("the erasures could not be saved: {0}")]
    Erasures(std::io::Error),
    #[error("the system random number generator failed")]
    Random,
    /// State that the code's invariants rule out.
    #[error("inconsistent keyring: {0}")]
    Inconsistent(&'static str),
}

impl From<LeaseError> for ServiceError {
    fn from(error: LeaseError) -> Self {
        match error {
            LeaseError::Refused(refusal) => ServiceError::Refused(refusal),
            LeaseError::Random => ServiceError::Random,
        }
    }
}

impl ServiceError {
    /// The status a caller sees, with `request_id` in the message of internal
    /// failures. Logs what a human must look at, once, here. (A method rather than
    /// `From`, as in vault-server, because the request id is the call's.)
    pub(crate) fn into_status(self, request_id: &str) -> Status {
        let internal = |code: Code, what: &str| {
            tracing::error!(request_id, error = %self, "{what}");
            Status::new(code, format!("{what} (request id {request_id})"))
        };
        match &self {
            ServiceError::InvalidArgument { .. } => Status::invalid_argument(self.to_string()),
            ServiceError::Unauthenticated => Status::unauthenticated(self.to_string()),
            ServiceError::PermissionDenied => Status::permission_denied(self.to_string()),
            ServiceError::Refused(refusal) => refused(refusal),
            ServiceError::NewRootKey(error) => new_root_key(error, request_id),
            ServiceError::Checkpoint(_) => {
                internal(Code::Unavailable, "the audit checkpoint could not be saved")
            }
            ServiceError::Erasures(_) => {
                internal(Code::Unavailable, "the erasures could not be saved")
            }
            ServiceError::Seal(_) => internal(Code::Internal, "the keyring could not be sealed"),
            ServiceError::Save(_) => internal(
                Code::Unavailable,
                "the keyring could not be saved; nothing was changed",
            ),
            ServiceError::RootKeyChange(_) => internal(
                Code::Unavailable,
                "the root key change failed; nothing was changed",
            ),
            ServiceError::HistoryAfter(_) => internal(
                Code::Internal,
                "the operation was done but the key history could not be written",
            ),
            ServiceError::HistoryBefore(_) => internal(
                Code::Internal,
                "the key history could not be written, so nothing was done",
            ),
            ServiceError::HistoryRead(_) => {
                internal(Code::Internal, "the key history could not be read")
            }
            ServiceError::Random => internal(Code::Internal, "internal error"),
            ServiceError::Inconsistent(_) => internal(Code::Internal, "internal error"),
        }
    }
}

/// A refusal's text names the rule, the purpose and version, or a vault identity; it
/// is what the admin needs and holds no key material.
fn refused(refusal: &Refusal) -> Status {
    let message = refusal.to_string();
    match refusal {
        Refusal::NoSuchVersion { .. } | Refusal::NoSuchProposal(_) | Refusal::NoSuchGap(_) => {
            Status::not_found(message)
        }
        Refusal::SelfApproval | Refusal::TenantJob(_) => Status::permission_denied(message),
        Refusal::NotThisJob(_) => Status::not_found(message),
        Refusal::NotAead(_) => Status::invalid_argument(message),
        Refusal::WrongState { .. }
        | Refusal::AlreadyApproved(_)
        | Refusal::Expired(_)
        | Refusal::InUse { .. }
        | Refusal::UsageUnknown(_)
        | Refusal::Duplicate { .. }
        | Refusal::DualControl
        | Refusal::Restored { .. }
        | Refusal::NotRestored
        | Refusal::JobNotApproved(_)
        | Refusal::ClaimExpired(_)
        | Refusal::ClaimedElsewhere { .. }
        | Refusal::AlreadyUsed(_)
        | Refusal::NoFileDigest(_)
        | Refusal::NotClaimed(_) => Status::failed_precondition(message),
    }
}

/// The rule a root key file broke is the admin's to know; why the file could not be
/// read (an I/O error's text, with paths) stays in the log.
fn new_root_key(error: &KeyringError, request_id: &str) -> Status {
    let rule = match error {
        KeyringError::RootKeyFormat => {
            "new_root_key_file must hold exactly 64 hex characters (a 256-bit key)"
        }
        KeyringError::RootKeyFile(runtime::secret_file::SecretFileError::Permissions {
            ..
        }) => "new_root_key_file must be readable by its owner only (mode 0600)",
        _ => {
            tracing::warn!(request_id, error = %error, "cannot read the new root key file");
            return Status::failed_precondition(format!(
                "cannot use the new root key: new_root_key_file cannot be read; the keyservice \
                 log has the reason (request id {request_id})"
            ));
        }
    };
    Status::failed_precondition(format!("cannot use the new root key: {rule}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARKER: &str = "secret-marker-7f3a";

    fn io_error() -> std::io::Error {
        std::io::Error::other(format!("/var/lib/keyservice/{MARKER}: disk on fire"))
    }

    #[test]
    fn internal_failures_send_no_detail_only_the_request_id() {
        let keyring_io = || KeyringError::Io {
            path: format!("/var/lib/{MARKER}"),
            source: io_error(),
        };
        for (error, code) in [
            (ServiceError::HistoryRead(io_error()), Code::Internal),
            (ServiceError::HistoryAfter(io_error()), Code::Internal),
            (ServiceError::HistoryBefore(io_error()), Code::Internal),
            (ServiceError::Seal(keyring_io()), Code::Internal),
            (ServiceError::Save(keyring_io()), Code::Unavailable),
            (ServiceError::RootKeyChange(keyring_io()), Code::Unavailable),
            (
                ServiceError::NewRootKey(keyring_io()),
                Code::FailedPrecondition,
            ),
        ] {
            assert!(
                error.to_string().contains(MARKER),
                "the log gets the detail"
            );
            let status = error.into_status("0123abcd");
            assert_eq!(status.code(), code, "{status:?}");
            assert!(!status.message().contains(MARKER), "{status:?}");
            assert!(!status.message().contains("disk on fire"), "{status:?}");
            assert!(
                status.message().contains("request id 0123abcd"),
                "{status:?}"
            );
        }
        let status = ServiceError::HistoryRead(io_error()).into_status("0123abcd");
        assert_eq!(status.code(), Code::Internal);
    }

    #[test]
    fn caller_mistakes_keep_their_code_and_name_the_field() {
        let status = ServiceError::InvalidArgument {
            field: "purpose",
            rule: "must be card-data, fingerprint, cvc or audit",
        }
        .into_status("0123abcd");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "invalid purpose: must be card-data, fingerprint, cvc or audit"
        );

        let status = ServiceError::from(Refusal::SelfApproval).into_status("0123abcd");
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(status.message().contains("dual control"), "{status:?}");
        let status = ServiceError::from(Refusal::NoSuchProposal("p-1".into())).into_status("x");
        assert_eq!(status.code(), Code::NotFound);
        let status = ServiceError::from(Refusal::Expired("p-1".into())).into_status("x");
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("expired"), "{status:?}");
    }
}
