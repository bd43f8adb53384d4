//! A tenant's records: reading one (metadata only, or with its card opened), deleting,
//! finding and erasing a data subject's tokens, and purging what has expired.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use runtime::now_unix_ms;

use super::journal::Journal;
use crate::audit::AuditEvent;
use crate::card::{CardData, Pan};
use crate::cvc::CvcStore;
use crate::error::VaultError;
use crate::forward::idempotency;
use crate::guessing::Detector;
use crate::keys::Keys;
use crate::policy::{Caller, Tenant};
use crate::record::{self, Fingerprint, StoredRecord};
use crate::store::{Delete, DeleteOutcome, Riding, Store, StoreError, Tombstone};
use crate::token::Token;

/// Reads of a record that changed underneath (a rewrap) before giving up, and fresh
/// tokens drawn before giving up (with 128 random bits a second draw is already
/// astronomically unlikely).
pub(super) const ATTEMPTS: usize = 3;

/// What the records need besides the store, keys and journal.
#[derive(Debug)]
pub struct RecordSettings {
    /// Token lifetime per tenant when `Tokenize` names none.
    pub tenant_ttl_secs: HashMap<String, u64>,
    /// How long a deleted token is remembered (as a keyed id), so that looking it up
    /// is not counted as probing.
    pub tombstone_ttl: Duration,
    /// How long a forward's outcome is kept for replays (the idempotency window).
    pub outcome_ttl: Duration,
    pub max_batch_size: usize,
    /// `[sealed_intake]`.
    pub sealed_intake: crate::intake::IntakeSettings,
    /// The shape of each tenant's new tokens.
    pub tokens: crate::config::TokenSettings,
}

#[derive(Debug)]
pub struct Records<S> {
    store: Arc<S>,
    keys: Arc<Keys>,
    journal: Arc<Journal>,
    /// Shared with the keyservice usage reports, which count them.
    cvcs: Arc<CvcStore>,
    /// Counts the card numbers each identity brings, per first six and last four.
    guessing: Detector,
    settings: RecordSettings,
    /// Deletes since the store was last compacted (the purge job compacts).
    deleted_since_compaction: AtomicU64,
    /// When the purge job last removed old tombstones.
    tombstones_pruned_at_ms: AtomicI64,
}

/// How often the purge job removes tombstones past `tombstone_days`.
const TOMBSTONE_PRUNE_INTERVAL_MS: i64 = 3_600_000;

impl<S: Store> Records<S> {
    pub fn new(
        store: Arc<S>,
        keys: Arc<Keys>,
        journal: Arc<Journal>,
        cvcs: Arc<CvcStore>,
        guessing: Detector,
        settings: RecordSettings,
    ) -> Self {
        Self {
            store,
            keys,
            journal,
            cvcs,
            guessing,
            settings,
            deleted_since_compaction: AtomicU64::new(0),
            tombstones_pruned_at_ms: AtomicI64::new(0),
        }
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    pub fn keys(&self) -> &Arc<Keys> {
        &self.keys
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The journal, for a task that outlives the call.
    pub(super) fn journal_handle(&self) -> Arc<Journal> {
        Arc::clone(&self.journal)
    }

    /// The in-memory CVCs.
    pub fn cvcs(&self) -> &Arc<CvcStore> {
        &self.cvcs
    }

    pub(super) fn guessing(&self) -> &Detector {
        &self.guessing
    }

    pub(super) fn settings(&self) -> &RecordSettings {
        &self.settings
    }

    /// Reads a record of the caller's tenant, without opening its card. Another
    /// tenant's token is NOT_FOUND, exactly like an unknown one.
    pub async fn load(&self, caller: &Caller, token: &Token) -> Result<StoredRecord, VaultError> {
        Ok(self.load_bytes(caller, token).await?.1)
    }

    /// [`Self::load`], with the record bytes as stored.
    async fn load_bytes(
        &self,
        caller: &Caller,
        token: &Token,
    ) -> Result<(Vec<u8>, StoredRecord), VaultError> {
        let Some(bytes) = self.store.get(token).await? else {
            return Err(match self.was_deleted(&caller.tenant, token).await? {
                true => VaultError::Deleted,
                false => VaultError::NotFound,
            });
        };
        let stored = record::decode(&bytes)?;
        if stored.metadata.tenant != caller.tenant {
            // The same look-ups as for a token that is not there, so that the time of
            // the answer does not tell another tenant's token from none.
            self.was_deleted(&caller.tenant, token).await?;
            return Err(VaultError::NotFound);
        }
        // An expired token answers like an unknown one at once, before the purge.
        if stored.metadata.expired(now_unix_ms()) {
            return Err(VaultError::Expired);
        }
        Ok((bytes, stored))
    }

    /// Whether the tenant's `token` was deleted within the tombstone window, under any
    /// fingerprint version held.
    pub(super) async fn was_deleted(
        &self,
        tenant: &Tenant,
        token: &Token,
    ) -> Result<bool, VaultError> {
        let ids = {
            let keys = self.keys.snapshot();
            let active = keys.fingerprint.active();
            std::iter::once(active)
                .chain(keys.fingerprint.older())
                .map(|(version, key)| record::tombstone(version, key, tenant, token))
                .collect()
        };
        Ok(self.store.tombstoned(ids).await?)
    }

    /// Whether the key that opens a record is held (nothing is decrypted): a record
    /// that could never be sent is refused before anything is counted or claimed.
    pub fn openable(&self, stored: &StoredRecord) -> Result<(), VaultError> {
        let version = stored.metadata.key_version;
        match self.keys.snapshot().card_data.get(version) {
            Some(_) => Ok(()),
            None => Err(VaultError::KeyUnavailable(version)),
        }
    }

    /// Decrypts a record's card. Each opening is counted (`card_opened`), so that a
    /// test can see which paths never open one.
    pub fn open(&self, token: &Token, stored: &StoredRecord) -> Result<CardData, VaultError> {
        let version = stored.metadata.key_version;
        let keys = self.keys.snapshot();
        let key = keys
            .card_data
            .get(version)
            .ok_or(VaultError::KeyUnavailable(version))?;
        let card = stored.open(token, key)?;
        self.journal.metrics().event("card_opened");
        Ok(card)
    }

    /// Reads a record and authenticates it (decrypting, then dropping the card), so
    /// that edited or moved records are reported, never served.
    pub async fn load_verified(
        &self,
        caller: &Caller,
        token: &Token,
    ) -> Result<StoredRecord, VaultError> {
        let stored = self.load(caller, token).await?;
        drop(self.open(token, &stored)?);
        Ok(stored)
    }

    /// Deletes a record of the caller's tenant; the call's event commits in the same
    /// write, so no record is deleted unaudited.
    pub async fn delete(&self, caller: &Caller, token: &Token) -> Result<(), VaultError> {
        self.delete_token(caller, token, false).await
    }

    /// Deletes a record of the caller's tenant. The call's event rides the delete, or,
    /// with `intent` (a delete that is one step of a larger call, whose event comes at
    /// its end), a `DeleteStarted` event is made durable before it. The store deletes
    /// only the bytes read here, so a rewrap in between (new versions, new index key)
    /// means reading again.
    async fn delete_token(
        &self,
        caller: &Caller,
        token: &Token,
        intent: bool,
    ) -> Result<(), VaultError> {
        for attempt in 0..ATTEMPTS {
            let (bytes, stored) = self.load_bytes(caller, token).await?;
            if intent && attempt == 0 {
                self.journal
                    .intent(caller, "DeleteStarted", token, "", "")
                    .await?;
            }
            let tombstone = self.tombstone_now(&stored.metadata.tenant, token);
            let (riding, ride) = match intent {
                true => None,
                false => self.journal.riding(caller, |outcome: &DeleteOutcome, _| {
                    *outcome == DeleteOutcome::Deleted
                }),
            }
            .unzip();
            let outcome = self
                .delete_stored(token, bytes, &stored, tombstone, riding)
                .await?;
            self.journal.settle(ride);
            match outcome {
                DeleteOutcome::Deleted => return Ok(()),
                // Read a moment ago: a concurrent delete (a retry) won.
                DeleteOutcome::NotFound => return Err(VaultError::Deleted),
                DeleteOutcome::Changed => continue,
            }
        }
        Err(VaultError::Store(StoreError::Engine(
            "the record kept changing during a delete".into(),
        )))
    }

    /// The tombstone of `token` deleted now, under the active fingerprint version.
    fn tombstone_now(&self, tenant: &Tenant, token: &Token) -> Tombstone {
        let keys = self.keys.snapshot();
        let (version, key) = keys.fingerprint.active();
        Tombstone {
            key: record::tombstone(version, key, tenant, token),
            deleted_at_unix_ms: now_unix_ms(),
        }
    }

    /// Deletes the record `bytes` of `token` (if unchanged) and its CVC, leaving
    /// `tombstone`, with the call's event if `riding`.
    pub(super) async fn delete_stored(
        &self,
        token: &Token,
        bytes: Vec<u8>,
        stored: &StoredRecord,
        tombstone: Tombstone,
        riding: Option<Riding<DeleteOutcome>>,
    ) -> Result<DeleteOutcome, VaultError> {
        let outcome = self
            .store
            .delete_audited(
                Delete {
                    token: token.clone(),
                    expected: bytes,
                    index_key: stored.metadata.index_key(),
                    versions: stored.metadata.versions(),
                    indexes: stored.metadata.indexes(),
                    tombstone,
                },
                riding,
            )
            .await?;
        if outcome == DeleteOutcome::Deleted {
            self.cvcs.erase(token);
            self.deleted_since_compaction
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(outcome)
    }

    /// Every live token of the card `pan` in the caller's tenant, under every
    /// fingerprint version held (a card tokenized before a rotation is found too).
    async fn subject_tokens(&self, caller: &Caller, pan: &Pan) -> Result<Vec<Token>, VaultError> {
        let card_keys: Vec<Vec<u8>> = {
            let keys = self.keys.snapshot();
            let (active, active_key) = keys.fingerprint.active();
            std::iter::once((active, active_key))
                .chain(keys.fingerprint.older())
                .map(|(version, key)| {
                    let fingerprint = Fingerprint {
                        version,
                        value: record::fingerprint(key, &caller.tenant, pan),
                    };
                    record::card_key(&caller.tenant, &fingerprint)
                })
                .collect()
        };
        let mut tokens = Vec::new();
        for card_key in card_keys {
            for token in self.store.tokens_of_card(&card_key).await? {
                if !tokens.contains(&token) {
                    tokens.push(token);
                }
            }
        }
        Ok(tokens)
    }

    /// The caller's live tokens of the card `pan`. Rate-limited per identity.
    pub async fn find_subject(&self, caller: &Caller, pan: &Pan) -> Result<Vec<Token>, VaultError> {
        if !self
            .guessing
            .allow_find(&caller.identity, std::time::Instant::now())
        {
            return Err(VaultError::SubjectRateLimited);
        }
        self.watch_guessing(caller, pan).await?;
        let mut tokens = Vec::new();
        for token in self.subject_tokens(caller, pan).await? {
            // Another tenant's or an expired token is not the caller's.
            if self.load(caller, &token).await.is_ok() {
                tokens.push(token);
            }
        }
        Ok(tokens)
    }

    /// Deletes every token of the card `pan` in the caller's tenant, expired ones
    /// too; returns those deleted.
    pub async fn erase_subject(
        &self,
        caller: &Caller,
        pan: &Pan,
    ) -> Result<Vec<Token>, VaultError> {
        self.watch_guessing(caller, pan).await?;
        let mut erased = Vec::new();
        for token in self.subject_tokens(caller, pan).await? {
            match self.delete_token(caller, &token, true).await {
                Ok(()) => erased.push(token),
                Err(VaultError::NotFound | VaultError::Deleted) => {}
                Err(VaultError::Expired) => {
                    if self.purge_token(&token).await? {
                        erased.push(token);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        tracing::info!(erased = erased.len(), "data subject erased");
        Ok(erased)
    }

    /// Deletes every expired record (audited as one event per pass), then, if anything
    /// was deleted since the last time, compacts the store so that deleted records are
    /// physically gone. Returns the number purged.
    pub async fn purge(&self) -> Result<usize, VaultError> {
        let purged = self.purge_expired().await;
        // Forward outcomes are kept for the idempotency window only: they hold what a
        // processor answered about a card (masked, but still about the card).
        let ttl_ms = self.settings.outcome_ttl.as_millis() as i64;
        let now = now_unix_ms();
        // A sealed card's replay entry lives until its window ends (`intake`). It holds
        // nothing of a card, so removing it needs no compaction: they are counted apart.
        let stale_entries = AtomicU64::new(0);
        let stale = |value: &[u8]| {
            if crate::intake::is_entry(value) {
                let stale = crate::intake::Entry::decode(value)
                    .is_none_or(|entry| now > entry.keep_until_ms);
                if stale {
                    stale_entries.fetch_add(1, Ordering::Relaxed);
                }
                return stale;
            }
            idempotency::decode(value)
                .is_none_or(|outcome| now.saturating_sub(outcome.created_at_unix_ms) >= ttl_ms)
        };
        // Tombstones hold no token or card bytes: removing them needs no compaction,
        // and once an hour is soon enough (the scan reads every one).
        let last = self.tombstones_pruned_at_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= TOMBSTONE_PRUNE_INTERVAL_MS {
            self.tombstones_pruned_at_ms.store(now, Ordering::Relaxed);
            let kept_from = now.saturating_sub(self.settings.tombstone_ttl.as_millis() as i64);
            match self.store.prune_tombstones(kept_from).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "tombstones past tombstone_days removed"),
                Err(e) => tracing::error!(error = %e, "tombstones not pruned"),
            }
        }
        match self.store.prune_outcomes(&stale).await {
            Ok(0) => {}
            Ok(pruned) => {
                let entries = stale_entries.load(Ordering::Relaxed);
                self.deleted_since_compaction
                    .fetch_add((pruned as u64).saturating_sub(entries), Ordering::Relaxed);
                tracing::info!(
                    pruned,
                    "forward outcomes past the idempotency window removed"
                );
            }
            Err(e) => tracing::error!(error = %e, "forward outcomes not pruned"),
        }
        // Deletions are compacted away whatever happened above.
        let deleted = self.deleted_since_compaction.swap(0, Ordering::Relaxed);
        if deleted > 0 {
            if let Err(e) = self.store.compact().await {
                self.deleted_since_compaction
                    .fetch_add(deleted, Ordering::Relaxed);
                return Err(e.into());
            }
            tracing::info!(
                deleted,
                "store compacted: deleted records are physically gone"
            );
        }
        purged
    }

    async fn purge_expired(&self) -> Result<usize, VaultError> {
        let mut purged = 0;
        loop {
            let expired = self.store.expired(now_unix_ms(), 1000).await?;
            let mut progress = false;
            for token in &expired {
                match self.purge_token(token).await {
                    Ok(true) => {
                        purged += 1;
                        progress = true;
                    }
                    Ok(false) => {}
                    // One bad record does not stop the purge of the others.
                    Err(e) => {
                        tracing::error!(token = %token, error = %e, "expired token not purged")
                    }
                }
            }
            // Entries the purge cannot remove are left for the next run.
            if expired.is_empty() || !progress {
                break;
            }
        }
        Ok(purged)
    }

    /// Deletes an expired token's record, audited before the fact. Returns whether it
    /// was deleted.
    pub(super) async fn purge_token(&self, token: &Token) -> Result<bool, VaultError> {
        let Some(bytes) = self.store.get(token).await? else {
            return Ok(false);
        };
        let stored = record::decode(&bytes)?;
        if !stored.metadata.expired(now_unix_ms()) {
            return Ok(false);
        }
        self.journal
            .audit(AuditEvent {
                at_unix_ms: now_unix_ms(),
                actor: "vault".into(),
                peer: "-".into(),
                action: "Purge".into(),
                tenant: stored.metadata.tenant.as_str().to_owned(),
                token: token.as_str().to_owned(),
                outcome: "ok".into(),
                detail: "retention ended".into(),
                ..AuditEvent::default()
            })
            .await?;
        let tombstone = self.tombstone_now(&stored.metadata.tenant, token);
        let deleted = self
            .delete_stored(token, bytes, &stored, tombstone, None)
            .await?;
        Ok(deleted == DeleteOutcome::Deleted)
    }
}
