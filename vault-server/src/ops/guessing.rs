//! The guessing detector (see `crate::guessing`) on the records' side: every card
//! number a call carries is counted before anything is looked up or stored; a flag is
//! made durable (store `meta`) and audited before the refusal is answered; flags are
//! listed and lifted with the lockout's blocks, and read again from the store (the
//! other vaults of a shared database raise and lift them too).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use runtime::now_unix_ms;
use runtime::shutdown::Shutdown;

use super::records::Records;
use crate::audit::AuditEvent;
use crate::card::Pan;
use crate::error::VaultError;
use crate::guessing::{self, BucketId, Verdict};
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
        match detector.observe(&caller.identity, bucket, fingerprint, Instant::now()) {
            Verdict::Allowed => Ok(()),
            Verdict::Refused { newly_flagged } => {
                if newly_flagged {
                    self.flagged(caller, &bucket).await?;
                }
                Err(VaultError::Guessing)
            }
        }
    }

    /// Makes a new flag durable, then audits it.
    async fn flagged(&self, caller: &Caller, bucket: &BucketId) -> Result<(), VaultError> {
        let settings = self.guessing().settings();
        self.store()
            .put_meta(
                &guessing::flag_key(&caller.identity, bucket),
                now_unix_ms().to_be_bytes().to_vec(),
            )
            .await?;
        self.journal().metrics().event("guessing_flag");
        tracing::warn!(
            identity = %caller.identity,
            tenant = %caller.tenant.as_str(),
            bucket = %hex::encode(bucket),
            "card guessing suspected: the identity is flagged in this bucket until an admin lifts it"
        );
        self.journal()
            .audit(AuditEvent {
                at_unix_ms: now_unix_ms(),
                actor: caller.identity.clone(),
                peer: "-".into(),
                action: "GuessingFlag".into(),
                tenant: caller.tenant.as_str().to_owned(),
                outcome: "ok".into(),
                request_id: caller.request_id.clone(),
                detail: format!(
                    "{} flagged: more than {} different cards with one first six and last \
                     four within {} s (bucket {}); its calls with such cards are refused \
                     until an admin lifts it",
                    caller.identity,
                    settings.max_cards_per_bucket,
                    settings.window_secs,
                    hex::encode(bucket)
                ),
                ..AuditEvent::default()
            })
            .await
    }

    /// Every flag in force, as `<identity> bucket <hex>`.
    pub fn guessing_flags(&self) -> Vec<String> {
        self.guessing()
            .flags()
            .iter()
            .map(|(identity, bucket)| guessing::flag_subject(identity, bucket))
            .collect()
    }

    /// Lifts a flag (`<identity> bucket <hex>`), durably. Returns false when there was
    /// none.
    pub async fn lift_guessing_flag(&self, subject: &str) -> Result<bool, VaultError> {
        let Some((identity, bucket)) = guessing::parse_flag_subject(subject) else {
            return Ok(false);
        };
        let key = guessing::flag_key(&identity, &bucket);
        let raised = self
            .store()
            .get_meta(&key)
            .await?
            .is_some_and(|value| !value.is_empty());
        let held = self.guessing().lift(&identity, &bucket);
        if !raised && !held {
            return Ok(false);
        }
        self.store().put_meta(&key, Vec::new()).await?;
        Ok(true)
    }

    /// Reads the flags from the store into the detector.
    pub async fn load_guessing_flags(&self) -> Result<usize, VaultError> {
        let mut flags = HashSet::new();
        for key in self.store().list_meta(guessing::FLAGS).await? {
            let Some(flag) = guessing::parse_flag_key(&key) else {
                continue;
            };
            let raised = self
                .store()
                .get_meta(&format!("{}{key}", guessing::FLAGS))
                .await?;
            if raised.is_some_and(|value| !value.is_empty()) {
                flags.insert(flag);
            }
        }
        let count = flags.len();
        self.guessing().replace_flags(flags);
        Ok(count)
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
