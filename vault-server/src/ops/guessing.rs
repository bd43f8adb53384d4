//! The guessing detector (see `crate::guessing`) on the records' side: every card
//! number a call carries is counted before anything is looked up or stored; a flag is
//! made durable (store `meta`) and audited before the refusal is answered; flags are
//! listed and lifted with the lockout's blocks, and read again from the store (the
//! other vaults of a shared database raise and lift them too).

use std::time::{Duration, Instant};

use runtime::now_unix_ms;
use runtime::shutdown::Shutdown;

use super::records::Records;
use crate::audit::AuditEvent;
use crate::card::Pan;
use crate::error::VaultError;
use crate::guessing::{self, BucketId, FlagRow, Verdict};
use crate::policy::Caller;
use crate::record;
use crate::store::Store;

/// How often flags are read again from the store.
const REFRESH_EVERY: Duration = Duration::from_secs(5);

impl<S: Store> Records<S> {
    /// Counts the card `pan` the caller brought; refuses it if the caller is flagged
    /// in its bucket, or is flagged by it.
    pub(super) async fn watch_guessing(
        &self,
        caller: &Caller,
        pan: &Pan,
    ) -> Result<(), VaultError> {
        let fingerprint = {
            let keys = self.keys().snapshot();
            record::fingerprint(keys.fingerprint.active().1, &caller.tenant, pan)
        };
        self.watch_fingerprint(caller, pan, &fingerprint).await
    }

    /// [`Self::watch_guessing`] with the card's active-version fingerprint at hand.
    pub(super) async fn watch_fingerprint(
        &self,
        caller: &Caller,
        pan: &Pan,
        fingerprint: &[u8; 32],
    ) -> Result<(), VaultError> {
        let detector = self.guessing();
        let bucket = detector.bucket(&caller.tenant, pan);
        let limit = guessing::limit_for(
            detector.settings().max_cards_per_bucket,
            pan.expose_digits().len(),
        );
        match detector.observe(&caller.identity, bucket, fingerprint, limit, Instant::now()) {
            Verdict::Allowed => Ok(()),
            Verdict::Refused { flagged } => {
                for bucket in flagged.into_iter().flatten() {
                    self.flagged(caller, bucket);
                }
                Err(VaultError::Guessing)
            }
        }
    }

    /// Makes a new flag durable, then audits it: in a task of its own, which a caller
    /// that goes away cannot stop. A write that fails is made again by the refresh.
    fn flagged(&self, caller: &Caller, bucket: BucketId) {
        let settings = self.guessing().settings().clone();
        let raised = self
            .guessing()
            .raised_at(&caller.identity, &bucket)
            .unwrap_or_else(now_unix_ms);
        let (store, journal) = (std::sync::Arc::clone(self.store()), self.journal_handle());
        let (identity, tenant, request_id) = (
            caller.identity.clone(),
            caller.tenant.as_str().to_owned(),
            caller.request_id.clone(),
        );
        tokio::spawn(async move {
            let written = store
                .put_meta(
                    &guessing::flag_key(&identity, &bucket),
                    FlagRow::Raised(raised).encode(),
                )
                .await;
            if let Err(e) = written {
                tracing::error!(error = %e, "a guessing flag could not be stored; the refresh tries again");
            }
            journal.metrics().event("guessing_flag");
            let what = match bucket == guessing::ALL_BUCKETS {
                true => format!(
                    "flagged in every bucket: more than {} buckets flagged",
                    guessing::MAX_FLAGS_PER_IDENTITY
                ),
                false => format!(
                    "flagged: more than {} different cards with one first six and last four \
                     within {} s (bucket {})",
                    settings.max_cards_per_bucket,
                    settings.window_secs,
                    hex::encode(bucket)
                ),
            };
            tracing::warn!(%identity, %tenant, "card guessing suspected: {what}");
            let event = AuditEvent {
                at_unix_ms: now_unix_ms(),
                actor: identity.clone(),
                peer: "-".into(),
                action: "GuessingFlag".into(),
                tenant,
                outcome: "ok".into(),
                request_id,
                detail: format!(
                    "{identity} {what}; its calls with such cards are refused until an admin \
                     lifts it"
                ),
                ..AuditEvent::default()
            };
            if let Err(e) = journal.audit(event).await {
                tracing::error!(error = %e, "a guessing flag could not be audited");
            }
        });
    }

    /// Every flag in force, as `<identity> bucket <hex>` (or `bucket all`).
    pub fn guessing_flags(&self) -> Vec<String> {
        self.guessing()
            .flags()
            .iter()
            .map(|(identity, bucket)| guessing::flag_subject(identity, bucket))
            .collect()
    }

    /// Lifts a flag (`<identity> bucket <hex>`), durably, for every vault of the store.
    /// Returns false when there was none.
    pub async fn lift_guessing_flag(&self, subject: &str) -> Result<bool, VaultError> {
        let Some((identity, bucket)) = guessing::parse_flag_subject(subject) else {
            return Ok(false);
        };
        let key = guessing::flag_key(&identity, &bucket);
        let raised = matches!(
            self.store()
                .get_meta(&key)
                .await?
                .as_deref()
                .and_then(FlagRow::decode),
            Some(FlagRow::Raised(_))
        );
        let held = self.guessing().lift(&identity, &bucket);
        if !raised && !held {
            return Ok(false);
        }
        self.store()
            .put_meta(&key, FlagRow::Lifted(now_unix_ms()).encode())
            .await?;
        Ok(true)
    }

    /// Reads the flags from the store into the detector, and writes again those held
    /// here that the store does not show (see `Detector::merge_flags`).
    pub async fn load_guessing_flags(&self) -> Result<usize, VaultError> {
        let mut rows = Vec::new();
        for key in self.store().list_meta(guessing::FLAGS).await? {
            let Some(flag) = guessing::parse_flag_key(&key) else {
                continue;
            };
            let value = self
                .store()
                .get_meta(&format!("{}{key}", guessing::FLAGS))
                .await?;
            if let Some(row) = value.as_deref().and_then(FlagRow::decode) {
                rows.push((flag, row));
            }
        }
        for ((identity, bucket), raised) in self.guessing().merge_flags(&rows) {
            self.store()
                .put_meta(
                    &guessing::flag_key(&identity, &bucket),
                    FlagRow::Raised(raised).encode(),
                )
                .await?;
        }
        Ok(self.guessing().flags().len())
    }
}

/// Reads the flags again every few seconds until `shutdown`: the vaults of a shared
/// database raise and lift them too.
pub async fn refresh_flags<S: Store>(records: std::sync::Arc<Records<S>>, shutdown: Shutdown) {
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = tokio::time::sleep(REFRESH_EVERY) => {}
            _ = &mut stop => return,
        }
        if let Err(e) = records.load_guessing_flags().await {
            tracing::debug!(error = %e, "guessing flags not read again");
        }
    }
}
