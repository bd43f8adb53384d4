//! How the writer plans each operation of a group: put-if-absent, reuse of a card's
//! live token, compare-and-delete and compare-and-rewrite, against the database and
//! what the group has written so far.

use super::indexes::{card_entry_key, expiry_key, version_key};
use super::writer::{Pending, SortedBatch, Writer};
use super::{CARDS, EXPIRY, FINGERPRINTS, RECORDS, VERSIONS, engine};
use crate::store::{
    Delete, DeleteOutcome, InsertOutcome, KeyUse, NewRecord, RecordIndexes, Rewrite,
    RewriteOutcome, StoreError,
};
use crate::token::Token;

impl Writer {
    fn record_exists(&self, token: &[u8], pending: &Pending) -> Result<bool, StoreError> {
        if let Some(state) = pending.records.get(token) {
            return Ok(*state);
        }
        let cf = self.db.cf_handle(RECORDS).ok_or(StoreError::Closed)?;
        Ok(self.db.get_pinned_cf(cf, token).map_err(engine)?.is_some())
    }

    fn index_entry(&self, key: &[u8], pending: &Pending) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(state) = pending.index.get(key) {
            return Ok(state.clone());
        }
        let cf = self.db.cf_handle(FINGERPRINTS).ok_or(StoreError::Closed)?;
        self.db.get_cf(cf, key).map_err(engine)
    }

    /// The live token an index key names, if any; a stale entry (record gone) is none.
    fn live_entry(&self, key: &[u8], pending: &Pending) -> Result<Option<Vec<u8>>, StoreError> {
        match self.index_entry(key, pending)? {
            Some(token) if self.record_exists(&token, pending)? => Ok(Some(token)),
            _ => Ok(None),
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
        let index_cf = self.family(FINGERPRINTS)?;
        let versions_cf = self.family(VERSIONS)?;
        let mut outcomes = Vec::with_capacity(records.len());
        for record in records {
            let token = record.token.as_str().as_bytes();
            if self.record_exists(token, pending)? {
                outcomes.push(InsertOutcome::TokenTaken);
                continue;
            }
            // An index entry whose record is gone is stale: replaced below.
            let indexed = self.live_entry(&record.index_key, pending)?;
            let mut reusable = indexed.clone();
            if record.reuse_existing && reusable.is_none() {
                // The card may be indexed under an older fingerprint version still.
                for older in &record.older_index_keys {
                    if let Some(token) = self.live_entry(older, pending)? {
                        reusable = Some(token);
                        break;
                    }
                }
            }
            if let (true, Some(existing)) = (record.reuse_existing, reusable) {
                let existing = Token::from_stored(&existing).ok_or_else(|| {
                    StoreError::Engine("fingerprint index holds a malformed token".into())
                })?;
                outcomes.push(InsertOutcome::Existing(existing));
                continue;
            }
            match indexed {
                Some(_) => {}
                None => {
                    batch.put_cf(index_cf, &record.index_key, token);
                    pending
                        .index
                        .insert(record.index_key.clone(), Some(token.to_vec()));
                }
            }
            batch.put_cf(records_cf, token, &record.value);
            for key_use in KeyUse::ALL {
                let version = record.versions.get(key_use);
                batch.put_cf(versions_cf, version_key(key_use, version, token), []);
            }
            self.put_indexes(batch, &record.indexes, token)?;
            pending.count(record.versions, 1);
            pending.records.insert(token.to_vec(), true);
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
        let (index_key, versions) = (&delete.index_key, delete.versions);
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
        let versions_cf = self.family(VERSIONS)?;
        for key_use in KeyUse::ALL {
            batch.delete_cf(
                versions_cf,
                version_key(key_use, versions.get(key_use), token),
            );
        }
        self.delete_indexes(batch, &delete.indexes, token)?;
        pending.count(versions, -1);
        pending.records.insert(token.to_vec(), false);
        if self.index_entry(index_key, pending)?.as_deref() == Some(token) {
            let index_cf = self.db.cf_handle(FINGERPRINTS).ok_or(StoreError::Closed)?;
            batch.delete_cf(index_cf, index_key);
            pending.index.insert(index_key.to_vec(), None);
        }
        Ok(DeleteOutcome::Deleted)
    }

    fn put_indexes<'a>(
        &'a self,
        batch: &mut SortedBatch<'a>,
        indexes: &RecordIndexes,
        token: &[u8],
    ) -> Result<(), StoreError> {
        if indexes.expires_at_unix_ms > 0 {
            let key = expiry_key(indexes.expires_at_unix_ms, token);
            batch.put_cf(self.family(EXPIRY)?, key, []);
        }
        batch.put_cf(
            self.family(CARDS)?,
            card_entry_key(&indexes.card_key, token),
            [],
        );
        Ok(())
    }

    fn delete_indexes<'a>(
        &'a self,
        batch: &mut SortedBatch<'a>,
        indexes: &RecordIndexes,
        token: &[u8],
    ) -> Result<(), StoreError> {
        if indexes.expires_at_unix_ms > 0 {
            let key = expiry_key(indexes.expires_at_unix_ms, token);
            batch.delete_cf(self.family(EXPIRY)?, key);
        }
        batch.delete_cf(
            self.family(CARDS)?,
            card_entry_key(&indexes.card_key, token),
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
        let versions_cf = self.family(VERSIONS)?;
        for key_use in KeyUse::ALL {
            let old = rewrite.old_versions.get(key_use);
            batch.delete_cf(versions_cf, version_key(key_use, old, token));
        }
        for key_use in KeyUse::ALL {
            let new = rewrite.new_versions.get(key_use);
            batch.put_cf(versions_cf, version_key(key_use, new, token), []);
        }
        self.delete_indexes(batch, &rewrite.old_indexes, token)?;
        self.put_indexes(batch, &rewrite.new_indexes, token)?;
        pending.count(rewrite.old_versions, -1);
        pending.count(rewrite.new_versions, 1);
        if rewrite.old_index_key != rewrite.new_index_key {
            let index_cf = self.family(FINGERPRINTS)?;
            if self
                .index_entry(&rewrite.old_index_key, pending)?
                .as_deref()
                == Some(token)
            {
                batch.delete_cf(index_cf, &rewrite.old_index_key);
                pending.index.insert(rewrite.old_index_key.clone(), None);
            }
            // Another live token of the same card may own the new entry already.
            if self.live_entry(&rewrite.new_index_key, pending)?.is_none() {
                batch.put_cf(index_cf, &rewrite.new_index_key, token);
                pending
                    .index
                    .insert(rewrite.new_index_key.clone(), Some(token.to_vec()));
            }
        }
        pending.rewritten.insert(token.to_vec());
        Ok(RewriteOutcome::Rewritten)
    }
}
