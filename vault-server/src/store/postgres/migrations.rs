//! The schema: versioned migrations, applied at start-up or by `vault-server migrate`,
//! and the check that a database has the schema this vault-server needs.

use std::collections::BTreeSet;

use super::connect::{Connector, Object, Pool};
use super::errors::{pg, pool_error};
use super::locks::MIGRATION_LOCK;
use super::settings::PostgresSettings;
use crate::store::StoreError;

/// The schema, in order. Each runs once, in its own transaction, recorded in
/// `schema_migrations`. Never edit a released one: add the next.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "records, fingerprint index, outcomes, meta, audit chain, version counts",
        include_str!("0001_initial.sql"),
    ),
    (
        2,
        "tombstones of deleted tokens",
        include_str!("0002_tombstones.sql"),
    ),
    (
        3,
        "erasures not yet reported to the keyservice",
        include_str!("0003_unsent_erasures.sql"),
    ),
];

/// Applies the migrations this database lacks, one transaction each, under a lock so
/// that vaults starting together do not race. Refuses a schema newer than this
/// vault-server knows.
pub(super) async fn migrate(client: &mut Object) -> Result<Vec<i32>, StoreError> {
    let mut applied = Vec::new();
    let transaction = client.transaction().await.map_err(pg)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version integer PRIMARY KEY,
                 description text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(pg)?;
    let have: BTreeSet<i32> = transaction
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(pg)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    refuse_newer(&have)?;
    for (version, description, sql) in MIGRATIONS {
        if have.contains(version) {
            continue;
        }
        transaction.batch_execute(sql).await.map_err(pg)?;
        transaction
            .execute(
                "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
                &[version, description],
            )
            .await
            .map_err(pg)?;
        tracing::info!(version, description, "database schema migrated");
        applied.push(*version);
    }
    transaction.commit().await.map_err(pg)?;
    Ok(applied)
}

fn refuse_newer(have: &BTreeSet<i32>) -> Result<(), StoreError> {
    let known = MIGRATIONS.iter().map(|(v, _, _)| *v).max().unwrap_or(0);
    match have.iter().max() {
        Some(newest) if *newest > known => Err(StoreError::Engine(format!(
            "the database schema is at version {newest}, newer than this vault-server knows \
             ({known}): upgrade the vault-server"
        ))),
        _ => Ok(()),
    }
}

pub(super) async fn check_schema(client: &Object) -> Result<(), StoreError> {
    let rows = client
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(|e| {
            StoreError::Engine(format!(
                "the database has no vault schema ({}); run `vault-server migrate` or set \
                 storage.postgres.migrate = true",
                pg(e)
            ))
        })?;
    let have: BTreeSet<i32> = rows.iter().map(|row| row.get(0)).collect();
    refuse_newer(&have)?;
    if let Some((missing, _, _)) = MIGRATIONS.iter().find(|(v, _, _)| !have.contains(v)) {
        return Err(StoreError::Engine(format!(
            "the database schema lacks migration {missing}; run `vault-server migrate` or set \
             storage.postgres.migrate = true"
        )));
    }
    Ok(())
}

/// `vault-server migrate`: applies the migrations and says which.
pub async fn migrate_only(settings: &PostgresSettings) -> Result<Vec<i32>, StoreError> {
    // One connection, which bounds itself (see `Connector::connect`).
    let pool = Pool::builder(Connector::from_settings(settings)?)
        .max_size(1)
        .build()
        .map_err(|e| StoreError::Engine(format!("database pool: {e}")))?;
    let mut client = pool.get().await.map_err(pool_error)?;
    migrate(&mut client).await
}
