//! Erasures that outlive a restore. Each delete stores the token's keyed id (its
//! tombstone) and an unsent copy of it in the same atomic write; every second a task
//! sends the unsent ones to the keyservice under this store's id (a random id the store
//! keeps, so a backup and the vaults of one database share it), which keeps them off
//! this host. The store also keeps how many of its erasures at the keyservice it
//! reflects (`erasures-applied`). At start-up, and whenever the keyservice holds more
//! than that, the vault reads the ones after it: those with no tombstone here were
//! erased after this copy of the store was made (a backup restored, a database restored
//! from an older copy), and every record whose keyed id is among them is deleted again
//! before the vault serves (at start-up) or within a second (a database restored under
//! running vaults, whose audit gap refuses card data meanwhile). `backup verify` counts
//! the records of a backup that a restore would erase again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use runtime::now_unix_ms;
use runtime::shutdown::Shutdown;
use vault_proto::keys::v1 as pb;

use super::records::{ATTEMPTS, Records};
use crate::audit::AuditEvent;
use crate::error::VaultError;
use crate::keys::{KeySet, Keys};
use crate::record::{self, StoredRecord};
use crate::store::{DeleteOutcome, Store, Tombstone};
use crate::token::Token;

/// Most erasures per call to the keyservice (its limit).
const PER_CALL: usize = 4096;
/// How often unsent erasures are sent: the window in which a host lost for good
/// takes erasures the keyservice has not heard of with it.
const SEND_EVERY: Duration = Duration::from_secs(1);
/// The `meta` key of the store's id at the keyservice.
pub const STORE_ID: &str = "store-id";
/// The `meta` key of how many of the store's erasures at the keyservice it reflects.
const APPLIED: &str = "erasures-applied";

/// Erasures to match against records, by fingerprint key version.
#[derive(Debug, Default)]
pub struct ErasureSet {
    /// HMAC → when it was deleted.
    by_version: HashMap<u32, HashMap<[u8; 32], i64>>,
    count: usize,
}

impl ErasureSet {
    fn insert(&mut self, id: &[u8], deleted_at_unix_ms: i64) -> bool {
        let Some((version, mac)) = id.split_first_chunk::<4>() else {
            return false;
        };
        let Ok(mac) = <[u8; 32]>::try_from(mac) else {
            return false;
        };
        self.by_version
            .entry(u32::from_be_bytes(*version))
            .or_default()
            .insert(mac, deleted_at_unix_ms);
        self.count += 1;
        true
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The fingerprint versions of erasures whose key is no longer held: those
    /// cannot be matched against records.
    pub fn unmatchable_versions(&self, keys: &KeySet) -> Vec<u32> {
        let mut versions: Vec<u32> = self
            .by_version
            .keys()
            .copied()
            .filter(|version| keys.fingerprint.get(*version).is_none())
            .collect();
        versions.sort_unstable();
        versions
    }

    /// The tombstone of the stored record `token`, if it was erased.
    pub fn erased(&self, keys: &KeySet, token: &Token, stored: &StoredRecord) -> Option<Tombstone> {
        self.by_version.iter().find_map(|(version, macs)| {
            let key = keys.fingerprint.get(*version)?;
            let id = record::tombstone(*version, key, &stored.metadata.tenant, token);
            let deleted_at_unix_ms = *macs.get(&id[4..])?;
            Some(Tombstone {
                key: id,
                deleted_at_unix_ms,
            })
        })
    }

    /// Whether a stored record (as in a backup) is erased.
    pub fn holds(&self, keys: &KeySet, token: &[u8], value: &[u8]) -> bool {
        let (Some(token), Ok(stored)) = (Token::from_stored(token), record::decode(value)) else {
            return false;
        };
        self.erased(keys, &token, &stored).is_some()
    }
}

/// The store's id at the keyservice, made by the first vault that asks.
pub async fn store_id<S: Store>(store: &S) -> Result<Vec<u8>, VaultError> {
    if let Some(id) = store.get_meta(STORE_ID).await? {
        return Ok(id);
    }
    let mut id = vec![0; 16];
    envelope::fill_random(&mut id)?;
    Ok(store.init_meta(STORE_ID, id).await?)
}

/// The store's erasures at the keyservice from position `after` on, and the position
/// after the last.
async fn fetch(
    keys: &Keys,
    store_id: &[u8],
    mut after: u64,
) -> Result<(Vec<pb::Erasure>, u64), tonic::Status> {
    let mut client = keys.keyservice();
    let mut erasures = Vec::new();
    loop {
        let page = client
            .list_erasures(pb::ListErasuresRequest {
                after,
                limit: PER_CALL as u32,
                store_id: store_id.to_vec(),
            })
            .await?
            .into_inner();
        let done = page.erasures.is_empty() || page.next >= page.total;
        erasures.extend(page.erasures);
        after = page.next;
        if done {
            return Ok((erasures, after));
        }
    }
}

/// Every erasure of the store, for `backup verify`.
pub async fn all(keys: &Keys, store_id: &[u8]) -> Result<ErasureSet, VaultError> {
    let (erasures, _) = fetch(keys, store_id, 0).await.map_err(unavailable)?;
    let mut set = ErasureSet::default();
    for erasure in erasures {
        set.insert(&erasure.id, erasure.deleted_at_unix_ms);
    }
    Ok(set)
}

fn unavailable(status: tonic::Status) -> VaultError {
    match status.code() {
        tonic::Code::Unimplemented => VaultError::Erasures(
            "the keyservice does not keep erasures: upgrade it before the vaults".into(),
        ),
        _ => VaultError::Erasures(status.message().to_owned()),
    }
}

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Records examined.
    pub records: u64,
    /// Records erased again.
    pub erased: u64,
}

impl<S: Store> Records<S> {
    /// Deletes every record whose keyed id is in `erasures`, with its tombstone (the
    /// erasure's own id). Blocking only on the store, page by page.
    pub async fn replay_erasures(&self, erasures: &ErasureSet) -> Result<Replayed, VaultError> {
        let mut replayed = Replayed::default();
        if erasures.is_empty() {
            return Ok(replayed);
        }
        let keys = self.keys().snapshot();
        let mut cursor = None;
        loop {
            let page = self.store().records_after(cursor.take(), 1000).await?;
            let Some((last, _)) = page.last() else {
                return Ok(replayed);
            };
            cursor = Some(last.clone());
            for (token, bytes) in page {
                replayed.records += 1;
                let (Some(token), Ok(stored)) =
                    (Token::from_stored(&token), record::decode(&bytes))
                else {
                    continue;
                };
                let Some(tombstone) = erasures.erased(&keys, &token, &stored) else {
                    continue;
                };
                if self.erase_again(&token, bytes, &stored, tombstone).await? {
                    replayed.erased += 1;
                }
            }
            if replayed.records % 100_000 < 1000 {
                tracing::info!(
                    records = replayed.records,
                    erased = replayed.erased,
                    "replaying erasures"
                );
            }
        }
    }

    /// Deletes one erased record (read again if a rewrap changed it meanwhile).
    async fn erase_again(
        &self,
        token: &Token,
        mut bytes: Vec<u8>,
        stored: &StoredRecord,
        tombstone: Tombstone,
    ) -> Result<bool, VaultError> {
        let mut stored = stored.clone();
        for _ in 0..ATTEMPTS {
            match self
                .delete_stored(token, bytes, &stored, tombstone.clone(), None)
                .await?
            {
                DeleteOutcome::Deleted => return Ok(true),
                DeleteOutcome::NotFound => return Ok(false),
                DeleteOutcome::Changed => {
                    let Some(current) = self.store().get(token).await? else {
                        return Ok(false);
                    };
                    stored = record::decode(&current)?;
                    bytes = current;
                }
            }
        }
        Err(VaultError::Store(crate::store::StoreError::Engine(
            "the record kept changing while its erasure was replayed".into(),
        )))
    }
}

/// Brings the store up to the erasures the keyservice keeps for it: reads those
/// after the position it reflects, and if any has no tombstone here (this copy of the
/// store is older than the erasure: a restore), deletes every matching record again and
/// says so in the audit log. Then moves the position. A crash before that replays again
/// (a replay is idempotent).
pub async fn catch_up<S: Store>(
    records: &Records<S>,
    store_id: &[u8],
) -> Result<Option<Replayed>, VaultError> {
    let store = records.store();
    let from = applied(store.as_ref()).await?;
    let (erasures, next) = fetch(records.keys(), store_id, from)
        .await
        .map_err(unavailable)?;
    if next <= from {
        return Ok(None);
    }
    let missing = store
        .missing_tombstones(erasures.iter().map(|e| e.id.clone()).collect())
        .await?;
    let mut replayed = None;
    if !missing.is_empty() {
        let missing: std::collections::HashSet<Vec<u8>> = missing.into_iter().collect();
        let mut set = ErasureSet::default();
        for erasure in erasures.iter().filter(|e| missing.contains(&e.id)) {
            set.insert(&erasure.id, erasure.deleted_at_unix_ms);
        }
        replayed = Some(replay(records, &set).await?);
    }
    // Raised only: the vaults of one database move it too.
    if applied(store.as_ref()).await? < next {
        store.put_meta(APPLIED, next.to_be_bytes().to_vec()).await?;
    }
    Ok(replayed)
}

async fn applied<S: Store>(store: &S) -> Result<u64, VaultError> {
    Ok(store
        .get_meta(APPLIED)
        .await?
        .and_then(|bytes| bytes.try_into().ok())
        .map_or(0, u64::from_be_bytes))
}

/// Erases again the records of `set` (erasures this copy of the store does not
/// reflect), and audits it.
async fn replay<S: Store>(records: &Records<S>, set: &ErasureSet) -> Result<Replayed, VaultError> {
    let unmatchable = set.unmatchable_versions(&records.keys().snapshot());
    if !unmatchable.is_empty() {
        tracing::error!(
            versions = ?unmatchable,
            "erasures under destroyed fingerprint versions cannot be matched: records of an \
             older copy still under those versions are not erased again"
        );
    }
    tracing::warn!(
        erasures = set.len(),
        "this store is older than erasures the keyservice keeps for it (a restore): \
         erasing them again"
    );
    let replayed = records.replay_erasures(set).await?;
    records
        .journal()
        .audit(AuditEvent {
            at_unix_ms: now_unix_ms(),
            actor: "vault".into(),
            peer: "-".into(),
            action: "ErasuresReplayed".into(),
            outcome: "ok".into(),
            detail: format!(
                "{} records erased again of {} examined; {} erasures this copy of the \
                 store did not reflect{}",
                replayed.erased,
                replayed.records,
                set.len(),
                match unmatchable.is_empty() {
                    true => String::new(),
                    false => format!("; versions {unmatchable:?} unmatchable"),
                }
            ),
            ..AuditEvent::default()
        })
        .await?;
    tracing::warn!(
        records = replayed.records,
        erased = replayed.erased,
        "erasures replayed"
    );
    Ok(replayed)
}

/// Every second until `shutdown`: sends the unsent erasures to the keyservice (which
/// answers how many it keeps for the store), and catches up when it keeps more than
/// the store reflects. Unsent ones stay stored and go with the next try, after a
/// restart too.
pub async fn send_periodically<S: Store>(
    records: Arc<Records<S>>,
    store_id: Vec<u8>,
    shutdown: Shutdown,
) {
    let stop = shutdown.wait();
    tokio::pin!(stop);
    let mut failing_since: Option<std::time::Instant> = None;
    let mut warned_at: Option<std::time::Instant> = None;
    loop {
        let round = async {
            let (sent, kept) = send(records.store().as_ref(), records.keys(), &store_id).await?;
            if kept > applied(records.store().as_ref()).await? {
                catch_up(&records, &store_id).await?;
            }
            Ok::<_, VaultError>(sent)
        };
        let full = tokio::select! {
            round = round => match round {
                Ok(sent) => {
                    failing_since = None;
                    sent == PER_CALL
                }
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    // Said at once, then once a minute: unsent erasures are lost with
                    // the host if it is lost for good.
                    if warned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                        warned_at = Some(std::time::Instant::now());
                        tracing::warn!(
                            error = %e,
                            failing_for_secs = since.elapsed().as_secs(),
                            "erasures not sent to the keyservice; they stay stored and go later"
                        );
                    }
                    false
                }
            },
            _ = &mut stop => return,
        };
        if full {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(SEND_EVERY) => {}
            _ = &mut stop => return,
        }
    }
}

/// Sends what is unsent once more (at shutdown, once every call has ended), for two
/// seconds at most.
pub async fn send_last<S: Store>(store: &S, keys: &Keys, store_id: &[u8]) {
    let last = async {
        loop {
            let (sent, _) = send(store, keys, store_id).await?;
            if sent < PER_CALL {
                return Ok::<_, VaultError>(());
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(2), last).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the last erasures were not sent; they go at the next start")
        }
        Err(_) => {
            tracing::warn!("the last erasures were not sent within 2 s; they go at the next start")
        }
    }
}

/// Sends one batch (possibly empty); returns how many were sent and how many the
/// keyservice keeps for the store.
async fn send<S: Store>(
    store: &S,
    keys: &Keys,
    store_id: &[u8],
) -> Result<(usize, u64), VaultError> {
    let unsent = store.unsent_erasures(PER_CALL).await?;
    let request = pb::ReportErasuresRequest {
        erasures: unsent
            .iter()
            .map(|tombstone| pb::Erasure {
                id: tombstone.key.clone(),
                deleted_at_unix_ms: tombstone.deleted_at_unix_ms,
            })
            .collect(),
        store_id: store_id.to_vec(),
    };
    let kept = keys
        .keyservice()
        .report_erasures(request)
        .await
        .map_err(unavailable)?
        .into_inner()
        .kept;
    let sent = unsent.len();
    if sent > 0 {
        store
            .erasures_sent(unsent.into_iter().map(|tombstone| tombstone.key).collect())
            .await?;
    }
    Ok((sent, kept))
}
