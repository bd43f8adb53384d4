//! The vaults' erasures, kept off the vaults' hosts: each deleted token's keyed id (the
//! fingerprint key version, then an HMAC of the tenant and token under that version's
//! key; see the vault's `record::tombstone`) and when it was deleted. Restoring a
//! vault's backup, or a database restored from an older copy, brings back what was
//! erased since; the vault that finds its log rewound reads these and deletes again
//! every record whose keyed id is here. Nothing of a token or card can be read from
//! an id without the fingerprint key, which the keyservice holds sealed and never
//! applies.
//!
//! One append-only file of fixed-size entries (36-byte id, 8-byte big-endian time),
//! synced before a report is acknowledged. A partial last entry (a crash mid-append)
//! is cut off at open. Entries are kept for good: 44 bytes per deletion.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Mutex;

/// A keyed id's length: a 4-byte version and a 32-byte HMAC.
pub const ID_LEN: usize = 36;
const ENTRY_LEN: usize = ID_LEN + 8;

/// Most erasures taken in one report, and answered in one page.
pub const MAX_PER_CALL: usize = 4096;

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
    kept: Vec<Erasure>,
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
        let kept = bytes[..whole]
            .chunks_exact(ENTRY_LEN)
            .filter_map(|entry| {
                let (id, at) = entry.split_first_chunk::<ID_LEN>()?;
                Some(Erasure {
                    id: *id,
                    deleted_at_unix_ms: i64::from_be_bytes(at.try_into().ok()?),
                })
            })
            .collect();
        Ok(Self {
            inner: Mutex::new(Inner { file, kept }),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `erasures` durably. Returns how many are kept in all.
    pub fn append(&self, erasures: &[Erasure]) -> std::io::Result<u64> {
        let mut inner = self.inner();
        let mut bytes = Vec::with_capacity(erasures.len() * ENTRY_LEN);
        for erasure in erasures {
            bytes.extend_from_slice(&erasure.id);
            bytes.extend_from_slice(&erasure.deleted_at_unix_ms.to_be_bytes());
        }
        let written = inner
            .file
            .write_all(&bytes)
            .and_then(|()| inner.file.sync_data());
        if let Err(e) = written {
            // Whatever part was written is cut off again, so that the next append
            // starts on an entry boundary.
            let whole = (inner.kept.len() * ENTRY_LEN) as u64;
            let _ = inner.file.set_len(whole);
            return Err(e);
        }
        inner.kept.extend_from_slice(erasures);
        Ok(inner.kept.len() as u64)
    }

    /// Up to `limit` erasures from position `after` on (0: the first), and the
    /// position after the last one returned.
    pub fn page(&self, after: u64, limit: usize) -> (Vec<Erasure>, u64) {
        let inner = self.inner();
        let start = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(inner.kept.len());
        let end = start.saturating_add(limit).min(inner.kept.len());
        (inner.kept[start..end].to_vec(), end as u64)
    }

    pub fn len(&self) -> u64 {
        self.inner().kept.len() as u64
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

    #[test]
    fn erasures_survive_a_reopen_and_a_torn_last_entry_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("erasures.bin");
        let log = Erasures::open(&path).unwrap();
        assert!(log.is_empty());
        assert_eq!(log.append(&[erasure(1), erasure(2)]).unwrap(), 2);
        assert_eq!(log.append(&[erasure(3)]).unwrap(), 3);
        drop(log);
        // A crash in the middle of the next append.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[9; 20]).unwrap();
        drop(file);

        let log = Erasures::open(&path).unwrap();
        assert_eq!(log.len(), 3);
        assert_eq!(log.page(0, 2), (vec![erasure(1), erasure(2)], 2));
        assert_eq!(log.page(2, 10), (vec![erasure(3)], 3));
        assert_eq!(log.page(3, 10), (vec![], 3));
        assert_eq!(log.page(u64::MAX, 10), (vec![], 3));
        // Appends go on from the cut.
        log.append(&[erasure(4)]).unwrap();
        drop(log);
        let log = Erasures::open(&path).unwrap();
        assert_eq!(log.page(3, 10), (vec![erasure(4)], 4));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            4 * ENTRY_LEN as u64
        );
    }
}
