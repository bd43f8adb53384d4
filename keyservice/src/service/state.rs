//! Durable changes: the keyring is saved before a change is answered or announced,
//! and every change (or refusal) is recorded in the history.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use super::{KEEP_PROPOSALS_MS, Shared, lock, now_unix_ms};
use crate::error::ServiceError;
use crate::history::{History, NewEvent};
use crate::keyring::{Keyring, KeyringError, RootKey};
use crate::lifecycle::Refusal;
use crate::metrics::Metrics;

impl Shared {
    pub(crate) fn new(
        keyring: Keyring,
        root: RootKey,
        settings: &crate::Settings,
        history: History,
        checkpoints: crate::checkpoints::Checkpoints,
        erasures: crate::erasures::Erasures,
    ) -> Self {
        Self {
            keyring: Mutex::new(keyring),
            root: Mutex::new(root),
            keyring_file: settings.keyring_file.clone(),
            root_key_file: settings.root_key_file.clone(),
            history,
            lifecycle: settings.lifecycle.clone(),
            changes: watch::channel(0).0,
            usage: Mutex::new(HashMap::new()),
            vault_identities: settings.access.vault_identities.clone(),
            metrics: Metrics::default(),
            checkpoints,
            erasures,
            save_failing: AtomicBool::new(false),
            generation_seen: std::sync::atomic::AtomicU64::new(0),
            postponed_warned_at: Mutex::new(None),
        }
    }

    /// How long a proposal waits for its approval, and an approved tenant job for its
    /// claim.
    pub(super) fn approval_window_ms(&self) -> i64 {
        i64::try_from(self.lifecycle.approval_window_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// Saves the keyring under `root`, keeping the save-failure metric and health.
    pub(super) fn save(&self, keyring: &mut Keyring, root: &RootKey) -> Result<(), KeyringError> {
        let saved = keyring.save(&self.keyring_file, root);
        if saved.is_err() {
            self.metrics.keyring_save_failures.inc();
        }
        self.save_failing.store(saved.is_err(), Ordering::Relaxed);
        saved
    }

    /// The keyring sealed under the current root key: the state to restore if a
    /// change cannot be made durable.
    pub(super) fn seal(&self, keyring: &Keyring) -> Result<Vec<u8>, ServiceError> {
        keyring.seal(&lock(&self.root)).map_err(ServiceError::Seal)
    }

    /// Puts back the state sealed by [`Shared::seal`].
    pub(super) fn restore(&self, keyring: &mut Keyring, before: &[u8]) {
        if let Ok(unchanged) = Keyring::open(before, &lock(&self.root)) {
            *keyring = unchanged;
        }
    }

    /// Applies `change` to the keyring and saves it. If the save fails, the keyring
    /// is reloaded from the state before, so memory never runs ahead of what is
    /// durable.
    pub(super) fn mutate<T>(
        &self,
        change: impl FnOnce(&mut Keyring) -> Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        self.mutate_if(false, change)
    }

    /// [`Shared::mutate`]; `while_restored`: also while a restored keyring waits for
    /// acceptance (only the proposal to accept it).
    pub(super) fn mutate_if<T>(
        &self,
        while_restored: bool,
        change: impl FnOnce(&mut Keyring) -> Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        let mut keyring = lock(&self.keyring);
        if let Some(refusal) = self.restored(&keyring).filter(|_| !while_restored) {
            return Err(ServiceError::Refused(refusal));
        }
        let before = self.seal(&keyring)?;
        let result = change(&mut keyring)?;
        keyring.prune_proposals(now_unix_ms(), KEEP_PROPOSALS_MS);
        let saved = self.save(&mut keyring, &lock(&self.root));
        if let Err(error) = saved {
            self.restore(&mut keyring, &before);
            return Err(ServiceError::Save(error));
        }
        Ok(result)
    }

    pub(super) fn announce(&self) {
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// Records the event of an operation that was carried out.
    pub(super) fn record(&self, event: NewEvent<'_>) -> Result<(), ServiceError> {
        self.history
            .append(event, now_unix_ms())
            .map(drop)
            .map_err(ServiceError::HistoryAfter)
    }

    /// Records the intent of an irreversible operation before it is carried out.
    pub(super) fn record_intent(&self, event: NewEvent<'_>) -> Result<(), ServiceError> {
        self.history
            .append(event, now_unix_ms())
            .map(drop)
            .map_err(ServiceError::HistoryBefore)
    }

    /// Records a refusal, and hands back the error. A refusal that cannot be recorded
    /// is still a refusal: the failure to record it is logged here.
    pub(super) fn refuse(&self, mut event: NewEvent<'_>, error: ServiceError) -> ServiceError {
        if let ServiceError::Refused(refusal) = &error {
            event.outcome = format!("refused: {refusal}");
            if let Err(e) = self.history.append(event, now_unix_ms()) {
                tracing::error!(error = %e, "cannot write a refusal to the key history");
            }
        }
        error
    }

    /// [`Shared::refuse`] for a refusal of the lifecycle rules.
    pub(super) fn refused(&self, event: NewEvent<'_>, refusal: Refusal) -> ServiceError {
        self.refuse(event, ServiceError::Refused(refusal))
    }
}
