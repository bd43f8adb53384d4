//! The log's head, and where it is kept so that nothing on the vault's host can move it
//! back: the sequence number of the last entry and that entry's chain value (its MAC).
//!
//! - In the store, as the anchor (`AUDIT_HEAD_KEY`), MACed under the audit key, so it
//!   cannot be forged without the key (an older one can be put back; see below).
//! - In the writer's memory: the highest head written or read. Appends continue after
//!   it, never after a lower end: entries removed from the log's end leave a gap that
//!   `verify` reports on every run after, instead of being written over.
//! - Off the host, at the keyservice: a checkpoint per vault (certificate identity and
//!   node name), sent at most once a second. A starting vault continues after it, and
//!   `verify` checks the log against it, so a deleted or restored data directory is
//!   reported too.

use std::sync::Arc;
use std::time::Duration;

use envelope::SecretKey;
use runtime::shutdown::Shutdown;
use tokio::sync::watch;
use vault_proto::keys::v1 as pb;

use super::Gaps;
use crate::keys::{KeySet, Keys};
use crate::store::{Store, StoreError};

const HEAD_LABEL: &[u8] = b"tokenvault.audit.head.v1";
/// version | sequence | chain | mac
const ANCHOR_LEN: usize = 4 + 8 + 32 + 32;
/// Checkpoints go to the keyservice at most this often.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub sequence: u64,
    pub chain: [u8; 32],
}

/// What the store's anchor says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// A head whose MAC verifies.
    Head(Head),
    /// An anchor written by an older vault: a sequence number without MAC or chain.
    Legacy(u64),
    /// An anchor that does not verify (altered, or MACed under a key no longer held),
    /// with the sequence number it claims, if it has one.
    Altered(Option<u64>),
}

fn head_mac(key: &SecretKey, head: &Head) -> [u8; 32] {
    envelope::hmac_sha256(
        key,
        &[HEAD_LABEL, &head.sequence.to_be_bytes(), &head.chain],
    )
}

impl Head {
    /// The anchor bytes of this head, MACed under the active audit key.
    pub fn anchor(&self, keys: &KeySet) -> Vec<u8> {
        let (version, key) = keys.audit.active();
        let mut bytes = Vec::with_capacity(ANCHOR_LEN);
        bytes.extend_from_slice(&version.to_be_bytes());
        bytes.extend_from_slice(&self.sequence.to_be_bytes());
        bytes.extend_from_slice(&self.chain);
        bytes.extend_from_slice(&head_mac(key, self));
        bytes
    }

    /// Whichever of two heads is further along (the first on a tie).
    pub fn highest(a: Option<Head>, b: Option<Head>) -> Option<Head> {
        match (a, b) {
            (Some(a), Some(b)) if b.sequence > a.sequence => Some(b),
            (Some(a), _) => Some(a),
            (None, b) => b,
        }
    }
}

impl Anchor {
    pub fn decode(bytes: &[u8], keys: &KeySet) -> Anchor {
        if let Ok(legacy) = <[u8; 8]>::try_from(bytes) {
            return Anchor::Legacy(u64::from_be_bytes(legacy));
        }
        let (Some(version), Some(sequence), Some(chain), Some(mac)) = (
            bytes.get(..4),
            bytes.get(4..12),
            bytes.get(12..44),
            bytes.get(44..),
        ) else {
            return Anchor::Altered(None);
        };
        let head = Head {
            sequence: u64::from_be_bytes(sequence.try_into().unwrap_or_default()),
            chain: chain.try_into().unwrap_or_default(),
        };
        let version = u32::from_be_bytes(version.try_into().unwrap_or_default());
        match keys.audit.get(version) {
            Some(key) if bytes.len() == ANCHOR_LEN && head_mac(key, &head).as_slice() == mac => {
                Anchor::Head(head)
            }
            _ => Anchor::Altered(Some(head.sequence)),
        }
    }

    /// The sequence number the anchor says was written.
    pub fn sequence(&self) -> Option<u64> {
        match self {
            Anchor::Head(head) => Some(head.sequence),
            Anchor::Legacy(sequence) => Some(*sequence),
            Anchor::Altered(sequence) => *sequence,
        }
    }
}

/// What the keyservice keeps for this vault: its checkpoint, and the gaps in its log
/// that two admins acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kept {
    pub head: Option<Head>,
    pub acknowledged: Vec<Acknowledged>,
    /// Gaps this vault reported finding.
    pub found: Vec<(u64, u64)>,
    /// The heads of the identity's other nodes (node name, head), when asked for.
    pub others: Vec<(String, Head)>,
}

impl Kept {
    /// The other nodes' heads: all of them, or only those of `writers` (the vaults
    /// that write this log, where several share it).
    pub fn other_heads<'a>(
        &'a self,
        writers: Option<&'a [String]>,
    ) -> impl Iterator<Item = Head> + 'a {
        self.others
            .iter()
            .filter(move |(node, _)| writers.is_none_or(|writers| writers.contains(node)))
            .map(|(_, head)| *head)
    }
}

/// The `meta` keys under which the vaults sharing a log (PostgreSQL) name themselves,
/// by the node name their checkpoints are kept under: only their checkpoints count as
/// heads of this log. Vaults of one identity on another database are left out.
pub const LOG_WRITERS: &str = "audit-writer/";

/// Names this vault among the writers of its shared log (see [`LOG_WRITERS`]).
pub async fn register_writer<S: Store>(store: &S, node: &str) -> Result<(), StoreError> {
    store
        .put_meta(&format!("{LOG_WRITERS}{node}"), Vec::new())
        .await
}

/// The vaults writing this log, where several share it.
pub async fn log_writers<S: Store>(store: &S) -> Result<Vec<String>, StoreError> {
    store.list_meta(LOG_WRITERS).await
}

/// Entries `first..=last` missing from the log, acknowledged under dual control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acknowledged {
    pub first: u64,
    pub last: u64,
    /// "proposer, approver".
    pub by: String,
}

/// This vault's checkpoint at the keyservice, and its acknowledged gaps.
pub async fn checkpoint(keys: &Keys, node: &str) -> Result<Kept, tonic::Status> {
    checkpoints(keys, node, false).await
}

/// [`checkpoint`], with `other_nodes` also the heads of the identity's other nodes (for
/// vaults sharing one chain).
pub async fn checkpoints(
    keys: &Keys,
    node: &str,
    other_nodes: bool,
) -> Result<Kept, tonic::Status> {
    let kept = keys
        .keyservice()
        .get_audit_checkpoint(pb::GetAuditCheckpointRequest {
            node: node.to_owned(),
            other_nodes,
        })
        .await?
        .into_inner();
    let head = head_of(&kept);
    let others = kept
        .other_nodes
        .iter()
        .filter_map(|other| head_of(other).map(|head| (other.node.clone(), head)))
        .collect();
    let acknowledged = kept
        .acknowledged_gaps
        .into_iter()
        .map(|gap| Acknowledged {
            first: gap.first_sequence,
            last: gap.last_sequence,
            by: format!("{}, {}", gap.proposed_by, gap.approved_by),
        })
        .collect();
    let found = kept
        .found_gaps
        .into_iter()
        .map(|gap| (gap.first_sequence, gap.last_sequence))
        .collect();
    Ok(Kept {
        head,
        acknowledged,
        found,
        others,
    })
}

fn head_of(kept: &pb::AuditCheckpoint) -> Option<Head> {
    match (kept.sequence, <[u8; 32]>::try_from(kept.chain.as_slice())) {
        // Sequence numbers are int8 in PostgreSQL; the keyservice refuses larger ones.
        (0, _) | (_, Err(_)) => None,
        (sequence, _) if sequence > i64::MAX as u64 => None,
        (sequence, Ok(chain)) => Some(Head { sequence, chain }),
    }
}

/// Sends each new durable head to the keyservice as this vault's checkpoint, with the
/// gaps found, at most once a second (so within a second of any call), until
/// `shutdown`. A head that cannot be sent is sent with the next. While a gap is not
/// acknowledged, asks every second whether it is.
pub async fn report_checkpoints(
    keys: Arc<Keys>,
    node: String,
    mut heads: watch::Receiver<Option<Head>>,
    gaps: Arc<Gaps>,
    shutdown: Shutdown,
) {
    let stop = shutdown.wait();
    tokio::pin!(stop);
    let mut sent: Option<Head> = None;
    let mut gaps_sent = 0;
    loop {
        let head = *heads.borrow_and_update();
        let found = gaps.all_found();
        if let Some(head) = head.filter(|head| Some(*head) != sent || found.len() != gaps_sent) {
            // Not after shutdown, which sends the last head itself (`report_last`).
            let mut client = keys.keyservice();
            tokio::select! {
                reported = report(&mut client, &node, head, &found) => match reported {
                    Ok(_) => {
                        sent = Some(head);
                        gaps_sent = found.len();
                    }
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), "audit checkpoint not delivered")
                    }
                },
                _ = &mut stop => return,
            }
        }
        if gaps.unacknowledged().is_some() {
            tokio::select! {
                kept = checkpoint(&keys, &node) => match kept {
                    Ok(kept) => learn(&gaps, &kept),
                    Err(status) => tracing::debug!(code = ?status.code(), "audit gap acknowledgements not read"),
                },
                _ = &mut stop => return,
            }
        }
        // At most once a second, except that a gap found is reported at once.
        tokio::select! {
            () = tokio::time::sleep(CHECKPOINT_EVERY) => {}
            () = gaps.newly_found() => continue,
            _ = &mut stop => return,
        }
        // Waits for a new head (or a retry of an unsent one, or an acknowledgement).
        if sent == *heads.borrow() && gaps.unacknowledged().is_none() {
            tokio::select! {
                changed = heads.changed() => if changed.is_err() { return },
                () = gaps.newly_found() => {}
                _ = &mut stop => return,
            }
        }
    }
}

/// For a vault sharing its log with others (one database): reads their checkpoints
/// every second and raises `floor` to the highest, until `shutdown`.
pub async fn learn_shared_heads<S: Store>(
    store: Arc<S>,
    keys: Arc<Keys>,
    node: String,
    floor: Arc<super::Floor>,
    shutdown: Shutdown,
) {
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        let learnt = async {
            let writers = log_writers(store.as_ref())
                .await
                .map_err(|e| e.to_string())?;
            let kept = checkpoints(&keys, &node, true)
                .await
                .map_err(|status| status.message().to_owned())?;
            Ok::<_, String>(
                kept.other_heads(Some(&writers))
                    .max_by_key(|head| head.sequence),
            )
        };
        tokio::select! {
            learnt = learnt => match learnt {
                Ok(Some(highest)) => floor.raise(highest),
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "the other vaults' audit heads were not read"),
            },
            _ = &mut stop => return,
        }
        tokio::select! {
            () = tokio::time::sleep(CHECKPOINT_EVERY) => {}
            _ = &mut stop => return,
        }
    }
}

async fn report(
    client: &mut crate::keys::Client,
    node: &str,
    head: Head,
    found: &[(u64, u64)],
) -> Result<(), tonic::Status> {
    let report = pb::AuditCheckpoint {
        node: node.to_owned(),
        sequence: head.sequence,
        chain: head.chain.to_vec(),
        found_gaps: found
            .iter()
            .map(|&(first, last)| pb::GapRange {
                first_sequence: first,
                last_sequence: last,
            })
            .collect(),
        ..pb::AuditCheckpoint::default()
    };
    client.report_audit_head(report).await.map(drop)
}

/// Sends the last durable head, once the vault has stopped writing (at shutdown), so
/// that entries of its last second cannot be cut unseen while it is down. Gives up
/// after two seconds: the keyservice may be what is down.
pub async fn report_last(
    mut client: crate::keys::Client,
    node: &str,
    heads: &watch::Receiver<Option<Head>>,
    gaps: &Gaps,
) {
    let Some(head) = *heads.borrow() else {
        return;
    };
    let found = gaps.all_found();
    match tokio::time::timeout(
        Duration::from_secs(2),
        report(&mut client, node, head, &found),
    )
    .await
    {
        Ok(Ok(())) => tracing::debug!(sequence = head.sequence, "last audit head sent"),
        Ok(Err(status)) => {
            tracing::warn!(code = ?status.code(), "the last audit head could not be sent")
        }
        Err(_) => tracing::warn!("the last audit head could not be sent within 2 s"),
    }
}

/// Takes in what the keyservice keeps of this vault's gaps.
pub fn learn(gaps: &Gaps, kept: &Kept) {
    let acknowledged: Vec<(u64, u64)> = kept
        .acknowledged
        .iter()
        .map(|gap| (gap.first, gap.last))
        .collect();
    gaps.learn(&kept.found, &acknowledged);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key set with every purpose at version 1, the audit key from `seed`.
    fn keys(seed: u8) -> KeySet {
        let key = |purpose: pb::KeyPurpose, byte: u8| pb::KeyMaterial {
            purpose: purpose as i32,
            version: 1,
            state: pb::KeyState::Active as i32,
            material: vec![byte; 32],
            deactivated_at_unix_ms: 0,
        };
        KeySet::from_wire(pb::GetKeysResponse {
            keys: vec![
                key(pb::KeyPurpose::CardData, 1),
                key(pb::KeyPurpose::Fingerprint, 2),
                key(pb::KeyPurpose::Cvc, 3),
                key(pb::KeyPurpose::Audit, seed),
            ],
            generation: 1,
        })
        .unwrap()
    }

    /// Control: PCI-10.3.2 (docs/compliance.md).
    /// Attack: forge the log's anchor without the audit key; it does not verify.
    #[test]
    fn an_anchor_verifies_under_its_key_only() {
        let head = Head {
            sequence: 21,
            chain: [7; 32],
        };
        let anchor = head.anchor(&keys(4));
        assert_eq!(Anchor::decode(&anchor, &keys(4)), Anchor::Head(head));
        // Another audit key (a forger's) does not make it.
        assert_eq!(Anchor::decode(&anchor, &keys(5)), Anchor::Altered(Some(21)));
        // A sequence number raised or lowered by hand breaks the MAC.
        let mut lowered = anchor.clone();
        lowered[11] = 3;
        assert_eq!(Anchor::decode(&lowered, &keys(4)), Anchor::Altered(Some(3)));
        assert_eq!(
            Anchor::decode(&anchor[..40], &keys(4)),
            Anchor::Altered(None)
        );
        // What older vaults wrote: the sequence number alone.
        assert_eq!(
            Anchor::decode(&9u64.to_be_bytes(), &keys(4)),
            Anchor::Legacy(9)
        );
    }

    #[test]
    fn the_highest_head_wins() {
        let at = |sequence| {
            Some(Head {
                sequence,
                chain: [sequence as u8; 32],
            })
        };
        assert_eq!(Head::highest(at(3), at(5)), at(5));
        assert_eq!(Head::highest(at(5), at(3)), at(5));
        assert_eq!(Head::highest(None, at(3)), at(3));
        assert_eq!(Head::highest(at(3), None), at(3));
    }
}
