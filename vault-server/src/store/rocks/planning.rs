//! How the writer plans each operation of a group: put-if-absent, reuse of a card's
//! live token, compare-and-delete and compare-and-rewrite, against the database and
//! what the group has written so far.

use super::indexes::{
    card_entry, encode_entry, entry_expired, expiry_key, index_prefix, older_index_prefix,
    token_under,
};
use super::writer::{Pending, SortedBatch, Writer};
use super::{CARD_INDEX, EXPIRY, IDEMPOTENCY, RECORDS, TOMBSTONES, UNSENT_ERASURES, engine};
use crate::store::{
    Claim, Delete, DeleteOutcome, InsertOutcome, KeyVersions, NewRecord, RecordIndexes,
    Replaceable, Rewrite, RewriteOutcome, StoreError,
};
use crate::token::Token;

impl Writer {
    fn record_exists(&self, token: &[u8], pending: &Pending) -> Result<bool, StoreError> {
        if let Some(state) = pending.records.get(token) {
            return Ok(*state);
        }
        let cf = self.family(RECORDS)?;
        Ok(self.db.get_pinned_cf(cf, token).map_err(engine)?.is_some())
    }

    /// A live token indexed under `prefix` (one index key): one added earlier in this
    /// group, else the oldest on disk whose record still exists and has not expired (an
    /// expired one waits for the purge and is never handed out again).
    fn live_token(
        &self,
        prefix: &[u8],
        pending: &Pending,
        now_unix_ms: i64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        for token in pending.cards.get(prefix).into_iter().flatten() {
            if self.record_exists(token, pending)? {
                return Ok(Some(token.clone()));
            }
        }
        let mut iter = self.db.raw_iterator_cf(self.family(CARD_INDEX)?);
        iter.seek(prefix);
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if !key.starts_with(prefix) {
                break;
            }
            if let Some(token) = token_under(key, prefix)
                && !entry_expired(value, now_unix_ms)
                && self.record_exists(token, pending)?
            {
                return Ok(Some(token.to_vec()));
            }
            iter.next();
        }
        iter.status().map_err(engine)?;
        Ok(None)
    }

    /// Put-if-absent (or if replaceable) of an idempotency outcome. This thread is the
    /// only writer, so what it reads (the group's own writes first) is what the batch
    /// replaces.
    pub(super) fn plan_claim<'a>(
        &'a self,
        key: &[u8],
        value: &[u8],
        replaceable: &Replaceable,
        batch: &mut SortedBatch<'a>,
        pending: &mut Pending,
    ) -> Result<Claim, StoreError> {
        let cf = self.family(IDEMPOTENCY)?;
        if let Some(stored) = self.outcome(key, pending)?
            && !replaceable(&stored)
        {
            return Ok(Claim::Taken(stored));
        }
        batch.put_cf(cf, key, value);
        pending.outcomes.insert(key.to_vec(), Some(value.to_vec()));
        Ok(Claim::Claimed)
    }

    /// Deletes each outcome that still holds the value the purge examined.
    pub(super) fn plan_remove_outcomes<'a>(
        &'a self,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        batch: &mut SortedBatch<'a>,
        pending: &mut Pending,
    ) -> Result<(), StoreError> {
        let cf = self.family(IDEMPOTENCY)?;
        for (key, examined) in entries {
            if self.outcome(&key, pending)?.as_ref() == Some(&examined) {
                batch.delete_cf(cf, &key);
                pending.outcomes.insert(key, None);
            }
        }
        Ok(())
    }

    /// An idempotency outcome as this group has left it so far.
    fn outcome(&self, key: &[u8], pending: &Pending) -> Result<Option<Vec<u8>>, StoreError> {
        match pending.outcomes.get(key) {
            Some(value) => Ok(value.clone()),
            None => self
                .db
                .get_cf(self.family(IDEMPOTENCY)?, key)
                .map_err(engine),
        }
    }

    fn family(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or(StoreError::Closed)
    }

    pub(super) fn plan_insert<'a>(
        &'a self,
        records: &[NewRecord],
        batch: &mut SortedBatch<'a>,
        pending: &mut Pending,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        let records_cf = self.family(RECORDS)?;
        let now = runtime::now_unix_ms();
        let mut outcomes = Vec::with_capacity(records.len());
        for record in records {
            if let (Some((key, _)), Some(claim)) = (&record.outcome, &record.claim)
                && let Some(stored) = self.outcome(key, pending)?
                && !(claim.0)(&stored)
            {
                outcomes.push(InsertOutcome::OutcomeTaken(stored));
                continue;
            }
            let token = record.token.as_str().as_bytes();
            if self.record_exists(token, pending)? {
                outcomes.push(InsertOutcome::TokenTaken);
                continue;
            }
            let card_key = &record.indexes.card_key;
            let prefix = index_prefix(card_key, &record.index_key)?;
            if record.reuse_existing {
                // The card may be indexed under an older fingerprint version still.
                let mut reusable = self.live_token(&prefix, pending, now)?;
                for older in &record.older_index_keys {
                    if reusable.is_some() {
                        break;
                    }
                    reusable =
                        self.live_token(&older_index_prefix(card_key, older)?, pending, now)?;
                }
                if let Some(existing) = reusable {
                    let existing = Token::from_stored(&existing).ok_or_else(|| {
                        StoreError::Engine("the card index holds a malformed token".into())
                    })?;
                    outcomes.push(InsertOutcome::Existing(existing));
                    continue;
                }
            }
            batch.put_cf(records_cf, token, &record.value);
            self.put_indexes(
                batch,
                &record.indexes,
                &record.index_key,
                record.versions,
                token,
            )?;
            pending.count(record.versions, 1);
            pending.records.insert(token.to_vec(), true);
            pending
                .cards
                .entry(prefix)
                .or_default()
                .push(token.to_vec());
            if let Some((key, value)) = &record.outcome {
                batch.put_cf(self.family(IDEMPOTENCY)?, key, value);
                pending.outcomes.insert(key.clone(), Some(value.clone()));
            }
            outcomes.push(InsertOutcome::Stored);
        }
        Ok(outcomes)
    }

    pub(super) fn plan_delete<'a>(
        &'a self,
        delete: &Delete,
        batch: &mut SortedBatch<'a>,
        pending: &mut Pending,
    ) -> Result<DeleteOutcome, StoreError> {
        let token = delete.token.as_str().as_bytes();
        // Touched earlier in this group: the caller's copy may be stale.
        if pending.rewritten.contains(token) {
            return Ok(DeleteOutcome::Changed);
        }
        match pending.records.get(token) {
            Some(false) => return Ok(DeleteOutcome::NotFound),
            Some(true) => return Ok(DeleteOutcome::Changed),
            None => {}
        }
        match self
            .db
            .get_pinned_cf(self.family(RECORDS)?, token)
            .map_err(engine)?
        {
            None => return Ok(DeleteOutcome::NotFound),
            Some(current) if current.as_ref() != delete.expected.as_slice() => {
                return Ok(DeleteOutcome::Changed);
            }
            Some(_) => {}
        }
        batch.delete_cf(self.family(RECORDS)?, token);
        self.delete_indexes(batch, &delete.indexes, &delete.index_key, token)?;
        let tombstone = &delete.tombstone;
        batch.put_cf(
            self.family(TOMBSTONES)?,
            &tombstone.key,
            tombstone.deleted_at_unix_ms.to_be_bytes(),
        );
        // Sent to the keyservice, so that a restore from an older copy erases it again.
        batch.put_cf(
            self.family(UNSENT_ERASURES)?,
            &tombstone.key,
            tombstone.deleted_at_unix_ms.to_be_bytes(),
        );
        pending.count(delete.versions, -1);
        pending.records.insert(token.to_vec(), false);
        Ok(DeleteOutcome::Deleted)
    }

    /// A record's card index entry (with its versions) and, with a TTL, its expiry
    /// entry.
    fn put_indexes<'a>(
        &'a self,
        batch: &mut SortedBatch<'a>,
        indexes: &RecordIndexes,
        index_key: &[u8],
        versions: KeyVersions,
        token: &[u8],
    ) -> Result<(), StoreError> {
        if indexes.expires_at_unix_ms > 0 {
            let key = expiry_key(indexes.expires_at_unix_ms, token);
            batch.put_cf(self.family(EXPIRY)?, key, []);
        }
        batch.put_cf(
            self.family(CARD_INDEX)?,
            card_entry(indexes, index_key, token)?,
            encode_entry(versions, indexes.expires_at_unix_ms),
        );
        Ok(())
    }

    fn delete_indexes<'a>(
        &'a self,
        batch: &mut SortedBatch<'a>,
        indexes: &RecordIndexes,
        index_key: &[u8],
        token: &[u8],
    ) -> Result<(), StoreError> {
        if indexes.expires_at_unix_ms > 0 {
            let key = expiry_key(indexes.expires_at_unix_ms, token);
            batch.delete_cf(self.family(EXPIRY)?, key);
        }
        batch.delete_cf(
            self.family(CARD_INDEX)?,
            card_entry(indexes, index_key, token)?,
        );
        Ok(())
    }

    pub(super) fn plan_rewrite<'a>(
        &'a self,
        rewrite: &Rewrite,
        batch: &mut SortedBatch<'a>,
        pending: &mut Pending,
    ) -> Result<RewriteOutcome, StoreError> {
        let token = rewrite.token.as_str().as_bytes();
        // Touched earlier in this group (deleted, or rewritten): the caller's copy is
        // stale.
        if pending.records.contains_key(token) || pending.rewritten.contains(token) {
            return Ok(RewriteOutcome::Changed);
        }
        let current = self
            .db
            .get_pinned_cf(self.family(RECORDS)?, token)
            .map_err(engine)?;
        if current.as_deref() != Some(rewrite.expected.as_slice()) {
            return Ok(RewriteOutcome::Changed);
        }
        batch.put_cf(self.family(RECORDS)?, token, &rewrite.value);
        // The new entries after the old ones' deletes: where the keys are the same (a
        // card-data version changed, not the fingerprint), the put wins.
        self.delete_indexes(batch, &rewrite.old_indexes, &rewrite.old_index_key, token)?;
        self.put_indexes(
            batch,
            &rewrite.new_indexes,
            &rewrite.new_index_key,
            rewrite.new_versions,
            token,
        )?;
        pending.count(rewrite.old_versions, -1);
        pending.count(rewrite.new_versions, 1);
        let prefix = index_prefix(&rewrite.new_indexes.card_key, &rewrite.new_index_key)?;
        pending
            .cards
            .entry(prefix)
            .or_default()
            .push(token.to_vec());
        pending.rewritten.insert(token.to_vec());
        Ok(RewriteOutcome::Rewritten)
    }
}
