//! Storage behind a small trait. The store sees only tokens, keyed hashes and sealed
//! record bytes; it never sees card data. Every engine passes the conformance suite in
//! `conformance.rs`. Only `rocks.rs` names RocksDB.

use std::future::Future;
use std::path::Path;

use crate::token::Token;

#[cfg(test)]
mod conformance;
pub mod rocks;

/// A record to insert, if its token is free.
#[derive(Debug)]
pub struct NewRecord {
    pub token: Token,
    /// Sealed record bytes (see `record.rs`).
    pub value: Vec<u8>,
    /// The fingerprint index key of the card (tenant, keyed fingerprint, expiry).
    pub index_key: Vec<u8>,
    /// When the index already names a live token, return it instead of storing.
    pub reuse_existing: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Stored and durable.
    Stored,
    /// The token already exists; nothing was written (the caller draws a new token).
    TokenTaken,
    /// `reuse_existing` was set and the index names this live token; nothing was written.
    Existing(Token),
}

#[derive(Debug, thiserror::Error)]
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
}

pub trait Store: Send + Sync + 'static {
    /// Inserts records atomically and durably (one synced write), each only if its
    /// token is free. Returns one outcome per record, in order, after the write is
    /// durable. An existing record is never overwritten.
    fn insert(
        &self,
        records: Vec<NewRecord>,
    ) -> impl Future<Output = Result<Vec<InsertOutcome>, StoreError>> + Send;

    /// The stored bytes of a token's record.
    fn get(
        &self,
        token: &Token,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;

    /// Deletes a token's record durably, and its index entry if the entry names this
    /// token. Returns false when the token did not exist.
    fn delete(
        &self,
        token: Token,
        index_key: Vec<u8>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

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

    /// Stores (or replaces) a forward outcome durably. Outcomes hold no card data.
    fn put_outcome(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
