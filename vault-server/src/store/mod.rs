//! Storage behind a small trait. The store sees only tokens, keyed hashes and sealed
//! record bytes; it never sees card data. Every engine passes the conformance suite in
//! `conformance.rs`. Only `rocks/` names RocksDB and only `postgres/` PostgreSQL;
//! `Engine` is the one the config selects.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;

use crate::token::Token;

#[cfg(test)]
mod conformance;
mod engine;
pub mod postgres;
pub mod rocks;

pub use engine::Engine;

/// A record to insert, if its token is free.
#[derive(Debug)]
pub struct NewRecord {
    pub token: Token,
    /// Sealed record bytes (see `record.rs`).
    pub value: Vec<u8>,
    /// The fingerprint index key of the card (tenant, keyed fingerprint, expiry). It
    /// starts with `indexes.card_key` (an engine may index by both in one key).
    pub index_key: Vec<u8>,
    /// When the index already names a live token, return it instead of storing.
    pub reuse_existing: bool,
    /// Index keys of the same card under older fingerprint key versions (each starting
    /// with that version's card key, as long as `indexes.card_key`): with
    /// `reuse_existing`, a live token named there is returned too.
    pub older_index_keys: Vec<Vec<u8>>,
    /// The key versions the record uses (the store counts and lists records by them).
    pub versions: KeyVersions,
    /// The record's other indexes (expiry, card).
    pub indexes: RecordIndexes,
    /// An outcome (key, value, as `put_outcome` takes them) written in the same atomic
    /// write as the record, only if the record is stored: a sealed card's answer
    /// (`intake`), so that the record never exists without it.
    pub outcome: Option<(Vec<u8>, Vec<u8>)>,
    /// Set: `outcome` is claimed in the record's write. The record is stored only if
    /// the outcome's key holds nothing or a value this rule says may be replaced;
    /// otherwise nothing is written and the record's outcome is
    /// [`InsertOutcome::OutcomeTaken`]. (A sealed card's nonce is claimed this way in
    /// one durable write with its record, instead of a claim's write before it.)
    pub claim: Option<ClaimRule>,
}

/// The rule of [`NewRecord::claim`].
#[derive(Clone)]
pub struct ClaimRule(pub Replaceable);

impl std::fmt::Debug for ClaimRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClaimRule")
    }
}

/// What the store indexes a record by besides its token and fingerprint entry: when
/// it expires (for the purge job) and its card (every token of one card, for
/// data-subject requests). Clear metadata and keyed hashes only.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordIndexes {
    /// 0: never.
    pub expires_at_unix_ms: i64,
    /// When the record was made (an engine may order a card's tokens by it: reuse
    /// returns the oldest live one).
    pub created_at_unix_ms: i64,
    /// Tenant and keyed fingerprint (see `Metadata::card_key`).
    pub card_key: Vec<u8>,
}

/// The key purposes a stored record uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyUse {
    CardData,
    Fingerprint,
}

impl KeyUse {
    pub const ALL: [KeyUse; 2] = [KeyUse::CardData, KeyUse::Fingerprint];

    pub fn code(self) -> u8 {
        match self {
            KeyUse::CardData => 1,
            KeyUse::Fingerprint => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|u| u.code() == code)
    }
}

/// The card-data and fingerprint key versions of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyVersions {
    pub card_data: u32,
    pub fingerprint: u32,
}

impl KeyVersions {
    pub fn get(self, key_use: KeyUse) -> u32 {
        match key_use {
            KeyUse::CardData => self.card_data,
            KeyUse::Fingerprint => self.fingerprint,
        }
    }
}

/// Re-encryption of one record onto new key versions, applied only if the record
/// still holds `expected` (so a concurrent delete or rewrite wins).
#[derive(Debug)]
pub struct Rewrite {
    pub token: Token,
    pub expected: Vec<u8>,
    pub value: Vec<u8>,
    pub old_versions: KeyVersions,
    pub new_versions: KeyVersions,
    pub old_index_key: Vec<u8>,
    pub new_index_key: Vec<u8>,
    pub old_indexes: RecordIndexes,
    pub new_indexes: RecordIndexes,
}

/// Deletion of one record, applied only if it still holds `expected` (so that its
/// versions and index key, read from those bytes, are still right).
#[derive(Debug)]
pub struct Delete {
    pub token: Token,
    pub expected: Vec<u8>,
    pub index_key: Vec<u8>,
    pub versions: KeyVersions,
    pub indexes: RecordIndexes,
    /// Written with the deletion: the deleted token's keyed id (see `record::tombstone`),
    /// so that a later lookup of it is told apart from a probe without keeping the
    /// token's bytes.
    pub tombstone: Tombstone,
}

/// A record as stored: the token's bytes and the record's.
pub type StoredBytes = (Vec<u8>, Vec<u8>);

/// A deleted token's keyed id and when it was deleted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tombstone {
    pub key: Vec<u8>,
    pub deleted_at_unix_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    NotFound,
    /// The record changed since it was read (a rewrap); read it again and retry.
    Changed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriteOutcome {
    Rewritten,
    /// The record was deleted or changed meanwhile; nothing was written.
    Changed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Stored and durable.
    Stored,
    /// The token already exists; nothing was written (the caller draws a new token).
    TokenTaken,
    /// `reuse_existing` was set and the index names this live token; nothing was written.
    Existing(Token),
    /// The record's claimed outcome key holds a value its rule may not replace (see
    /// [`NewRecord::claim`]); nothing was written. That value.
    OutcomeTaken(Vec<u8>),
}

/// What [`Store::claim_outcome`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The value is stored: the key is the caller's.
    Claimed,
    /// Another claim holds the key; nothing was written. Its stored value.
    Taken(Vec<u8>),
}

/// Whether a stored outcome may be replaced by a new claim (it was released, or its
/// window ended). Decided by the caller, which knows the format and the window.
pub type Replaceable = std::sync::Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The engine refused or failed a read or write; the detail is for the server log.
    #[error("storage engine error: {0}")]
    Engine(String),
    /// The disk is full: nothing of the failed write was stored.
    #[error("storage is full: {0}")]
    NoSpace(String),
    /// The data directory cannot be written (read-only filesystem, permissions).
    #[error("storage is not writable: {0}")]
    NotWritable(String),
    /// The store is shutting down.
    #[error("storage is shutting down")]
    Closed,
    /// The store is being reopened after its disk was full or read-only; retry.
    #[error("storage is being reopened")]
    Reopening,
    /// The database cannot be reached (connection lost, failover under way); nothing
    /// of the failed write was acknowledged. Retry.
    #[error("storage is unavailable: {0}")]
    Unavailable(String),
    /// This engine does not do that (the reason says what to do instead).
    #[error("{0}")]
    Unsupported(&'static str),
}

/// The audit log's end as stored, read under the append's lock: the last entry
/// (sequence number, bytes) and the anchor (the [`AUDIT_HEAD_KEY`] value written with
/// the last append, which a cut that removed entries from the end may have left).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogEnd {
    pub last: Option<(u64, Vec<u8>)>,
    pub anchor: Option<Vec<u8>>,
}

/// Chains audit events onto the log: given its end, returns the entries to append.
pub type AuditSeal = Box<dyn FnOnce(LogEnd) -> Sealed + Send>;

/// The audit event of the call a write finishes, committed in the same atomic, durable
/// write as the write's data, so that a call waits for one commit and the log says
/// "ok" exactly when the data exists (or is gone). Given the write's outcome, it
/// returns the seal chaining the event, or `None` when the outcome does not finish the
/// call (a token taken, an existing record to check, a record changed meanwhile): its
/// event is then written on its own, later. An engine calls it once per try of the
/// write (it may plan the write again after losing a race), and chains what it returns
/// last.
pub type Riding<O> = Box<dyn Fn(&O) -> Option<AuditSeal> + Send + Sync>;

/// Audit entries to append, and the anchor to record with them.
#[derive(Debug, Default)]
pub struct Sealed {
    pub entries: Vec<(u64, Vec<u8>)>,
    /// The [`AUDIT_HEAD_KEY`] value the engine writes with them.
    pub anchor: Vec<u8>,
}

/// The data store's `meta` key holding the log's head (the audit module's MACed
/// sequence number and chain value): the anchor that shows a log cut short (entries
/// removed from its end, or the log replaced). Kept here, not in `audit`, because the
/// engines write it with the entries: the store never depends on the audit module.
pub const AUDIT_HEAD_KEY: &str = "audit-head";

/// Held while this vault runs a background job that must run on one vault at a time
/// (see [`Store::lock_job`]); dropping it lets another vault take the job.
#[derive(Debug)]
pub struct JobLock {
    _held: Option<Box<dyn std::fmt::Debug + Send + Sync>>,
    /// Fires if the lock is lost while held (its database connection broke).
    lost: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl JobLock {
    /// A store only this process opens: nobody else can run the job.
    pub fn sole() -> Self {
        Self {
            _held: None,
            lost: None,
        }
    }

    pub fn held(
        guard: impl std::fmt::Debug + Send + Sync + 'static,
        lost: tokio::sync::oneshot::Receiver<()>,
    ) -> Self {
        Self {
            _held: Some(Box::new(guard)),
            lost: Some(lost),
        }
    }

    /// Resolves if the lock is lost while held (never for a sole store): another vault
    /// may take the job from then on.
    pub async fn lost(&mut self) {
        match &mut self.lost {
            Some(lost) => {
                let _ = lost.await;
            }
            None => std::future::pending().await,
        }
    }
}

/// What an engine reports about itself (`Store::stats`). Sizes are bytes; a figure the
/// engine cannot read is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Free space on the data and the audit log filesystems; none for an engine
    /// without a local disk (PostgreSQL: the database's disks are its own to watch).
    pub data_free_bytes: Option<u64>,
    pub audit_free_bytes: Option<u64>,
    /// Table files on disk, and memtables in memory, over all data column families.
    pub table_bytes: u64,
    pub memtable_bytes: u64,
    /// Bytes compaction still has to rewrite, and compactions running now.
    pub pending_compaction_bytes: u64,
    pub running_compactions: u64,
    /// Writes stopped, or slowed to `delayed_write_rate` bytes/s (0: not slowed), because
    /// compaction is behind.
    pub write_stopped: bool,
    pub delayed_write_rate: u64,
    pub block_cache_bytes: u64,
    /// The database cannot be reached now, does not confirm writes (a synchronous
    /// standby down), or this vault lost its node name (an engine over the network:
    /// PostgreSQL).
    pub unreachable: bool,
}

pub trait Store: Send + Sync + 'static {
    /// Inserts records atomically and durably (one synced write), each only if its
    /// token is free. Returns one outcome per record, in order, after the write is
    /// durable. An existing record is never overwritten.
    fn insert(
        &self,
        records: Vec<NewRecord>,
    ) -> impl Future<Output = Result<Vec<InsertOutcome>, StoreError>> + Send {
        self.insert_audited(records, None)
    }

    /// [`Store::insert`], with the audit event `riding` makes from the outcomes chained
    /// onto the log in the same atomic, durable write (and in the same append order as
    /// [`Store::append_audit`]: after the log's end, atomically with every other writer).
    fn insert_audited(
        &self,
        records: Vec<NewRecord>,
        riding: Option<Riding<[InsertOutcome]>>,
    ) -> impl Future<Output = Result<Vec<InsertOutcome>, StoreError>> + Send;

    /// The stored bytes of a token's record.
    fn get(
        &self,
        token: &Token,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;

    /// Deletes a token's record durably, and its index entry if the entry names this
    /// token, if the record still holds the bytes the caller read; writes its
    /// tombstone in the same atomic write.
    fn delete(
        &self,
        delete: Delete,
    ) -> impl Future<Output = Result<DeleteOutcome, StoreError>> + Send {
        self.delete_audited(delete, None)
    }

    /// [`Store::delete`], with the audit event `riding` makes from the outcome in the
    /// same write (see [`Store::insert_audited`]).
    fn delete_audited(
        &self,
        delete: Delete,
        riding: Option<Riding<DeleteOutcome>>,
    ) -> impl Future<Output = Result<DeleteOutcome, StoreError>> + Send;

    /// Replaces a record with its re-encryption, atomically and durably, unless it
    /// changed since it was read.
    fn rewrite(
        &self,
        rewrite: Rewrite,
    ) -> impl Future<Output = Result<RewriteOutcome, StoreError>> + Send;

    /// Records per key use and version.
    fn version_counts(&self) -> BTreeMap<(KeyUse, u32), u64>;

    /// The engine's figures for metrics and health, read now.
    fn stats(&self) -> StoreStats;

    /// Up to `limit` tokens of records whose card-data or fingerprint version differs
    /// from `active`, in a stable order, starting after `cursor` (an opaque position
    /// returned with each token).
    fn records_off_versions(
        &self,
        active: KeyVersions,
        cursor: Option<&[u8]>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(Vec<u8>, Token)>, StoreError>> + Send;

    /// Appends the entries `seal` makes after the last stored one, and moves the anchor
    /// (the [`AUDIT_HEAD_KEY`] meta entry) to the new end, in one durable write,
    /// atomically with respect to every other writer of the log (other vaults on a
    /// shared database included). Returns their sequence numbers.
    fn append_audit(
        &self,
        seal: AuditSeal,
    ) -> impl Future<Output = Result<Vec<u64>, StoreError>> + Send;

    /// Up to `limit` audit entries with a sequence number above `after`, in order.
    fn read_audit(
        &self,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(u64, Vec<u8>)>, StoreError>> + Send;

    /// The audit entry with the highest sequence number.
    fn last_audit(&self)
    -> impl Future<Output = Result<Option<(u64, Vec<u8>)>, StoreError>> + Send;

    /// Deletes every stored forward outcome for which `expired(value)` holds (the
    /// purge job: outcomes are kept only for the idempotency window), each only if it
    /// still holds the value examined: a claim made meanwhile is never removed.
    /// Returns how many were examined as expired.
    fn prune_outcomes(
        &self,
        expired: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Up to `limit` tokens of records that expired at or before `now_unix_ms`.
    fn expired(
        &self,
        now_unix_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Token>, StoreError>> + Send;

    /// Whether a tombstone is stored under any of `keys`.
    fn tombstoned(
        &self,
        keys: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Those of `keys` under which no tombstone is stored.
    fn missing_tombstones(
        &self,
        keys: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Vec<Vec<u8>>, StoreError>> + Send;

    /// Deletes the tombstones of deletions before `before_unix_ms`; returns how many.
    fn prune_tombstones(
        &self,
        before_unix_ms: i64,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Up to `limit` erasures not yet reported to the keyservice (each delete writes
    /// one with its tombstone, in the same atomic write), oldest keyed id first.
    fn unsent_erasures(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Tombstone>, StoreError>> + Send;

    /// Forgets the unsent erasures `keys`: the keyservice keeps them now.
    fn erasures_sent(
        &self,
        keys: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Up to `limit` records in token order, starting after `cursor` (a token's
    /// stored bytes).
    fn records_after(
        &self,
        cursor: Option<Vec<u8>>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredBytes>, StoreError>> + Send;

    /// Every token whose record has this card key.
    fn tokens_of_card(
        &self,
        card_key: &[u8],
    ) -> impl Future<Output = Result<Vec<Token>, StoreError>> + Send;

    /// How many of `card_keys` (duplicates counted each time) have a record: what an
    /// import job counts of the cards its tenant held already, without reusing their
    /// tokens. One read for them all.
    fn count_known_cards(
        &self,
        card_keys: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Makes deleted data physically gone: flushes and compacts, so that no file of
    /// the store still holds a deleted record's bytes or token.
    fn compact(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Small durable state of background jobs (the rewrap cursor).
    fn get_meta(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;

    fn put_meta(
        &self,
        key: &str,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Stores `value` under `key` unless a value is stored there already (by another
    /// vault of a shared database too), and returns the value stored: the one way to
    /// make a value every vault of a database agrees on.
    fn init_meta(
        &self,
        key: &str,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, StoreError>> + Send;

    /// The `meta` keys that start with `prefix`, without it.
    fn list_meta(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// The stored outcome of a forward under an idempotency key.
    fn get_outcome(
        &self,
        key: &[u8],
    ) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;

    /// Writes a consistent copy of everything stored into `dir` (which must not exist)
    /// while writes go on, and returns its size in bytes.
    fn create_backup(&self, dir: &Path) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Calls `visit(token, record bytes)` for every record of a backup made by
    /// [`Store::create_backup`]. Blocking; call it off the async threads.
    fn scan_backup(dir: &Path, visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), StoreError>;

    /// Stores `value` under idempotency key `key` durably if no outcome is stored there
    /// or the stored one is `replaceable`, atomically with respect to every other
    /// writer, other vaults on a shared database included: of concurrent claims of one
    /// key, exactly one wins. This is what makes N vaults one for idempotency.
    fn claim_outcome(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        replaceable: Replaceable,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Stores (or replaces) a forward outcome durably. Outcomes hold no card data.
    /// Only the holder of the key's claim writes it.
    fn put_outcome(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Takes background job `job` (the rewrap) for this vault, where several vaults
    /// share the store: `None` while another vault holds it. The job is this vault's
    /// until the lock is dropped or the vault dies.
    fn lock_job(
        &self,
        job: &str,
    ) -> impl Future<Output = Result<Option<JobLock>, StoreError>> + Send;
}
