//! Records per key use and version, stored with the records (`COUNTS`) and read at
//! start.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rocksdb::{DB, WriteOptions};

use super::indexes::decode_versions;
use super::{CARD_INDEX, COUNTS, META, engine};
use crate::store::{KeyUse, StoreError};

pub(super) type Counts = Arc<Mutex<BTreeMap<(KeyUse, u32), u64>>>;

/// `COUNTS` as stored: per key use and version, `use: u8 | version: u32 | count: u64`,
/// big-endian.
pub(super) fn encode_counts(counts: &BTreeMap<(KeyUse, u32), u64>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(counts.len() * 13);
    for (&(key_use, version), count) in counts {
        bytes.push(key_use.code());
        bytes.extend_from_slice(&version.to_be_bytes());
        bytes.extend_from_slice(&count.to_be_bytes());
    }
    bytes
}

pub(super) fn decode_counts(bytes: &[u8]) -> Option<BTreeMap<(KeyUse, u32), u64>> {
    if !bytes.len().is_multiple_of(13) {
        return None;
    }
    bytes
        .chunks_exact(13)
        .map(|entry| {
            let key_use = KeyUse::from_code(entry[0])?;
            let version = u32::from_be_bytes(entry[1..5].try_into().ok()?);
            let count = u64::from_be_bytes(entry[5..].try_into().ok()?);
            Some(((key_use, version), count))
        })
        .collect()
}

/// The stored counts, or (for a data directory from before they were stored, or just
/// indexed) a count of every card index entry, then stored.
pub(super) fn load_counts(db: &DB) -> Result<BTreeMap<(KeyUse, u32), u64>, StoreError> {
    let meta = db.cf_handle(META).ok_or(StoreError::Closed)?;
    if let Some(stored) = db.get_pinned_cf(meta, COUNTS).map_err(engine)? {
        let stored = decode_counts(&stored)
            .ok_or_else(|| StoreError::Engine("the stored record counts are malformed".into()))?;
        return Ok(stored);
    }
    let counts = count_versions(db)?;
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    db.put_cf_opt(meta, COUNTS, encode_counts(&counts), &sync)
        .map_err(engine)?;
    Ok(counts)
}

fn count_versions(db: &DB) -> Result<BTreeMap<(KeyUse, u32), u64>, StoreError> {
    let index = db.cf_handle(CARD_INDEX).ok_or(StoreError::Closed)?;
    let mut counts = BTreeMap::new();
    let mut iter = db.raw_iterator_cf(index);
    iter.seek_to_first();
    while let Some(value) = iter.value() {
        if let Some(versions) = decode_versions(value) {
            for key_use in KeyUse::ALL {
                *counts.entry((key_use, versions.get(key_use))).or_insert(0) += 1;
            }
        }
        iter.next();
    }
    iter.status().map_err(engine)?;
    Ok(counts)
}
