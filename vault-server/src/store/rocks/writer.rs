//! The writer: one thread that takes everything queued, plans it against the database
//! and the batch so far, chains the group's audit events onto the log, and commits it
//! all as one synced write (group commit): the data of a group and the events of its
//! calls become durable together, with one fsync.

use rustc_hash::{FxHashMap, FxHashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use rocksdb::{Cache, DB, WriteBatch, WriteOptions};
use tokio::sync::{mpsc, oneshot};

use super::audit::{log_end, seal_entries};
use super::counts::{Counts, encode_counts};
use super::{AUDIT, COUNTS, IDEMPOTENCY, META, Slot, classify};
use crate::store::{
    AUDIT_HEAD_KEY, AuditSeal, Claim, Delete, DeleteOutcome, InsertOutcome, KeyUse, KeyVersions,
    LogEnd, NewRecord, Replaceable, Rewrite, RewriteOutcome, Riding, StoreError,
};

/// Most operations committed in one batch; bounds batch size and latency.
pub(super) const MAX_GROUP: usize = 2048;
/// Queue depth in front of the writer; callers wait (backpressure) beyond it.
pub(super) const QUEUE_DEPTH: usize = 4096;

pub(super) enum Op {
    Insert {
        records: Vec<NewRecord>,
        /// The event of the call the insert finishes, committed with it.
        riding: Option<Riding<[InsertOutcome]>>,
        reply: oneshot::Sender<Result<Vec<InsertOutcome>, StoreError>>,
    },
    Delete {
        delete: Delete,
        /// The event of the call the delete finishes, committed with it.
        riding: Option<Riding<DeleteOutcome>>,
        reply: oneshot::Sender<Result<DeleteOutcome, StoreError>>,
    },
    Rewrite {
        rewrite: Rewrite,
        reply: oneshot::Sender<Result<RewriteOutcome, StoreError>>,
    },
    /// Idempotency outcomes deleted only if each still holds the value given.
    RemoveOutcomes {
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Plain deletes from `family` (expired tombstones).
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
    /// An idempotency outcome written only if the key is free or `replaceable`.
    Claim {
        key: Vec<u8>,
        value: Vec<u8>,
        replaceable: Replaceable,
        reply: oneshot::Sender<Result<Claim, StoreError>>,
    },
    /// Audit events to chain onto the log's end; answered with their sequence numbers.
    Audit {
        seal: AuditSeal,
        reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
    },
}

pub(super) struct Writer {
    pub(super) db: Arc<DB>,
    pub(super) counts: Counts,
    /// Where readers find `db`, emptied while it is reopened.
    pub(super) slot: Slot,
    pub(super) dir: PathBuf,
    pub(super) cache: Cache,
    /// Set when a write was refused for a full or read-only filesystem: RocksDB
    /// refuses every write after that until it is reopened.
    pub(super) refused_since: Option<Instant>,
    pub(super) last_recovery: Option<Instant>,
    /// The audit log's end after the last write that went through. This thread is the
    /// log's only writer, so it need not read the end from the database for every
    /// group; emptied when a write fails (the end is read again).
    pub(super) log_end: std::cell::RefCell<Option<LogEnd>>,
}

/// A group's writes, handed to RocksDB sorted by column family and key. Inserting
/// random keys into a memtable's skiplist costs a cache miss at each step down from
/// the top; RocksDB keeps the previous insert's path (its splice), so keys that arrive
/// in order each reuse most of it. The sort is stable: two writes of one key keep their
/// order.
#[derive(Default)]
pub(super) struct SortedBatch<'a> {
    entries: Vec<BatchEntry<'a>>,
}

/// A put (with its value) or a delete (`None`) of one key.
type BatchEntry<'a> = (&'a rocksdb::ColumnFamily, Vec<u8>, Option<Vec<u8>>);

impl<'a> SortedBatch<'a> {
    pub(super) fn put_cf(
        &mut self,
        family: &'a rocksdb::ColumnFamily,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) {
        self.entries
            .push((family, key.as_ref().to_vec(), Some(value.as_ref().to_vec())));
    }

    pub(super) fn delete_cf(&mut self, family: &'a rocksdb::ColumnFamily, key: impl AsRef<[u8]>) {
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

impl Writer {
    pub(super) fn run(mut self, mut receiver: mpsc::Receiver<Op>) {
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

    /// Commits `group`; true if the write was refused for a full or read-only
    /// filesystem.
    fn commit(&self, group: Vec<Op>) -> bool {
        let mut batch = SortedBatch::default();
        let mut pending = Pending::default();
        let mut inserts = Vec::new();
        let mut deletes = Vec::new();
        let mut rewrites = Vec::new();
        let mut put_replies = Vec::new();
        let mut claims = Vec::new();
        let mut seals = Vec::new();
        // A failed read while planning fails the whole group: the batch may already
        // hold part of that operation, so nothing is written.
        let mut failure = None;
        self.look_up_new_tokens(&group, &mut pending);
        for op in group {
            match op {
                Op::Insert {
                    records,
                    riding,
                    reply,
                } => {
                    let outcomes = self.plan_insert(&records, &mut batch, &mut pending);
                    let outcomes = outcomes.unwrap_or_else(|e| {
                        failure.get_or_insert(e.to_string());
                        Vec::new()
                    });
                    // In the group's order: chained after the events queued before it.
                    if let Some(seal) = riding.and_then(|riding| riding(&outcomes)) {
                        seals.push((seal, None));
                    }
                    inserts.push((reply, outcomes));
                }
                Op::Delete {
                    delete,
                    riding,
                    reply,
                } => {
                    let outcome = self.plan_delete(&delete, &mut batch, &mut pending);
                    let outcome = outcome.unwrap_or_else(|e| {
                        failure.get_or_insert(e.to_string());
                        DeleteOutcome::Changed
                    });
                    if let Some(seal) = riding.and_then(|riding| riding(&outcome)) {
                        seals.push((seal, None));
                    }
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
                                if family == IDEMPOTENCY {
                                    pending.outcomes.insert(key.clone(), Some(value.clone()));
                                }
                                batch.put_cf(cf, key, value);
                            }
                        }
                        None => {
                            failure.get_or_insert(StoreError::Closed.to_string());
                        }
                    }
                    put_replies.push(reply);
                }
                Op::RemoveOutcomes { entries, reply } => {
                    if let Err(e) = self.plan_remove_outcomes(entries, &mut batch, &mut pending) {
                        failure.get_or_insert(e.to_string());
                    }
                    put_replies.push(reply);
                }
                Op::Claim {
                    key,
                    value,
                    replaceable,
                    reply,
                } => {
                    let claim =
                        self.plan_claim(&key, &value, &replaceable, &mut batch, &mut pending);
                    let claim = claim.unwrap_or_else(|e| {
                        failure.get_or_insert(e.to_string());
                        Claim::Taken(Vec::new())
                    });
                    claims.push((reply, claim));
                }
                Op::Audit { seal, reply } => seals.push((seal, Some(reply))),
            }
        }
        // The events are chained last, once the group's data is planned, in the order
        // they came: each seal continues after the entries of the one before.
        let mut appended = Vec::with_capacity(seals.len());
        let mut new_end = None;
        if failure.is_some() && !seals.is_empty() {
            // A failed read while planning fails the group's data operations, not the
            // audit events queued with them (a failed event stops the audit log until
            // a restart): they are committed alone. Events riding an insert fail with
            // it: they say its data exists.
            seals.retain(|(_, reply)| reply.is_some());
            self.commit_events_alone(seals);
        } else if !seals.is_empty() {
            match self.chain_events(seals, &mut batch) {
                Ok((chained, end)) => {
                    appended = chained;
                    new_end = Some(end);
                }
                Err((e, replies)) => {
                    failure.get_or_insert(e.to_string());
                    appended = replies.into_iter().map(|r| (r, Vec::new())).collect();
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
        if written.is_ok() && new_end.is_some() {
            *self.log_end.borrow_mut() = new_end;
        }
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
        for (reply, claim) in claims {
            let _ = reply.send(written.clone().map(|()| claim).map_err(classify));
        }
        for (reply, sequences) in appended {
            if let Some(reply) = reply {
                let _ = reply.send(written.clone().map(|()| sequences).map_err(classify));
            }
        }
        written.is_err_and(|e| {
            matches!(
                classify(e),
                StoreError::NoSpace(_) | StoreError::NotWritable(_)
            )
        })
    }
}

/// Where an audit append is answered; none for events riding an insert (its reply
/// answers for them).
type AuditReply = Option<oneshot::Sender<Result<Vec<u64>, StoreError>>>;
impl Writer {
    /// Whether the tokens the group's inserts bring exist, read in one batched look-up
    /// (RocksDB's MultiGet: the keys sorted, each table's filter and index read once
    /// for all of them) instead of one read per record while planning; noted as the
    /// group's starting state. On a failed read, nothing is noted and each record is
    /// read while planning, which reports the failure.
    fn look_up_new_tokens(&self, group: &[Op], pending: &mut Pending) {
        let mut tokens: Vec<&[u8]> = group
            .iter()
            .flat_map(|op| match op {
                Op::Insert { records, .. } => records.as_slice(),
                _ => &[],
            })
            .map(|record| record.token.as_str().as_bytes())
            .collect();
        if tokens.len() < 2 {
            return;
        }
        tokens.sort_unstable();
        tokens.dedup();
        let Some(cf) = self.db.cf_handle(super::RECORDS) else {
            return;
        };
        let found = self.db.batched_multi_get_cf(cf, &tokens, true);
        if found.iter().any(Result::is_err) {
            return;
        }
        for (token, found) in tokens.into_iter().zip(found) {
            let exists = matches!(found, Ok(Some(_)));
            pending.records.insert(token.to_vec(), exists);
        }
    }
}

/// Audit appends of one group, with where to answer each.
type Seals = Vec<(AuditSeal, AuditReply)>;
/// Each append's sequence numbers and the log's end after them, or every reply back if
/// the log's end was unreadable.
type Chained = Result<(Vec<(AuditReply, Vec<u64>)>, LogEnd), (StoreError, Vec<AuditReply>)>;

impl Writer {
    /// Commits audit appends in a batch of their own (see `commit`).
    fn commit_events_alone(&self, seals: Seals) {
        let mut batch = SortedBatch::default();
        let (written, chained) = match self.chain_events(seals, &mut batch) {
            Ok((chained, end)) => {
                let mut sync = WriteOptions::default();
                sync.set_sync(true);
                let written = self
                    .db
                    .write_opt(batch.into_write_batch(), &sync)
                    .map_err(|e| e.into_string());
                if written.is_ok() {
                    *self.log_end.borrow_mut() = Some(end);
                }
                (written, chained)
            }
            Err((e, replies)) => (
                Err(e.to_string()),
                replies.into_iter().map(|r| (r, Vec::new())).collect(),
            ),
        };
        for (reply, sequences) in chained {
            if let Some(reply) = reply {
                let _ = reply.send(written.clone().map(|()| sequences).map_err(classify));
            }
        }
    }

    /// Chains each append onto the log's end (as the last write left it, else read,
    /// then the entries before it in this group) and puts the entries and the last
    /// anchor into `batch`. This thread is the log's only writer, so that end is still
    /// the end at the write. The end is taken from the cache: a failed write leaves it
    /// to be read again.
    fn chain_events<'a>(&'a self, seals: Seals, batch: &mut SortedBatch<'a>) -> Chained {
        let (Some(log), Some(meta)) = (self.db.cf_handle(AUDIT), self.db.cf_handle(META)) else {
            return Err((
                StoreError::Closed,
                seals.into_iter().map(|(_, r)| r).collect(),
            ));
        };
        let cached = self.log_end.borrow_mut().take();
        let mut end = match cached.map_or_else(|| log_end(&self.db), Ok) {
            Ok(end) => end,
            Err(e) => return Err((e, seals.into_iter().map(|(_, r)| r).collect())),
        };
        let stored_anchor = end.anchor.clone();
        let mut chained = Vec::with_capacity(seals.len());
        for (seal, reply) in seals {
            let sealed = seal_entries(seal, end.clone());
            let mut sequences = Vec::with_capacity(sealed.entries.len());
            for (sequence, entry) in &sealed.entries {
                batch.put_cf(log, sequence.to_be_bytes(), entry);
                sequences.push(*sequence);
            }
            if let Some(last) = sealed.entries.into_iter().next_back() {
                end.last = Some(last);
            }
            if !sealed.anchor.is_empty() {
                end.anchor = Some(sealed.anchor);
            }
            chained.push((reply, sequences));
        }
        if end.anchor != stored_anchor
            && let Some(anchor) = &end.anchor
        {
            batch.put_cf(meta, AUDIT_HEAD_KEY, anchor);
        }
        Ok((chained, end))
    }
}

/// What one group commit has written so far, so later operations in the same group
/// see earlier ones: whether a record exists, and the tokens added under an index
/// prefix (see `indexes::index_prefix`).
#[derive(Default)]
pub(super) struct Pending {
    pub(super) records: FxHashMap<Vec<u8>, bool>,
    pub(super) cards: FxHashMap<Vec<u8>, Vec<Vec<u8>>>,
    /// Records rewritten in this group (a second rewrite of one must re-read).
    pub(super) rewritten: FxHashSet<Vec<u8>>,
    /// Changes to the per-version record counts, applied once the batch is durable.
    pub(super) counts: Vec<((KeyUse, u32), i64)>,
    /// Idempotency outcomes written (`None`: removed) in this group, as a later
    /// operation of the group must see them.
    pub(super) outcomes: FxHashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Pending {
    pub(super) fn count(&mut self, versions: KeyVersions, delta: i64) {
        for key_use in KeyUse::ALL {
            self.counts.push(((key_use, versions.get(key_use)), delta));
        }
    }
}
