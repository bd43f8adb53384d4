//! Admin operations a single admin may do: list the versions, rotate (also on a
//! schedule), retire, and read the history.

use vault_proto::keys::v1 as pb;

use super::wire::{purpose_from_wire, purpose_to_wire, state_to_wire};
use super::{Shared, lock, now_unix_ms};
use crate::error::ServiceError;
use crate::history::NewEvent;
use crate::keyring::{Keyring, Purpose};

/// How often a postponed scheduled rotation is logged at WARN.
const POSTPONED_WARNING_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

impl Shared {
    pub(super) fn version_info(
        &self,
        keyring: &Keyring,
        purpose: Purpose,
        version: u32,
    ) -> pb::KeyVersionInfo {
        let limit = if purpose.is_aead() {
            self.lifecycle.max_encryptions_per_version
        } else {
            0
        };
        let v = keyring.version(purpose, version).ok();
        pb::KeyVersionInfo {
            purpose: purpose_to_wire(purpose) as i32,
            version,
            state: v.map_or(pb::KeyState::Unspecified, |v| state_to_wire(v.state)) as i32,
            created_at_unix_ms: v.map_or(0, |v| v.created_at_unix_ms),
            encryptions_leased: v.map_or(0, |v| v.encryptions_leased),
            encryption_limit: limit,
            records: self.records_using(purpose, version),
        }
    }

    /// Rotates `purpose` (saved, recorded, announced). `reason` labels the metric:
    /// `manual` or `scheduled`.
    fn rotate(
        &self,
        purpose: Purpose,
        actor: &str,
        reason: &'static str,
        detail: String,
    ) -> Result<u32, ServiceError> {
        let floor = self.highest_reported(purpose);
        let version = self.mutate(|keyring| {
            keyring
                .rotate_above(purpose, floor, now_unix_ms())
                .map_err(|_| ServiceError::Random)
        })?;
        tracing::info!(purpose = purpose.name(), version, %detail, "rotated");
        self.metrics.rotated(purpose.name(), reason);
        self.announce();
        self.record(NewEvent {
            actor,
            action: "rotate",
            purpose: Some(purpose.name()),
            version,
            outcome: "ok".into(),
            detail,
        })?;
        Ok(version)
    }

    /// Rotates every purpose whose active version is older than `rotate_after_days`.
    pub(crate) fn rotate_due(&self) {
        self.rotate_due_at(now_unix_ms());
    }

    /// [`Shared::rotate_due`] as of `now_ms`. A rotation that is due waits until every
    /// configured vault identity has reported its usage (and so shown the keyring
    /// generation it has used: a keyring restored from a copy must be caught first);
    /// while it waits, each check counts in `scheduled_rotations_postponed` and one an
    /// hour logs a WARN naming the silent identity, so that a cryptoperiod overrun by a
    /// vault that never reports (decommissioned but still listed) is seen.
    pub(crate) fn rotate_due_at(&self, now_ms: i64) {
        let Some(days) = self.lifecycle.rotate_after_days else {
            return;
        };
        let max_age_ms = i64::from(days) * 24 * 60 * 60 * 1000;
        let due = lock(&self.keyring).due_for_rotation(now_ms, max_age_ms);
        if due.is_empty() {
            return;
        }
        if let Some(silent) = self.silent_vault() {
            self.metrics.scheduled_rotations_postponed.inc();
            let mut warned = lock(&self.postponed_warned_at);
            if warned.is_none_or(|at| at.elapsed() >= POSTPONED_WARNING_EVERY) {
                *warned = Some(std::time::Instant::now());
                let purposes: Vec<&str> = due.iter().map(|p| p.name()).collect();
                tracing::warn!(
                    %silent,
                    ?purposes,
                    rotate_after_days = days,
                    "scheduled rotation is due but postponed: a configured vault identity has \
                     not reported its key usage since the keyservice started (remove it from \
                     [access] vault_identities if it is gone); logged once an hour"
                );
            }
            return;
        }
        for purpose in due {
            let detail = format!("scheduled: rotate_after_days = {days}");
            if let Err(error) = self.rotate(purpose, "keyservice", "scheduled", detail) {
                tracing::error!(purpose = purpose.name(), error = %error, "scheduled rotation failed");
            }
        }
    }
}

pub(super) fn list_key_versions(shared: &Shared) -> pb::ListKeyVersionsResponse {
    let keyring = lock(&shared.keyring);
    let versions = keyring
        .versions()
        .iter()
        .map(|v| shared.version_info(&keyring, v.purpose, v.version))
        .collect();
    let reporters = lock(&shared.usage)
        .iter()
        .map(|((identity, instance), report)| pb::UsageReporter {
            identity: identity.clone(),
            reported_at_unix_ms: report.at_unix_ms,
            instance: instance.clone(),
        })
        .collect();
    pb::ListKeyVersionsResponse {
        versions,
        reporters,
    }
}

pub(super) fn rotate_key(
    shared: &Shared,
    caller: &str,
    request: &pb::RotateKeyRequest,
) -> Result<pb::RotateKeyResponse, ServiceError> {
    let purpose = purpose_from_wire(request.purpose)?;
    let version = shared.rotate(purpose, caller, "manual", "manual".into())?;
    let keyring = lock(&shared.keyring);
    Ok(pb::RotateKeyResponse {
        created: Some(shared.version_info(&keyring, purpose, version)),
    })
}

/// One admin alone cannot retire (a retirement breaks every token on the version, and
/// for the audit key the log's verification): refused, and the refusal recorded.
pub(super) fn retire_key(
    shared: &Shared,
    caller: &str,
    request: &pb::RetireKeyRequest,
) -> Result<pb::RetireKeyResponse, ServiceError> {
    let purpose = purpose_from_wire(request.purpose)?;
    let event = NewEvent {
        actor: caller,
        action: "retire",
        purpose: Some(purpose.name()),
        version: request.version,
        ..Default::default()
    };
    Err(shared.refused(event, crate::lifecycle::Refusal::DualControl))
}

pub(super) fn key_history(
    shared: &Shared,
    request: &pb::KeyHistoryRequest,
) -> Result<pb::KeyHistoryResponse, ServiceError> {
    let events = shared
        .history
        .read(request.limit as usize)
        .map_err(ServiceError::HistoryRead)?
        .into_iter()
        .map(|e| pb::KeyEvent {
            sequence: e.sequence,
            at_unix_ms: e.at_unix_ms,
            purpose: Purpose::ALL
                .into_iter()
                .find(|p| Some(p.name()) == e.purpose.as_deref())
                .map_or(pb::KeyPurpose::Unspecified, purpose_to_wire) as i32,
            actor: e.actor,
            action: e.action,
            version: e.version,
            outcome: e.outcome,
            detail: e.detail,
        })
        .collect();
    let chain = if request.verify {
        let found = shared.history.verify().map_err(ServiceError::HistoryRead)?;
        if let Some(sequence) = found.broken_at {
            tracing::error!(
                sequence,
                "the key history's chain is broken: a line was edited, removed, inserted or reordered"
            );
        }
        Some(pb::HistoryChain {
            events: found.events,
            unchained: found.unchained,
            intact: found.broken_at.is_none(),
            broken_at_sequence: found.broken_at.unwrap_or(0),
        })
    } else {
        None
    };
    Ok(pb::KeyHistoryResponse { events, chain })
}
