//! The record counts per key version (`version_counts`, one slot per writer): loaded
//! at start, the other vaults' refreshed, this vault's recounted after a commit whose
//! outcome was unknown.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::connect::{Object, Pool, release_after_failure};
use super::errors::{pg, pool_error};
use super::statements::BEGIN;
use super::{Health, note};
use crate::store::{KeyUse, StoreError};

/// How often the counts other vaults write are read.
pub(super) const COUNTS_REFRESH: Duration = Duration::from_secs(2);
/// Longest a recount of this vault's counts waits for its write groups in flight.
const RECOUNT_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) type CountMap = BTreeMap<(KeyUse, u32), i64>;

/// Records per key version: this vault's own slots, exact (changed after each commit),
/// and the other vaults', read every `COUNTS_REFRESH`.
#[derive(Debug, Default)]
pub(super) struct Counts {
    own: Mutex<CountMap>,
    others: Mutex<CountMap>,
    /// Writers hold it shared from before a commit until its deltas are in `own`; a
    /// recount of `own` holds it exclusively, so that it sees no commit half-counted.
    pub(super) gate: tokio::sync::RwLock<()>,
    /// A commit's outcome was unknown (its answer lost with the connection): `own` is
    /// recounted from the database at the next refresh.
    pub(super) own_unsure: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Counts {
    pub(super) fn add(&self, deltas: &CountMap) {
        let mut own = lock(&self.own);
        for (key, delta) in deltas {
            *own.entry(*key).or_insert(0) += delta;
        }
    }

    pub(super) fn total(&self) -> BTreeMap<(KeyUse, u32), u64> {
        let mut total = lock(&self.own).clone();
        for (key, n) in lock(&self.others).iter() {
            *total.entry(*key).or_insert(0) += n;
        }
        total
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(key, n)| (key, n as u64))
            .collect()
    }
}

fn key_use_of(code: i16) -> Result<KeyUse, StoreError> {
    u8::try_from(code)
        .ok()
        .and_then(KeyUse::from_code)
        .ok_or_else(|| StoreError::Engine(format!("unknown key use {code} in version_counts")))
}

pub(super) async fn load_counts(
    pool: &Pool,
    own_slots: &[String],
    counts_lock: i64,
    counts: &Counts,
) -> Result<(), StoreError> {
    let client = pool.get().await.map_err(pool_error)?;
    // After every write group of this vault's last run has ended: one whose commit
    // was left waiting (for a synchronous standby) counts once it is visible.
    let read = async {
        client.batch_execute(BEGIN).await?;
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&counts_lock])
            .await?;
        let rows = client
            .query(
                "SELECT slot = ANY($1), key_use, version, sum(records)::bigint
                 FROM version_counts GROUP BY 1, 2, 3",
                &[&own_slots],
            )
            .await?;
        client.batch_execute("COMMIT").await?;
        Ok(rows)
    };
    let rows = match read.await {
        Ok(rows) => rows,
        Err(e) => {
            release_after_failure(client).await;
            return Err(pg(e));
        }
    };
    let (mut own, mut others) = (CountMap::new(), CountMap::new());
    for row in rows {
        let key = (key_use_of(row.get(1))?, row.get::<_, i32>(2) as u32);
        let n: i64 = row.get(3);
        if row.get(0) {
            own.insert(key, n);
        } else {
            others.insert(key, n);
        }
    }
    *lock(&counts.own) = own;
    *lock(&counts.others) = others;
    Ok(())
}

/// This vault's own counts as the database has them, once no write group of this
/// vault is in flight anywhere: the exclusive counts lock waits for every transaction
/// holding it shared, including one whose answer was lost and whose commit is still
/// waiting (for a synchronous standby); PostgreSQL releases a transaction's locks only
/// after its commit is visible.
async fn recount_own(
    client: &Object,
    own_slots: &[String],
    counts_lock: i64,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    // The server gives up the lock wait before the client's timeout would drop the
    // connection (a dropped connection's server process would wait on regardless).
    let lock_timeout_ms = RECOUNT_TIMEOUT.as_millis().saturating_sub(1_000);
    client
        .batch_execute(&format!(
            "{BEGIN}; SET LOCAL lock_timeout = {lock_timeout_ms}"
        ))
        .await?;
    client
        .execute("SELECT pg_advisory_xact_lock($1)", &[&counts_lock])
        .await?;
    let rows = client
        .query(
            "SELECT key_use, version, sum(records)::bigint FROM version_counts
             WHERE slot = ANY($1) GROUP BY 1, 2",
            &[&own_slots],
        )
        .await?;
    client.batch_execute("COMMIT").await?;
    Ok(rows)
}

async fn recount_own_counts(
    pool: &Pool,
    own_slots: &[String],
    counts_lock: i64,
) -> Result<CountMap, StoreError> {
    let client = pool.get().await.map_err(pool_error)?;
    let rows = match tokio::time::timeout(
        RECOUNT_TIMEOUT,
        recount_own(&client, own_slots, counts_lock),
    )
    .await
    {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            release_after_failure(client).await;
            return Err(pg(e));
        }
        Err(_) => {
            drop(Object::take(client));
            return Err(StoreError::Unavailable(
                "a write group of this vault is still waiting for its commit".into(),
            ));
        }
    };
    let mut own = CountMap::new();
    for row in rows {
        own.insert(
            (key_use_of(row.get(0))?, row.get::<_, i32>(1) as u32),
            row.get(2),
        );
    }
    Ok(own)
}

pub(super) async fn refresh_counts(
    pool: Pool,
    own_slots: Vec<String>,
    counts_lock: i64,
    counts: std::sync::Weak<Counts>,
    health: Arc<Health>,
) {
    loop {
        tokio::time::sleep(COUNTS_REFRESH).await;
        let Some(counts) = counts.upgrade() else {
            return;
        };
        let read = async {
            let client = pool.get().await.map_err(pool_error)?;
            let rows = client
                .query(
                    "SELECT key_use, version, sum(records)::bigint FROM version_counts
                     WHERE NOT slot = ANY($1) GROUP BY 1, 2",
                    &[&own_slots],
                )
                .await
                .map_err(pg)?;
            let mut others = CountMap::new();
            for row in rows {
                others.insert(
                    (key_use_of(row.get(0))?, row.get::<_, i32>(1) as u32),
                    row.get(2),
                );
            }
            Ok::<_, StoreError>(others)
        };
        let read = read.await;
        note(
            &health.unreachable,
            read.as_ref().err(),
            "the database cannot be reached",
        );
        match read {
            Ok(others) => *lock(&counts.others) = others,
            Err(e) => tracing::debug!(error = %e, "other vaults' record counts not refreshed"),
        }
        if counts.own_unsure.load(Ordering::Relaxed) {
            let _no_commit_in_flight = counts.gate.write().await;
            match recount_own_counts(&pool, &own_slots, counts_lock).await {
                Ok(own) => {
                    *lock(&counts.own) = own;
                    counts.own_unsure.store(false, Ordering::Relaxed);
                    tracing::info!(
                        "this vault's record counts were read again after a commit with an unknown outcome"
                    );
                }
                Err(e) => tracing::debug!(error = %e, "record counts not recounted yet"),
            }
        }
    }
}
