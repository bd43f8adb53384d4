//! What the admin port shows: the gauges, set from the keyring, the proposals and the
//! usage reports at each scrape, and the health line.

use std::sync::atomic::Ordering;

use super::{Shared, lock, now_unix_ms};
use crate::keyring::{ProposalState, Purpose, State};
use crate::lifecycle;
use crate::metrics::Metrics;

impl Shared {
    /// Sets the gauges from the keyring, the proposals and the usage reports.
    fn refresh_gauges(&self, metrics: &Metrics) {
        let now = now_unix_ms();
        {
            let keyring = lock(&self.keyring);
            metrics.encryptions_leased.clear();
            for purpose in Purpose::ALL {
                let name = purpose.name();
                for state in [
                    State::Active,
                    State::DecryptOnly,
                    State::Retired,
                    State::Destroyed,
                ] {
                    let count = keyring
                        .versions()
                        .iter()
                        .filter(|v| v.purpose == purpose && v.state == state)
                        .count();
                    metrics
                        .key_versions
                        .get_or_create(&crate::metrics::StateLabels {
                            purpose: name,
                            state: lifecycle::state_name(state),
                        })
                        .set(count as i64);
                }
                metrics
                    .active_versions
                    .get_or_create(&crate::metrics::PurposeLabels { purpose: name })
                    .set(keyring.active(purpose).map_or(0, |v| i64::from(v.version)));
            }
            for v in keyring.versions() {
                if v.purpose.is_aead() && v.state != State::Destroyed {
                    metrics
                        .encryptions_leased
                        .get_or_create(&crate::metrics::LeasedLabels {
                            purpose: v.purpose.name(),
                            version: v.version,
                            state: lifecycle::state_name(v.state),
                        })
                        .set(i64::try_from(v.encryptions_leased).unwrap_or(i64::MAX));
                }
            }
            let pending = keyring
                .proposals
                .iter()
                .filter(|p| p.state == ProposalState::Pending && !p.expired(now))
                .count();
            metrics.proposals_pending.set(pending as i64);
        }
        metrics
            .encryption_limit
            .set(i64::try_from(self.lifecycle.max_encryptions_per_version).unwrap_or(i64::MAX));
        let max_age_ms = (self.lifecycle.usage_report_max_age_secs * 1000) as i64;
        let (mut fresh, mut stale) = (0, 0);
        for report in lock(&self.usage).values() {
            if now.saturating_sub(report.at_unix_ms) <= max_age_ms {
                fresh += 1;
            } else {
                stale += 1;
            }
        }
        for (freshness, count) in [("fresh", fresh), ("stale", stale)] {
            metrics
                .usage_reporters
                .get_or_create(&crate::metrics::FreshnessLabels { freshness })
                .set(count);
        }
    }
}

impl runtime::admin::Observed for Shared {
    fn metrics(&self) -> String {
        self.metrics.scrape(|metrics| self.refresh_gauges(metrics))
    }

    fn health(&self) -> (bool, String) {
        if self.save_failing.load(Ordering::Relaxed) {
            (
                true,
                "degraded: the last keyring save failed; rotations, leases and approvals \
                 are refused until the keyring can be saved"
                    .into(),
            )
        } else {
            (true, "serving".into())
        }
    }
}
