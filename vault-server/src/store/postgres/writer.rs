//! The writers: each takes everything queued and commits it as one transaction
//! (group commit), planned again when it loses a race with another vault.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;

use super::audit::{AuditStatements, chain};
use super::connect::{Object, Pool, release_after_failure};
use super::counts::{CountMap, Counts};
use super::errors::{pg, pool_error};
use super::lane::CommitLane;
use super::locks::{GroupLocks, INDEX_LOCK, KeyLocks, OUTCOME_LOCK, index_lock, outcome_lock};
use super::planning::{Lookups, Planned, add_counts, delete_one, lookup_params, plan, rewrite_one};
use super::statements::{BEGIN, Param, Statements};
use super::{Health, note};
use crate::store::{
    AuditSeal, Claim, Delete, DeleteOutcome, InsertOutcome, NewRecord, Replaceable, Rewrite,
    RewriteOutcome, Riding, StoreError,
};

const MAX_GROUP: usize = 1024;
/// Records in one write group at most (a group holds a lock per fingerprint key it
/// touches: see `MAX_KEY_LOCKS`).
const MAX_GROUP_RECORDS: usize = 4096;
pub(super) const QUEUE_DEPTH: usize = 4096;
/// Tries of one group when it loses a race with another transaction (deadlock,
/// token taken meanwhile, serialization failure).
const GROUP_TRIES: usize = 5;

pub(super) enum Op {
    Insert {
        records: Vec<NewRecord>,
        /// The event of the call the insert finishes, committed with it.
        riding: Option<Riding<[InsertOutcome]>>,
        reply: oneshot::Sender<Result<Vec<InsertOutcome>, StoreError>>,
    },
    Delete {
        delete: Delete,
        /// The event of the call the delete finishes, committed with it.
        riding: Option<Riding<DeleteOutcome>>,
        reply: oneshot::Sender<Result<DeleteOutcome, StoreError>>,
    },
    Rewrite {
        rewrite: Rewrite,
        reply: oneshot::Sender<Result<RewriteOutcome, StoreError>>,
    },
    PutMeta {
        key: String,
        value: Vec<u8>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    PutOutcome {
        key: Vec<u8>,
        value: Vec<u8>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Deletes each outcome only if it still holds the value given.
    RemoveOutcomes {
        keys: Vec<Vec<u8>>,
        values: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    ClaimOutcome {
        key: Vec<u8>,
        value: Vec<u8>,
        replaceable: Replaceable,
        reply: oneshot::Sender<Result<Claim, StoreError>>,
    },
}

/// What one op did, kept until the group commits.
enum Done {
    Insert(Vec<InsertOutcome>),
    Delete(DeleteOutcome),
    Rewrite(RewriteOutcome),
    Claim(Claim),
    Unit,
}

impl Op {
    /// Records the op writes (for the group's size).
    fn records(&self) -> usize {
        match self {
            Op::Insert { records, .. } => records.len(),
            Op::RemoveOutcomes { keys, .. } => keys.len(),
            _ => 1,
        }
    }

    /// Sends the op's result (what `try_group` did for it, or the group's error). A
    /// caller that gave up is not waiting for it.
    fn answer(self, result: Result<Done, StoreError>) {
        let mismatch = || StoreError::Engine("mismatched write result".into());
        match self {
            Op::Insert { reply, .. } => {
                let _ = reply.send(result.and_then(|done| match done {
                    Done::Insert(outcomes) => Ok(outcomes),
                    _ => Err(mismatch()),
                }));
            }
            Op::Delete { reply, .. } => {
                let _ = reply.send(result.and_then(|done| match done {
                    Done::Delete(outcome) => Ok(outcome),
                    _ => Err(mismatch()),
                }));
            }
            Op::Rewrite { reply, .. } => {
                let _ = reply.send(result.and_then(|done| match done {
                    Done::Rewrite(outcome) => Ok(outcome),
                    _ => Err(mismatch()),
                }));
            }
            Op::ClaimOutcome { reply, .. } => {
                let _ = reply.send(result.and_then(|done| match done {
                    Done::Claim(claim) => Ok(claim),
                    _ => Err(mismatch()),
                }));
            }
            Op::PutMeta { reply, .. }
            | Op::PutOutcome { reply, .. }
            | Op::RemoveOutcomes { reply, .. } => {
                let _ = reply.send(result.map(drop));
            }
        }
    }
}

/// One writer task's own settings.
#[derive(Debug, Clone)]
pub(super) struct Writer {
    /// Its slot in `version_counts`.
    pub(super) slot: String,
    /// This vault's counts lock: every write group takes it shared, a recount of the
    /// vault's own counts exclusively (see `recount_own`).
    pub(super) counts_lock: i64,
    pub(super) lane: CommitLane,
}

/// Whether a group that failed with `e` should be planned and tried again.
fn lost_a_race(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|code| {
        *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::UNIQUE_VIOLATION
    })
}

/// One writer: takes everything queued (up to `MAX_GROUP`) and commits it as one
/// transaction, while the other writers gather or commit theirs.
pub(super) async fn write(
    pool: Pool,
    receiver: Arc<tokio::sync::Mutex<mpsc::Receiver<Op>>>,
    counts: Arc<Counts>,
    writer: Writer,
    health: Arc<Health>,
) {
    loop {
        let group = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut records = first.records();
            let mut group = vec![first];
            while group.len() < MAX_GROUP && records < MAX_GROUP_RECORDS {
                match receiver.try_recv() {
                    Ok(op) => {
                        records += op.records();
                        group.push(op);
                    }
                    Err(_) => break,
                }
            }
            group
        };
        let gate = counts.gate.read().await;
        let result = commit_group(&pool, &group, &writer).await;
        note(
            &health.unconfirmed,
            result.as_ref().err(),
            "writes are not confirmed by the database",
        );
        match &result {
            Ok((_, deltas)) => counts.add(deltas),
            // The outcome is unknown (the answer was lost, or the commit not
            // confirmed in time): count again from the database.
            Err(StoreError::Unavailable(_)) => counts.own_unsure.store(true, Ordering::Relaxed),
            Err(_) => {}
        }
        drop(gate);
        match result {
            Ok((done, _)) => {
                for (op, done) in group.into_iter().zip(done) {
                    op.answer(Ok(done));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, writes = group.len(), "database write failed; nothing of it was acknowledged");
                for op in group {
                    op.answer(Err(e.clone()));
                }
            }
        }
    }
}

async fn commit_group(
    pool: &Pool,
    group: &[Op],
    writer: &Writer,
) -> Result<(Vec<Done>, CountMap), StoreError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let in_flight = writer.lane.enter().await?;
        let mut client = pool.get().await.map_err(pool_error)?;
        let Ok(tried) =
            tokio::time::timeout(writer.lane.timeout, try_group(&mut client, group, writer)).await
        else {
            // Whether it committed is unknown; it was not acknowledged.
            in_flight.keep_until_answered(client);
            return Err(writer.lane.timed_out("a commit"));
        };
        match tried {
            Ok(done) => return Ok(done),
            Err(e) => {
                // Leave no connection inside a failed transaction in the pool.
                release_after_failure(client).await;
                if lost_a_race(&e) && tries < GROUP_TRIES {
                    tracing::debug!(error = %pg(e), "write group lost a race; planned again");
                    tokio::time::sleep(Duration::from_millis(5 * tries as u64)).await;
                    continue;
                }
                return Err(pg(e));
            }
        }
    }
}

async fn try_group(
    client: &mut Object,
    group: &[Op],
    writer: &Writer,
) -> Result<(Vec<Done>, CountMap), tokio_postgres::Error> {
    let statements = Statements::prepare(client).await?;
    // A claimed outcome needs its own statements (`claim_planned`) between a record's
    // plan and its write, which `insert_group`'s one pipelined round does not have.
    let claims = |op: &Op| match op {
        Op::Insert { records, .. } => records.iter().any(|r| r.claim.is_some()),
        _ => false,
    };
    if group.iter().all(|op| matches!(op, Op::Insert { .. })) && !group.iter().any(claims) {
        return insert_group(client, &statements, group, writer).await;
    }
    let slot = writer.slot.as_str();
    let (locks, tokens) = locks_of(group);
    let keys = locks.keys();
    let (counts, index, outcomes, keys_param): (Param, Param, Param, Param) = (
        [&writer.counts_lock],
        [&INDEX_LOCK],
        [&OUTCOME_LOCK],
        [&keys],
    );
    tokio::try_join!(
        client.batch_execute(BEGIN),
        client.query(&statements.lock_index_shared, &counts),
        client.query(statements.kind_lock(&locks.index), &index),
        client.query(statements.kind_lock(&locks.outcomes), &outcomes),
        client.query(&statements.lock_keys, &keys_param),
    )?;
    if !tokens.is_empty() {
        client.query(&statements.lock_rows, &[&tokens]).await?;
    }
    let mut deltas = CountMap::new();
    let mut done = Vec::with_capacity(group.len());
    let mut seals = Vec::new();
    for op in group {
        done.push(match op {
            Op::Insert {
                records, riding, ..
            } => {
                let (tokens, index_keys) = lookup_params(records.iter());
                let (tokens, index_keys): (Param, Param) = ([&tokens], [&index_keys]);
                let (taken, live) = tokio::try_join!(
                    client.query(&statements.taken, &tokens),
                    client.query(&statements.live, &index_keys),
                )?;
                let mut found = Lookups::from_rows(&taken, &live);
                let mut planned = Planned::default();
                let mut outcomes = plan(records, &mut found, &mut planned, &mut deltas);
                claim_planned(
                    client,
                    &statements,
                    records,
                    &mut outcomes,
                    &mut planned,
                    &mut deltas,
                )
                .await?;
                planned.write(client, &statements).await?;
                seals.extend(riding.as_ref().and_then(|riding| riding(&outcomes)));
                Done::Insert(outcomes)
            }
            Op::Delete { delete, riding, .. } => {
                let outcome = delete_one(client, &statements, delete, &mut deltas).await?;
                seals.extend(riding.as_ref().and_then(|riding| riding(&outcome)));
                Done::Delete(outcome)
            }
            Op::Rewrite { rewrite, .. } => {
                Done::Rewrite(rewrite_one(client, &statements, rewrite, &mut deltas).await?)
            }
            Op::PutMeta { key, value, .. } => {
                client.execute(&statements.put_meta, &[key, value]).await?;
                Done::Unit
            }
            Op::PutOutcome { key, value, .. } => {
                client
                    .execute(&statements.put_outcome, &[key, value])
                    .await?;
                Done::Unit
            }
            Op::RemoveOutcomes { keys, values, .. } => {
                client
                    .execute(&statements.remove_outcomes, &[keys, values])
                    .await?;
                Done::Unit
            }
            Op::ClaimOutcome {
                key,
                value,
                replaceable,
                ..
            } => Done::Claim(claim_outcome(client, &statements, key, value, replaceable).await?),
        });
    }
    deltas.retain(|_, delta| *delta != 0);
    let chained = match seals.is_empty() {
        true => None,
        false => {
            let audit = AuditStatements::prepare(client).await?;
            let end = audit.lock_end(client).await?;
            Some((audit, chain(seals, end)))
        }
    };
    tokio::try_join!(
        add_counts(client, &statements, slot, &deltas),
        append_chained(client, chained.as_ref()),
        client.batch_execute("COMMIT"),
    )?;
    Ok((done, deltas))
}

/// Writes the entries a group chained (see `audit::chain`), if any.
async fn append_chained(
    client: &Object,
    chained: Option<&(AuditStatements, super::audit::Chained)>,
) -> Result<(), tokio_postgres::Error> {
    match chained {
        Some((audit, chained)) => audit.write(client, chained).await,
        None => Ok(()),
    }
}

/// The common group, only tokenizations, in two round trips: BEGIN, the locks and
/// the look-ups in one; the writes, the counts and COMMIT in the other. (PostgreSQL
/// runs pipelined statements in order, and a failed one aborts the transaction, so
/// COMMIT then rolls back and the error comes back from the statement that failed.)
async fn insert_group(
    client: &Object,
    statements: &Statements,
    group: &[Op],
    writer: &Writer,
) -> Result<(Vec<Done>, CountMap), tokio_postgres::Error> {
    let slot = writer.slot.as_str();
    let records = || {
        group.iter().flat_map(|op| match op {
            Op::Insert { records, .. } => records.as_slice(),
            _ => &[],
        })
    };
    let (locks, _) = locks_of(group);
    let (tokens, index_keys) = lookup_params(records());
    let keys = locks.keys();
    let (counts, index, outcomes, keys, tokens, index_keys): (
        Param,
        Param,
        Param,
        Param,
        Param,
        Param,
    ) = (
        [&writer.counts_lock],
        [&INDEX_LOCK],
        [&OUTCOME_LOCK],
        [&keys],
        [&tokens],
        [&index_keys],
    );
    // The chain's lock, last (see `audit`), only when the group carries events.
    let audit = match group.iter().any(|op| {
        matches!(
            op,
            Op::Insert {
                riding: Some(_),
                ..
            }
        )
    }) {
        true => Some(AuditStatements::prepare(client).await?),
        false => None,
    };
    let log_end = async {
        match &audit {
            Some(audit) => audit.lock_end(client).await.map(Some),
            None => Ok(None),
        }
    };
    let (_, _, _, _, _, taken, live, end) = tokio::try_join!(
        client.batch_execute(BEGIN),
        client.query(&statements.lock_index_shared, &counts),
        client.query(statements.kind_lock(&locks.index), &index),
        client.query(statements.kind_lock(&locks.outcomes), &outcomes),
        client.query(&statements.lock_keys, &keys),
        client.query(&statements.taken, &tokens),
        client.query(&statements.live, &index_keys),
        log_end,
    )?;
    let mut found = Lookups::from_rows(&taken, &live);
    let mut planned = Planned::default();
    let mut deltas = CountMap::new();
    let mut seals: Vec<AuditSeal> = Vec::new();
    let done = group
        .iter()
        .map(|op| match op {
            Op::Insert {
                records, riding, ..
            } => {
                let outcomes = plan(records, &mut found, &mut planned, &mut deltas);
                seals.extend(riding.as_ref().and_then(|riding| riding(&outcomes)));
                Done::Insert(outcomes)
            }
            _ => Done::Unit,
        })
        .collect();
    let chained = audit
        .zip(end)
        .map(|(audit, end)| (audit, chain(seals, end)));
    tokio::try_join!(
        planned.write(client, statements),
        add_counts(client, statements, slot, &deltas),
        append_chained(client, chained.as_ref()),
        client.batch_execute("COMMIT"),
    )?;
    Ok((done, deltas))
}

/// The index and outcome locks of a group, and the tokens of the records it changes,
/// sorted.
pub(super) fn locks_of(group: &[Op]) -> (GroupLocks, Vec<&str>) {
    let mut keys = BTreeSet::new();
    let mut outcomes = BTreeSet::new();
    let mut tokens = BTreeSet::new();
    for op in group {
        match op {
            Op::Insert { records, .. } => {
                for record in records {
                    keys.insert(index_lock(&record.index_key));
                    if record.reuse_existing {
                        keys.extend(record.older_index_keys.iter().map(|k| index_lock(k)));
                    }
                    if let Some((key, _)) = &record.outcome {
                        outcomes.insert(outcome_lock(key));
                    }
                }
            }
            Op::Delete { delete, .. } => {
                keys.insert(index_lock(&delete.index_key));
                tokens.insert(delete.token.as_str());
            }
            Op::Rewrite { rewrite, .. } => {
                keys.insert(index_lock(&rewrite.old_index_key));
                keys.insert(index_lock(&rewrite.new_index_key));
                tokens.insert(rewrite.token.as_str());
            }
            Op::PutOutcome { key, .. } | Op::ClaimOutcome { key, .. } => {
                outcomes.insert(outcome_lock(key));
            }
            // Not the prune's removals: locked key by key, each chunk of a thousand
            // would take `OUTCOME_LOCK` exclusive and stall every group that claims
            // or puts. It removes only expired or released entries; a cycle needs a
            // group that has locked one such entry (to replace it) and waits on
            // another the prune has just removed, at that moment. PostgreSQL breaks
            // it, and the group is planned again.
            Op::RemoveOutcomes { .. } | Op::PutMeta { .. } => {}
        }
    }
    let locks = GroupLocks {
        index: KeyLocks::of(keys),
        outcomes: KeyLocks::of(outcomes),
    };
    (locks, tokens.into_iter().collect())
}

/// Claims the outcome of each record planned for storing whose outcome is claimed
/// (`NewRecord::claim`), as [`claim_outcome`] does, in the records' own transaction; a
/// record whose claim is taken is withdrawn from the plan. (Of two vaults claiming the
/// same key at once, the second waits on the first's outcome lock, taken with the
/// group's other locks, then finds its row.)
async fn claim_planned<'a>(
    client: &Object,
    statements: &Statements,
    records: &'a [NewRecord],
    outcomes: &mut [InsertOutcome],
    planned: &mut Planned<'a>,
    deltas: &mut CountMap,
) -> Result<(), tokio_postgres::Error> {
    for (record, outcome) in records.iter().zip(outcomes.iter_mut()) {
        let (Some((key, value)), Some(claim), InsertOutcome::Stored) =
            (&record.outcome, &record.claim, &*outcome)
        else {
            continue;
        };
        if let Claim::Taken(stored) =
            claim_outcome(client, statements, key, value, &claim.0).await?
        {
            planned.withdraw(record, deltas);
            *outcome = InsertOutcome::OutcomeTaken(stored);
        }
    }
    Ok(())
}

/// Put-if-absent (or if replaceable) of an idempotency outcome: a new key is inserted;
/// an existing one is read under a row lock, so of two vaults replacing a released
/// outcome at once the second sees the first's claim.
async fn claim_outcome(
    client: &Object,
    statements: &Statements,
    key: &Vec<u8>,
    value: &Vec<u8>,
    replaceable: &Replaceable,
) -> Result<Claim, tokio_postgres::Error> {
    let stored = loop {
        if client
            .execute(&statements.add_outcome, &[key, value])
            .await?
            == 1
        {
            return Ok(Claim::Claimed);
        }
        // Gone again if the purge removed it in between: then insert once more.
        if let Some(row) = client
            .query_opt(&statements.outcome_for_update, &[key])
            .await?
        {
            break row.get::<_, Vec<u8>>(0);
        }
    };
    if !replaceable(&stored) {
        return Ok(Claim::Taken(stored));
    }
    client
        .execute(&statements.put_outcome, &[key, value])
        .await?;
    Ok(Claim::Claimed)
}
