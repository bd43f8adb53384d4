//! The gaps this vault knows in its own audit log (entries missing below its head), and
//! whether two admins acknowledged them. While one is not acknowledged the vault refuses
//! card data: the calls' envelope asks here. The keyservice keeps both lists, so a
//! vault restarted on a data directory that no longer shows a gap still knows it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Entries `first..=last`.
pub type Range = (u64, u64);

#[derive(Debug, Default)]
pub struct Gaps {
    inner: Mutex<Inner>,
    /// Whether a gap is open, read by every call without taking the lock.
    open: AtomicBool,
    /// Wakes the checkpoint reporter at once when a gap is found: the keyservice must
    /// hear of it before a restart could forget it.
    found_one: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Inner {
    found: Vec<Range>,
    acknowledged: Vec<Range>,
}

/// An acknowledgement names a gap exactly: a wider one would cover later cuts too.
fn covers(acknowledged: &Range, gap: &Range) -> bool {
    acknowledged == gap
}

impl Gaps {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a gap this vault found (or the keyservice says it found before).
    pub fn found(&self, gap: Range) {
        let mut inner = self.inner();
        if !inner.found.contains(&gap) {
            tracing::error!(
                first = gap.0,
                last = gap.1,
                "the audit log is missing entries: card data is refused until two admins \
                 acknowledge the gap (`vaultctl audit verify` says how)"
            );
            inner.found.push(gap);
            self.open.store(true, Ordering::Release);
            self.found_one.notify_one();
        }
    }

    /// Returns when a gap is found (at once if one was found since the last call).
    pub async fn newly_found(&self) {
        self.found_one.notified().await;
    }

    /// What the keyservice keeps: gaps found before, and those acknowledged.
    pub fn learn(&self, found: &[Range], acknowledged: &[Range]) {
        for gap in found {
            self.found(*gap);
        }
        let mut inner = self.inner();
        for gap in acknowledged {
            if !inner.acknowledged.contains(gap) {
                inner.acknowledged.push(*gap);
            }
        }
        let open = first_open(&inner).is_some();
        self.open.store(open, Ordering::Release);
    }

    /// Every gap found, for the keyservice.
    pub fn all_found(&self) -> Vec<Range> {
        self.inner().found.clone()
    }

    /// The first gap not acknowledged, if any. Cheap when there is none (every call
    /// asks).
    pub fn unacknowledged(&self) -> Option<Range> {
        if !self.open.load(Ordering::Acquire) {
            return None;
        }
        first_open(&self.inner())
    }
}

fn first_open(inner: &Inner) -> Option<Range> {
    inner
        .found
        .iter()
        .filter(|gap| !inner.acknowledged.iter().any(|a| covers(a, gap)))
        .min()
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_blocks_until_an_acknowledgement_covers_it() {
        let gaps = Gaps::default();
        assert_eq!(gaps.unacknowledged(), None);
        gaps.found((5, 9));
        gaps.found((20, 20));
        assert_eq!(gaps.unacknowledged(), Some((5, 9)));
        gaps.learn(&[], &[(5, 8), (1, 9)]);
        assert_eq!(
            gaps.unacknowledged(),
            Some((5, 9)),
            "only the exact range does"
        );
        gaps.learn(&[(5, 9)], &[(5, 9)]);
        assert_eq!(gaps.unacknowledged(), Some((20, 20)));
        gaps.learn(&[], &[(20, 20)]);
        assert_eq!(gaps.unacknowledged(), None);
        assert_eq!(gaps.all_found(), vec![(5, 9), (20, 20)]);
    }
}
