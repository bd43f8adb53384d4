//! The keyservice's Prometheus metrics, served on its admin port
//! (`[admin] listen_addr`, see `runtime::admin`).
//!
//! Labels have low cardinality on purpose: RPC method, status code, key purpose,
//! version and state, rotation reason. Never an identity, a vault instance, a proposal
//! id or anything derived from key material.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PurposeLabels {
    pub purpose: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub purpose: &'static str,
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeasedLabels {
    pub purpose: &'static str,
    pub version: u32,
    /// So that alerts can pick the active version's budget.
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RotationLabels {
    pub purpose: &'static str,
    /// `manual`, `scheduled` or `budget`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FreshnessLabels {
    /// `fresh` (within `usage_report_max_age_secs`) or `stale`.
    pub freshness: &'static str,
}

/// Every metric the keyservice exports. Counters and the histogram are updated as
/// calls happen; gauges are set from the keyring at each scrape.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rpc: runtime::admin::RpcMetrics,
    pub rotations: Family<RotationLabels, Counter>,
    pub keyring_save_failures: Counter,
    /// Checks that found a scheduled rotation due and put it off because a configured
    /// vault identity had not reported its usage yet.
    pub scheduled_rotations_postponed: Counter,
    pub key_versions: Family<StateLabels, Gauge>,
    pub active_versions: Family<PurposeLabels, Gauge>,
    pub encryptions_leased: Family<LeasedLabels, Gauge>,
    pub encryption_limit: Gauge,
    pub proposals_pending: Gauge,
    pub usage_reporters: Family<FreshnessLabels, Gauge>,
    /// One scrape at a time: a refresh clears families that another scrape could be
    /// encoding.
    scraping: std::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tokenvault_keyservice");
        let rpc = runtime::admin::RpcMetrics::register(&mut registry);
        let rotations = Family::<RotationLabels, Counter>::default();
        registry.register(
            "rotations",
            "Key rotations done since start, by purpose and reason (manual, scheduled, budget)",
            rotations.clone(),
        );
        let keyring_save_failures = Counter::default();
        registry.register(
            "keyring_save_failures",
            "Keyring saves that failed since start (the change was refused)",
            keyring_save_failures.clone(),
        );
        let scheduled_rotations_postponed = Counter::default();
        registry.register(
            "scheduled_rotations_postponed",
            "Checks (one a minute) that found a scheduled rotation due and put it off \
             because a configured vault identity has not reported its key usage since start",
            scheduled_rotations_postponed.clone(),
        );
        let key_versions = Family::<StateLabels, Gauge>::default();
        registry.register(
            "key_versions",
            "Key versions by purpose and state",
            key_versions.clone(),
        );
        let active_versions = Family::<PurposeLabels, Gauge>::default();
        registry.register(
            "active_key_version",
            "The active key version of each purpose",
            active_versions.clone(),
        );
        let encryptions_leased = Family::<LeasedLabels, Gauge>::default();
        registry.register(
            "encryptions_leased",
            "AES-GCM encryptions leased to vaults under each version that still has \
             material (an upper bound of the encryptions made)",
            encryptions_leased.clone(),
        );
        let encryption_limit = Gauge::default();
        registry.register(
            "encryption_limit",
            "Most encryptions leased under one AES-GCM key version \
             (lifecycle.max_encryptions_per_version); the keyservice rotates when it is spent",
            encryption_limit.clone(),
        );
        let proposals_pending = Gauge::default();
        registry.register(
            "proposals_pending",
            "Dual-control proposals waiting for a second admin (not expired)",
            proposals_pending.clone(),
        );
        let usage_reporters = Family::<FreshnessLabels, Gauge>::default();
        registry.register(
            "usage_reporters",
            "Vault instances that reported key usage since start, by freshness \
             (fresh: within lifecycle.usage_report_max_age_secs)",
            usage_reporters.clone(),
        );
        Self {
            registry,
            rpc,
            rotations,
            keyring_save_failures,
            scheduled_rotations_postponed,
            key_versions,
            active_versions,
            encryptions_leased,
            encryption_limit,
            proposals_pending,
            usage_reporters,
            scraping: std::sync::Mutex::new(()),
        }
    }
}

impl Metrics {
    /// Counts one answered call and its latency.
    pub fn call(&self, method: &'static str, code: tonic::Code, elapsed: std::time::Duration) {
        self.rpc.call(method, code, elapsed);
    }

    pub fn rotated(&self, purpose: &'static str, reason: &'static str) {
        self.rotations
            .get_or_create(&RotationLabels { purpose, reason })
            .inc();
    }

    /// Sets the gauges with `refresh`, then encodes everything (text exposition
    /// format).
    pub fn scrape(&self, refresh: impl FnOnce(&Self)) -> String {
        let _one_at_a_time = self
            .scraping
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        refresh(self);
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
