//! The audit log: a column family of the data database (`audit`, keyed by sequence
//! number, big-endian), written by the data writer in the same synced batch as the
//! data of the calls it records (see `writer.rs`). Also: moving the log of a vault from
//! before that, a database of its own, into the column family once.

use std::path::Path;

use rocksdb::{DB, Options, WriteBatch, WriteOptions};

use super::{AUDIT, META, RocksStore, engine, family};
use crate::store::{AUDIT_HEAD_KEY, AuditSeal, LogEnd, Sealed, StoreError};

/// `meta` key present once the audit log lives in the `audit` column family (written
/// when a store is created, or with the last entries moved from the old database).
const LOG_HERE: &[u8] = b"audit-log-in-data";
/// Entries moved from an old audit database per synced write.
const MOVE_BATCH: usize = 10_000;
/// A file in the data directory by which an operator says the old audit log is lost
/// for good (see `move_old_audit_log`).
const LOG_LOST_FILE: &str = "AUDIT-LOG-LOST";

impl RocksStore {
    /// See `Store::read_audit`.
    pub(super) fn read_audit_log(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let db = self.db()?;
        let mut iter = db.raw_iterator_cf(family(&db, AUDIT)?);
        iter.seek(after.saturating_add(1).to_be_bytes());
        let mut entries = Vec::new();
        while entries.len() < limit {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            let sequence = sequence_of(key)?;
            if sequence > after {
                entries.push((sequence, value.to_vec()));
            }
            iter.next();
        }
        iter.status().map_err(engine)?;
        Ok(entries)
    }

    /// See `Store::last_audit`.
    pub(super) fn last_in_audit_log(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        last_entry(&*self.db()?)
    }
}

fn sequence_of(key: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(key.try_into().map_err(|_| {
        StoreError::Engine("an audit key is not a sequence number".into())
    })?))
}

/// The log's last entry and its anchor.
pub(super) fn log_end(db: &DB) -> Result<LogEnd, StoreError> {
    Ok(LogEnd {
        last: last_entry(db)?,
        anchor: db
            .get_cf(family(db, META)?, AUDIT_HEAD_KEY)
            .map_err(engine)?,
    })
}

/// The log's last entry.
fn last_entry(db: &DB) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    let mut iter = db.raw_iterator_cf(family(db, AUDIT)?);
    iter.seek_to_last();
    iter.status().map_err(engine)?;
    match (iter.key(), iter.value()) {
        (Some(key), Some(value)) => Ok(Some((sequence_of(key)?, value.to_vec()))),
        _ => Ok(None),
    }
}

/// Runs `seal` on the log's end. It runs on the writer thread, inside a group: a panic
/// must not end the thread (every later write would fail), so nothing is appended
/// instead and the caller's event fails.
pub(super) fn seal_entries(seal: AuditSeal, end: LogEnd) -> Sealed {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| seal(end))).unwrap_or_else(|_| {
        tracing::error!("audit entries could not be made; nothing was appended");
        Sealed::default()
    })
}

/// Moves the audit log of a vault from before the `audit` column family (a database of
/// its own in `old_dir`) into the column family, once: the entries are copied in
/// synced batches (copying one twice is harmless), the marker goes with the last, and
/// the old directory is renamed `<old_dir>.moved`. Once the marker is there, a database
/// found at `old_dir` is never copied again (it could only be an older copy put back,
/// whose entries would overwrite newer ones): it is reported and left alone.
pub(super) fn move_old_audit_log(db: &DB, old_dir: &Path) -> Result<(), StoreError> {
    let meta = family(db, META)?;
    let present = old_dir.join("CURRENT").exists();
    if db.get_cf(meta, LOG_HERE).map_err(engine)?.is_some() {
        if present {
            tracing::warn!(
                path = %old_dir.display(),
                "an old audit log database is there but the log moved into the data \
                 directory already; it is ignored"
            );
        }
        return Ok(());
    }
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    if !present {
        // An anchor here means an older vault wrote a log, kept elsewhere: starting
        // without it would make it a gap for good (its volume may just not be mounted).
        let anchored = db.get_cf(meta, AUDIT_HEAD_KEY).map_err(engine)?.is_some();
        let lost = db.path().join(LOG_LOST_FILE);
        if anchored && !lost.exists() {
            return Err(StoreError::Engine(format!(
                "this data directory's audit log is not at {}: mount it there or set \
                 audit_dir to where it is. If it is lost for good, create the file {} to \
                 start without it; its entries then show as a gap that two admins \
                 acknowledge",
                old_dir.display(),
                lost.display()
            )));
        }
        return db.put_cf_opt(meta, LOG_HERE, b"", &sync).map_err(engine);
    }
    let old = DB::open_for_read_only(&Options::default(), old_dir, false).map_err(engine)?;
    let log = family(db, AUDIT)?;
    let mut batch = WriteBatch::default();
    let mut moved = 0u64;
    for entry in old.iterator(rocksdb::IteratorMode::Start) {
        let (key, value) = entry.map_err(engine)?;
        sequence_of(&key)?;
        batch.put_cf(log, key, value);
        moved += 1;
        if batch.len() >= MOVE_BATCH {
            db.write_opt(std::mem::take(&mut batch), &sync)
                .map_err(engine)?;
            tracing::info!(moved, "moving the audit log into the data directory");
        }
    }
    batch.put_cf(meta, LOG_HERE, b"");
    db.write_opt(batch, &sync).map_err(engine)?;
    drop(old);
    let mut aside = old_dir.as_os_str().to_owned();
    aside.push(".moved");
    match std::fs::rename(old_dir, &aside) {
        Ok(()) => tracing::warn!(
            moved,
            from = %old_dir.display(),
            kept_at = %Path::new(&aside).display(),
            "the audit log moved into the data directory; the old database is kept \
             aside for you to delete once `vaultctl audit verify` is clean"
        ),
        Err(e) => tracing::warn!(
            moved,
            from = %old_dir.display(),
            error = %e,
            "the audit log moved into the data directory; the old database could not \
             be renamed and is ignored from now on"
        ),
    }
    Ok(())
}
