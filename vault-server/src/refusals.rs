//! Calls refused before any work because the caller is not in the policy (or shows no
//! usable identity) or is blocked. Each costs a counter, not a durable audit event:
//! any CA-signed certificate can send them, and one event per call would let a tight
//! loop fill the audit disk, after which every tenant is refused. Every
//! `summary_secs`, one audit event per caller and reason says how many there were.

use std::collections::HashMap;
use std::sync::Mutex;

/// Distinct callers counted per period at most; the rest are summed under
/// [`OTHERS`], so that memory stays bounded whatever identities a flood uses.
const MAX_CALLERS: usize = 10_000;
/// The actor of the summary of callers beyond [`MAX_CALLERS`].
pub const OTHERS: &str = "(other callers)";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// No client certificate identity, or one the policy does not list.
    Unlisted,
    /// Blocked by the lockout.
    Blocked,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Unlisted => "unlisted",
            Reason::Blocked => "blocked",
        }
    }
}

/// The refused calls of one caller for one reason in a period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub reason: Reason,
    pub actor: String,
    /// The peer address of the first refused call.
    pub peer: String,
    pub calls: u64,
    pub first_at_unix_ms: i64,
}

#[derive(Debug, Default)]
pub struct Refusals {
    counted: Mutex<HashMap<(Reason, String), Summary>>,
}

impl Refusals {
    pub fn count(&self, reason: Reason, actor: &str, peer: &str, now_unix_ms: i64) {
        let mut counted = self
            .counted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut key = (reason, actor.to_owned());
        if !counted.contains_key(&key) && counted.len() >= MAX_CALLERS {
            key.1 = OTHERS.to_owned();
        }
        counted
            .entry(key)
            .or_insert_with_key(|(reason, actor)| Summary {
                reason: *reason,
                actor: actor.clone(),
                peer: peer.to_owned(),
                calls: 0,
                first_at_unix_ms: now_unix_ms,
            })
            .calls += 1;
    }

    /// Puts a summary back (its audit event could not be written): it is added to the
    /// next period's.
    pub fn restore(&self, summary: Summary) {
        let mut counted = self
            .counted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (summary.reason, summary.actor.clone());
        match counted.get_mut(&key) {
            Some(current) => {
                current.calls += summary.calls;
                current.first_at_unix_ms = current.first_at_unix_ms.min(summary.first_at_unix_ms);
            }
            None => {
                counted.insert(key, summary);
            }
        }
    }

    /// The period's summaries, in a stable order; counting starts again.
    pub fn take(&self) -> Vec<Summary> {
        let counted = std::mem::take(
            &mut *self
                .counted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut summaries: Vec<Summary> = counted.into_values().collect();
        summaries.sort_by(|a, b| (a.reason, &a.actor).cmp(&(b.reason, &b.actor)));
        summaries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_summed_per_caller_and_reason_within_bounded_memory() {
        let refusals = Refusals::default();
        for _ in 0..3 {
            refusals.count(Reason::Unlisted, "uri:spiffe://x/mallory", "10.0.0.9", 5);
        }
        refusals.count(Reason::Blocked, "uri:spiffe://x/mallory", "10.0.0.8", 7);
        let summaries = refusals.take();
        assert_eq!(summaries.len(), 2);
        assert_eq!(
            (
                summaries[0].reason,
                summaries[0].calls,
                summaries[0].peer.as_str()
            ),
            (Reason::Unlisted, 3, "10.0.0.9")
        );
        assert_eq!(
            (summaries[1].reason, summaries[1].calls),
            (Reason::Blocked, 1)
        );
        assert!(refusals.take().is_empty(), "a new period starts empty");
        // A summary whose event could not be written joins the next period's.
        refusals.count(Reason::Blocked, "uri:spiffe://x/mallory", "10.0.0.8", 9);
        refusals.restore(summaries[1].clone());
        let next = refusals.take();
        assert_eq!((next[0].calls, next[0].first_at_unix_ms), (2, 7));

        for n in 0..MAX_CALLERS + 50 {
            refusals.count(Reason::Unlisted, &format!("cn:caller-{n}"), "-", 0);
        }
        let summaries = refusals.take();
        assert_eq!(summaries.len(), MAX_CALLERS + 1);
        let others = summaries.iter().find(|s| s.actor == OTHERS).unwrap();
        assert_eq!(others.calls, 50);
    }
}
