//! The vaults' erasures, kept off the vaults' hosts: each deleted token's keyed id (the
//! fingerprint key version, then an HMAC of the tenant and token under that version's
//! key; see the vault's `record::tombstone`), when it was deleted, and the store it was
//! deleted from (a random id each vault store keeps: a RocksDB data directory, or one
//! PostgreSQL database shared by its vaults; a backup carries it). A store restored
//! from an older copy brings back what was erased since; its vault reads the store's
//! erasures from the position it had applied and deletes again every record whose
//! keyed id is among them. Nothing of a token or card can be read from an id without
//! the fingerprint key, which the keyservice holds sealed and never applies.
//!
//! One append-only file of 64-byte entries: store id (16), keyed id (36), time (8,
//! big-endian milliseconds), and the first 4 bytes of the SHA-256 of those 60. Synced
//! before a report is answered. A partial last entry (a crash mid-append) is cut off
//! at open; a damaged entry anywhere else refuses the open. An id already kept is not
//! appended again (the vaults of one database all send the same ones). Kept for good.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Mutex;

/// A keyed id's length: a 4-byte version and a 32-byte HMAC.
pub const ID_LEN: usize = 36;
/// A store id's length.
pub const STORE_LEN: usize = 16;
const ENTRY_LEN: usize = STORE_LEN + ID_LEN + 8 + 4;

/// Most erasures taken in one report, and answered in one page.
pub const MAX_PER_CALL: usize = 4096;

pub type StoreId = [u8; STORE_LEN];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erasure {
    pub id: [u8; ID_LEN],
    pub deleted_at_unix_ms: i64,
}

#[derive(Debug)]
pub struct Erasures {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    /// Entries in the file.
    entries: u64,
    by_store: HashMap<StoreId, Vec<Erasure>>,
    /// The ids kept (8 bytes of each HMAC), so that none is kept twice.
    kept: HashSet<u64>,
    /// An append failed and its part could not be cut off: nothing more is appended,
    /// as the next entry would not start on an entry boundary.
    broken: bool,
}

fn check(entry: &[u8]) -> [u8; 4] {
    let digest = ring::digest::digest(&ring::digest::SHA256, entry);
    let mut out = [0; 4];
    out.copy_from_slice(&digest.as_ref()[..4]);
    out
}

fn short(id: &[u8; ID_LEN]) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&id[4..12]);
    u64::from_be_bytes(bytes)
}

impl Erasures {
    /// Opens (or creates, mode 0600) the file and reads every entry.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let whole = bytes.len() - bytes.len() % ENTRY_LEN;
        if whole != bytes.len() {
            tracing::warn!(
                path = %path.display(),
                cut = bytes.len() - whole,
                "the erasure log ends in a partial entry (a crash while it was written); \
                 it is cut off: the vault that sent it was not answered and sends it again"
            );
            file.set_len(whole as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        let mut inner = Inner {
            file,
            entries: 0,
            by_store: HashMap::new(),
            kept: HashSet::new(),
            broken: false,
        };
        for (n, entry) in bytes[..whole].chunks_exact(ENTRY_LEN).enumerate() {
            let (body, sum) = entry.split_at(ENTRY_LEN - 4);
            if check(body) != sum {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("erasure entry {n} is damaged (its checksum does not match)"),
                ));
            }
            let (store, rest) = body.split_at(STORE_LEN);
            let (id, at) = rest.split_at(ID_LEN);
            let erasure = Erasure {
                id: id.try_into().map_err(std::io::Error::other)?,
                deleted_at_unix_ms: i64::from_be_bytes(
                    at.try_into().map_err(std::io::Error::other)?,
                ),
            };
            inner.kept.insert(short(&erasure.id));
            inner
                .by_store
                .entry(store.try_into().map_err(std::io::Error::other)?)
                .or_default()
                .push(erasure);
            inner.entries += 1;
        }
        Ok(Self {
            inner: Mutex::new(inner),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends the erasures of `store` not kept yet, durably. Returns how many the
    /// store has in all.
    pub fn append(&self, store: &StoreId, erasures: &[Erasure]) -> std::io::Result<u64> {
        let mut inner = self.inner();
        let mut fresh = Vec::new();
        let mut seen = HashSet::new();
        for erasure in erasures {
            let short = short(&erasure.id);
            if !inner.kept.contains(&short) && seen.insert(short) {
                fresh.push(*erasure);
            }
        }
        if !fresh.is_empty() {
            if inner.broken {
                return Err(std::io::Error::other(
                    "an earlier append failed and could not be undone; restart the keyservice",
                ));
            }
            let mut bytes = Vec::with_capacity(fresh.len() * ENTRY_LEN);
            for erasure in &fresh {
                let start = bytes.len();
                bytes.extend_from_slice(store);
                bytes.extend_from_slice(&erasure.id);
                bytes.extend_from_slice(&erasure.deleted_at_unix_ms.to_be_bytes());
                let sum = check(&bytes[start..]);
                bytes.extend_from_slice(&sum);
            }
            let written = inner
                .file
                .write_all(&bytes)
                .and_then(|()| inner.file.sync_data());
            if let Err(e) = written {
                // Cut whatever part was written, so that the next append starts on an
                // entry boundary; if even that fails, append nothing more.
                let whole = inner.entries * ENTRY_LEN as u64;
                if inner.file.set_len(whole).is_err() {
                    inner.broken = true;
                }
                return Err(e);
            }
            inner.entries += fresh.len() as u64;
            for erasure in &fresh {
                inner.kept.insert(short(&erasure.id));
            }
            inner.by_store.entry(*store).or_default().extend(fresh);
        }
        Ok(inner
            .by_store
            .get(store)
            .map_or(0, |kept| kept.len() as u64))
    }

    /// Up to `limit` of `store`'s erasures from position `after` on (0: the first),
    /// the position after the last one returned, and how many the store has.
    pub fn page(&self, store: &StoreId, after: u64, limit: usize) -> (Vec<Erasure>, u64, u64) {
        let inner = self.inner();
        let kept: &[Erasure] = inner.by_store.get(store).map_or(&[], Vec::as_slice);
        let start = usize::try_from(after).unwrap_or(usize::MAX).min(kept.len());
        let end = start.saturating_add(limit).min(kept.len());
        (kept[start..end].to_vec(), end as u64, kept.len() as u64)
    }

    /// Every erasure kept, all stores.
    pub fn len(&self) -> u64 {
        self.inner().entries
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erasure(byte: u8) -> Erasure {
        Erasure {
            id: [byte; ID_LEN],
            deleted_at_unix_ms: 1_700_000_000_000 + i64::from(byte),
        }
    }

    const A: StoreId = [0xa; STORE_LEN];
    const B: StoreId = [0xb; STORE_LEN];

    #[test]
    fn erasures_survive_a_reopen_per_store_once_and_a_torn_last_entry_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("erasures.bin");
        let log = Erasures::open(&path).unwrap();
        assert!(log.is_empty());
        assert_eq!(
            log.append(&A, &[erasure(1), erasure(2), erasure(1)])
                .unwrap(),
            2
        );
        assert_eq!(log.append(&B, &[erasure(3)]).unwrap(), 1);
        // Sent again (by another vault of the database): kept once.
        assert_eq!(log.append(&A, &[erasure(2)]).unwrap(), 2);
        assert_eq!(log.len(), 3);
        drop(log);
        // A crash in the middle of the next append.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[9; 20]).unwrap();
        drop(file);

        let log = Erasures::open(&path).unwrap();
        assert_eq!(log.len(), 3);
        assert_eq!(log.page(&A, 0, 1), (vec![erasure(1)], 1, 2));
        assert_eq!(log.page(&A, 1, 10), (vec![erasure(2)], 2, 2));
        assert_eq!(log.page(&A, u64::MAX, 10), (vec![], 2, 2));
        assert_eq!(log.page(&B, 0, 10), (vec![erasure(3)], 1, 1));
        assert_eq!(log.page(&[0; STORE_LEN], 0, 10), (vec![], 0, 0));
        // Appends go on from the cut.
        log.append(&A, &[erasure(4)]).unwrap();
        drop(log);
        let log = Erasures::open(&path).unwrap();
        assert_eq!(log.page(&A, 2, 10), (vec![erasure(4)], 3, 3));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            4 * ENTRY_LEN as u64
        );
    }

    #[test]
    fn a_damaged_entry_refuses_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("erasures.bin");
        let log = Erasures::open(&path).unwrap();
        log.append(&A, &[erasure(1), erasure(2)]).unwrap();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let err = Erasures::open(&path).unwrap_err();
        assert!(err.to_string().contains("entry 0 is damaged"), "{err}");
    }
}
