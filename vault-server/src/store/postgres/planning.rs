//! What a write group does to the rows: each insert, delete and rewrite decided from
//! what the look-ups found under the group's locks, then written.

use std::collections::{HashMap, HashSet};

use tokio_postgres::types::ToSql;

use super::connect::Object;
use super::counts::CountMap;
use super::statements::Statements;
use crate::store::{
    Delete, DeleteOutcome, InsertOutcome, KeyUse, KeyVersions, NewRecord, Rewrite, RewriteOutcome,
};
use crate::token::Token;

fn count(deltas: &mut CountMap, versions: KeyVersions, delta: i64) {
    for key_use in KeyUse::ALL {
        *deltas.entry((key_use, versions.get(key_use))).or_insert(0) += delta;
    }
}

pub(super) async fn add_counts(
    client: &Object,
    statements: &Statements,
    slot: &str,
    deltas: &CountMap,
) -> Result<(), tokio_postgres::Error> {
    let changed: Vec<_> = deltas.iter().filter(|(_, n)| **n != 0).collect();
    if changed.is_empty() {
        return Ok(());
    }
    let uses: Vec<i16> = changed
        .iter()
        .map(|((u, _), _)| i16::from(u.code()))
        .collect();
    let versions: Vec<i32> = changed.iter().map(|((_, v), _)| *v as i32).collect();
    let ns: Vec<i64> = changed.iter().map(|(_, n)| **n).collect();
    client
        .execute(&statements.add_counts, &[&slot, &uses, &versions, &ns])
        .await
        .map(drop)
}

/// The tokens and the fingerprint index keys (with older versions' where reuse may
/// look there) that inserting `records` looks up.
pub(super) fn lookup_params<'a>(
    records: impl Iterator<Item = &'a NewRecord>,
) -> (Vec<&'a str>, Vec<&'a [u8]>) {
    let mut tokens = Vec::new();
    let mut index_keys = Vec::new();
    for record in records {
        tokens.push(record.token.as_str());
        index_keys.push(record.index_key.as_slice());
        if record.reuse_existing {
            index_keys.extend(record.older_index_keys.iter().map(Vec::as_slice));
        }
    }
    (tokens, index_keys)
}

/// What the look-ups found, updated as records are planned (a later record of the
/// same group sees the earlier ones).
pub(super) struct Lookups {
    taken: HashSet<String>,
    /// Index key to the live token it names.
    live: HashMap<Vec<u8>, String>,
}

impl Lookups {
    pub(super) fn from_rows(taken: &[tokio_postgres::Row], live: &[tokio_postgres::Row]) -> Self {
        Self {
            taken: taken.iter().map(|row| row.get(0)).collect(),
            live: live.iter().map(|row| (row.get(0), row.get(1))).collect(),
        }
    }
}

/// The rows an insert step writes.
#[derive(Default)]
pub(super) struct Planned<'a> {
    rows: Vec<&'a NewRecord>,
    entries: Vec<(&'a [u8], &'a str)>,
}

/// Decides each record's outcome as `RocksStore` does: a token already stored is
/// taken; with `reuse_existing`, a live token the fingerprint index names (under the
/// current or an older fingerprint version) is returned instead; the index entry is
/// written when it is missing or names a record that is gone. The index keys are
/// locked (see `locks_of`), so what the look-ups found holds until COMMIT.
pub(super) fn plan<'a>(
    records: &'a [NewRecord],
    found: &mut Lookups,
    planned: &mut Planned<'a>,
    deltas: &mut CountMap,
) -> Vec<InsertOutcome> {
    let mut outcomes = Vec::with_capacity(records.len());
    for record in records {
        let token = record.token.as_str();
        if found.taken.contains(token) {
            outcomes.push(InsertOutcome::TokenTaken);
            continue;
        }
        let indexed = found.live.get(&record.index_key).cloned();
        let mut reusable = indexed.clone();
        if record.reuse_existing && reusable.is_none() {
            reusable = record
                .older_index_keys
                .iter()
                .find_map(|older| found.live.get(older).cloned());
        }
        if let (true, Some(existing)) = (record.reuse_existing, reusable) {
            match Token::from_stored(existing.as_bytes()) {
                Some(existing) => outcomes.push(InsertOutcome::Existing(existing)),
                None => {
                    tracing::error!("the fingerprint index holds a malformed token");
                    outcomes.push(InsertOutcome::TokenTaken);
                }
            }
            continue;
        }
        if indexed.is_none() {
            planned.entries.push((&record.index_key, token));
            found
                .live
                .insert(record.index_key.clone(), token.to_owned());
        }
        found.taken.insert(token.to_owned());
        planned.rows.push(record);
        count(deltas, record.versions, 1);
        outcomes.push(InsertOutcome::Stored);
    }
    outcomes
}

impl<'a> Planned<'a> {
    /// Takes a planned record out of the plan again (its claimed outcome was taken).
    /// A later record of the same call that the plan answered with this record's token
    /// (`reuse_existing`) finds it missing when it checks it, and is stored anew
    /// (`Records::existing`).
    pub(super) fn withdraw(&mut self, record: &'a NewRecord, deltas: &mut CountMap) {
        let before = self.rows.len();
        self.rows.retain(|row| !std::ptr::eq(*row, record));
        if self.rows.len() < before {
            let token = record.token.as_str();
            count(deltas, record.versions, -1);
            // Its fingerprint entry, if the plan gave it one, goes to the next planned
            // record of the same card (which the plan left without one, since it named
            // this record's token).
            if let Some(at) = self
                .entries
                .iter()
                .position(|(_, planned)| *planned == token)
            {
                let (key, _) = self.entries.remove(at);
                if let Some(next) = self.rows.iter().find(|row| row.index_key == key) {
                    self.entries.push((key, next.token.as_str()));
                }
            }
        }
    }

    pub(super) async fn write(
        &self,
        client: &Object,
        statements: &Statements,
    ) -> Result<(), tokio_postgres::Error> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let rows = &self.rows;
        let tokens: Vec<&str> = rows.iter().map(|r| r.token.as_str()).collect();
        let values: Vec<&[u8]> = rows.iter().map(|r| r.value.as_slice()).collect();
        let card_versions: Vec<i32> = rows.iter().map(|r| r.versions.card_data as i32).collect();
        let fingerprint_versions: Vec<i32> =
            rows.iter().map(|r| r.versions.fingerprint as i32).collect();
        let expiries: Vec<i64> = rows.iter().map(|r| r.indexes.expires_at_unix_ms).collect();
        let card_keys: Vec<&[u8]> = rows.iter().map(|r| r.indexes.card_key.as_slice()).collect();
        let entry_keys: Vec<&[u8]> = self.entries.iter().map(|(k, _)| *k).collect();
        let entry_tokens: Vec<&str> = self.entries.iter().map(|(_, t)| *t).collect();
        let record_params: [&(dyn ToSql + Sync); 6] = [
            &tokens,
            &values,
            &card_versions,
            &fingerprint_versions,
            &expiries,
            &card_keys,
        ];
        let entry_params: [&(dyn ToSql + Sync); 2] = [&entry_keys, &entry_tokens];
        // The outcomes that go with stored records (sealed answers, import rows), the
        // last of each key.
        let mut outcomes: HashMap<&[u8], &[u8]> = HashMap::new();
        for (key, value) in rows.iter().filter_map(|r| r.outcome.as_ref()) {
            outcomes.insert(key, value);
        }
        let (outcome_keys, outcome_values): (Vec<&[u8]>, Vec<&[u8]>) = outcomes.into_iter().unzip();
        let outcome_params: [&(dyn ToSql + Sync); 2] = [&outcome_keys, &outcome_values];
        // Every statement is sent at the first poll, so that all of them precede the
        // COMMIT the caller pipelines after them (`insert_group`): a statement sent
        // after an await here would run after COMMIT, outside the transaction. (Before,
        // the outcomes were written one by one after the records, and a vault killed
        // between them left records without their outcomes.)
        let entries = async {
            match self.entries.is_empty() {
                true => Ok(0),
                false => client.execute(&statements.put_entries, &entry_params).await,
            }
        };
        let outcomes = async {
            match outcome_keys.is_empty() {
                true => Ok(0),
                false => {
                    client
                        .execute(&statements.put_outcomes, &outcome_params)
                        .await
                }
            }
        };
        tokio::try_join!(
            client.execute(&statements.insert_records, &record_params),
            entries,
            outcomes,
        )?;
        Ok(())
    }
}

/// The record's current bytes (its row is locked by `try_group`).
async fn current(
    client: &Object,
    statements: &Statements,
    token: &str,
) -> Result<Option<Vec<u8>>, tokio_postgres::Error> {
    Ok(client
        .query_opt(&statements.current, &[&token])
        .await?
        .map(|row| row.get(0)))
}

pub(super) async fn delete_one(
    client: &Object,
    statements: &Statements,
    delete: &Delete,
    deltas: &mut CountMap,
) -> Result<DeleteOutcome, tokio_postgres::Error> {
    let token = delete.token.as_str();
    match current(client, statements, token).await? {
        None => return Ok(DeleteOutcome::NotFound),
        Some(value) if value != delete.expected => return Ok(DeleteOutcome::Changed),
        Some(_) => {}
    }
    let record_params: [&(dyn ToSql + Sync); 1] = [&token];
    let entry_params: [&(dyn ToSql + Sync); 2] = [&delete.index_key, &token];
    let tombstone = &delete.tombstone;
    let tombstone_params: [&(dyn ToSql + Sync); 2] =
        [&tombstone.key, &tombstone.deleted_at_unix_ms];
    tokio::try_join!(
        client.execute(&statements.remove_record, &record_params),
        client.execute(&statements.remove_entry, &entry_params),
        client.execute(&statements.add_tombstone, &tombstone_params),
        client.execute(&statements.add_unsent_erasure, &tombstone_params),
    )?;
    count(deltas, delete.versions, -1);
    Ok(DeleteOutcome::Deleted)
}

pub(super) async fn rewrite_one(
    client: &Object,
    statements: &Statements,
    rewrite: &Rewrite,
    deltas: &mut CountMap,
) -> Result<RewriteOutcome, tokio_postgres::Error> {
    let token = rewrite.token.as_str();
    if current(client, statements, token).await?.as_deref() != Some(rewrite.expected.as_slice()) {
        return Ok(RewriteOutcome::Changed);
    }
    let new = rewrite.new_versions;
    client
        .execute(
            &statements.rewrite_record,
            &[
                &token,
                &rewrite.value,
                &(new.card_data as i32),
                &(new.fingerprint as i32),
                &rewrite.new_indexes.expires_at_unix_ms,
                &rewrite.new_indexes.card_key,
            ],
        )
        .await?;
    if rewrite.old_index_key != rewrite.new_index_key {
        let old_params: [&(dyn ToSql + Sync); 2] = [&rewrite.old_index_key, &token];
        let new_params: [&(dyn ToSql + Sync); 2] = [&rewrite.new_index_key, &token];
        tokio::try_join!(
            client.execute(&statements.remove_entry, &old_params),
            client.execute(&statements.put_entry_if_stale, &new_params),
        )?;
    }
    count(deltas, rewrite.old_versions, -1);
    count(deltas, rewrite.new_versions, 1);
    Ok(RewriteOutcome::Rewritten)
}
