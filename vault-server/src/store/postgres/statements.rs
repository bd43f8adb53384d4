//! The SQL of the write groups, prepared once per connection.

use tokio_postgres::types::ToSql;

use super::connect::Object;
use super::locks::KeyLocks;

/// Every write transaction: the locking (advisory locks, then look-ups under them)
/// relies on each statement seeing what committed before it, whatever the database's
/// default isolation level.
pub(super) const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// One statement parameter, bound before statements are pipelined.
pub(super) type Param<'a> = [&'a (dyn ToSql + Sync); 1];

/// Every statement a write group uses, prepared once per connection (the pool keeps
/// them), so that pipelined calls are sent in the order they are made.
pub(super) struct Statements {
    pub(super) lock_index_shared: tokio_postgres::Statement,
    lock_index: tokio_postgres::Statement,
    pub(super) lock_keys: tokio_postgres::Statement,
    pub(super) lock_rows: tokio_postgres::Statement,
    pub(super) taken: tokio_postgres::Statement,
    pub(super) live: tokio_postgres::Statement,
    pub(super) insert_records: tokio_postgres::Statement,
    pub(super) put_entries: tokio_postgres::Statement,
    pub(super) add_counts: tokio_postgres::Statement,
    pub(super) current: tokio_postgres::Statement,
    pub(super) remove_record: tokio_postgres::Statement,
    pub(super) remove_entry: tokio_postgres::Statement,
    pub(super) add_tombstone: tokio_postgres::Statement,
    pub(super) add_unsent_erasure: tokio_postgres::Statement,
    pub(super) rewrite_record: tokio_postgres::Statement,
    pub(super) put_entry_if_stale: tokio_postgres::Statement,
    pub(super) put_meta: tokio_postgres::Statement,
    pub(super) put_outcome: tokio_postgres::Statement,
    pub(super) put_outcomes: tokio_postgres::Statement,
    pub(super) add_outcome: tokio_postgres::Statement,
    pub(super) outcome_for_update: tokio_postgres::Statement,
    pub(super) remove_outcomes: tokio_postgres::Statement,
}

impl Statements {
    /// The statement taking the index lock the way `locks` needs it.
    /// The statement taking a kind's lock (`INDEX_LOCK`, `OUTCOME_LOCK`): shared when
    /// its keys are locked one by one, else exclusive.
    pub(super) fn kind_lock(&self, locks: &KeyLocks) -> &tokio_postgres::Statement {
        match locks {
            KeyLocks::Keys(_) => &self.lock_index_shared,
            KeyLocks::Whole => &self.lock_index,
        }
    }

    pub(super) async fn prepare(client: &Object) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            lock_index_shared: client
                .prepare_cached("SELECT pg_advisory_xact_lock_shared($1)")
                .await?,
            lock_index: client
                .prepare_cached("SELECT pg_advisory_xact_lock($1)")
                .await?,
            lock_keys: client
                .prepare_cached(
                    "SELECT pg_advisory_xact_lock(k)
                     FROM (SELECT unnest($1::int8[]) AS k ORDER BY 1) s",
                )
                .await?,
            lock_rows: client
                .prepare_cached(
                    "SELECT token FROM records WHERE token = ANY($1) ORDER BY token FOR UPDATE",
                )
                .await?,
            taken: client
                .prepare_cached("SELECT token FROM records WHERE token = ANY($1)")
                .await?,
            live: client
                .prepare_cached(
                    "SELECT f.index_key, f.token FROM fingerprints f
                     JOIN records r ON r.token = f.token
                     WHERE f.index_key = ANY($1)",
                )
                .await?,
            insert_records: client
                .prepare_cached(
                    "INSERT INTO records (token, value, card_data_version, fingerprint_version,
                         expires_at_unix_ms, card_key)
                     SELECT * FROM unnest($1::text[], $2::bytea[], $3::int4[], $4::int4[],
                         $5::int8[], $6::bytea[])",
                )
                .await?,
            // Written only where the look-up found no live entry, under the key's lock.
            put_entries: client
                .prepare_cached(
                    "INSERT INTO fingerprints (index_key, token)
                     SELECT * FROM unnest($1::bytea[], $2::text[])
                     ON CONFLICT (index_key) DO UPDATE SET token = excluded.token",
                )
                .await?,
            add_counts: client
                .prepare_cached(
                    "INSERT INTO version_counts (slot, key_use, version, records)
                     SELECT $1, u, v, n FROM unnest($2::int2[], $3::int4[], $4::int8[]) AS t(u, v, n)
                     ON CONFLICT (slot, key_use, version)
                     DO UPDATE SET records = version_counts.records + excluded.records",
                )
                .await?,
            current: client
                .prepare_cached("SELECT value FROM records WHERE token = $1")
                .await?,
            remove_record: client
                .prepare_cached("DELETE FROM records WHERE token = $1")
                .await?,
            // Only if it names this token: another live token may own it.
            remove_entry: client
                .prepare_cached("DELETE FROM fingerprints WHERE index_key = $1 AND token = $2")
                .await?,
            add_unsent_erasure: client
                .prepare_cached(
                    "INSERT INTO unsent_erasures (key, deleted_at_unix_ms) VALUES ($1, $2)
                     ON CONFLICT (key) DO NOTHING",
                )
                .await?,
            rewrite_record: client
                .prepare_cached(
                    "UPDATE records SET value = $2, card_data_version = $3,
                         fingerprint_version = $4, expires_at_unix_ms = $5, card_key = $6
                     WHERE token = $1",
                )
                .await?,
            // Another live token of the same card may own the entry already; a stale
            // one (its record gone) is replaced.
            put_entry_if_stale: client
                .prepare_cached(
                    "INSERT INTO fingerprints (index_key, token) VALUES ($1, $2)
                     ON CONFLICT (index_key) DO UPDATE SET token = excluded.token
                     WHERE NOT EXISTS (SELECT 1 FROM records r WHERE r.token = fingerprints.token)",
                )
                .await?,
            put_meta: client
                .prepare_cached(
                    "INSERT INTO meta (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )
                .await?,
            put_outcome: client
                .prepare_cached(
                    "INSERT INTO outcomes (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )
                .await?,
            // Distinct keys only (one statement cannot update a row twice).
            put_outcomes: client
                .prepare_cached(
                    "INSERT INTO outcomes (key, value)
                     SELECT * FROM unnest($1::bytea[], $2::bytea[])
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )
                .await?,
            // Waits for a concurrent insert of the key to commit or roll back, so the
            // row the next statement locks is the committed one.
            add_tombstone: client
                .prepare_cached(
                    "INSERT INTO tombstones (key, deleted_at_unix_ms) VALUES ($1, $2)
                     ON CONFLICT (key) DO NOTHING",
                )
                .await?,
            add_outcome: client
                .prepare_cached(
                    "INSERT INTO outcomes (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO NOTHING",
                )
                .await?,
            outcome_for_update: client
                .prepare_cached("SELECT value FROM outcomes WHERE key = $1 FOR UPDATE")
                .await?,
            remove_outcomes: client
                .prepare_cached(
                    "DELETE FROM outcomes o USING unnest($1::bytea[], $2::bytea[]) AS d(key, value)
                     WHERE o.key = d.key AND o.value = d.value",
                )
                .await?,
        })
    }
}
