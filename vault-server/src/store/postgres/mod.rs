//! The PostgreSQL engine: several vault-servers over one database (PostgreSQL with
//! synchronous standbys, or an engine that speaks its protocol). Only this module
//! names PostgreSQL.
//!
//! - Writes go through `writers` tasks per vault, each committing everything queued
//!   as one transaction (group commit, as in the RocksDB engine). A caller is answered
//!   after COMMIT returns, that is after the commit is durable on the primary and, with
//!   `synchronous_standby_names` set, on the synchronous standbys.
//! - Vaults (and writers) serialise on what they share with transaction-scoped
//!   advisory locks on the fingerprint index keys a transaction reads or writes and
//!   on the idempotency outcome keys it claims or puts, taken in one sorted step, then
//!   row locks on the records it changes, also sorted: the fingerprint index cannot
//!   get two tokens for one card, and no two transactions wait on each other in a
//!   cycle. A deadlock or a token taken meanwhile by another
//!   vault rolls the group back and it is planned again.
//! - The audit log is one chain for all vaults: an append locks the chain's end,
//!   reads the last entry, and chains onto it in the same transaction.
//! - A lost connection fails the calls in flight with `StoreError::Unavailable`; the
//!   pool opens new connections (to whichever host `target_session_attrs=read-write`
//!   finds) on the next call.

mod audit;
mod connect;
mod counts;
mod errors;
mod lane;
mod locks;
mod migrations;
mod node;
mod planning;
mod settings;
mod statements;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool::Runtime;
use tokio::sync::{mpsc, oneshot};

use super::{
    AuditSeal, Claim, Delete, DeleteOutcome, InsertOutcome, JobLock, KeyUse, KeyVersions,
    NewRecord, Replaceable, Rewrite, RewriteOutcome, Riding, Store, StoreError, StoreStats,
    StoredBytes, Tombstone,
};
use crate::token::Token;

use connect::{Connector, Object, Pool};
use counts::{Counts, load_counts, refresh_counts};
use errors::{pg, pool_error};
use lane::CommitLane;
use locks::index_lock;
pub use migrations::migrate_only;
use migrations::{check_schema, migrate};
use node::hold_node_name;
pub use settings::PostgresSettings;
use writer::{Op, QUEUE_DEPTH, Writer, write};

/// The PostgreSQL store. Cheap to share; writer tasks end when it is dropped.
#[derive(Debug)]
pub struct PgStore {
    pool: Pool,
    connect: Connector,
    /// The audit log's commits.
    audit_lane: CommitLane,
    /// Dropped with the store: ends the task holding this vault's node name.
    _node_name: oneshot::Sender<()>,
    queue: mpsc::Sender<Op>,
    counts: Arc<Counts>,
    health: Arc<Health>,
}

/// What the store's health (`Store::stats().unreachable`) is made of.
#[derive(Debug, Default)]
struct Health {
    /// The counts refresh every `COUNTS_REFRESH` (or a call) could not reach the
    /// database.
    unreachable: AtomicBool,
    /// The last write group was not confirmed (connection lost, or its commit not
    /// confirmed in time, e.g. a synchronous standby down); cleared by the next
    /// confirmed one.
    unconfirmed: AtomicBool,
    /// This vault lost its node name's lock and has not taken it back.
    node_lost: AtomicBool,
}

impl Health {
    fn troubled(&self) -> bool {
        self.unreachable.load(Ordering::Relaxed)
            || self.unconfirmed.load(Ordering::Relaxed)
            || self.node_lost.load(Ordering::Relaxed)
    }
}

impl PgStore {
    /// Connects, applies (or, with `migrate` off, checks) the schema, loads the record
    /// counts and starts the writers. `node` names this vault among those sharing the
    /// database.
    pub async fn open(settings: &PostgresSettings, node: &str) -> Result<Self, StoreError> {
        let connect = Connector::from_settings(settings)?;
        let timeout = Duration::from_millis(settings.connect_timeout_ms);
        // A new connection bounds itself (`Connector::connect`: each address within the
        // connect timeout); a call waiting for a free one may wait while another tries
        // every host in turn.
        let pool = Pool::builder(connect.clone())
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(connect.budget() + timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| StoreError::Engine(format!("database pool: {e}")))?;
        let health = Arc::new(Health::default());
        let node_name = hold_node_name(&connect, node, timeout, Arc::clone(&health)).await?;
        {
            let mut client = pool.get().await.map_err(pool_error)?;
            if settings.migrate {
                migrate(&mut client).await?;
            } else {
                check_schema(&client).await?;
            }
        }
        let slots: Vec<String> = (0..settings.writers)
            .map(|i| format!("{node}#{i}"))
            .collect();
        let counts = Arc::new(Counts::default());
        let counts_lock = index_lock(format!("counts/{node}").as_bytes());
        load_counts(&pool, &slots, counts_lock, &counts).await?;
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        let commit_timeout = Duration::from_millis(settings.commit_timeout_ms);
        for slot in &slots {
            let writer = Writer {
                slot: slot.clone(),
                counts_lock,
                lane: CommitLane::new(commit_timeout),
            };
            tokio::spawn(write(
                pool.clone(),
                Arc::clone(&receiver),
                Arc::clone(&counts),
                writer,
                Arc::clone(&health),
            ));
        }
        tokio::spawn(refresh_counts(
            pool.clone(),
            slots,
            counts_lock,
            Arc::downgrade(&counts),
            Arc::clone(&health),
        ));
        Ok(Self {
            pool,
            connect,
            audit_lane: CommitLane::new(commit_timeout),
            _node_name: node_name,
            queue,
            counts,
            health,
        })
    }

    async fn client(&self) -> Result<Object, StoreError> {
        let client = self.pool.get().await.map_err(pool_error);
        if let Err(e) = &client {
            // Only bad news here: a connection from the pool proves nothing yet.
            note(
                &self.health.unreachable,
                Some(e),
                "the database cannot be reached",
            );
        }
        client
    }

    async fn submit<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(op(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// Sets `flag` to whether `error` says the database was unavailable, and logs the
/// change.
fn note(flag: &AtomicBool, error: Option<&StoreError>, what: &str) {
    let now = matches!(error, Some(StoreError::Unavailable(_)));
    if flag.swap(now, Ordering::Relaxed) != now {
        if now {
            tracing::warn!("{what}");
        } else {
            tracing::info!("no longer: {what}");
        }
    }
}

fn tokens_of(rows: &[tokio_postgres::Row]) -> Result<Vec<Token>, StoreError> {
    rows.iter()
        .map(|row| {
            let token: &str = row.get(0);
            Token::from_stored(token.as_bytes()).ok_or_else(|| {
                StoreError::Engine("the records table holds a malformed token".into())
            })
        })
        .collect()
}

impl Store for PgStore {
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
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT value FROM records WHERE token = $1")
            .await
            .map_err(pg)?;
        Ok(client
            .query_opt(&statement, &[&token.as_str()])
            .await
            .map_err(pg)?
            .map(|row| row.get(0)))
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
        self.counts.total()
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            unreachable: self.health.troubled(),
            ..StoreStats::default()
        }
    }

    async fn records_off_versions(
        &self,
        active: KeyVersions,
        cursor: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Token)>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT token FROM records
                 WHERE token > $1 AND (card_data_version <> $2 OR fingerprint_version <> $3)
                 ORDER BY token LIMIT $4",
            )
            .await
            .map_err(pg)?;
        let after = cursor.map(String::from_utf8_lossy).unwrap_or_default();
        let rows = client
            .query(
                &statement,
                &[
                    &after.as_ref(),
                    &(active.card_data as i32),
                    &(active.fingerprint as i32),
                    &(limit as i64),
                ],
            )
            .await
            .map_err(pg)?;
        Ok(tokens_of(&rows)?
            .into_iter()
            .map(|token| (token.as_str().as_bytes().to_vec(), token))
            .collect())
    }

    async fn append_audit(&self, seal: AuditSeal) -> Result<Vec<u64>, StoreError> {
        // The log's end is read again by every append, in the transaction that appends:
        // a failed append leaves nothing uncertain, so any failure is one to retry.
        self.append_audit_once(seal).await.map_err(|e| match e {
            StoreError::Unavailable(_) => e,
            other => StoreError::Unavailable(other.to_string()),
        })
    }

    async fn read_audit(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT sequence, entry FROM audit WHERE sequence > $1 ORDER BY sequence LIMIT $2",
                &[&(after.min(i64::MAX as u64) as i64), &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|row| (row.get::<_, i64>(0) as u64, row.get(1)))
            .collect())
    }

    async fn last_audit(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT sequence, entry FROM audit ORDER BY sequence DESC LIMIT 1",
                &[],
            )
            .await
            .map_err(pg)?
            .map(|row| (row.get::<_, i64>(0) as u64, row.get(1))))
    }

    async fn prune_outcomes(
        &self,
        expired: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<usize, StoreError> {
        let stale: Vec<(Vec<u8>, Vec<u8>)> = {
            let client = self.client().await?;
            client
                .query("SELECT key, value FROM outcomes", &[])
                .await
                .map_err(pg)?
                .iter()
                .filter(|row| expired(row.get::<_, &[u8]>(1)))
                .map(|row| (row.get(0), row.get(1)))
                .collect()
        };
        let pruned = stale.len();
        for chunk in stale.chunks(1000) {
            let (keys, values) = chunk.iter().cloned().unzip();
            self.submit(|reply| Op::RemoveOutcomes {
                keys,
                values,
                reply,
            })
            .await?;
        }
        Ok(pruned)
    }

    async fn tombstoned(&self, keys: Vec<Vec<u8>>) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM tombstones WHERE key = ANY($1))")
            .await
            .map_err(pg)?;
        Ok(client
            .query_one(&statement, &[&keys])
            .await
            .map_err(pg)?
            .get(0))
    }

    async fn prune_tombstones(&self, before_unix_ms: i64) -> Result<usize, StoreError> {
        // Not through a writer: it touches no record, count or log, and is one statement.
        let client = self.client().await?;
        let pruned = client
            .execute(
                "DELETE FROM tombstones WHERE deleted_at_unix_ms < $1",
                &[&before_unix_ms],
            )
            .await
            .map_err(pg)?;
        Ok(pruned as usize)
    }

    async fn missing_tombstones(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT key FROM tombstones WHERE key = ANY($1)", &[&keys])
            .await
            .map_err(pg)?;
        let stored: std::collections::HashSet<Vec<u8>> =
            rows.iter().map(|row| row.get(0)).collect();
        Ok(keys
            .into_iter()
            .filter(|key| !stored.contains(key))
            .collect())
    }

    async fn unsent_erasures(&self, limit: usize) -> Result<Vec<Tombstone>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT key, deleted_at_unix_ms FROM unsent_erasures ORDER BY key LIMIT $1",
                &[&(limit as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|row| Tombstone {
                key: row.get(0),
                deleted_at_unix_ms: row.get(1),
            })
            .collect())
    }

    async fn erasures_sent(&self, keys: Vec<Vec<u8>>) -> Result<(), StoreError> {
        // Not through a writer, like `prune_tombstones`.
        let client = self.client().await?;
        client
            .execute("DELETE FROM unsent_erasures WHERE key = ANY($1)", &[&keys])
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn records_after(
        &self,
        cursor: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<StoredBytes>, StoreError> {
        let client = self.client().await?;
        let after = cursor
            .map(|cursor| String::from_utf8_lossy(&cursor).into_owned())
            .unwrap_or_default();
        let rows = client
            .query(
                "SELECT token, value FROM records WHERE token > $1 ORDER BY token LIMIT $2",
                &[&after, &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|row| (row.get::<_, String>(0).into_bytes(), row.get(1)))
            .collect())
    }

    async fn expired(&self, now_unix_ms: i64, limit: usize) -> Result<Vec<Token>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT token FROM records
                 WHERE expires_at_unix_ms > 0 AND expires_at_unix_ms <= $1
                 ORDER BY expires_at_unix_ms LIMIT $2",
                &[&now_unix_ms, &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        tokens_of(&rows)
    }

    async fn tokens_of_card(&self, card_key: &[u8]) -> Result<Vec<Token>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT token FROM records WHERE card_key = $1 ORDER BY token",
                &[&card_key],
            )
            .await
            .map_err(pg)?;
        tokens_of(&rows)
    }

    async fn count_known_cards(&self, card_keys: Vec<Vec<u8>>) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM unnest($1::bytea[]) AS k(card_key) \
                 WHERE EXISTS (SELECT 1 FROM records r WHERE r.card_key = k.card_key)",
                &[&card_keys],
            )
            .await
            .map_err(pg)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn compact(&self) -> Result<(), StoreError> {
        // Deleted rows are gone from queries at once; VACUUM removes their tuples and
        // index entries from the pages. (Freed page space, WAL and the standbys' copies
        // are overwritten by PostgreSQL over time: see docs/operations.md.)
        let client = self.client().await?;
        client
            .batch_execute("VACUUM records, fingerprints, outcomes, tombstones")
            .await
            .map_err(pg)
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
            .await
            .map_err(pg)?
            .map(|row| row.get(0)))
    }

    async fn put_meta(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.submit(|reply| Op::PutMeta { key, value, reply }).await
    }

    async fn init_meta(&self, key: &str, value: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&key, &value],
            )
            .await
            .map_err(pg)?;
        let row = client
            .query_one("SELECT value FROM meta WHERE key = $1", &[&key])
            .await
            .map_err(pg)?;
        Ok(row.get(0))
    }

    async fn list_meta(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT key FROM meta WHERE starts_with(key, $1) ORDER BY key",
                &[&prefix],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                row.get::<_, String>(0)
                    .strip_prefix(prefix)
                    .map(str::to_owned)
            })
            .collect())
    }

    async fn get_outcome(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT value FROM outcomes WHERE key = $1")
            .await
            .map_err(pg)?;
        Ok(client
            .query_opt(&statement, &[&key])
            .await
            .map_err(pg)?
            .map(|row| row.get(0)))
    }

    async fn create_backup(&self, _dir: &Path) -> Result<u64, StoreError> {
        Err(StoreError::Unsupported(
            "this vault stores in PostgreSQL: back it up with PostgreSQL's tools \
             (pg_basebackup and WAL archiving, see docs/operations.md)",
        ))
    }

    fn scan_backup(_dir: &Path, _visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), StoreError> {
        Err(StoreError::Unsupported(
            "PostgreSQL stores have no vault backups to scan",
        ))
    }

    async fn claim_outcome(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        replaceable: Replaceable,
    ) -> Result<Claim, StoreError> {
        self.submit(|reply| Op::ClaimOutcome {
            key,
            value,
            replaceable,
            reply,
        })
        .await
    }

    async fn put_outcome(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        self.submit(|reply| Op::PutOutcome { key, value, reply })
            .await
    }

    async fn lock_job(&self, job: &str) -> Result<Option<JobLock>, StoreError> {
        let key = index_lock(format!("job/{job}").as_bytes());
        Ok(self
            .connect
            .session_lock(key)
            .await?
            .map(|(held, lost)| JobLock::held(held, lost)))
    }
}
