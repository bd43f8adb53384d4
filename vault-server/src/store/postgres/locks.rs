//! What a transaction locks: the advisory lock keys of the vault's own range, and the
//! fingerprint index and outcome locks of a write group (see the module documentation
//! of `postgres`).

/// Advisory lock keys (64-bit, the vault's own range).
pub(super) const MIGRATION_LOCK: i64 = 0x746f_6b76_0000_0001;
pub(super) const AUDIT_LOCK: i64 = 0x746f_6b76_0000_0002;
pub(super) const INDEX_LOCK: i64 = 0x746f_6b76_0000_0003;
pub(super) const OUTCOME_LOCK: i64 = 0x746f_6b76_0000_0004;

/// A group touching more fingerprint keys than this takes one exclusive lock on the
/// whole index (`INDEX_LOCK`) instead of a lock per key (others take it shared), so
/// that no transaction fills PostgreSQL's lock table (max_locks_per_transaction x
/// connections, shared by the whole server). Outcome keys have a budget of their own,
/// under `OUTCOME_LOCK`.
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

/// How a group locks one kind of key (fingerprint index keys, or outcome keys): the
/// kind's lock shared and each key (sorted), or, past `MAX_KEY_LOCKS` keys, the kind's
/// lock exclusive.
#[derive(Debug, PartialEq)]
pub(super) enum KeyLocks {
    Keys(Vec<i64>),
    Whole,
}

impl KeyLocks {
    pub(super) fn of(keys: std::collections::BTreeSet<i64>) -> KeyLocks {
        if keys.len() > MAX_KEY_LOCKS {
            KeyLocks::Whole
        } else {
            KeyLocks::Keys(keys.into_iter().collect())
        }
    }

    /// The keys to lock one by one (none when the whole kind is locked).
    pub(super) fn keys(&self) -> &[i64] {
        match self {
            KeyLocks::Keys(keys) => keys,
            KeyLocks::Whole => &[],
        }
    }
}

/// What a write group locks, in this order: `INDEX_LOCK` and `OUTCOME_LOCK`, each
/// shared or exclusive, then the keys locked one by one, in one sorted step.
pub(super) struct GroupLocks {
    pub(super) index: KeyLocks,
    pub(super) outcomes: KeyLocks,
}

impl GroupLocks {
    /// The keys of both kinds locked one by one (the statement sorts them).
    pub(super) fn keys(&self) -> Vec<i64> {
        [self.index.keys(), self.outcomes.keys()].concat()
    }
}
