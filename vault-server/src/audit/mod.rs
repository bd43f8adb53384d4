//! The audit log: one event per call (and per policy reload, key change seen, lockout),
//! never card data, append-only in the store and hash-chained: each entry carries
//! HMAC-SHA256(audit key, previous MAC | sequence | event), with the audit key from the
//! keyservice. Someone with the disk alone can edit bytes but cannot recompute the
//! chain; `verify` finds the first entry edited, removed, inserted or moved.
//!
//! Stored entry (the store's `audit` family, keyed by sequence number, big-endian):
//!
//! ```text
//! audit_key_version: u32 | mac: 32 bytes | event as JSON
//! ```
//!
//! One task assigns sequence numbers and MACs and writes everything queued as one
//! durable batch; a caller is answered only once its event is on disk, and an event
//! that cannot be written fails the call (DESIGN.md: no unaudited access). A call that
//! ends with a write (a tokenization) has its event chained in that write instead
//! (`Auditor::riding`): the data and the event that reports it commit together, and
//! the call waits for one commit.

use std::sync::Arc;

use envelope::SecretKey;
use tokio::sync::{mpsc, oneshot, watch};

use crate::keys::{KeySet, Keys};
use crate::store::{AUDIT_HEAD_KEY, AuditSeal, LogEnd, Riding, Sealed, Store, StoreError};

mod gaps;
mod head;

pub use crate::event::{AuditEvent, CallEvent, stored_detail};

pub use gaps::Gaps;
pub use head::{
    Acknowledged, Anchor, Head, Kept, checkpoint, checkpoints, learn, learn_shared_heads,
    log_writers, register_writer, report_checkpoints, report_last,
};

const MAC_LABEL: &[u8] = b"tokenvault.audit.v1";
const HEADER_LEN: usize = 4 + 32;
/// Events written in one batch at most.
const MAX_BATCH: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the audit log could not be written: {0}")]
    Store(#[from] StoreError),
    #[error("the audit log is stopped")]
    Closed,
}

type Pending = (AuditEvent, oneshot::Sender<Result<u64, AuditError>>);

/// Where calls send their events.
#[derive(Debug, Clone)]
pub struct Auditor {
    queue: mpsc::Sender<Pending>,
    heads: watch::Receiver<Option<Head>>,
    chainer: Arc<Chainer>,
}

/// What chains events onto the log's end: for the writing task, and for the events
/// that ride the write of the call they record (`Auditor::riding`).
#[derive(Debug)]
struct Chainer {
    keys: Arc<Keys>,
    gaps: Arc<Gaps>,
    floor: Arc<Floor>,
    /// The durable head, after each append (for the checkpoints).
    heads: watch::Sender<Option<Head>>,
}

/// Where a seal leaves the head it wrote (set when the seal runs).
type HeadOut = Arc<std::sync::Mutex<Option<Head>>>;

/// An event riding a write, to be settled once the write is durable.
#[derive(Debug)]
pub struct Ride {
    head: HeadOut,
    event: Arc<CallEvent>,
}

/// The highest head the other vaults sharing this log (on one database) have reported
/// to the keyservice: they wrote that far, durably, so new entries go after it even if
/// the log's end and its head row were put back to an earlier point meanwhile.
#[derive(Debug, Default)]
pub struct Floor(std::sync::Mutex<Option<Head>>);

impl Floor {
    pub fn raise(&self, head: Head) {
        let mut floor = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *floor = Head::highest(*floor, Some(head));
    }

    fn get(&self) -> Option<Head> {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn mac(key: &SecretKey, previous: &[u8; 32], sequence: u64, event: &[u8]) -> [u8; 32] {
    envelope::hmac_sha256(key, &[MAC_LABEL, previous, &sequence.to_be_bytes(), event])
}

/// Splits a stored entry into key version, MAC and event JSON.
fn split(entry: &[u8]) -> Option<(u32, [u8; 32], &[u8])> {
    let version = u32::from_be_bytes(entry.get(..4)?.try_into().ok()?);
    let mac = entry.get(4..HEADER_LEN)?.try_into().ok()?;
    Some((version, mac, entry.get(HEADER_LEN..)?))
}

impl Auditor {
    /// Continues the chain after the highest head known (the last stored entry, the
    /// store's anchor, this vault's checkpoint at the keyservice) and starts the
    /// writing task, which ends when every `Auditor` handle is dropped.
    ///
    /// The other nodes' checkpoints (`kept.others`) count where the log is theirs too
    /// (`shared_chain`: vaults on one database, those named as its writers), and where
    /// this vault's log is empty
    /// while its identity has logs elsewhere: a data directory wiped and the vault
    /// started under another node name (another port or host) continues after them,
    /// leaving a gap that two admins acknowledge, as does a new vault added under an
    /// identity that already has one.
    pub async fn start<S: Store>(
        store: Arc<S>,
        keys: Arc<Keys>,
        kept: &Kept,
        shared_chain: bool,
        gaps: Arc<Gaps>,
    ) -> Result<Self, StoreError> {
        let last = match store.last_audit().await? {
            Some((sequence, entry)) => {
                let (_, chain, _) = split(&entry).ok_or_else(|| {
                    StoreError::Engine("the last audit entry is malformed".into())
                })?;
                Some(Head { sequence, chain })
            }
            None => None,
        };
        let anchor = store
            .get_meta(AUDIT_HEAD_KEY)
            .await?
            .map(|bytes| Anchor::decode(&bytes, &keys.snapshot()));
        let anchored = match anchor {
            Some(Anchor::Head(head)) => Some(head),
            Some(Anchor::Altered(_)) => {
                tracing::error!(
                    "the audit log's anchor does not verify: it was altered; \
                     `vaultctl audit verify` reports it"
                );
                None
            }
            Some(Anchor::Legacy(_)) | None => None,
        };
        let writers = match shared_chain {
            true => Some(log_writers(store.as_ref()).await?),
            false => None,
        };
        let others = kept
            .other_heads(writers.as_deref())
            .max_by_key(|head| head.sequence);
        let empty = last.is_none() && anchor.is_none();
        let checkpoint = match (shared_chain || empty, others) {
            (true, Some(other)) if Head::highest(kept.head, Some(other)) != kept.head => {
                if !shared_chain {
                    tracing::error!(
                        other_head = other.sequence,
                        "this vault's audit log is empty, but its identity has logs on other \
                         nodes: it goes on after them, and card data is refused until two \
                         admins acknowledge the gap (a new vault under an existing identity \
                         is acknowledged the same way)"
                    );
                }
                Head::highest(kept.head, Some(other))
            }
            _ => kept.head,
        };
        let highest = Head::highest(Head::highest(last, anchored), checkpoint);
        let last_sequence = last.map_or(0, |head| head.sequence);
        let claimed = anchor.and_then(|anchor| anchor.sequence()).unwrap_or(0);
        let ahead = highest.map_or(0, |head| head.sequence).max(claimed);
        if ahead > last_sequence {
            tracing::error!(
                head = ahead,
                last = last_sequence,
                "the audit log ends before the last entry written: it was cut short or \
                 replaced. New entries follow the head, leaving the gap, which \
                 `vaultctl audit verify` reports"
            );
        }
        let (queue, receiver) = mpsc::channel(8192);
        let (heads, watching) = watch::channel(highest);
        // Only a head that verifies makes a gap that stops card data; an older
        // vault's bare anchor is only reported by `verify`.
        let known = highest.map_or(0, |head| head.sequence);
        if known > last_sequence {
            gaps.found((last_sequence + 1, known));
        }
        let chainer = Arc::new(Chainer {
            keys,
            gaps,
            floor: Arc::default(),
            heads,
        });
        tokio::spawn(write_events(store, receiver, Arc::clone(&chainer)));
        let auditor = Self {
            queue,
            heads: watching,
            chainer,
        };
        if ahead > last_sequence {
            // Said in the log itself, as the first entry after the gap.
            let gap = AuditEvent {
                at_unix_ms: runtime::now_unix_ms(),
                actor: "vault".into(),
                peer: "-".into(),
                action: "AuditGap".into(),
                outcome: "found".into(),
                detail: format!(
                    "entries {}..={ahead} are missing: the log ends before its head",
                    last_sequence + 1
                ),
                ..AuditEvent::default()
            };
            if let Err(e) = auditor.record(gap).await {
                tracing::error!(error = %e, "the audit gap could not be recorded");
            }
        }
        Ok(auditor)
    }

    /// Writes `event` durably and returns its sequence number.
    pub async fn record(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((event, reply))
            .await
            .map_err(|_| AuditError::Closed)?;
        answer.await.map_err(|_| AuditError::Closed)?
    }

    /// The durable head, after each append (for the checkpoints).
    pub fn heads(&self) -> watch::Receiver<Option<Head>> {
        self.heads.clone()
    }

    /// Where the other vaults' heads go (see [`Floor`]).
    pub fn floor(&self) -> Arc<Floor> {
        Arc::clone(&self.chainer.floor)
    }

    /// The call's event, to ride the write that finishes the call: `finish` completes
    /// a copy of it from the write's outcomes, or returns false when they do not
    /// finish the call (its event is then written on its own). Settle the ride with
    /// [`Auditor::settle`] once the write is durable.
    pub fn riding<O: ?Sized>(
        &self,
        event: &Arc<CallEvent>,
        finish: impl Fn(&O, &mut AuditEvent) -> bool + Send + Sync + 'static,
    ) -> (Riding<O>, Ride) {
        let head: HeadOut = Arc::default();
        let ride = Ride {
            head: Arc::clone(&head),
            event: Arc::clone(event),
        };
        let chainer = Arc::clone(&self.chainer);
        let succeeded = event.succeeded.clone();
        let riding: Riding<O> = Box::new(move |outcomes: &O| {
            // A write planned again forgets what an earlier try chained.
            *head
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
            let mut event = succeeded.clone();
            finish(outcomes, &mut event).then(|| chainer.seal(vec![event], Arc::clone(&head)))
        });
        (riding, ride)
    }

    /// After the write a ride went with is durable: whether it carried the event (then
    /// the call's envelope writes no other, and the head moves on).
    pub fn settle(&self, ride: Ride) -> bool {
        let head = *ride
            .head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match head {
            Some(head) => {
                self.chainer.published(head);
                ride.event.carried();
                true
            }
            None => false,
        }
    }
}

impl Chainer {
    /// A seal chaining `events` onto the log's end, after the highest head known now
    /// (the log's last entry, its anchor, this vault's own head and the floor),
    /// whichever is furthest: a log cut short is never written over, also by a vault
    /// sharing it that never saw the entries cut (the anchor still names them). The
    /// head it leaves goes to `head_out`.
    fn seal(&self, events: Vec<AuditEvent>, head_out: HeadOut) -> AuditSeal {
        let set = self.keys.snapshot();
        let known = Head::highest(*self.heads.borrow(), self.floor.get());
        let found = Arc::clone(&self.gaps);
        Box::new(move |end: LogEnd| {
            let stored = end.last.map(|(sequence, entry)| Head {
                sequence,
                // Checked at start; a malformed end is reported by `verify`.
                chain: split(&entry).map_or([0u8; 32], |(_, mac, _)| mac),
            });
            // An anchor that does not verify is `verify`'s to report.
            let anchored = match end.anchor.map(|bytes| Anchor::decode(&bytes, &set)) {
                Some(Anchor::Head(head)) => Some(head),
                _ => None,
            };
            let after = Head::highest(Head::highest(stored, known), anchored);
            let (version, key) = set.audit.active();
            let (mut sequence, mut previous) = after.map_or((1, [0u8; 32]), |head| {
                (head.sequence.saturating_add(1), head.chain)
            });
            // Entries are missing between the log's end and the head it continues.
            let gap = after.filter(|head| Some(*head) != stored);
            if let Some(head) = gap {
                let first = stored.map_or(1, |stored| stored.sequence + 1);
                found.found((first, head.sequence));
            }
            let mut entries = Vec::with_capacity(events.len());
            for (i, mut event) in events.into_iter().enumerate() {
                event.sequence = sequence;
                if i == 0
                    && let Some(head) = gap
                {
                    event.chained_on = hex::encode(head.chain);
                }
                // Serializing strings and numbers cannot fail; were it to, the empty
                // event would fail `verify`, not vanish.
                let json = serde_json::to_vec(&event).unwrap_or_default();
                previous = mac(key, &previous, sequence, &json);
                let mut entry = Vec::with_capacity(HEADER_LEN + json.len());
                entry.extend_from_slice(&version.to_be_bytes());
                entry.extend_from_slice(&previous);
                entry.extend_from_slice(&json);
                entries.push((sequence, entry));
                sequence += 1;
            }
            let head = Head {
                sequence: sequence - 1,
                chain: previous,
            };
            *head_out
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(head);
            Sealed {
                entries,
                anchor: head.anchor(&set),
            }
        })
    }

    /// A head now durable: published for the checkpoints unless a later one already
    /// is (writes that ride and the writing task's settle in any order).
    fn published(&self, head: Head) {
        self.heads.send_if_modified(|published| {
            let later = published.is_none_or(|published| head.sequence > published.sequence);
            if later {
                *published = Some(head);
            }
            later
        });
    }
}

async fn write_events<S: Store>(
    store: Arc<S>,
    mut receiver: mpsc::Receiver<Pending>,
    chainer: Arc<Chainer>,
) {
    // After a write failed for an unexpected engine error the log's end on disk is
    // uncertain: stop, refusing every call, until a restart re-reads the last entry.
    let mut broken = false;
    while let Some(first) = receiver.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(pending) => group.push(pending),
                Err(_) => break,
            }
        }
        if broken {
            for (_, reply) in group {
                let _ = reply.send(Err(AuditError::Closed));
            }
            continue;
        }
        let (events, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        // The store runs the seal with the log's end (last entry and anchor), under its
        // lock where several vaults share one log, so the chain never forks.
        let appended: HeadOut = Arc::default();
        let seal = chainer.seal(events, Arc::clone(&appended));
        match store.append_audit(seal).await {
            Ok(sequences) => {
                for (sequence, reply) in sequences.into_iter().zip(replies) {
                    let _ = reply.send(Ok(sequence));
                }
                // The anchor went with the entries; the checkpoint goes to the
                // keyservice.
                let head = *appended
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(head) = head {
                    chainer.published(head);
                }
            }
            // The store reads the log's end again at the next append (on a new
            // connection, or from the reopened database once its disk has room), so a
            // write that failed for these reasons leaves the chain nothing uncertain.
            Err(
                e @ (StoreError::Unavailable(_)
                | StoreError::NoSpace(_)
                | StoreError::NotWritable(_)
                | StoreError::Reopening),
            ) => {
                tracing::error!(error = %e, "audit events could not be written; their calls are refused");
                for reply in replies {
                    let _ = reply.send(Err(AuditError::Store(e.clone())));
                }
            }
            Err(e) => {
                broken = true;
                tracing::error!(error = %e, "audit events could not be written; their calls and every call until a restart are refused");
                for reply in replies {
                    let _ = reply.send(Err(AuditError::Store(e.clone())));
                }
            }
        }
    }
}

/// Decodes stored entries for reading (no verification; `verify` does that).
pub fn decode(entry: &[u8]) -> Option<(u32, AuditEvent)> {
    decode_chained(entry).map(|(version, _, event)| (version, event))
}

/// [`decode`], with the entry's chain value.
pub fn decode_chained(entry: &[u8]) -> Option<(u32, [u8; 32], AuditEvent)> {
    let (version, chain, json) = split(entry)?;
    Some((version, chain, serde_json::from_slice(json).ok()?))
}

/// The result of checking the whole chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Entries checked (gaps not counted).
    pub entries: u64,
    /// The first entry at fault and what is wrong with it (gaps are not faults here:
    /// whether one is acknowledged is the caller's to say).
    pub fault: Option<(u64, &'static str)>,
    /// Entries missing where the writer continued after a head (first, last).
    pub gaps: Vec<(u64, u64)>,
}

/// Whether `event`, stored at `position` after missing entries, is the writer's first
/// entry after a gap: it names the head it chains on, and its MAC is over that.
fn gap_entry(
    set: &KeySet,
    position: u64,
    event: &AuditEvent,
    version: u32,
    stored_mac: [u8; 32],
    json: &[u8],
) -> Option<()> {
    let chained_on: [u8; 32] = hex::decode(&event.chained_on).ok()?.try_into().ok()?;
    let key = set.audit.get(version)?;
    (event.sequence == position && mac(key, &chained_on, position, json) == stored_mac)
        .then_some(())
}

/// Checks every entry in order (sequence numbers without gaps, each event's own
/// sequence matching its position, each MAC over the previous one), then the heads
/// kept elsewhere: the store's anchor and this vault's `checkpoint` at the keyservice
/// must each name an entry of the log with the same chain value. Reports the fault with
/// the lowest sequence number.
pub async fn verify<S: Store>(
    store: &S,
    set: &KeySet,
    checkpoints: &[Head],
) -> Result<Verification, StoreError> {
    let anchor = store
        .get_meta(AUDIT_HEAD_KEY)
        .await?
        .map(|bytes| Anchor::decode(&bytes, set));
    // The heads to check, by sequence number: (sequence, chain value, what a mismatch
    // means).
    let mut heads: Vec<Head> = Vec::new();
    if let Some(Anchor::Head(head)) = anchor {
        heads.push(head);
    }
    heads.extend_from_slice(checkpoints);
    let mut seen: Vec<(u64, [u8; 32])> = Vec::new();
    let mut expected = 1u64;
    let mut previous = [0u8; 32];
    let mut after = 0;
    let mut chain_fault = None;
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    'pages: loop {
        let page = store.read_audit(after, 10_000).await?;
        let Some(last) = page.last().map(|(sequence, _)| *sequence) else {
            break;
        };
        for (i, (position, entry)) in page.iter().enumerate() {
            let Some((version, stored_mac, json)) = split(entry) else {
                chain_fault = Some(if *position == expected {
                    "edited"
                } else {
                    "removed"
                });
                break 'pages;
            };
            let Ok(event) = serde_json::from_slice::<AuditEvent>(json) else {
                chain_fault = Some(if *position == expected {
                    "edited"
                } else {
                    "removed"
                });
                break 'pages;
            };
            if *position != expected {
                // A gap the writer left on purpose: the entry after it names the head
                // it chains on, and its MAC proves that. Anything else is a cut.
                match gap_entry(set, *position, &event, version, stored_mac, json) {
                    Some(()) if *position > expected => {
                        gaps.push((expected, position - 1));
                        if heads.iter().any(|head| head.sequence == *position) {
                            seen.push((*position, stored_mac));
                        }
                        previous = stored_mac;
                        expected = position + 1;
                        continue;
                    }
                    _ => {
                        chain_fault = Some("removed");
                        break 'pages;
                    }
                }
            }
            if event.sequence != expected {
                chain_fault = Some("reordered");
                break 'pages;
            }
            let Some(key) = set.audit.get(version) else {
                chain_fault = Some("unverifiable");
                break 'pages;
            };
            if mac(key, &previous, expected, json) != stored_mac {
                // An entry slipped in pushes the original one down a place.
                let next_is_displaced = page
                    .get(i + 1)
                    .and_then(|(_, next)| decode(next))
                    .is_some_and(|(_, next)| next.sequence == expected);
                chain_fault = Some(if next_is_displaced {
                    "inserted"
                } else {
                    "edited"
                });
                break 'pages;
            }
            if heads.iter().any(|head| head.sequence == expected) {
                seen.push((expected, stored_mac));
            }
            previous = stored_mac;
            expected += 1;
        }
        after = last;
    }
    let entries = expected - 1;
    let mut faults: Vec<(u64, &'static str)> = Vec::new();
    faults.extend(chain_fault.map(|problem| (expected, problem)));
    // Entries missing at the end are "removed" too: a head kept elsewhere says they
    // were written.
    let claimed = anchor.and_then(|anchor| anchor.sequence());
    if claimed.is_some_and(|claimed| claimed >= expected) {
        faults.push((expected, "removed"));
    }
    if let Some(Anchor::Altered(claimed)) = anchor {
        faults.push((claimed.unwrap_or(expected), "head altered"));
    }
    let in_gap = |sequence: u64| {
        gaps.iter()
            .any(|(first, last)| (*first..=*last).contains(&sequence))
    };
    for head in &heads {
        if head.sequence >= expected {
            faults.push((expected, "removed"));
        } else if !in_gap(head.sequence) && !seen.contains(&(head.sequence, head.chain)) {
            faults.push((head.sequence, "replaced"));
        }
    }
    Ok(Verification {
        entries,
        fault: faults.into_iter().min_by_key(|(sequence, _)| *sequence),
        gaps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::rocks::{RocksStore, Tuning};
    use vault_proto::keys::v1 as pb;

    fn keys() -> KeySet {
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
                key(pb::KeyPurpose::Audit, 4),
            ],
            generation: 1,
        })
        .unwrap()
    }

    /// The stored entry `sequence` of `event`, chained on `previous`.
    fn entry(set: &KeySet, previous: &[u8; 32], sequence: u64, event: &AuditEvent) -> Vec<u8> {
        let (version, key) = set.audit.active();
        let json = serde_json::to_vec(&AuditEvent {
            sequence,
            ..event.clone()
        })
        .unwrap();
        let chain = mac(key, previous, sequence, &json);
        [version.to_be_bytes().as_slice(), &chain, &json].concat()
    }

    fn chain_of(entry: &[u8]) -> [u8; 32] {
        split(entry).unwrap().1
    }

    /// A store holding `entries` (sequence, bytes) as its audit log.
    async fn store_with(dir: &std::path::Path, entries: Vec<(u64, Vec<u8>)>) -> RocksStore {
        let store = RocksStore::open(
            &dir.join("data"),
            &dir.join("audit"),
            |_| None,
            &Tuning::default(),
        )
        .unwrap();
        store
            .append_audit(Box::new(move |_| Sealed {
                entries,
                anchor: Vec::new(),
            }))
            .await
            .unwrap();
        store
    }

    /// PCI DSS 10.3.2: each entry's MAC covers the entry before it, which binds it to
    /// its place in this log, not only to its sequence number.
    ///
    /// Control: PCI-10.3.2 (docs/compliance.md).
    /// Attack: vaults that share the keyservice's audit key (replicas, another region's
    /// vault) write entries with the same key and the same sequence numbers; someone with
    /// this vault's disk puts the other log's entry 2 in place of this one's (its MAC is
    /// valid for its key, sequence and event) to swap what happened. `verify` reports it.
    #[tokio::test]
    async fn an_entry_spliced_in_from_another_log_under_the_same_key_is_found() {
        let set = keys();
        let event = |action: &str| AuditEvent {
            action: action.into(),
            outcome: "ok".into(),
            ..AuditEvent::default()
        };
        let first = entry(&set, &[0; 32], 1, &event("Tokenize"));
        let second = entry(&set, &chain_of(&first), 2, &event("Forward"));
        let third = entry(&set, &chain_of(&second), 3, &event("DeleteToken"));
        let other_first = entry(&set, &[0; 32], 1, &event("GetTokenInfo"));
        let other_second = entry(&set, &chain_of(&other_first), 2, &event("GetTokenInfo"));

        let dir = tempfile::tempdir().unwrap();
        let intact = store_with(
            dir.path(),
            vec![(1, first.clone()), (2, second), (3, third.clone())],
        )
        .await;
        assert_eq!(verify(&intact, &set, &[]).await.unwrap().fault, None);

        let dir = tempfile::tempdir().unwrap();
        let spliced = store_with(dir.path(), vec![(1, first), (2, other_second), (3, third)]).await;
        let found = verify(&spliced, &set, &[]).await.unwrap();
        assert_eq!(
            found.fault.map(|(sequence, _)| sequence),
            Some(2),
            "{found:?}"
        );
    }

    #[tokio::test]
    async fn a_gap_the_writer_marked_is_listed_and_the_chain_checked_past_it() {
        let set = keys();
        let event = AuditEvent {
            action: "Tokenize".into(),
            outcome: "ok".into(),
            ..AuditEvent::default()
        };
        let first = entry(&set, &[0; 32], 1, &event);
        let second = entry(&set, &chain_of(&first), 2, &event);
        // Entries 3..=9 missing; 10 names the head of 9 it chains on.
        let head_of_nine = [9u8; 32];
        let marked = AuditEvent {
            chained_on: hex::encode(head_of_nine),
            ..event.clone()
        };
        let tenth = entry(&set, &head_of_nine, 10, &marked);
        let eleventh = entry(&set, &chain_of(&tenth), 11, &event);
        let log = vec![
            (1, first.clone()),
            (2, second.clone()),
            (10, tenth.clone()),
            (11, eleventh.clone()),
        ];

        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path(), log.clone()).await;
        let checkpoint = Head {
            sequence: 11,
            chain: chain_of(&eleventh),
        };
        let found = verify(&store, &set, &[checkpoint]).await.unwrap();
        assert_eq!((found.gaps, found.fault), (vec![(3, 9)], None));

        // The same jump without the mark is a cut.
        let unmarked = entry(&set, &head_of_nine, 10, &event);
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path(), vec![(1, first.clone()), (10, unmarked)]).await;
        let found = verify(&store, &set, &[]).await.unwrap();
        assert_eq!(found.fault, Some((2, "removed")));

        // A mark that names another head than the one its MAC was made over.
        let forged = AuditEvent {
            chained_on: hex::encode([8u8; 32]),
            ..event.clone()
        };
        let forged = entry(&set, &head_of_nine, 10, &forged);
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path(), vec![(1, first.clone()), (10, forged)]).await;
        let found = verify(&store, &set, &[]).await.unwrap();
        assert_eq!(found.fault, Some((2, "removed")));

        // An edit after the gap is still found.
        let mut edited = eleventh.clone();
        let at = edited.len() - 3;
        edited[at] ^= 1;
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(
            dir.path(),
            vec![(1, first), (2, second), (10, tenth), (11, edited)],
        )
        .await;
        let found = verify(&store, &set, &[]).await.unwrap();
        assert_eq!(found.fault, Some((11, "edited")));
    }
}
