//! RocksDB engine. Column families: `records` (token → sealed record), `card-index`
//! (one entry per record: its card, expiry and token → its key versions; see
//! `indexes.rs`), `expiry` (records with a TTL only), `idempotency` (tenant and
//! idempotency key → forward outcome, which holds no card data), `meta` (small state of
//! background jobs, the record counts, the audit log's anchor), `tombstones` (a deleted
//! token's keyed id → when it was deleted) and `audit` (the audit log: sequence number
//! → entry). A tokenization writes two data keys (three with a
//! TTL); its call's audit entry follows in a later group commit of the same WAL.
//!
//! Writes go through one dedicated writer thread that takes everything queued, checks
//! put-if-absent against the database plus the writes already in the batch, chains the
//! queued audit events onto the log, and commits it all as one synced WriteBatch (group
//! commit). Every waiter is answered only after the sync, so an acknowledged token
//! survives `kill -9` and power loss, and one fsync is shared by every request that
//! arrived meanwhile (DESIGN.md, Storage). Being the only writer also makes
//! put-if-absent race-free and keeps the audit chain from forking. One database means
//! one WAL: data and audit events are durable in the same sync, and a batch holding
//! both is atomic.
//!
//! After a write fails because the disk is full or read-only, RocksDB refuses every
//! later write until the database is reopened. The writer does that by itself, at the
//! next write once the filesystem is writable with `RECOVERY_FREE_BYTES` free; reads go
//! on meanwhile, and pause only for the reopen itself.

mod audit;
mod backup;
#[cfg(test)]
mod card_token_tests;
mod counts;
#[cfg(test)]
mod erasure_tests;
mod indexes;
mod options;
mod planning;
mod recovery;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use rocksdb::{Cache, DB};
use tokio::sync::{mpsc, oneshot};

use super::{
    AuditSeal, Claim, Delete, DeleteOutcome, InsertOutcome, JobLock, KeyUse, KeyVersions,
    NewRecord, RecordIndexes, Replaceable, Rewrite, RewriteOutcome, Riding, Store, StoreError,
    StoreStats, StoredBytes, Tombstone,
};
use crate::token::Token;

use audit::move_old_audit_log;
pub use backup::scan_records;
use counts::{Counts, load_counts};
use indexes::{card_prefix, decode_versions, drop_old_families, entry_token, index_records};
use options::open_data;
use writer::{Op, QUEUE_DEPTH, Writer};

const RECORDS: &str = "records";
const CARD_INDEX: &str = "card-index";
const IDEMPOTENCY: &str = "idempotency";
const META: &str = "meta";
const EXPIRY: &str = "expiry";
const AUDIT: &str = "audit";
const TOMBSTONES: &str = "tombstones";
const UNSENT_ERASURES: &str = "unsent-erasures";
const FAMILIES: [&str; 8] = [
    RECORDS,
    CARD_INDEX,
    IDEMPOTENCY,
    META,
    EXPIRY,
    AUDIT,
    TOMBSTONES,
    UNSENT_ERASURES,
];
/// `meta` key present once every record has its card index (and expiry) entry.
const INDEXED: &[u8] = b"indexed-v3";
/// `meta` key holding the number of records per key use and version, written in the
/// same batch as every change to `versions`, so that start-up reads it instead of
/// counting every record.
const COUNTS: &[u8] = b"version-counts";

/// Reads a record's key versions, indexes and index key from its stored bytes (to index
/// records written before the card index existed).
pub type IndexesOf = fn(&[u8]) -> Option<(KeyVersions, RecordIndexes, Vec<u8>)>;

/// Memory settings (`[storage]` in the vault config).
#[derive(Debug, Clone)]
pub struct Tuning {
    pub block_cache_bytes: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            block_cache_bytes: 128 * 1024 * 1024,
        }
    }
}

/// The open data database, shared by readers and the writer. Empty only while the
/// writer reopens it (`Writer::recover`).
type Slot = Arc<RwLock<Option<Arc<DB>>>>;

/// Free space (for an unprivileged writer) on the filesystem holding `dir`; 0 if it
/// cannot be read.
fn free_bytes(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir).map_or(0, |fs| {
        fs.blocks_available().saturating_mul(fs.fragment_size())
    })
}

fn family<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily, StoreError> {
    db.cf_handle(name).ok_or(StoreError::Closed)
}

pub struct RocksStore {
    dir: PathBuf,
    cache: Cache,
    data: Slot,
    counts: Counts,
    queue: Option<mpsc::Sender<Op>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.dir)
            .finish_non_exhaustive()
    }
}

fn engine(e: rocksdb::Error) -> StoreError {
    classify(e.into_string())
}

/// RocksDB reports the cause of an I/O error only in its message (the OS error text).
fn classify(message: String) -> StoreError {
    if message.contains("No space left on device") {
        StoreError::NoSpace(message)
    } else if message.contains("Read-only file system")
        || message.contains("Permission denied")
        // The store was reopened read-only after a refused write (see `recover`).
        || message.contains("read only mode")
    {
        StoreError::NotWritable(message)
    } else {
        StoreError::Engine(message)
    }
}

/// `meta` key present once the deletions made before erasures were sent to the
/// keyservice (the tombstones then held) are queued to be sent too.
const ERASURES_SEEDED: &[u8] = b"erasures-seeded";

/// Queues every tombstone as an unsent erasure, once: deletions made before this
/// version reach the keyservice too, so that an older backup does not bring them back.
fn seed_unsent_erasures(db: &DB) -> Result<(), StoreError> {
    let meta = family(db, META)?;
    if db.get_cf(meta, ERASURES_SEEDED).map_err(engine)?.is_some() {
        return Ok(());
    }
    let mut batch = rocksdb::WriteBatch::default();
    let unsent = family(db, UNSENT_ERASURES)?;
    let mut iter = db.raw_iterator_cf(family(db, TOMBSTONES)?);
    iter.seek_to_first();
    while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
        batch.put_cf(unsent, key, value);
        iter.next();
    }
    iter.status().map_err(engine)?;
    batch.put_cf(meta, ERASURES_SEEDED, []);
    let mut sync = rocksdb::WriteOptions::default();
    sync.set_sync(true);
    db.write_opt(batch, &sync).map_err(engine)
}

impl RocksStore {
    /// Opens (or creates) the database in `dir` and starts the writer thread. A
    /// database from before the `versions` column family is indexed once, with
    /// `indexes_of` reading each record's key versions and indexes. An audit log kept
    /// in a database of its own at `old_audit_dir` (before the `audit` column family)
    /// is moved in once.
    pub fn open(
        dir: &Path,
        old_audit_dir: &Path,
        indexes_of: IndexesOf,
        tuning: &Tuning,
    ) -> Result<Self, StoreError> {
        let cache = Cache::new_lru_cache(tuning.block_cache_bytes);
        let mut db = open_data(dir, &cache)?;
        move_old_audit_log(&db, old_audit_dir)?;
        // The marker is written with the index's last batch: an indexing run that was
        // interrupted runs again (writing an entry twice is harmless).
        if db
            .get_cf(family(&db, META)?, INDEXED)
            .map_err(engine)?
            .is_none()
        {
            index_records(&db, indexes_of)?;
        }
        drop_old_families(&mut db)?;
        seed_unsent_erasures(&db)?;
        let db = Arc::new(db);
        let counts = Arc::new(Mutex::new(load_counts(&db)?));
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let data: Slot = Arc::new(RwLock::new(Some(Arc::clone(&db))));
        let writer = Writer {
            db,
            counts: Arc::clone(&counts),
            slot: Arc::clone(&data),
            dir: dir.to_owned(),
            cache: cache.clone(),
            refused_since: None,
            last_recovery: None,
            log_end: Default::default(),
        };
        let writer = std::thread::Builder::new()
            .name("rocksdb-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| StoreError::Engine(format!("cannot start writer thread: {e}")))?;
        Ok(Self {
            dir: dir.to_owned(),
            cache,
            data,
            counts,
            queue: Some(queue),
            writer: Some(writer),
        })
    }

    /// The data database, unless the writer is reopening it this moment.
    fn db(&self) -> Result<Arc<DB>, StoreError> {
        self.data
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(StoreError::Reopening)
    }

    async fn submit<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let queue = self.queue.as_ref().ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        queue
            .send(op(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

impl Drop for RocksStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer after it commits what is queued; joining it
        // releases the database lock before a restart in the same process reopens it.
        self.queue.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Store for RocksStore {
    async fn insert_audited(
        &self,
        records: Vec<NewRecord>,
        riding: Option<Riding<[InsertOutcome]>>,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        self.submit(|reply| Op::Insert {
            records,
            riding,
            reply,
        })
        .await
    }

    async fn get(&self, token: &Token) -> Result<Option<Vec<u8>>, StoreError> {
        // Point reads are served from the memtable or block cache in microseconds;
        // they run inline rather than paying for a thread hop.
        let db = self.db()?;
        db.get_cf(family(&db, RECORDS)?, token.as_str())
            .map_err(engine)
    }

    async fn delete_audited(
        &self,
        delete: Delete,
        riding: Option<Riding<DeleteOutcome>>,
    ) -> Result<DeleteOutcome, StoreError> {
        self.submit(|reply| Op::Delete {
            delete,
            riding,
            reply,
        })
        .await
    }

    async fn rewrite(&self, rewrite: Rewrite) -> Result<RewriteOutcome, StoreError> {
        self.submit(|reply| Op::Rewrite { rewrite, reply }).await
    }

    fn version_counts(&self) -> BTreeMap<(KeyUse, u32), u64> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn stats(&self) -> StoreStats {
        let mut stats = StoreStats {
            data_free_bytes: Some(free_bytes(&self.dir)),
            // The log is a column family of the data database, on the same disk.
            audit_free_bytes: None,
            block_cache_bytes: self.cache.get_usage() as u64,
            ..StoreStats::default()
        };
        let Ok(db) = self.db() else {
            return stats;
        };
        let int = |name: &str| db.property_int_value(name).ok().flatten().unwrap_or(0);
        stats.running_compactions = int("rocksdb.num-running-compactions");
        stats.write_stopped = int("rocksdb.is-write-stopped") != 0;
        stats.delayed_write_rate = int("rocksdb.actual-delayed-write-rate");
        for name in FAMILIES {
            let Some(cf) = db.cf_handle(name) else {
                continue;
            };
            let int = |property: &str| {
                db.property_int_value_cf(cf, property)
                    .ok()
                    .flatten()
                    .unwrap_or(0)
            };
            stats.table_bytes += int("rocksdb.total-sst-files-size");
            stats.memtable_bytes += int("rocksdb.cur-size-all-mem-tables");
            stats.pending_compaction_bytes += int("rocksdb.estimate-pending-compaction-bytes");
        }
        stats
    }

    async fn records_off_versions(
        &self,
        active: KeyVersions,
        cursor: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Token)>, StoreError> {
        // The card index holds every record's versions: one pass over it, page by page,
        // off the async threads (a page may scan many records already on `active`).
        let db = self.db()?;
        let cursor = cursor.map(<[u8]>::to_vec);
        tokio::task::spawn_blocking(move || {
            let cursor = cursor.as_deref();
            let mut found = Vec::new();
            let mut iter = db.raw_iterator_cf(family(&db, CARD_INDEX)?);
            match cursor {
                Some(cursor) => {
                    iter.seek(cursor);
                    if iter.key() == Some(cursor) {
                        iter.next();
                    }
                }
                None => iter.seek_to_first(),
            }
            while found.len() < limit {
                let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                    break;
                };
                if decode_versions(value) != Some(active) {
                    let token = entry_token(key)
                        .and_then(Token::from_stored)
                        .ok_or_else(|| {
                            StoreError::Engine("the card index holds a malformed token".into())
                        })?;
                    found.push((key.to_vec(), token));
                }
                iter.next();
            }
            iter.status().map_err(engine)?;
            Ok(found)
        })
        .await
        .map_err(|e| StoreError::Engine(e.to_string()))?
    }

    async fn prune_outcomes(
        &self,
        expired: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<usize, StoreError> {
        let mut stale = Vec::new();
        {
            let db = self.db()?;
            let mut iter = db.raw_iterator_cf(family(&db, IDEMPOTENCY)?);
            iter.seek_to_first();
            while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
                if expired(value) {
                    stale.push((key.to_vec(), value.to_vec()));
                }
                iter.next();
            }
            iter.status().map_err(engine)?;
        }
        let pruned = stale.len();
        for chunk in stale.chunks(1000) {
            let entries = chunk.to_vec();
            self.submit(|reply| Op::RemoveOutcomes { entries, reply })
                .await?;
        }
        Ok(pruned)
    }

    async fn expired(&self, now_unix_ms: i64, limit: usize) -> Result<Vec<Token>, StoreError> {
        let db = self.db()?;
        let mut iter = db.raw_iterator_cf(family(&db, EXPIRY)?);
        iter.seek_to_first();
        let mut tokens = Vec::new();
        while tokens.len() < limit {
            let Some(key) = iter.key() else { break };
            let (at, token) = key
                .split_at_checked(8)
                .ok_or_else(|| StoreError::Engine("an expiry key is malformed".into()))?;
            let at = i64::from_be_bytes(
                at.try_into()
                    .map_err(|_| StoreError::Engine("an expiry key is malformed".into()))?,
            );
            if at > now_unix_ms {
                break;
            }
            tokens.push(Token::from_stored(token).ok_or_else(|| {
                StoreError::Engine("the expiry index holds a malformed token".into())
            })?);
            iter.next();
        }
        iter.status().map_err(engine)?;
        Ok(tokens)
    }

    async fn tokens_of_card(&self, card_key: &[u8]) -> Result<Vec<Token>, StoreError> {
        let db = self.db()?;
        let prefix = card_prefix(card_key)?;
        let mut iter = db.raw_iterator_cf(family(&db, CARD_INDEX)?);
        iter.seek(&prefix);
        let mut tokens = Vec::new();
        while let Some(key) = iter.key() {
            if !key.starts_with(&prefix) {
                break;
            }
            // Any expiry: the token is the entry's last bytes.
            if let Some(token) = entry_token(key).and_then(Token::from_stored) {
                tokens.push(token);
            }
            iter.next();
        }
        iter.status().map_err(engine)?;
        Ok(tokens)
    }

    async fn count_known_cards(&self, card_keys: Vec<Vec<u8>>) -> Result<u64, StoreError> {
        let db = self.db()?;
        tokio::task::spawn_blocking(move || {
            // A card index entry exists exactly while its record does.
            let mut iter = db.raw_iterator_cf(family(&db, CARD_INDEX)?);
            let mut known = 0;
            for card_key in card_keys {
                let prefix = card_prefix(&card_key)?;
                iter.seek(&prefix);
                known += u64::from(iter.key().is_some_and(|key| key.starts_with(&prefix)));
            }
            iter.status().map_err(engine)?;
            Ok(known)
        })
        .await
        .map_err(|_| StoreError::Engine("a card count panicked".into()))?
    }

    async fn compact(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        tokio::task::spawn_blocking(move || {
            for name in FAMILIES {
                let cf = db.cf_handle(name).ok_or(StoreError::Closed)?;
                // Every family is flushed, so that no WAL file still holds an erased
                // write; the audit log holds tokens on purpose and is not rewritten.
                db.flush_cf(cf).map_err(engine)?;
                if name == AUDIT {
                    continue;
                }
                let mut options = rocksdb::CompactOptions::default();
                // Rewrite the bottom level too: that is where old copies live.
                options.set_bottommost_level_compaction(
                    rocksdb::BottommostLevelCompaction::ForceOptimized,
                );
                db.compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &options);
            }
            // One more change starts a new MANIFEST holding only the files now live
            // (see `db_options`); the previous one, which named the erased keys as
            // file boundaries, is deleted.
            let meta = db.cf_handle(META).ok_or(StoreError::Closed)?;
            let now = time::OffsetDateTime::now_utc()
                .unix_timestamp()
                .to_be_bytes();
            db.put_cf(meta, b"compacted-at", now).map_err(engine)?;
            db.flush_cf(meta).map_err(engine)?;
            // The WAL files that held the deleted writes are obsolete after the flushes;
            // RocksDB deletes them (no WAL archive is configured).
            db.flush_wal(true).map_err(engine)
        })
        .await
        .map_err(|e| StoreError::Engine(e.to_string()))?
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db()?;
        db.get_cf(family(&db, META)?, key).map_err(engine)
    }

    async fn put_meta(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let key = key.as_bytes().to_vec();
        self.submit(|reply| Op::Put {
            family: META,
            entries: vec![(key, value)],
            reply,
        })
        .await
    }

    async fn init_meta(&self, key: &str, value: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        // One vault per data directory (the lock says so) and one start-up at a time.
        if let Some(stored) = self.get_meta(key).await? {
            return Ok(stored);
        }
        self.put_meta(key, value.clone()).await?;
        Ok(value)
    }

    async fn append_audit(&self, seal: AuditSeal) -> Result<Vec<u64>, StoreError> {
        // Chained and committed by the writer, with whatever data its group holds.
        self.submit(|reply| Op::Audit { seal, reply }).await
    }

    async fn read_audit(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.read_audit_log(after, limit)
    }

    async fn last_audit(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.last_in_audit_log()
    }

    async fn create_backup(&self, dir: &Path) -> Result<u64, StoreError> {
        self.checkpoint(dir).await
    }

    fn scan_backup(dir: &Path, visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), StoreError> {
        scan_records(dir, visit)
    }

    async fn list_meta(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let db = self.db()?;
        let mut iter = db.raw_iterator_cf(family(&db, META)?);
        iter.seek(prefix);
        let mut keys = Vec::new();
        while let Some(key) = iter.key() {
            let Some(rest) = key.strip_prefix(prefix.as_bytes()) else {
                break;
            };
            keys.push(String::from_utf8_lossy(rest).into_owned());
            iter.next();
        }
        iter.status().map_err(engine)?;
        Ok(keys)
    }

    async fn tombstoned(&self, keys: Vec<Vec<u8>>) -> Result<bool, StoreError> {
        let db = self.db()?;
        let cf = family(&db, TOMBSTONES)?;
        for key in keys {
            if db.get_pinned_cf(cf, key).map_err(engine)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn prune_tombstones(&self, before_unix_ms: i64) -> Result<usize, StoreError> {
        let mut keys = Vec::new();
        {
            let db = self.db()?;
            let mut iter = db.raw_iterator_cf(family(&db, TOMBSTONES)?);
            iter.seek_to_first();
            while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
                let deleted_at = value.try_into().map_or(0, i64::from_be_bytes);
                if deleted_at < before_unix_ms {
                    keys.push(key.to_vec());
                }
                iter.next();
            }
            iter.status().map_err(engine)?;
        }
        let pruned = keys.len();
        for chunk in keys.chunks(1000) {
            let entries = chunk.to_vec();
            self.submit(|reply| Op::Remove {
                family: TOMBSTONES,
                keys: entries,
                reply,
            })
            .await?;
        }
        Ok(pruned)
    }

    async fn missing_tombstones(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, StoreError> {
        let db = self.db()?;
        let cf = family(&db, TOMBSTONES)?;
        let mut missing = Vec::new();
        for key in keys {
            if db.get_pinned_cf(cf, &key).map_err(engine)?.is_none() {
                missing.push(key);
            }
        }
        Ok(missing)
    }

    async fn unsent_erasures(&self, limit: usize) -> Result<Vec<Tombstone>, StoreError> {
        let db = self.db()?;
        let mut iter = db.raw_iterator_cf(family(&db, UNSENT_ERASURES)?);
        iter.seek_to_first();
        let mut unsent = Vec::new();
        while let (Some(key), Some(value), true) = (iter.key(), iter.value(), unsent.len() < limit)
        {
            unsent.push(Tombstone {
                key: key.to_vec(),
                deleted_at_unix_ms: value.try_into().map_or(0, i64::from_be_bytes),
            });
            iter.next();
        }
        iter.status().map_err(engine)?;
        Ok(unsent)
    }

    async fn erasures_sent(&self, keys: Vec<Vec<u8>>) -> Result<(), StoreError> {
        self.submit(|reply| Op::Remove {
            family: UNSENT_ERASURES,
            keys,
            reply,
        })
        .await
        .map(drop)
    }

    async fn records_after(
        &self,
        cursor: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<StoredBytes>, StoreError> {
        let db = self.db()?;
        tokio::task::spawn_blocking(move || {
            let mut iter = db.raw_iterator_cf(family(&db, RECORDS)?);
            match &cursor {
                Some(cursor) => {
                    iter.seek(cursor);
                    if iter.key() == Some(cursor.as_slice()) {
                        iter.next();
                    }
                }
                None => iter.seek_to_first(),
            }
            let mut found = Vec::new();
            while let (Some(key), Some(value), true) =
                (iter.key(), iter.value(), found.len() < limit)
            {
                found.push((key.to_vec(), value.to_vec()));
                iter.next();
            }
            iter.status().map_err(engine)?;
            Ok(found)
        })
        .await
        .map_err(|e| StoreError::Engine(e.to_string()))?
    }

    async fn get_outcome(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db()?;
        db.get_cf(family(&db, IDEMPOTENCY)?, key).map_err(engine)
    }

    async fn claim_outcome(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        replaceable: Replaceable,
    ) -> Result<Claim, StoreError> {
        self.submit(|reply| Op::Claim {
            key,
            value,
            replaceable,
            reply,
        })
        .await
    }

    async fn put_outcome(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        self.submit(|reply| Op::Put {
            family: IDEMPOTENCY,
            entries: vec![(key, value)],
            reply,
        })
        .await
    }

    async fn lock_job(&self, _job: &str) -> Result<Option<JobLock>, StoreError> {
        // RocksDB's own lock keeps every other process out of this store.
        Ok(Some(JobLock::sole()))
    }
}
