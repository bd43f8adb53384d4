//! The engine the config selects (`[storage] type`), as one `Store`: each call goes to
//! the engine in use.

use std::collections::BTreeMap;
use std::path::Path;

use super::postgres::PgStore;
use super::rocks::RocksStore;
use super::{
    AuditSeal, Claim, Delete, DeleteOutcome, InsertOutcome, JobLock, KeyUse, KeyVersions,
    NewRecord, Replaceable, Rewrite, RewriteOutcome, Riding, Store, StoreError, StoreStats,
    StoredBytes, Tombstone,
};
use crate::token::Token;

#[derive(Debug)]
pub enum Engine {
    Rocks(RocksStore),
    Postgres(Box<PgStore>),
}

/// Calls the same method on whichever engine `$engine` holds.
macro_rules! each {
    ($engine:expr, $store:ident => $call:expr) => {
        match $engine {
            Engine::Rocks($store) => $call,
            Engine::Postgres($store) => $call,
        }
    };
}

impl Store for Engine {
    async fn insert_audited(
        &self,
        records: Vec<NewRecord>,
        riding: Option<Riding<[InsertOutcome]>>,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        each!(self, s => s.insert_audited(records, riding).await)
    }

    async fn get(&self, token: &Token) -> Result<Option<Vec<u8>>, StoreError> {
        each!(self, s => s.get(token).await)
    }

    async fn delete_audited(
        &self,
        delete: Delete,
        riding: Option<Riding<DeleteOutcome>>,
    ) -> Result<DeleteOutcome, StoreError> {
        each!(self, s => s.delete_audited(delete, riding).await)
    }

    async fn rewrite(&self, rewrite: Rewrite) -> Result<RewriteOutcome, StoreError> {
        each!(self, s => s.rewrite(rewrite).await)
    }

    fn version_counts(&self) -> BTreeMap<(KeyUse, u32), u64> {
        each!(self, s => s.version_counts())
    }

    fn stats(&self) -> StoreStats {
        each!(self, s => s.stats())
    }

    async fn records_off_versions(
        &self,
        active: KeyVersions,
        cursor: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Token)>, StoreError> {
        each!(self, s => s.records_off_versions(active, cursor, limit).await)
    }

    async fn append_audit(&self, seal: AuditSeal) -> Result<Vec<u64>, StoreError> {
        each!(self, s => s.append_audit(seal).await)
    }

    async fn read_audit(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        each!(self, s => s.read_audit(after, limit).await)
    }

    async fn last_audit(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        each!(self, s => s.last_audit().await)
    }

    async fn prune_outcomes(
        &self,
        expired: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<usize, StoreError> {
        each!(self, s => s.prune_outcomes(expired).await)
    }

    async fn expired(&self, now_unix_ms: i64, limit: usize) -> Result<Vec<Token>, StoreError> {
        each!(self, s => s.expired(now_unix_ms, limit).await)
    }

    async fn tokens_of_card(&self, card_key: &[u8]) -> Result<Vec<Token>, StoreError> {
        each!(self, s => s.tokens_of_card(card_key).await)
    }

    async fn count_known_cards(&self, card_keys: Vec<Vec<u8>>) -> Result<u64, StoreError> {
        each!(self, s => s.count_known_cards(card_keys).await)
    }

    async fn compact(&self) -> Result<(), StoreError> {
        each!(self, s => s.compact().await)
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        each!(self, s => s.get_meta(key).await)
    }

    async fn put_meta(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        each!(self, s => s.put_meta(key, value).await)
    }

    async fn init_meta(&self, key: &str, value: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        each!(self, s => s.init_meta(key, value).await)
    }

    async fn list_meta(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        each!(self, s => s.list_meta(prefix).await)
    }

    async fn get_outcome(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        each!(self, s => s.get_outcome(key).await)
    }

    async fn create_backup(&self, dir: &Path) -> Result<u64, StoreError> {
        each!(self, s => s.create_backup(dir).await)
    }

    /// Backups are RocksDB checkpoints (a PostgreSQL store makes none).
    fn scan_backup(dir: &Path, visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), StoreError> {
        RocksStore::scan_backup(dir, visit)
    }

    async fn claim_outcome(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        replaceable: Replaceable,
    ) -> Result<Claim, StoreError> {
        each!(self, s => s.claim_outcome(key, value, replaceable).await)
    }

    async fn tombstoned(&self, keys: Vec<Vec<u8>>) -> Result<bool, StoreError> {
        each!(self, s => s.tombstoned(keys).await)
    }

    async fn prune_tombstones(&self, before_unix_ms: i64) -> Result<usize, StoreError> {
        each!(self, s => s.prune_tombstones(before_unix_ms).await)
    }

    async fn missing_tombstones(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, StoreError> {
        each!(self, s => s.missing_tombstones(keys).await)
    }

    async fn unsent_erasures(&self, limit: usize) -> Result<Vec<Tombstone>, StoreError> {
        each!(self, s => s.unsent_erasures(limit).await)
    }

    async fn erasures_sent(&self, keys: Vec<Vec<u8>>) -> Result<(), StoreError> {
        each!(self, s => s.erasures_sent(keys).await)
    }

    async fn records_after(
        &self,
        cursor: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<StoredBytes>, StoreError> {
        each!(self, s => s.records_after(cursor, limit).await)
    }

    async fn put_outcome(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        each!(self, s => s.put_outcome(key, value).await)
    }

    async fn lock_job(&self, job: &str) -> Result<Option<JobLock>, StoreError> {
        each!(self, s => s.lock_job(job).await)
    }
}
