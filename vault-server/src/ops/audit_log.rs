//! Reading the audit log (for auditors) and checking its hash chain.

use std::sync::Arc;

use crate::audit::{self, Acknowledged, AuditEvent, Verification};
use crate::error::VaultError;
use crate::keys::Keys;
use crate::store::Store;

/// Events per page read from the store, and per answer at most.
const PAGE: usize = 1000;

#[derive(Debug)]
pub struct AuditLog<S> {
    store: Arc<S>,
    keys: Arc<Keys>,
    /// This vault's node name, under which the keyservice keeps its checkpoint.
    node: String,
    /// This vault's certificate identity, which an acknowledgement names.
    identity: String,
    /// Whether other vaults append to the same chain (PostgreSQL): their checkpoints
    /// are checked too.
    shared_chain: bool,
}

/// Which events to read: after a sequence number, within a time window (0: open).
#[derive(Debug, Default)]
pub struct AuditQuery {
    pub after_sequence: u64,
    /// 0: the most a page holds.
    pub limit: u32,
    pub since_unix_ms: i64,
    pub until_unix_ms: i64,
}

/// Events read, each with the version of the audit key that chained it and its chain
/// value, and the last sequence number written.
#[derive(Debug)]
pub struct AuditPage {
    pub events: Vec<(u32, [u8; 32], AuditEvent)>,
    pub last_sequence: u64,
}

impl<S: Store> AuditLog<S> {
    pub fn new(
        store: Arc<S>,
        keys: Arc<Keys>,
        (node, identity): (String, String),
        shared_chain: bool,
    ) -> Self {
        Self {
            store,
            keys,
            node,
            identity,
            shared_chain,
        }
    }

    pub async fn read(&self, query: AuditQuery) -> Result<AuditPage, VaultError> {
        let limit = match query.limit {
            0 => PAGE,
            n => (n as usize).min(PAGE),
        };
        let in_window = |at: i64| {
            (query.since_unix_ms == 0 || at >= query.since_unix_ms)
                && (query.until_unix_ms == 0 || at <= query.until_unix_ms)
        };
        let mut events = Vec::new();
        let mut after = query.after_sequence;
        // Pages until `limit` events in the window are found or the log ends.
        'pages: loop {
            let page = self.store.read_audit(after, PAGE).await?;
            let Some(last) = page.last().map(|(sequence, _)| *sequence) else {
                break;
            };
            for (_, entry) in &page {
                let Some(entry) = audit::decode_chained(entry) else {
                    continue;
                };
                if in_window(entry.2.at_unix_ms) {
                    events.push(entry);
                    if events.len() >= limit {
                        break 'pages;
                    }
                }
            }
            after = last;
        }
        let last_sequence = self
            .store
            .last_audit()
            .await?
            .map_or(0, |(sequence, _)| sequence);
        Ok(AuditPage {
            events,
            last_sequence,
        })
    }

    /// Checks the chain, the store's anchor, and this vault's checkpoint at the
    /// keyservice (without which nothing would show a log deleted or restored whole).
    /// A gap is a fault ("removed") until two admins acknowledge it.
    pub async fn verify(&self) -> Result<AuditReport, VaultError> {
        let kept = audit::checkpoints(&self.keys, &self.node, self.shared_chain)
            .await
            .map_err(|status| VaultError::CheckpointUnavailable(status.message().to_owned()))?;
        // Where vaults share the log, the heads of those that write it (not of vaults of
        // the same identity on another database).
        let writers = match self.shared_chain {
            true => Some(audit::log_writers(self.store.as_ref()).await?),
            false => None,
        };
        let heads: Vec<_> = kept
            .head
            .into_iter()
            .chain(kept.other_heads(writers.as_deref()))
            .collect();
        let verification =
            audit::verify(self.store.as_ref(), &self.keys.snapshot(), &heads).await?;
        Ok(AuditReport::new(
            verification,
            &kept.acknowledged,
            self.node.clone(),
            self.identity.clone(),
        ))
    }
}

/// What `audit verify` answers.
#[derive(Debug)]
pub struct AuditReport {
    /// Entries checked.
    pub entries: u64,
    /// The first entry at fault, an unacknowledged gap included.
    pub fault: Option<(u64, &'static str)>,
    pub gaps: Vec<Gap>,
    /// This vault's node name and certificate identity, which an acknowledgement
    /// names.
    pub node: String,
    pub identity: String,
}

/// Entries `first..=last` missing from the log; `acknowledged_by` "proposer, approver".
#[derive(Debug)]
pub struct Gap {
    pub first: u64,
    pub last: u64,
    pub acknowledged_by: Option<String>,
}

impl AuditReport {
    fn new(
        verification: Verification,
        acknowledged: &[Acknowledged],
        node: String,
        identity: String,
    ) -> Self {
        let gaps: Vec<Gap> = verification
            .gaps
            .iter()
            .map(|&(first, last)| Gap {
                first,
                last,
                acknowledged_by: acknowledged
                    .iter()
                    .find(|a| (a.first, a.last) == (first, last))
                    .map(|a| a.by.clone()),
            })
            .collect();
        let unacknowledged = gaps
            .iter()
            .filter(|gap| gap.acknowledged_by.is_none())
            .map(|gap| (gap.first, "removed"));
        let fault = verification
            .fault
            .into_iter()
            .chain(unacknowledged)
            .min_by_key(|(sequence, _)| *sequence);
        Self {
            entries: verification.entries,
            fault,
            gaps,
            node,
            identity,
        }
    }
}
