//! Erasures that outlive a restore. Each delete stores the token's keyed id (its
//! tombstone) and an unsent copy of it in the same atomic write; a task sends the
//! unsent ones to the keyservice every second, which keeps them off this host. A vault
//! whose audit log turns out rewound (a backup restored, a database restored from an
//! older copy) reads them all back before serving and deletes again every record whose
//! keyed id is among them: what was erased after the backup was taken stays erased.
//! `backup verify` counts the records of a backup that a restore would erase again.

use std::collections::{HashMap, HashSet};
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
/// The `meta` key prefix marking a gap in the audit log whose erasures were replayed.
const REPLAYED: &str = "erasures-replayed/";

/// Every erasure the keyservice keeps, by fingerprint key version.
#[derive(Debug, Default)]
pub struct ErasureSet {
    by_version: HashMap<u32, HashSet<[u8; 32]>>,
    count: usize,
}

impl ErasureSet {
    fn insert(&mut self, id: &[u8]) -> bool {
        let Some((version, mac)) = id.split_first_chunk::<4>() else {
            return false;
        };
        let Ok(mac) = <[u8; 32]>::try_from(mac) else {
            return false;
        };
        self.by_version
            .entry(u32::from_be_bytes(*version))
            .or_default()
            .insert(mac);
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

    /// The keyed id under which the stored record `token` was erased, if it was.
    pub fn erased(&self, keys: &KeySet, token: &Token, stored: &StoredRecord) -> Option<Vec<u8>> {
        self.by_version.iter().find_map(|(version, macs)| {
            let key = keys.fingerprint.get(*version)?;
            let id = record::tombstone(*version, key, &stored.metadata.tenant, token);
            macs.contains(&id[4..]).then_some(id)
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

/// Reads every erasure the keyservice keeps, page by page.
pub async fn fetch(keys: &Keys) -> Result<ErasureSet, tonic::Status> {
    let mut client = keys.keyservice();
    let mut set = ErasureSet::default();
    let mut after = 0;
    loop {
        let page = client
            .list_erasures(pb::ListErasuresRequest {
                after,
                limit: PER_CALL as u32,
            })
            .await?
            .into_inner();
        for erasure in &page.erasures {
            if !set.insert(&erasure.id) {
                return Err(tonic::Status::data_loss(
                    "the keyservice answered an erasure that is not a keyed id",
                ));
            }
        }
        if page.erasures.is_empty() || page.next >= page.total {
            return Ok(set);
        }
        after = page.next;
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
                let Some(id) = erasures.erased(&keys, &token, &stored) else {
                    continue;
                };
                let tombstone = Tombstone {
                    key: id,
                    deleted_at_unix_ms: now_unix_ms(),
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
                .delete_stored(token, bytes, &stored, tombstone.clone())
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

/// At start-up: if the audit log has a gap whose erasures were not replayed yet (the
/// log was rewound: a restore), reads every erasure from the keyservice and erases
/// again, then marks those gaps replayed and says so in the audit log. A crash before
/// the mark replays again at the next start (a replay is idempotent).
pub async fn replay_after_restore<S: Store>(
    records: &Records<S>,
    gaps: &[(u64, u64)],
) -> Result<Option<Replayed>, VaultError> {
    let mut due = Vec::new();
    for &(first, last) in gaps {
        let mark = format!("{REPLAYED}{first}-{last}");
        if records.store().get_meta(&mark).await?.is_none() {
            due.push(mark);
        }
    }
    if due.is_empty() {
        return Ok(None);
    }
    let erasures = fetch(records.keys())
        .await
        .map_err(|status| VaultError::Erasures(status.message().to_owned()))?;
    let unmatchable = erasures.unmatchable_versions(&records.keys().snapshot());
    if !unmatchable.is_empty() {
        tracing::error!(
            versions = ?unmatchable,
            "erasures under destroyed fingerprint versions cannot be matched: records of a \
             backup still under those versions are not erased again"
        );
    }
    tracing::info!(
        erasures = erasures.len(),
        "the audit log was rewound (a restore): erasing again what was erased since"
    );
    let replayed = records.replay_erasures(&erasures).await?;
    records
        .journal()
        .audit(AuditEvent {
            at_unix_ms: now_unix_ms(),
            actor: "vault".into(),
            peer: "-".into(),
            action: "ErasuresReplayed".into(),
            outcome: "ok".into(),
            detail: format!(
                "{} records erased again of {} examined; {} erasures kept at the keyservice{}",
                replayed.erased,
                replayed.records,
                erasures.len(),
                match unmatchable.is_empty() {
                    true => String::new(),
                    false => format!("; versions {unmatchable:?} unmatchable"),
                }
            ),
            ..AuditEvent::default()
        })
        .await?;
    for mark in due {
        records.store().put_meta(&mark, Vec::new()).await?;
    }
    tracing::info!(
        records = replayed.records,
        erased = replayed.erased,
        "erasures replayed"
    );
    Ok(Some(replayed))
}

/// Sends the unsent erasures to the keyservice every second until `shutdown`, then
/// once more (for two seconds at most). Unsent ones stay stored and go with the next
/// try, after a restart too.
pub async fn send_periodically<S: Store>(store: Arc<S>, keys: Arc<Keys>, shutdown: Shutdown) {
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        let full = tokio::select! {
            sent = send(store.as_ref(), &keys) => match sent {
                Ok(count) => count == PER_CALL,
                Err(e) => {
                    tracing::debug!(error = %e, "erasures not sent to the keyservice");
                    false
                }
            },
            _ = &mut stop => break,
        };
        if full {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(SEND_EVERY) => {}
            _ = &mut stop => break,
        }
    }
    match tokio::time::timeout(Duration::from_secs(2), send(store.as_ref(), &keys)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the last erasures were not sent; they go at the next start")
        }
        Err(_) => {
            tracing::warn!("the last erasures were not sent within 2 s; they go at the next start")
        }
    }
}

/// Sends one batch; returns how many were sent.
async fn send<S: Store>(store: &S, keys: &Keys) -> Result<usize, String> {
    let unsent = store
        .unsent_erasures(PER_CALL)
        .await
        .map_err(|e| e.to_string())?;
    if unsent.is_empty() {
        return Ok(0);
    }
    let request = pb::ReportErasuresRequest {
        erasures: unsent
            .iter()
            .map(|tombstone| pb::Erasure {
                id: tombstone.key.clone(),
                deleted_at_unix_ms: tombstone.deleted_at_unix_ms,
            })
            .collect(),
    };
    keys.keyservice()
        .report_erasures(request)
        .await
        .map_err(|status| status.message().to_owned())?;
    let sent = unsent.len();
    store
        .erasures_sent(unsent.into_iter().map(|tombstone| tombstone.key).collect())
        .await
        .map_err(|e| e.to_string())?;
    Ok(sent)
}
