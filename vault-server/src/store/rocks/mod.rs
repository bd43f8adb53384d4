//! RocksDB engine. Column families: `records` (token → sealed record), `fingerprints`
//! (index key → token), `idempotency` (tenant and idempotency key → forward outcome,
//! which holds no card data), `versions` (key use | key version | token → empty: which
//! records use which key version, for counting and rewrap) and `meta` (small state of
//! background jobs).
//!
//! Writes go through one dedicated writer thread that takes everything queued, checks
//! put-if-absent against the database plus the writes already in the batch, and commits
//! it as one synced WriteBatch (group commit). Every waiter is answered only after the
//! sync, so an acknowledged token survives `kill -9` and power loss, and one fsync is
//! shared by every request that arrived meanwhile (DESIGN.md, Storage). Being the only
//! writer also makes put-if-absent race-free. The audit log, a database of its own, has
//! its own writer thread the same way, so that its syncs overlap the data's.
//!
//! After a write fails because the disk is full or read-only, RocksDB refuses every
//! later write until the database is reopened. The writer does that by itself, at the
//! next write once the filesystem is writable with `RECOVERY_FREE_BYTES` free; reads go
//! on meanwhile, and pause only for the reopen itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, Options, WriteBatch,
    WriteOptions,
};
use tokio::sync::{mpsc, oneshot};

use super::{
    AuditSeal, Delete, DeleteOutcome, InsertOutcome, JobLock, KeyUse, KeyVersions, NewRecord,
    RecordIndexes, Rewrite, RewriteOutcome, Store, StoreError, StoreStats,
};
use crate::token::Token;

const RECORDS: &str = "records";
const FINGERPRINTS: &str = "fingerprints";
const IDEMPOTENCY: &str = "idempotency";
const VERSIONS: &str = "versions";
const META: &str = "meta";
const EXPIRY: &str = "expiry";
const CARDS: &str = "cards";
const FAMILIES: [&str; 7] = [
    RECORDS,
    FINGERPRINTS,
    IDEMPOTENCY,
    VERSIONS,
    META,
    EXPIRY,
    CARDS,
];
/// `meta` key present once every record has its `versions`, `expiry` and `cards`
/// entries.
const INDEXED: &[u8] = b"indexed-v2";
/// `meta` key holding the number of records per key use and version, written in the
/// same batch as every change to `versions`, so that start-up reads it instead of
/// counting every record.
const COUNTS: &[u8] = b"version-counts";

/// Reads a record's key versions and indexes from its stored bytes (to index records
/// written before those column families existed).
pub type IndexesOf = fn(&[u8]) -> Option<(KeyVersions, RecordIndexes)>;

fn expiry_key(expires_at_unix_ms: i64, token: &[u8]) -> Vec<u8> {
    // Expiry times are positive: big-endian bytes sort in time order.
    [&expires_at_unix_ms.to_be_bytes()[..], token].concat()
}

fn card_entry_key(card_key: &[u8], token: &[u8]) -> Vec<u8> {
    [card_key, token].concat()
}

type Counts = Arc<Mutex<BTreeMap<(KeyUse, u32), u64>>>;

/// `COUNTS` as stored: per key use and version, `use: u8 | version: u32 | count: u64`,
/// big-endian.
fn encode_counts(counts: &BTreeMap<(KeyUse, u32), u64>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(counts.len() * 13);
    for (&(key_use, version), count) in counts {
        bytes.push(key_use.code());
        bytes.extend_from_slice(&version.to_be_bytes());
        bytes.extend_from_slice(&count.to_be_bytes());
    }
    bytes
}

fn decode_counts(bytes: &[u8]) -> Option<BTreeMap<(KeyUse, u32), u64>> {
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

fn version_key(key_use: KeyUse, version: u32, token: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(5 + token.len());
    key.push(key_use.code());
    key.extend_from_slice(&version.to_be_bytes());
    key.extend_from_slice(token);
    key
}

fn parse_version_key(key: &[u8]) -> Option<(KeyUse, u32, &[u8])> {
    let key_use = KeyUse::from_code(*key.first()?)?;
    let version = u32::from_be_bytes(key.get(1..5)?.try_into().ok()?);
    Some((key_use, version, key.get(5..)?))
}
/// Most operations committed in one batch; bounds batch size and latency.
const MAX_GROUP: usize = 2048;
/// Queue depth in front of the writer; callers wait (backpressure) beyond it.
const QUEUE_DEPTH: usize = 4096;

enum Op {
    Insert {
        records: Vec<NewRecord>,
        reply: oneshot::Sender<Result<Vec<InsertOutcome>, StoreError>>,
    },
    Delete {
        delete: Delete,
        reply: oneshot::Sender<Result<DeleteOutcome, StoreError>>,
    },
    Rewrite {
        rewrite: Rewrite,
        reply: oneshot::Sender<Result<RewriteOutcome, StoreError>>,
    },
    /// Plain deletes from `family` (expired idempotency outcomes).
    Remove {
        family: &'static str,
        keys: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Plain puts into `family` (idempotency outcomes, job state).
    Put {
        family: &'static str,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// Audit entries to append (key, entry), and where to answer once they are durable.
type AuditAppend = (
    Vec<(Vec<u8>, Vec<u8>)>,
    oneshot::Sender<Result<(), StoreError>>,
);

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

/// Free space a filesystem must have before a store refused by a full disk reopens.
const RECOVERY_FREE_BYTES: u64 = 32 * 1024 * 1024;
/// How often a refused store looks at the filesystem again (at a write).
const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);

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

fn open_data(dir: &Path, cache: &Cache) -> Result<DB, StoreError> {
    let families =
        FAMILIES.map(|name| ColumnFamilyDescriptor::new(name, family_options(Some(name), cache)));
    DB::open_cf_descriptors(&family_options(None, cache), dir, families).map_err(engine)
}

pub struct RocksStore {
    dir: PathBuf,
    audit_dir: PathBuf,
    cache: Cache,
    data: Slot,
    /// Audit entries go to a database of their own, outside the data directory: erasure
    /// must leave no token in the data directory, while the audit log keeps its events
    /// (which name tokens, never card data) for their retention period.
    audit_db: Arc<DB>,
    counts: Counts,
    queue: Option<mpsc::Sender<Op>>,
    writer: Option<JoinHandle<()>>,
    audit_queue: Option<mpsc::Sender<AuditAppend>>,
    /// One append at a time: each reads the log's end and chains onto it.
    audit_append: tokio::sync::Mutex<()>,
    audit_writer: Option<JoinHandle<()>>,
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

/// Options of one column family (or of the audit database, `None`). Families read by
/// key get bloom filters, in their files and in the memtable, so that the lookups every
/// tokenization makes for a key that does not exist yet (a fresh token, a new card's
/// fingerprint) mostly touch no skiplist and no data block; families only ever scanned
/// in order get none, which saves the filters' memory.
fn family_options(family: Option<&str>, cache: &Cache) -> Options {
    let mut options = db_options();
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    // Index and filter blocks are charged to the cache, so that memory stays bounded as
    // the number of records grows; those of level 0 (the newest files) stay pinned.
    table.set_cache_index_and_filter_blocks(true);
    table.set_cache_index_and_filter_blocks_with_high_priority(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    // Partitioned: a file's index and filter are cut into 4 KiB blocks under a small
    // top-level index kept pinned, so a lookup loads (and checksums) only the parts it
    // needs. Whole per-file index blocks were hundreds of KiB at 9 million records;
    // once they no longer fitted in the cache, every lookup re-read and re-verified
    // them, and reads slowed several times over.
    table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
    table.set_partition_filters(true);
    table.set_metadata_block_size(4096);
    table.set_pin_top_level_index_and_filter(true);
    if matches!(family, Some(RECORDS | FINGERPRINTS | IDEMPOTENCY | META)) {
        table.set_bloom_filter(10.0, false);
        table.set_whole_key_filtering(true);
        options.set_memtable_prefix_bloom_ratio(0.05);
        options.set_memtable_whole_key_filtering(true);
    }
    options.set_block_based_table_factory(&table);
    // Small memtables: inserting a random key into a skiplist costs a cache miss per
    // step, and every tokenization inserts several such keys. At 8 MiB (instead of 64)
    // a memtable mostly stays in the CPU caches; flushes stay cheap and infrequent.
    options.set_write_buffer_size(8 * 1024 * 1024);
    options
}

fn db_options() -> Options {
    // The MANIFEST names the first and last key of every table file and would keep old
    // entries (erased tokens among them) until it rolls over, by default at 1 GiB. With
    // these two settings every change after the first starts a new MANIFEST holding
    // only the live files (a few KiB), and the old one is deleted.
    let mut options = Options::default()
        .get_options_from_string("max_manifest_file_size=1;max_manifest_space_amp_pct=0")
        .unwrap_or_default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    // Records are ciphertext and so incompressible; no compression also keeps the
    // leak scan honest (a compressed block could hide plaintext from it).
    options.set_compression_type(DBCompressionType::None);
    options.set_keep_log_file_num(5);
    options
}

impl RocksStore {
    /// Opens (or creates) the database in `dir` and starts the writer thread. A
    /// database from before the `versions` column family is indexed once, with
    /// `indexes_of` reading each record's key versions and indexes. The audit log is
    /// kept in `audit_dir`.
    pub fn open(
        dir: &Path,
        audit_dir: &Path,
        indexes_of: IndexesOf,
        tuning: &Tuning,
    ) -> Result<Self, StoreError> {
        let cache = Cache::new_lru_cache(tuning.block_cache_bytes);
        let db = Arc::new(open_data(dir, &cache)?);
        let audit_db =
            Arc::new(DB::open(&family_options(None, &cache), audit_dir).map_err(engine)?);
        // The marker is written with the index's last batch: an indexing run that was
        // interrupted runs again (writing an entry twice is harmless).
        let meta = db.cf_handle(META).ok_or(StoreError::Closed)?;
        if db.get_cf(meta, INDEXED).map_err(engine)?.is_none() {
            index_records(&db, indexes_of)?;
        }
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
        };
        let writer = std::thread::Builder::new()
            .name("rocksdb-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| StoreError::Engine(format!("cannot start writer thread: {e}")))?;
        let (audit_queue, audit_receiver) = mpsc::channel(QUEUE_DEPTH);
        let writer_audit_db = Arc::clone(&audit_db);
        let audit_writer = std::thread::Builder::new()
            .name("rocksdb-audit".into())
            .spawn(move || write_audit(&writer_audit_db, audit_receiver))
            .map_err(|e| StoreError::Engine(format!("cannot start audit writer thread: {e}")))?;
        Ok(Self {
            dir: dir.to_owned(),
            audit_dir: audit_dir.to_owned(),
            cache,
            data,
            audit_db,
            counts,
            queue: Some(queue),
            writer: Some(writer),
            audit_queue: Some(audit_queue),
            audit_append: tokio::sync::Mutex::new(()),
            audit_writer: Some(audit_writer),
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

/// Writes the `versions` entries of every record (one synced batch per 10,000).
fn index_records(db: &DB, indexes_of: IndexesOf) -> Result<(), StoreError> {
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

/// The stored counts, or (for a data directory from before they were stored) a count
/// of every `versions` entry, then stored.
fn load_counts(db: &DB) -> Result<BTreeMap<(KeyUse, u32), u64>, StoreError> {
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

/// Calls `visit(token, record bytes)` for every record of a backup (or any stopped
/// data directory), opened read-only. Blocking.
pub fn scan_records(dir: &Path, visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), StoreError> {
    let families = DB::list_cf(&Options::default(), dir).map_err(engine)?;
    let db =
        DB::open_cf_for_read_only(&Options::default(), dir, families, false).map_err(engine)?;
    let cf = db
        .cf_handle(RECORDS)
        .ok_or_else(|| StoreError::Engine("no records column family".into()))?;
    for entry in db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
        let (token, value) = entry.map_err(engine)?;
        visit(&token, &value);
    }
    Ok(())
}

impl Drop for RocksStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer after it commits what is queued; joining it
        // releases the database lock before a restart in the same process reopens it.
        self.queue.take();
        self.audit_queue.take();
        for writer in [self.writer.take(), self.audit_writer.take()]
            .into_iter()
            .flatten()
        {
            let _ = writer.join();
        }
    }
}

impl Store for RocksStore {
    async fn insert(&self, records: Vec<NewRecord>) -> Result<Vec<InsertOutcome>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        self.submit(|reply| Op::Insert { records, reply }).await
    }

    async fn get(&self, token: &Token) -> Result<Option<Vec<u8>>, StoreError> {
        // Point reads are served from the memtable or block cache in microseconds;
        // they run inline rather than paying for a thread hop.
        let db = self.db()?;
        db.get_cf(family(&db, RECORDS)?, token.as_str())
            .map_err(engine)
    }

    async fn delete(&self, delete: Delete) -> Result<DeleteOutcome, StoreError> {
        self.submit(|reply| Op::Delete { delete, reply }).await
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
            audit_free_bytes: Some(free_bytes(&self.audit_dir)),
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
        let db = self.db()?;
        let mut found = Vec::new();
        let mut iter = db.raw_iterator_cf(family(&db, VERSIONS)?);
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
            let Some(key) = iter.key() else { break };
            let Some((key_use, version, token)) = parse_version_key(key) else {
                iter.next();
                continue;
            };
            if version == active.get(key_use) {
                // Skip every record already on the active version in one seek.
                match version.checked_add(1) {
                    Some(next) => iter.seek(version_key(key_use, next, &[])),
                    None => iter.seek([key_use.code() + 1]),
                }
                continue;
            }
            let token = Token::from_stored(token).ok_or_else(|| {
                StoreError::Engine("versions index holds a malformed token".into())
            })?;
            found.push((key.to_vec(), token));
            iter.next();
        }
        iter.status().map_err(engine)?;
        Ok(found)
    }

    async fn prune_outcomes(
        &self,
        expired: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<usize, StoreError> {
        let mut keys = Vec::new();
        {
            let db = self.db()?;
            let mut iter = db.raw_iterator_cf(family(&db, IDEMPOTENCY)?);
            iter.seek_to_first();
            while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
                if expired(value) {
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
                family: IDEMPOTENCY,
                keys: entries,
                reply,
            })
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
        let mut iter = db.raw_iterator_cf(family(&db, CARDS)?);
        iter.seek(card_key);
        let mut tokens = Vec::new();
        while let Some(key) = iter.key() {
            let Some(token) = key.strip_prefix(card_key) else {
                break;
            };
            // A longer card key with this one as prefix is another card: tokens
            // have a fixed length.
            if let Some(token) = Token::from_stored(token) {
                tokens.push(token);
            }
            iter.next();
        }
        iter.status().map_err(engine)?;
        Ok(tokens)
    }

    async fn compact(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        tokio::task::spawn_blocking(move || {
            for name in FAMILIES {
                let cf = db.cf_handle(name).ok_or(StoreError::Closed)?;
                db.flush_cf(cf).map_err(engine)?;
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

    async fn append_audit(&self, seal: AuditSeal) -> Result<Vec<u64>, StoreError> {
        // One process owns this log (RocksDB's lock), and appends here one at a time:
        // the last entry read is still the last when the batch lands.
        let _one_at_a_time = self.audit_append.lock().await;
        let entries = seal(self.last_audit().await?);
        let sequences = entries.iter().map(|(sequence, _)| *sequence).collect();
        let entries = entries
            .into_iter()
            .map(|(sequence, entry)| (sequence.to_be_bytes().to_vec(), entry))
            .collect();
        let queue = self.audit_queue.as_ref().ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        queue
            .send((entries, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)??;
        Ok(sequences)
    }

    fn anchors_audit_log(&self) -> bool {
        // The log is a database of its own: its anchor goes to the data database.
        false
    }

    async fn read_audit(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut iter = self.audit_db.raw_iterator();
        iter.seek(after.saturating_add(1).to_be_bytes());
        let mut entries = Vec::new();
        while entries.len() < limit {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            let sequence =
                u64::from_be_bytes(key.try_into().map_err(|_| {
                    StoreError::Engine("an audit key is not a sequence number".into())
                })?);
            if sequence > after {
                entries.push((sequence, value.to_vec()));
            }
            iter.next();
        }
        iter.status().map_err(engine)?;
        Ok(entries)
    }

    async fn last_audit(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let mut iter = self.audit_db.raw_iterator();
        iter.seek_to_last();
        iter.status().map_err(engine)?;
        match (iter.key(), iter.value()) {
            (Some(key), Some(value)) => {
                let sequence = u64::from_be_bytes(key.try_into().map_err(|_| {
                    StoreError::Engine("an audit key is not a sequence number".into())
                })?);
                Ok(Some((sequence, value.to_vec())))
            }
            _ => Ok(None),
        }
    }

    async fn create_backup(&self, dir: &Path) -> Result<u64, StoreError> {
        let db = self.db()?;
        let dir = dir.to_owned();
        // A checkpoint hard-links the immutable SST files and copies the rest after a
        // flush: consistent, online, and cheap on the same filesystem.
        tokio::task::spawn_blocking(move || {
            if let Some(parent) = dir.parent() {
                let mut builder = std::fs::DirBuilder::new();
                builder.recursive(true);
                #[cfg(unix)]
                std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
                builder.create(parent).map_err(|e| {
                    StoreError::Engine(format!("cannot create backup directory: {e}"))
                })?;
            }
            rocksdb::checkpoint::Checkpoint::new(&db)
                .and_then(|checkpoint| checkpoint.create_checkpoint(&dir))
                .map_err(engine)?;
            let mut size = 0;
            for entry in std::fs::read_dir(&dir).map_err(|e| StoreError::Engine(e.to_string()))? {
                let metadata = entry
                    .and_then(|e| e.metadata())
                    .map_err(|e| StoreError::Engine(e.to_string()))?;
                size += metadata.len();
            }
            Ok(size)
        })
        .await
        .map_err(|e| StoreError::Engine(e.to_string()))?
    }

    fn scan_backup(dir: &Path, visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), StoreError> {
        scan_records(dir, visit)
    }

    async fn get_outcome(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db()?;
        db.get_cf(family(&db, IDEMPOTENCY)?, key).map_err(engine)
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

/// The audit database's writer: everything queued is one synced batch.
fn write_audit(db: &DB, mut receiver: mpsc::Receiver<AuditAppend>) {
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    while let Some(first) = receiver.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(append) => group.push(append),
                Err(_) => break,
            }
        }
        let mut batch = WriteBatch::default();
        let mut replies = Vec::with_capacity(group.len());
        for (entries, reply) in group {
            for (key, value) in entries {
                batch.put(key, value);
            }
            replies.push(reply);
        }
        let written = db.write_opt(batch, &sync).map_err(|e| e.into_string());
        for reply in replies {
            let _ = reply.send(written.clone().map_err(classify));
        }
    }
}

struct Writer {
    db: Arc<DB>,
    counts: Counts,
    /// Where readers find `db`, emptied while it is reopened.
    slot: Slot,
    dir: PathBuf,
    cache: Cache,
    /// Set when a write was refused for a full or read-only filesystem: RocksDB
    /// refuses every write after that until it is reopened.
    refused_since: Option<Instant>,
    last_recovery: Option<Instant>,
}

/// A group's writes, handed to RocksDB sorted by column family and key. Inserting
/// random keys into a memtable's skiplist costs a cache miss at each step down from
/// the top; RocksDB keeps the previous insert's path (its splice), so keys that arrive
/// in order each reuse most of it. The sort is stable: two writes of one key keep their
/// order.
#[derive(Default)]
struct SortedBatch<'a> {
    entries: Vec<BatchEntry<'a>>,
}

/// A put (with its value) or a delete (`None`) of one key.
type BatchEntry<'a> = (&'a rocksdb::ColumnFamily, Vec<u8>, Option<Vec<u8>>);

impl<'a> SortedBatch<'a> {
    fn put_cf(
        &mut self,
        family: &'a rocksdb::ColumnFamily,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) {
        self.entries
            .push((family, key.as_ref().to_vec(), Some(value.as_ref().to_vec())));
    }

    fn delete_cf(&mut self, family: &'a rocksdb::ColumnFamily, key: impl AsRef<[u8]>) {
        self.entries.push((family, key.as_ref().to_vec(), None));
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn into_write_batch(mut self) -> WriteBatch {
        // Families are told apart by address: any fixed order groups them.
        self.entries.sort_by(|(a, a_key, _), (b, b_key, _)| {
            (std::ptr::from_ref(*a) as usize, a_key).cmp(&(std::ptr::from_ref(*b) as usize, b_key))
        });
        let mut batch = WriteBatch::default();
        for (family, key, value) in self.entries {
            match value {
                Some(value) => batch.put_cf(family, key, value),
                None => batch.delete_cf(family, key),
            }
        }
        batch
    }
}

/// What one group commit has written so far, so later operations in the same group
/// see earlier ones: whether a record exists, and what an index key names (`None`
/// once deleted).
#[derive(Default)]
struct Pending {
    records: HashMap<Vec<u8>, bool>,
    index: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Records rewritten in this group (a second rewrite of one must re-read).
    rewritten: HashSet<Vec<u8>>,
    /// Changes to the per-version record counts, applied once the batch is durable.
    counts: Vec<((KeyUse, u32), i64)>,
}

impl Pending {
    fn count(&mut self, versions: KeyVersions, delta: i64) {
        for key_use in KeyUse::ALL {
            self.counts.push(((key_use, versions.get(key_use)), delta));
        }
    }
}

impl Writer {
    fn run(mut self, mut receiver: mpsc::Receiver<Op>) {
        while let Some(first) = receiver.blocking_recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match receiver.try_recv() {
                    Ok(op) => group.push(op),
                    Err(_) => break,
                }
            }
            if self.refused_since.is_some() {
                self = self.recover();
            }
            // A write that goes through (RocksDB may recover by itself) ends the refusal.
            self.refused_since = match self.commit(group) {
                true => self.refused_since.or_else(|| Some(Instant::now())),
                false => None,
            };
        }
    }

    /// Reopens the database once its filesystem is writable with room to spare (looked
    /// at most once per `RECOVERY_INTERVAL`). Readers wait out the reopen: the database
    /// is closed only once no reader holds it, and a reader that comes meanwhile is told
    /// to retry (UNAVAILABLE).
    fn recover(mut self) -> Self {
        if self
            .last_recovery
            .is_some_and(|at| at.elapsed() < RECOVERY_INTERVAL)
        {
            return self;
        }
        self.last_recovery = Some(Instant::now());
        let read_only = nix::sys::statvfs::statvfs(&self.dir).map_or(true, |fs| {
            fs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY)
        });
        if read_only || free_bytes(&self.dir) < RECOVERY_FREE_BYTES {
            return self;
        }
        let taken = self
            .slot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(taken);
        // Readers finish with their copies within a read; a long scan (a backup, a
        // compaction) is waited for a while, then the reopen is tried later.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.db) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if Arc::strong_count(&self.db) > 1 {
            self.put_back();
            return self;
        }
        let Writer {
            db,
            counts,
            slot,
            dir,
            cache,
            refused_since,
            last_recovery,
        } = self;
        // The old handle closes here, releasing the directory's lock. The filesystem
        // was writable a moment ago, so opening again fails only if it broke anew: the
        // writer keeps trying (writes wait, reads are told to retry) and says why.
        drop(db);
        // If it cannot be opened for writing (opening may need room to flush what the
        // log holds), it is opened read-only so that reads go on; writes keep being
        // refused and the next write tries again.
        let (db, refused_since) = loop {
            match open_data(&dir, &cache).and_then(|db| Ok((load_counts(&db)?, db))) {
                Ok((stored, db)) => {
                    *counts
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = stored;
                    tracing::warn!(
                        refused_for_secs = refused_since.map_or(0, |at| at.elapsed().as_secs()),
                        "storage writable again: the database was reopened and writes go on"
                    );
                    break (db, None);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot reopen the database for writing; reads go on read-only");
                    let families = FAMILIES.map(|name| {
                        ColumnFamilyDescriptor::new(name, family_options(Some(name), &cache))
                    });
                    match DB::open_cf_descriptors_read_only(
                        &family_options(None, &cache),
                        &dir,
                        families,
                        false,
                    ) {
                        Ok(db) => break (db, refused_since),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot reopen the database at all; trying again");
                            std::thread::sleep(RECOVERY_INTERVAL);
                        }
                    }
                }
            }
        };
        let writer = Writer {
            db: Arc::new(db),
            counts,
            slot,
            dir,
            cache,
            refused_since,
            last_recovery,
        };
        writer.put_back();
        writer
    }

    fn put_back(&self) {
        *self
            .slot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::clone(&self.db));
    }

    /// Commits `group`; true if the write was refused for a full or read-only
    /// filesystem.
    fn commit(&self, group: Vec<Op>) -> bool {
        let mut batch = SortedBatch::default();
        let mut pending = Pending::default();
        let mut inserts = Vec::new();
        let mut deletes = Vec::new();
        let mut rewrites = Vec::new();
        let mut put_replies = Vec::new();
        // A failed read while planning fails the whole group: the batch may already
        // hold part of that operation, so nothing is written.
        let mut failure = None;
        for op in group {
            match op {
                Op::Insert { records, reply } => {
                    let outcomes = self.plan_insert(&records, &mut batch, &mut pending);
                    let outcomes = outcomes.unwrap_or_else(|e| {
                        failure.get_or_insert(e.to_string());
                        Vec::new()
                    });
                    inserts.push((reply, outcomes));
                }
                Op::Delete { delete, reply } => {
                    let outcome = self.plan_delete(&delete, &mut batch, &mut pending);
                    let outcome = outcome.unwrap_or_else(|e| {
                        failure.get_or_insert(e.to_string());
                        DeleteOutcome::Changed
                    });
                    deletes.push((reply, outcome));
                }
                Op::Rewrite { rewrite, reply } => {
                    let outcome = self.plan_rewrite(&rewrite, &mut batch, &mut pending);
                    let outcome = outcome.unwrap_or_else(|e| {
                        failure.get_or_insert(e.to_string());
                        RewriteOutcome::Changed
                    });
                    rewrites.push((reply, outcome));
                }
                Op::Remove {
                    family,
                    keys,
                    reply,
                } => {
                    match self.db.cf_handle(family) {
                        Some(cf) => {
                            for key in keys {
                                batch.delete_cf(cf, key);
                            }
                        }
                        None => {
                            failure.get_or_insert(StoreError::Closed.to_string());
                        }
                    }
                    put_replies.push(reply);
                }
                Op::Put {
                    family,
                    entries,
                    reply,
                } => {
                    match self.db.cf_handle(family) {
                        Some(cf) => {
                            for (key, value) in entries {
                                batch.put_cf(cf, key, value);
                            }
                        }
                        None => {
                            failure.get_or_insert(StoreError::Closed.to_string());
                        }
                    }
                    put_replies.push(reply);
                }
            }
        }
        // The counts after this group go into its batch, so that the stored counts
        // always match the `versions` entries on disk.
        let counted = (failure.is_none() && !pending.counts.is_empty()).then(|| {
            let mut counts = self
                .counts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            for (key, delta) in pending.counts {
                let count = counts.entry(key).or_insert(0);
                *count = count.saturating_add_signed(delta);
                if *count == 0 {
                    counts.remove(&key);
                }
            }
            counts
        });
        if let (Some(counts), Some(meta)) = (&counted, self.db.cf_handle(META)) {
            batch.put_cf(meta, COUNTS, encode_counts(counts));
        }
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let written = match failure {
            Some(e) => Err(e),
            None if batch.is_empty() => Ok(()),
            None => self
                .db
                .write_opt(batch.into_write_batch(), &sync)
                .map_err(|e| e.into_string()),
        };
        if let (Ok(()), Some(counted)) = (&written, counted) {
            *self
                .counts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = counted;
        }
        for (reply, outcomes) in inserts {
            let _ = reply.send(written.clone().map(|()| outcomes).map_err(classify));
        }
        for (reply, outcome) in deletes {
            let _ = reply.send(written.clone().map(|()| outcome).map_err(classify));
        }
        for (reply, outcome) in rewrites {
            let _ = reply.send(written.clone().map(|()| outcome).map_err(classify));
        }
        for reply in put_replies {
            let _ = reply.send(written.clone().map_err(classify));
        }
        written.is_err_and(|e| {
            matches!(
                classify(e),
                StoreError::NoSpace(_) | StoreError::NotWritable(_)
            )
        })
    }

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

    fn plan_insert<'a>(
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

    fn plan_delete<'a>(
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

    fn plan_rewrite<'a>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Delete, DeleteOutcome};

    fn no_versions(_: &[u8]) -> Option<(KeyVersions, RecordIndexes)> {
        None
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = 0;
        super::super::conformance::run_all(|| {
            n += 1;
            let store = RocksStore::open(
                &dir.path().join(n.to_string()),
                &dir.path().join(format!("{n}-audit")),
                no_versions,
                &Tuning::default(),
            )
            .unwrap();
            async { store }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let token = Token::generate().unwrap();
        {
            let store = RocksStore::open(
                &dir.path().join("data"),
                &dir.path().join("audit"),
                no_versions,
                &Tuning::default(),
            )
            .unwrap();
            let outcome = store
                .insert(vec![NewRecord {
                    token: token.clone(),
                    value: b"sealed".to_vec(),
                    index_key: b"index".to_vec(),
                    reuse_existing: false,
                    older_index_keys: Vec::new(),
                    versions: KeyVersions {
                        card_data: 1,
                        fingerprint: 1,
                    },
                    indexes: Default::default(),
                }])
                .await
                .unwrap();
            assert_eq!(outcome, vec![InsertOutcome::Stored]);
        }
        let store = RocksStore::open(
            &dir.path().join("data"),
            &dir.path().join("audit"),
            no_versions,
            &Tuning::default(),
        )
        .unwrap();
        assert_eq!(
            store.get(&token).await.unwrap().as_deref(),
            Some(&b"sealed"[..])
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn record_counts_are_stored_with_the_records_and_read_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let (data, audit) = (dir.path().join("data"), dir.path().join("audit"));
        let open = || RocksStore::open(&data, &audit, no_versions, &Tuning::default()).unwrap();
        let record = |card_data| NewRecord {
            token: Token::generate().unwrap(),
            value: b"sealed".to_vec(),
            index_key: Token::generate().unwrap().as_str().as_bytes().to_vec(),
            reuse_existing: false,
            older_index_keys: Vec::new(),
            versions: KeyVersions {
                card_data,
                fingerprint: 1,
            },
            indexes: Default::default(),
        };
        let expected = BTreeMap::from([
            ((KeyUse::CardData, 1), 2),
            ((KeyUse::CardData, 2), 1),
            ((KeyUse::Fingerprint, 1), 3),
        ]);
        {
            let store = open();
            let records = vec![record(1), record(1), record(2), record(2)];
            let gone = &records[3];
            let delete = Delete {
                token: gone.token.clone(),
                expected: gone.value.clone(),
                index_key: gone.index_key.clone(),
                versions: gone.versions,
                indexes: gone.indexes.clone(),
            };
            store.insert(records).await.unwrap();
            let outcome = store.delete(delete).await.unwrap();
            assert_eq!(outcome, DeleteOutcome::Deleted);
            assert_eq!(store.version_counts(), expected);
        }
        // Read back from the stored counts (the scan would give the same; the stored
        // value is checked directly too).
        {
            let store = open();
            assert_eq!(store.version_counts(), expected);
            let db = store.db().unwrap();
            let meta = db.cf_handle(META).unwrap();
            let stored = db.get_cf(meta, COUNTS).unwrap().unwrap();
            assert_eq!(decode_counts(&stored), Some(expected.clone()));
            // Counts that miss a version in use (as an older vault-server would leave
            // them) are counted again.
            let mut stale = expected.clone();
            stale.remove(&(KeyUse::CardData, 2));
            db.put_cf(meta, COUNTS, encode_counts(&stale)).unwrap();
        }
        assert_eq!(open().version_counts(), expected);
        {
            // A data directory from before the counts were stored is counted once.
            let store = open();
            let db = store.db().unwrap();
            db.delete_cf(db.cf_handle(META).unwrap(), COUNTS).unwrap();
        }
        let store = open();
        assert_eq!(store.version_counts(), expected);
    }
}

#[cfg(test)]
mod erasure_tests {
    use super::*;
    use crate::store::{Delete, DeleteOutcome};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_record_leaves_no_file_after_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = RocksStore::open(
            &data,
            &dir.path().join("audit"),
            |_| None,
            &Tuning::default(),
        )
        .unwrap();
        let token = Token::generate().unwrap();
        let keep = Token::generate().unwrap();
        let versions = KeyVersions {
            card_data: 1,
            fingerprint: 1,
        };
        let record = |token: &Token, value: &[u8]| NewRecord {
            token: token.clone(),
            value: value.to_vec(),
            index_key: [b"index-", token.as_str().as_bytes()].concat(),
            reuse_existing: false,
            older_index_keys: Vec::new(),
            versions,
            indexes: RecordIndexes {
                expires_at_unix_ms: 0,
                card_key: b"card".to_vec(),
            },
        };
        store
            .insert(vec![
                record(&token, b"sealed-bytes-to-erase"),
                record(&keep, b"sealed-bytes-to-keep"),
            ])
            .await
            .unwrap();
        // On disk in table files first, as a long-lived record would be.
        store.compact().await.unwrap();
        let outcome = store
            .delete(Delete {
                token: token.clone(),
                expected: b"sealed-bytes-to-erase".to_vec(),
                index_key: [b"index-", token.as_str().as_bytes()].concat(),
                versions,
                indexes: RecordIndexes {
                    expires_at_unix_ms: 0,
                    card_key: b"card".to_vec(),
                },
            })
            .await
            .unwrap();
        assert_eq!(outcome, DeleteOutcome::Deleted);
        store.compact().await.unwrap();
        let mut kept = false;
        for entry in std::fs::read_dir(&data).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            for needle in [&b"sealed-bytes-to-erase"[..], token.as_str().as_bytes()] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "{} still holds erased data",
                    path.display()
                );
            }
            kept |= bytes.windows(20).any(|w| w == b"sealed-bytes-to-keep");
        }
        assert!(kept, "the other record is still stored");
    }
}
