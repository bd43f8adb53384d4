//! The keys of the index column families (`versions`, `expiry`, `cards`), and the
//! one-time indexing of records written before those families existed.

use rocksdb::{DB, WriteBatch, WriteOptions};

use super::{CARDS, COUNTS, EXPIRY, INDEXED, IndexesOf, META, RECORDS, VERSIONS, engine};
use crate::store::{KeyUse, StoreError};

pub(super) fn expiry_key(expires_at_unix_ms: i64, token: &[u8]) -> Vec<u8> {
    // Expiry times are positive: big-endian bytes sort in time order.
    [&expires_at_unix_ms.to_be_bytes()[..], token].concat()
}

pub(super) fn card_entry_key(card_key: &[u8], token: &[u8]) -> Vec<u8> {
    [card_key, token].concat()
}

pub(super) fn version_key(key_use: KeyUse, version: u32, token: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(5 + token.len());
    key.push(key_use.code());
    key.extend_from_slice(&version.to_be_bytes());
    key.extend_from_slice(token);
    key
}

pub(super) fn parse_version_key(key: &[u8]) -> Option<(KeyUse, u32, &[u8])> {
    let key_use = KeyUse::from_code(*key.first()?)?;
    let version = u32::from_be_bytes(key.get(1..5)?.try_into().ok()?);
    Some((key_use, version, key.get(5..)?))
}

/// Writes the `versions` entries of every record (one synced batch per 10,000).
pub(super) fn index_records(db: &DB, indexes_of: IndexesOf) -> Result<(), StoreError> {
    let records = db.cf_handle(RECORDS).ok_or(StoreError::Closed)?;
    let versions = db.cf_handle(VERSIONS).ok_or(StoreError::Closed)?;
    let expiry = db.cf_handle(EXPIRY).ok_or(StoreError::Closed)?;
    let cards = db.cf_handle(CARDS).ok_or(StoreError::Closed)?;
    let meta = db.cf_handle(META).ok_or(StoreError::Closed)?;
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    let mut batch = WriteBatch::default();
    let mut indexed = 0u64;
    for entry in db.iterator_cf(records, rocksdb::IteratorMode::Start) {
        let (token, value) = entry.map_err(engine)?;
        let Some((v, indexes)) = indexes_of(&value) else {
            continue;
        };
        for key_use in KeyUse::ALL {
            batch.put_cf(versions, version_key(key_use, v.get(key_use), &token), []);
        }
        if indexes.expires_at_unix_ms > 0 {
            batch.put_cf(expiry, expiry_key(indexes.expires_at_unix_ms, &token), []);
        }
        batch.put_cf(cards, card_entry_key(&indexes.card_key, &token), []);
        indexed += 1;
        if batch.len() >= 20_000 {
            db.write_opt(std::mem::take(&mut batch), &sync)
                .map_err(engine)?;
        }
    }
    // Marks the index complete, in the same durable write as its last entries; the
    // stored counts (if any) are out of date now and are counted anew.
    batch.put_cf(meta, INDEXED, []);
    batch.delete_cf(meta, COUNTS);
    db.write_opt(batch, &sync).map_err(engine)?;
    tracing::debug!(
        records = indexed,
        "indexed the key versions of existing records"
    );
    Ok(())
}
