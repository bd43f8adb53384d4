//! The card index and the expiry index, and the one-time move of a database from the
//! earlier layout (a fingerprint index, a `versions` and a `cards` family) to them.
//!
//! A card index entry, one per record:
//!
//! ```text
//! key   = card_key_len: u8 | index_key (which starts with the card key) |
//!         created_at_unix_ms: i64 | token
//! value = card_data_version: u32 | fingerprint_version: u32 | expires_at_unix_ms: i64
//! ```
//!
//! It serves `reuse_existing` (the live tokens of one index key: tenant, fingerprint
//! and expiry, oldest first, skipping expired ones), data-subject requests (every token of one card key, whatever the
//! expiry: the length byte makes the card key exact), and rewrap and counting (the
//! versions in the value). An expiry entry (`expires_at: i64 | token`) exists only for
//! a record with a TTL.
//!
//! `token` in a card index key is the token's *tail*: an opaque token as it is (26
//! bytes, the layout from before card-shaped tokens, so nothing is rewritten), a
//! card-shaped one (12 to 19 digits) followed by one byte holding its length, a byte no
//! token character has. So the token is read exactly from the key's end alone, which the
//! rewrap and data-subject scans need (they do not know the index key's length).

use rocksdb::{DB, WriteBatch, WriteOptions};

use super::{
    CARD_INDEX, COUNTS, EXPIRY, FAMILIES, INDEXED, IndexesOf, META, RECORDS, engine, family,
};
use crate::store::{KeyVersions, RecordIndexes, StoreError};
use crate::token;

pub(super) fn expiry_key(expires_at_unix_ms: i64, token: &[u8]) -> Vec<u8> {
    // Expiry times are positive: big-endian bytes sort in time order.
    [&expires_at_unix_ms.to_be_bytes()[..], token].concat()
}

fn card_key_len(card_key: &[u8]) -> Result<u8, StoreError> {
    u8::try_from(card_key.len())
        .map_err(|_| StoreError::Engine("a card key is longer than 255 bytes".into()))
}

/// Where the entries of one card key start (`card_key_len | card_key`).
pub(super) fn card_prefix(card_key: &[u8]) -> Result<Vec<u8>, StoreError> {
    Ok([&[card_key_len(card_key)?][..], card_key].concat())
}

/// Where the entries of one index key start: `card_key_len | index_key`. The index key
/// must start with the card key (the store's contract, see `NewRecord`).
pub(super) fn index_prefix(card_key: &[u8], index_key: &[u8]) -> Result<Vec<u8>, StoreError> {
    if !index_key.starts_with(card_key) {
        return Err(StoreError::Engine(
            "an index key does not start with its card key".into(),
        ));
    }
    Ok([&[card_key_len(card_key)?][..], index_key].concat())
}

/// Where the entries of an index key of the same card under an older fingerprint
/// version start: its card key differs from `card_key` but has its length.
pub(super) fn older_index_prefix(card_key: &[u8], older: &[u8]) -> Result<Vec<u8>, StoreError> {
    if older.len() < card_key.len() {
        return Err(StoreError::Engine(
            "an older index key is shorter than its card key".into(),
        ));
    }
    Ok([&[card_key_len(card_key)?][..], older].concat())
}

pub(super) fn card_entry(
    indexes: &RecordIndexes,
    index_key: &[u8],
    token: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let mut key = index_prefix(&indexes.card_key, index_key)?;
    // Times are positive: big-endian bytes sort oldest first.
    key.extend_from_slice(&indexes.created_at_unix_ms.to_be_bytes());
    key.extend_from_slice(&token_tail(token)?);
    Ok(key)
}

/// How a token ends a card index entry (see the module's doc).
pub(super) fn token_tail(token: &[u8]) -> Result<Vec<u8>, StoreError> {
    if token.len() == token::OPAQUE_LEN {
        return Ok(token.to_vec());
    }
    let len = u8::try_from(token.len())
        .ok()
        .filter(|len| token::CARD_LENS.contains(&usize::from(*len)))
        .ok_or_else(|| StoreError::Engine("a token to index has an impossible length".into()))?;
    Ok([token, &[len]].concat())
}

/// The token of an entry under `prefix`, if the entry is exactly `prefix | created_at
/// | token tail`.
pub(super) fn token_under<'k>(key: &'k [u8], prefix: &[u8]) -> Option<&'k [u8]> {
    let tail = key.strip_prefix(prefix)?.get(8..)?;
    let token = entry_token(tail)?;
    let exact = match token.len() {
        token::OPAQUE_LEN => tail.len() == token.len(),
        len => tail.len() == len + 1,
    };
    exact.then_some(token)
}

/// The token of any entry, read from its tail (see the module's doc).
pub(super) fn entry_token(key: &[u8]) -> Option<&[u8]> {
    let (&last, rest) = key.split_last()?;
    let len = usize::from(last);
    if token::CARD_LENS.contains(&len) {
        return rest.len().checked_sub(len).map(|start| &rest[start..]);
    }
    key.len()
        .checked_sub(token::OPAQUE_LEN)
        .map(|start| &key[start..])
}

pub(super) fn encode_entry(versions: KeyVersions, expires_at_unix_ms: i64) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..4].copy_from_slice(&versions.card_data.to_be_bytes());
    value[4..8].copy_from_slice(&versions.fingerprint.to_be_bytes());
    value[8..].copy_from_slice(&expires_at_unix_ms.to_be_bytes());
    value
}

/// Whether an entry's record has expired at `now_unix_ms` (0: it never does).
pub(super) fn entry_expired(value: &[u8], now_unix_ms: i64) -> bool {
    value
        .get(8..16)
        .and_then(|bytes| bytes.try_into().ok())
        .map(i64::from_be_bytes)
        .is_some_and(|at| at != 0 && at <= now_unix_ms)
}

pub(super) fn decode_versions(value: &[u8]) -> Option<KeyVersions> {
    Some(KeyVersions {
        card_data: u32::from_be_bytes(value.get(..4)?.try_into().ok()?),
        fingerprint: u32::from_be_bytes(value.get(4..8)?.try_into().ok()?),
    })
}

/// Drops every family that is not one of ours (the earlier layout's indexes), at each
/// start: a crash between `index_records`' marker and the drop must not leave them
/// (with erased cards' fingerprints and tokens) for good.
pub(super) fn drop_old_families(db: &mut DB) -> Result<(), StoreError> {
    let existing = DB::list_cf(&rocksdb::Options::default(), db.path()).map_err(engine)?;
    for name in existing {
        if name != "default" && !FAMILIES.contains(&name.as_str()) {
            db.drop_cf(&name).map_err(engine)?;
            tracing::info!(family = %name, "dropped an index family of the earlier layout");
        }
    }
    Ok(())
}

/// Builds the card index (and the expiry index) from the records, in synced batches,
/// with the marker in the last. Run at start when the marker is missing (an interrupted
/// run runs again: each entry is the same the second time); `drop_old_families` then
/// removes the earlier layout's families.
pub(super) fn index_records(db: &DB, indexes_of: IndexesOf) -> Result<(), StoreError> {
    let mut indexed = 0u64;
    {
        let records = family(db, RECORDS)?;
        let cards = family(db, CARD_INDEX)?;
        let expiry = family(db, EXPIRY)?;
        let meta = family(db, META)?;
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let mut batch = WriteBatch::default();
        for entry in db.iterator_cf(records, rocksdb::IteratorMode::Start) {
            let (token, value) = entry.map_err(engine)?;
            let Some((versions, indexes, index_key)) = indexes_of(&value) else {
                tracing::warn!("a record's header is unreadable; it is left out of the index");
                continue;
            };
            batch.put_cf(
                cards,
                card_entry(&indexes, &index_key, &token)?,
                encode_entry(versions, indexes.expires_at_unix_ms),
            );
            if indexes.expires_at_unix_ms > 0 {
                batch.put_cf(expiry, expiry_key(indexes.expires_at_unix_ms, &token), []);
            }
            indexed += 1;
            if batch.len() >= 20_000 {
                db.write_opt(std::mem::take(&mut batch), &sync)
                    .map_err(engine)?;
                tracing::info!(records = indexed, "indexing the records");
            }
        }
        // The stored counts are counted anew from the index.
        batch.put_cf(meta, INDEXED, []);
        batch.delete_cf(meta, COUNTS);
        db.write_opt(batch, &sync).map_err(engine)?;
    }
    if indexed > 0 {
        tracing::info!(records = indexed, "indexed the records in the card index");
    }
    Ok(())
}
