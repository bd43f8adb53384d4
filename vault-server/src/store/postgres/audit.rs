//! Audit appends: one chain for all vaults, each append locking the chain's end.

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

/// One audit append in two round trips (the chain's lock is held across them, so
/// they are kept few): BEGIN, the lock, the last entry and the anchor; then the new
/// entries, the anchor and COMMIT.
async fn append_audit(client: &Object, seal: AuditSeal) -> Result<Vec<u64>, tokio_postgres::Error> {
    let lock = client
        .prepare_cached("SELECT pg_advisory_xact_lock($1)")
        .await?;
    let last = client
        .prepare_cached("SELECT sequence, entry FROM audit ORDER BY sequence DESC LIMIT 1")
        .await?;
    let insert = client
        .prepare_cached(
            "INSERT INTO audit (sequence, entry) SELECT * FROM unnest($1::int8[], $2::bytea[])",
        )
        .await?;
    let read_anchor = client
        .prepare_cached("SELECT value FROM meta WHERE key = $1")
        .await?;
    let anchor = client
        .prepare_cached(
            "INSERT INTO meta (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .await?;
    let lock_params: Param = [&AUDIT_LOCK];
    let anchor_key: Param = [&AUDIT_HEAD_KEY];
    let (_, _, last, stored_anchor) = tokio::try_join!(
        client.batch_execute(BEGIN),
        client.query(&lock, &lock_params),
        client.query_opt(&last, &[]),
        client.query_opt(&read_anchor, &anchor_key),
    )?;
    let end = LogEnd {
        last: last.map(|row| (row.get::<_, i64>(0) as u64, row.get::<_, Vec<u8>>(1))),
        anchor: stored_anchor.map(|row| row.get::<_, Vec<u8>>(0)),
    };
    // Inside the transaction, holding the chain's lock: a panic here must not hand the
    // connection back to the pool mid-transaction. Nothing is appended instead.
    let Sealed {
        entries,
        anchor: head,
    } = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| seal(end))).unwrap_or_else(|_| {
        tracing::error!("audit entries could not be made; nothing was appended");
        Sealed::default()
    });
    let sequences: Vec<i64> = entries.iter().map(|(s, _)| *s as i64).collect();
    let bytes: Vec<&[u8]> = entries.iter().map(|(_, e)| e.as_slice()).collect();
    if entries.is_empty() {
        client.batch_execute("COMMIT").await?;
        return Ok(Vec::new());
    }
    let insert_params: [&(dyn ToSql + Sync); 2] = [&sequences, &bytes];
    let anchor_params: [&(dyn ToSql + Sync); 2] = [&AUDIT_HEAD_KEY, &head.as_slice()];
    tokio::try_join!(
        client.execute(&insert, &insert_params),
        client.execute(&anchor, &anchor_params),
        client.batch_execute("COMMIT"),
    )?;
    Ok(entries.into_iter().map(|(s, _)| s).collect())
}
