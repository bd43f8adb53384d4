//! Prometheus metrics and a plain health check, served over HTTP on the admin port
//! (`[admin] listen_addr`, loopback by default): `GET /metrics` and `GET /healthz`.
//!
//! Labels have low cardinality on purpose: RPC method, status code, processor name and
//! outcome, key purpose and version. Never a token, an identity or an address.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabels {
    pub processor: String,
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub purpose: String,
    pub version: u32,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PurposeLabels {
    pub purpose: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// A fixed name: no allocation per counted event.
    pub kind: &'static str,
}

/// Every metric the vault exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub rpc: runtime::admin::RpcMetrics,
    pub forwards: Family<ForwardLabels, Counter>,
    /// Audit events written, lockouts, velocity flags and card decryptions
    /// (`card_opened`).
    pub events: Family<EventLabels, Counter>,
    /// Set at each scrape from the store and the key set.
    pub records: Family<VersionLabels, Gauge>,
    pub active_versions: Family<PurposeLabels, Gauge>,
    pub keyservice_connected: Gauge,
    pub rewrap_remaining: Gauge,
    pub rewrap_rewritten: Counter,
    pub cvcs_held: Gauge,
    pub storage: StorageGauges,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FilesystemLabels {
    pub filesystem: String,
}

/// The storage engine's figures (`Store::stats`), set at each scrape.
#[derive(Debug, Default)]
pub struct StorageGauges {
    free_bytes: Family<FilesystemLabels, Gauge>,
    table_bytes: Gauge,
    memtable_bytes: Gauge,
    pending_compaction_bytes: Gauge,
    running_compactions: Gauge,
    write_stopped: Gauge,
    delayed_write_rate: Gauge,
    block_cache_bytes: Gauge,
    unreachable: Gauge,
}

impl StorageGauges {
    fn register(&self, registry: &mut Registry) {
        let storage = registry.sub_registry_with_prefix("storage");
        storage.register(
            "free_bytes",
            "Free space on the data and audit log filesystems",
            self.free_bytes.clone(),
        );
        storage.register(
            "table_bytes",
            "Table files on disk",
            self.table_bytes.clone(),
        );
        storage.register(
            "memtable_bytes",
            "Memtables in memory",
            self.memtable_bytes.clone(),
        );
        storage.register(
            "pending_compaction_bytes",
            "Bytes compaction has still to rewrite",
            self.pending_compaction_bytes.clone(),
        );
        storage.register(
            "running_compactions",
            "Compactions running now",
            self.running_compactions.clone(),
        );
        storage.register(
            "write_stopped",
            "1 while writes are stopped because compaction is behind",
            self.write_stopped.clone(),
        );
        storage.register(
            "delayed_write_rate_bytes",
            "Bytes per second writes are slowed to because compaction is behind; 0 if not",
            self.delayed_write_rate.clone(),
        );
        storage.register(
            "block_cache_bytes",
            "Block cache in use ([storage] block_cache_mb bounds it)",
            self.block_cache_bytes.clone(),
        );
        storage.register(
            "unreachable",
            "1 while the database (PostgreSQL) cannot be reached or does not confirm writes; 0 otherwise",
            self.unreachable.clone(),
        );
    }

    pub fn set(&self, stats: &crate::store::StoreStats) {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for (filesystem, free) in [
            ("data", stats.data_free_bytes),
            ("audit", stats.audit_free_bytes),
        ] {
            let Some(free) = free else { continue };
            self.free_bytes
                .get_or_create(&FilesystemLabels {
                    filesystem: filesystem.into(),
                })
                .set(gauge(free));
        }
        self.table_bytes.set(gauge(stats.table_bytes));
        self.memtable_bytes.set(gauge(stats.memtable_bytes));
        self.pending_compaction_bytes
            .set(gauge(stats.pending_compaction_bytes));
        self.running_compactions
            .set(gauge(stats.running_compactions));
        self.write_stopped.set(i64::from(stats.write_stopped));
        self.delayed_write_rate.set(gauge(stats.delayed_write_rate));
        self.block_cache_bytes.set(gauge(stats.block_cache_bytes));
        self.unreachable.set(i64::from(stats.unreachable));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tokenvault");
        let rpc = runtime::admin::RpcMetrics::register(&mut registry);
        let forwards = Family::<ForwardLabels, Counter>::default();
        registry.register(
            "forwards",
            "Forwards by processor and outcome",
            forwards.clone(),
        );
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "events",
            "Audit events written, lockouts, velocity flags and card decryptions, by kind",
            events.clone(),
        );
        let records = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "records",
            "Stored records by key purpose and version",
            records.clone(),
        );
        let active_versions = Family::<PurposeLabels, Gauge>::default();
        registry.register(
            "active_key_version",
            "The active key version of each purpose",
            active_versions.clone(),
        );
        let keyservice_connected = Gauge::default();
        registry.register(
            "keyservice_connected",
            "1 while the key watch stream to the keyservice is up",
            keyservice_connected.clone(),
        );
        let rewrap_remaining = Gauge::default();
        registry.register(
            "rewrap_remaining",
            "Records still to re-encrypt onto the active key versions",
            rewrap_remaining.clone(),
        );
        let rewrap_rewritten = Counter::default();
        registry.register(
            "rewrap_records_rewritten",
            "Records this vault-server re-encrypted since it started (where vaults share a \
             database, the one running the rewrap job)",
            rewrap_rewritten.clone(),
        );
        let cvcs_held = Gauge::default();
        registry.register(
            "cvcs_held",
            "CVCs held in memory (and reserved) now; [forwarding] max_cvcs bounds them, and \
             refusals count as events{kind=\"cvc_store_full\"}",
            cvcs_held.clone(),
        );
        let storage = StorageGauges::default();
        storage.register(&mut registry);
        Self {
            registry,
            storage,
            rpc,
            forwards,
            events,
            records,
            active_versions,
            keyservice_connected,
            rewrap_remaining,
            rewrap_rewritten,
            cvcs_held,
        }
    }
}

impl Metrics {
    pub fn event(&self, kind: &'static str) {
        self.events.get_or_create(&EventLabels { kind }).inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The admin port itself (HTTP, `/metrics` and `/healthz`) is shared with the
/// keyservice and lives in `runtime::admin`.
pub use runtime::admin::{Observed, serve_admin};
