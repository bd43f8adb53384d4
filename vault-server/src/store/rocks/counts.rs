//! Records per key use and version, stored with the records (`COUNTS`) and read at
//! start.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rocksdb::{DB, WriteOptions};

use super::indexes::{parse_version_key, version_key};
use super::{COUNTS, META, VERSIONS, engine};
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

/// The stored counts, or (for a data directory from before they were stored) a count
/// of every `versions` entry, then stored.
pub(super) fn load_counts(db: &DB) -> Result<BTreeMap<(KeyUse, u32), u64>, StoreError> {
    let meta = db.cf_handle(META).ok_or(StoreError::Closed)?;
    if let Some(stored) = db.get_pinned_cf(meta, COUNTS).map_err(engine)? {
        let stored = decode_counts(&stored)
            .ok_or_else(|| StoreError::Engine("the stored record counts are malformed".into()))?;
        // Destroy checks trust these counts. A version with records but no count (an
        // older vault-server, which did not keep them, ran on this directory) means
        // they are stale: count again.
        let on_disk = versions_on_disk(db)?;
        if on_disk.iter().all(|version| stored.contains_key(version)) {
            return Ok(stored);
        }
        tracing::warn!("the stored record counts miss a key version in use; counting every record");
    }
    let counts = count_versions(db)?;
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    db.put_cf_opt(meta, COUNTS, encode_counts(&counts), &sync)
        .map_err(engine)?;
    Ok(counts)
}

/// The key versions that have records, found with one seek per version.
fn versions_on_disk(db: &DB) -> Result<Vec<(KeyUse, u32)>, StoreError> {
    let versions = db.cf_handle(VERSIONS).ok_or(StoreError::Closed)?;
    let mut found = Vec::new();
    let mut iter = db.raw_iterator_cf(versions);
    for key_use in KeyUse::ALL {
        let mut next = Some(0u32);
        while let Some(version) = next {
            iter.seek(version_key(key_use, version, &[]));
            match iter.key().and_then(parse_version_key) {
                Some((found_use, found_version, _)) if found_use == key_use => {
                    found.push((key_use, found_version));
                    next = found_version.checked_add(1);
                }
                _ => next = None,
            }
        }
    }
    iter.status().map_err(engine)?;
    Ok(found)
}

fn count_versions(db: &DB) -> Result<BTreeMap<(KeyUse, u32), u64>, StoreError> {
    let versions = db.cf_handle(VERSIONS).ok_or(StoreError::Closed)?;
    let mut counts = BTreeMap::new();
    let mut iter = db.raw_iterator_cf(versions);
    iter.seek_to_first();
    while let Some(key) = iter.key() {
        if let Some((key_use, version, _)) = parse_version_key(key) {
            *counts.entry((key_use, version)).or_insert(0) += 1;
        }
        iter.next();
    }
    iter.status().map_err(engine)?;
    Ok(counts)
}
