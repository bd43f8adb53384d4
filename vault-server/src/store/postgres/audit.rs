//! Audit appends: one chain for all vaults of a database. Every transaction that
//! appends (an append of its own, or a write group carrying the events of the calls it
//! finishes) takes the chain's lock, reads the chain's end under it, and holds it
//! through COMMIT, so appends never fork the chain and each call's event commits with
//! its data. The lock is taken after every other lock a transaction takes, so the order
//! is the same everywhere and two transactions cannot wait for each other.

use tokio_postgres::types::ToSql;

use super::PgStore;
use super::connect::{Object, release_after_failure};
use super::errors::pg;
use super::locks::AUDIT_LOCK;
use super::statements::{BEGIN, Param};
use crate::store::{AUDIT_HEAD_KEY, AuditSeal, LogEnd, Sealed, StoreError};

impl PgStore {
    /// One audit append: under the chain's lock, reads the last entry, chains the new
    /// ones onto it, and moves the anchor (`AUDIT_HEAD_KEY`) with them, so that it
    /// never goes backwards whichever vault appends.
    pub(super) async fn append_audit_once(&self, seal: AuditSeal) -> Result<Vec<u64>, StoreError> {
        let in_flight = self.audit_lane.enter().await?;
        let client = self.client().await?;
        let Ok(appended) =
            tokio::time::timeout(self.audit_lane.timeout, append_audit(&client, seal)).await
        else {
            in_flight.keep_until_answered(client);
            return Err(self.audit_lane.timed_out("an audit commit"));
        };
        if appended.is_err() {
            release_after_failure(client).await;
        }
        appended.map_err(pg)
    }
}

/// The statements of an append, prepared once per connection.
pub(super) struct AuditStatements {
    lock: tokio_postgres::Statement,
    last: tokio_postgres::Statement,
    read_anchor: tokio_postgres::Statement,
    insert: tokio_postgres::Statement,
    anchor: tokio_postgres::Statement,
}

impl AuditStatements {
    pub(super) async fn prepare(client: &Object) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            lock: client
                .prepare_cached("SELECT pg_advisory_xact_lock($1)")
                .await?,
            last: client
                .prepare_cached("SELECT sequence, entry FROM audit ORDER BY sequence DESC LIMIT 1")
                .await?,
            read_anchor: client
                .prepare_cached("SELECT value FROM meta WHERE key = $1")
                .await?,
            insert: client
                .prepare_cached(
                    "INSERT INTO audit (sequence, entry) \
                     SELECT * FROM unnest($1::int8[], $2::bytea[])",
                )
                .await?,
            anchor: client
                .prepare_cached(
                    "INSERT INTO meta (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )
                .await?,
        })
    }

    /// Takes the chain's lock (held until the transaction ends) and reads the log's
    /// end under it, in one round trip; pipelined behind whatever the caller sent.
    pub(super) async fn lock_end(&self, client: &Object) -> Result<LogEnd, tokio_postgres::Error> {
        let lock_params: Param = [&AUDIT_LOCK];
        let anchor_key: Param = [&AUDIT_HEAD_KEY];
        let (_, last, stored_anchor) = tokio::try_join!(
            client.query(&self.lock, &lock_params),
            client.query_opt(&self.last, &[]),
            client.query_opt(&self.read_anchor, &anchor_key),
        )?;
        Ok(LogEnd {
            last: last.map(|row| (row.get::<_, i64>(0) as u64, row.get::<_, Vec<u8>>(1))),
            anchor: stored_anchor.map(|row| row.get::<_, Vec<u8>>(0)),
        })
    }

    /// Writes `chained` (from [`chain`]); nothing when it holds no entries.
    pub(super) async fn write(
        &self,
        client: &Object,
        chained: &Chained,
    ) -> Result<(), tokio_postgres::Error> {
        if chained.sequences.is_empty() {
            return Ok(());
        }
        let bytes: Vec<&[u8]> = chained.entries.iter().map(Vec::as_slice).collect();
        let insert_params: [&(dyn ToSql + Sync); 2] = [&chained.sequences, &bytes];
        let anchor_params: [&(dyn ToSql + Sync); 2] = [&AUDIT_HEAD_KEY, &chained.anchor.as_slice()];
        tokio::try_join!(
            client.execute(&self.insert, &insert_params),
            client.execute(&self.anchor, &anchor_params),
        )?;
        Ok(())
    }
}

/// Entries chained onto the log's end, each seal after the one before, and the last
/// anchor: what a transaction appends.
#[derive(Debug, Default)]
pub(super) struct Chained {
    pub(super) sequences: Vec<i64>,
    entries: Vec<Vec<u8>>,
    anchor: Vec<u8>,
    /// How many entries each seal made, in order.
    pub(super) counts: Vec<usize>,
}

/// Runs each seal on the end the one before left. Inside a transaction holding the
/// chain's lock: a panic must not hand the connection back to the pool
/// mid-transaction, so a seal that panics appends nothing instead.
pub(super) fn chain(seals: Vec<AuditSeal>, mut end: LogEnd) -> Chained {
    let mut chained = Chained::default();
    for seal in seals {
        let Sealed { entries, anchor } =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| seal(end.clone())))
                .unwrap_or_else(|_| {
                    tracing::error!("audit entries could not be made; nothing was appended");
                    Sealed::default()
                });
        chained.counts.push(entries.len());
        if let Some(last) = entries.last() {
            end.last = Some(last.clone());
        }
        for (sequence, entry) in entries {
            chained.sequences.push(sequence as i64);
            chained.entries.push(entry);
        }
        if !anchor.is_empty() {
            chained.anchor = anchor.clone();
            end.anchor = Some(anchor);
        }
    }
    chained
}

/// One audit append in two round trips (the chain's lock is held across them, so
/// they are kept few): BEGIN, the lock, the last entry and the anchor; then the new
/// entries, the anchor and COMMIT.
async fn append_audit(client: &Object, seal: AuditSeal) -> Result<Vec<u64>, tokio_postgres::Error> {
    let statements = AuditStatements::prepare(client).await?;
    let (_, end) = tokio::try_join!(client.batch_execute(BEGIN), statements.lock_end(client))?;
    let chained = chain(vec![seal], end);
    tokio::try_join!(
        statements.write(client, &chained),
        client.batch_execute("COMMIT"),
    )?;
    Ok(chained.sequences.iter().map(|s| *s as u64).collect())
}
