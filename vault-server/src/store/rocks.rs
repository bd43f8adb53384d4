//! RocksDB engine. Column families: `records` (token → sealed record), `fingerprints`
//! (index key → token) and `idempotency` (tenant and idempotency key → forward outcome,
//! which holds no card data).
//!
//! Writes go through one dedicated writer thread that takes everything queued, checks
//! put-if-absent against the database plus the writes already in the batch, and commits
//! it as one synced WriteBatch (group commit). Every waiter is answered only after the
//! sync, so an acknowledged token survives `kill -9` and power loss, and one fsync is
//! shared by every request that arrived meanwhile (DESIGN.md, Storage). Being the only
//! writer also makes put-if-absent race-free.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use rocksdb::{ColumnFamilyDescriptor, DB, DBCompressionType, Options, WriteBatch, WriteOptions};
use tokio::sync::{mpsc, oneshot};

use super::{InsertOutcome, NewRecord, Store, StoreError};
use crate::token::Token;

const RECORDS: &str = "records";
const FINGERPRINTS: &str = "fingerprints";
const IDEMPOTENCY: &str = "idempotency";
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
        token: Token,
        index_key: Vec<u8>,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    PutOutcome {
        key: Vec<u8>,
        value: Vec<u8>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

pub struct RocksStore {
    db: Arc<DB>,
    queue: Option<mpsc::Sender<Op>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.db.path())
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
    } else if message.contains("Read-only file system") || message.contains("Permission denied") {
        StoreError::NotWritable(message)
    } else {
        StoreError::Engine(message)
    }
}

fn db_options() -> Options {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    // Records are ciphertext and so incompressible; no compression also keeps the
    // leak scan honest (a compressed block could hide plaintext from it).
    options.set_compression_type(DBCompressionType::None);
    options.set_keep_log_file_num(5);
    options
}

impl RocksStore {
    /// Opens (or creates) the database in `dir` and starts the writer thread.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let families = [RECORDS, FINGERPRINTS, IDEMPOTENCY]
            .map(|name| ColumnFamilyDescriptor::new(name, db_options()));
        let db = Arc::new(DB::open_cf_descriptors(&db_options(), dir, families).map_err(engine)?);
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let writer_db = Arc::clone(&db);
        let writer = std::thread::Builder::new()
            .name("rocksdb-writer".into())
            .spawn(move || Writer { db: writer_db }.run(receiver))
            .map_err(|e| StoreError::Engine(format!("cannot start writer thread: {e}")))?;
        Ok(Self {
            db,
            queue: Some(queue),
            writer: Some(writer),
        })
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
        if let Some(writer) = self.writer.take() {
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
        let cf = self.db.cf_handle(RECORDS).ok_or(StoreError::Closed)?;
        self.db.get_cf(cf, token.as_str()).map_err(engine)
    }

    async fn delete(&self, token: Token, index_key: Vec<u8>) -> Result<bool, StoreError> {
        self.submit(|reply| Op::Delete {
            token,
            index_key,
            reply,
        })
        .await
    }

    async fn create_backup(&self, dir: &Path) -> Result<u64, StoreError> {
        let db = Arc::clone(&self.db);
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
        let cf = self.db.cf_handle(IDEMPOTENCY).ok_or(StoreError::Closed)?;
        self.db.get_cf(cf, key).map_err(engine)
    }

    async fn put_outcome(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        self.submit(|reply| Op::PutOutcome { key, value, reply })
            .await
    }
}

struct Writer {
    db: Arc<DB>,
}

/// What one group commit has written so far, so later operations in the same group
/// see earlier ones: whether a record exists, and what an index key names (`None`
/// once deleted).
#[derive(Default)]
struct Pending {
    records: HashMap<Vec<u8>, bool>,
    index: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Writer {
    fn run(self, mut receiver: mpsc::Receiver<Op>) {
        while let Some(first) = receiver.blocking_recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match receiver.try_recv() {
                    Ok(op) => group.push(op),
                    Err(_) => break,
                }
            }
            self.commit(group);
        }
    }

    fn commit(&self, group: Vec<Op>) {
        let mut batch = WriteBatch::default();
        let mut pending = Pending::default();
        let mut inserts = Vec::new();
        let mut deletes = Vec::new();
        let mut outcome_replies = Vec::new();
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
                Op::Delete {
                    token,
                    index_key,
                    reply,
                } => {
                    let existed = self.plan_delete(&token, &index_key, &mut batch, &mut pending);
                    let existed = existed.unwrap_or_else(|e| {
                        failure.get_or_insert(e.to_string());
                        false
                    });
                    deletes.push((reply, existed));
                }
                Op::PutOutcome { key, value, reply } => {
                    match self.db.cf_handle(IDEMPOTENCY) {
                        Some(cf) => batch.put_cf(cf, key, value),
                        None => {
                            failure.get_or_insert(StoreError::Closed.to_string());
                        }
                    }
                    outcome_replies.push(reply);
                }
            }
        }
        let written = match failure {
            Some(e) => Err(e),
            None => {
                let mut sync = WriteOptions::default();
                sync.set_sync(true);
                self.db.write_opt(batch, &sync).map_err(|e| e.into_string())
            }
        };
        for (reply, outcomes) in inserts {
            let _ = reply.send(written.clone().map(|()| outcomes).map_err(classify));
        }
        for (reply, existed) in deletes {
            let _ = reply.send(written.clone().map(|()| existed).map_err(classify));
        }
        for reply in outcome_replies {
            let _ = reply.send(written.clone().map_err(classify));
        }
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

    fn plan_insert(
        &self,
        records: &[NewRecord],
        batch: &mut WriteBatch,
        pending: &mut Pending,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        let records_cf = self.db.cf_handle(RECORDS).ok_or(StoreError::Closed)?;
        let index_cf = self.db.cf_handle(FINGERPRINTS).ok_or(StoreError::Closed)?;
        let mut outcomes = Vec::with_capacity(records.len());
        for record in records {
            let token = record.token.as_str().as_bytes();
            if self.record_exists(token, pending)? {
                outcomes.push(InsertOutcome::TokenTaken);
                continue;
            }
            let indexed = match self.index_entry(&record.index_key, pending)? {
                Some(existing) if self.record_exists(&existing, pending)? => Some(existing),
                // An index entry whose record is gone is stale: replace it.
                _ => None,
            };
            match indexed {
                Some(existing) if record.reuse_existing => {
                    let existing = Token::from_stored(&existing).ok_or_else(|| {
                        StoreError::Engine("fingerprint index holds a malformed token".into())
                    })?;
                    outcomes.push(InsertOutcome::Existing(existing));
                    continue;
                }
                Some(_) => {}
                None => {
                    batch.put_cf(index_cf, &record.index_key, token);
                    pending
                        .index
                        .insert(record.index_key.clone(), Some(token.to_vec()));
                }
            }
            batch.put_cf(records_cf, token, &record.value);
            pending.records.insert(token.to_vec(), true);
            outcomes.push(InsertOutcome::Stored);
        }
        Ok(outcomes)
    }

    fn plan_delete(
        &self,
        token: &Token,
        index_key: &[u8],
        batch: &mut WriteBatch,
        pending: &mut Pending,
    ) -> Result<bool, StoreError> {
        let token = token.as_str().as_bytes();
        if !self.record_exists(token, pending)? {
            return Ok(false);
        }
        let records_cf = self.db.cf_handle(RECORDS).ok_or(StoreError::Closed)?;
        batch.delete_cf(records_cf, token);
        pending.records.insert(token.to_vec(), false);
        if self.index_entry(index_key, pending)?.as_deref() == Some(token) {
            let index_cf = self.db.cf_handle(FINGERPRINTS).ok_or(StoreError::Closed)?;
            batch.delete_cf(index_cf, index_key);
            pending.index.insert(index_key.to_vec(), None);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = 0;
        super::super::conformance::run_all(|| {
            n += 1;
            RocksStore::open(&dir.path().join(n.to_string())).unwrap()
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let token = Token::generate().unwrap();
        {
            let store = RocksStore::open(dir.path()).unwrap();
            let outcome = store
                .insert(vec![NewRecord {
                    token: token.clone(),
                    value: b"sealed".to_vec(),
                    index_key: b"index".to_vec(),
                    reuse_existing: false,
                }])
                .await
                .unwrap();
            assert_eq!(outcome, vec![InsertOutcome::Stored]);
        }
        let store = RocksStore::open(dir.path()).unwrap();
        assert_eq!(
            store.get(&token).await.unwrap().as_deref(),
            Some(&b"sealed"[..])
        );
    }
}
