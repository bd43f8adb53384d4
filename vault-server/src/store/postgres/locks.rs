//! What a transaction locks: the advisory lock keys of the vault's own range, and the
//! fingerprint index and outcome locks of a write group (see the module documentation
//! of `postgres`).

/// Advisory lock keys (64-bit, the vault's own range).
pub(super) const MIGRATION_LOCK: i64 = 0x746f_6b76_0000_0001;
pub(super) const AUDIT_LOCK: i64 = 0x746f_6b76_0000_0002;
pub(super) const INDEX_LOCK: i64 = 0x746f_6b76_0000_0003;

/// A group touching more fingerprint keys than this takes one exclusive lock on the
/// whole index instead of a lock per key (others take it shared), so that no
/// transaction fills PostgreSQL's lock table (max_locks_per_transaction x
/// connections, shared by the whole server).
pub(super) const MAX_KEY_LOCKS: usize = 128;

/// The advisory lock key of a fingerprint index key: the first 8 bytes of its
/// SHA-256 (index keys start with the tenant, so their own bytes are not spread).
pub(super) fn index_lock(index_key: &[u8]) -> i64 {
    lock_key(&[index_key])
}

/// The advisory lock key of an idempotency outcome key (a sealed card's nonce, a
/// forward's idempotency key). A group locks every outcome key it writes in the same
/// sorted step as its index keys: two groups claiming the same keys in different
/// orders would otherwise each wait on the other's uncommitted row.
pub(super) fn outcome_lock(outcome_key: &[u8]) -> i64 {
    lock_key(&[b"outcome\0", outcome_key])
}

fn lock_key(parts: &[&[u8]]) -> i64 {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(part);
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&context.finish().as_ref()[..8]);
    i64::from_be_bytes(first)
}

/// How a group locks the fingerprint index: the index shared and each key it reads or
/// writes (sorted), or, past `MAX_KEY_LOCKS` keys, the whole index.
pub(super) enum IndexLocks {
    Keys(Vec<i64>),
    Whole,
}

impl IndexLocks {
    /// The keys to lock one by one (none when the whole index is locked).
    pub(super) fn keys(&self) -> &[i64] {
        match self {
            IndexLocks::Keys(keys) => keys,
            IndexLocks::Whole => &[],
        }
    }
}
