//! The vault: tokenizes card data over mutual-TLS gRPC, keeps it only as AES-256-GCM
//! ciphertext in RocksDB, with keys fetched from the keyservice and held in memory only.
//!
//! Layout (docs/architecture.md has the picture): `api` is the gRPC adapter, the only
//! module that names the wire types; `ops` the use cases, one file per RPC family;
//! below them the domain: `card` and `token` the card data and tokens, `record` the
//! on-disk format, `store` the storage trait and its engines, `keys` the key set and
//! encryption budgets, `cvc` the in-memory CVCs, `forward` the processors, `rewrap` the
//! background re-encryption, `policy` who may do what, `error` the one mapping to gRPC
//! statuses. This file is the composition root: it builds each part from its settings;
//! `tasks` holds the background jobs it starts.
//!
//! Must never depend on the keyservice crate (keys arrive only over the wire) nor
//! expose any API that returns card data.

mod api;
pub mod audit;
pub mod card;
pub mod config;
pub mod cvc;
pub mod error;
pub mod event;
pub mod forward;
pub mod guessing;
pub mod import;
pub mod intake;
pub mod keys;
pub mod lockout;
pub mod metrics;
mod ops;
pub mod policy;
pub mod record;
pub mod refusals;
pub mod rewrap;
pub mod store;
mod tasks;
pub mod token;
pub mod velocity;
mod window;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use runtime::shutdown::Shutdown;
use runtime::tls::{TlsFiles, TlsMaterial};
use tokio::net::TcpListener;

pub use config::Settings;
use store::Engine;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error(transparent)]
    Tls(#[from] runtime::tls::TlsError),
    #[error(transparent)]
    Keys(#[from] keys::KeysError),
    #[error("invalid processor configuration: {0}")]
    Processors(String),
    #[error("cannot open the data directory {path}: {detail}")]
    Storage { path: String, detail: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Reflection(#[from] runtime::grpc::ReflectionError),
    #[error("cannot read or store the keyring generation: {0}")]
    KeyringGeneration(#[from] store::StoreError),
}

/// A vault that holds its keys, has opened its database and bound its port.
#[derive(Debug)]
pub struct Bound {
    listener: TcpListener,
    admin_listener: TcpListener,
    vault: Arc<ops::Vault<Engine>>,
    /// Who may call, and what is recorded of each call.
    guards: api::Guards,
    /// The name of this vault's audit checkpoint at the keyservice, and the durable
    /// heads to send there (`None` when auditing is disabled).
    audit_node: String,
    audit_heads: Option<tokio::sync::watch::Receiver<Option<audit::Head>>>,
    /// Where the heads of the vaults sharing this log go (PostgreSQL only).
    audit_floor: Option<Arc<audit::Floor>>,
    store: Arc<Engine>,
    keys: Arc<keys::Keys>,
    rewrap: Arc<rewrap::Rewrapper<Engine>>,
    /// This vault's name among those sharing a database (PostgreSQL only).
    node: Option<String>,
    /// The store's id at the keyservice, under which its erasures are kept.
    store_id: Vec<u8>,
    purge_interval_secs: u64,
    /// How often refused calls are summed up in the audit log.
    refusal_summary: Duration,
    tls: TlsMaterial,
    limits: config::LimitsSettings,
    grpc_reflection: bool,
}

/// Start-up: policy, TLS material, keys from the keyservice (retrying until they come
/// or `shutdown` fires), then the database, then the port. Nothing is served without
/// keys (the store is opened first: it holds the keyring generation the keys must
/// not be older than).
pub async fn start(settings: &Settings, shutdown: Shutdown) -> Result<Bound, Error> {
    let policy = policy::Policy::load(&settings.policy_file)?;
    let processors =
        forward::Processors::from_settings(&settings.processors).map_err(Error::Processors)?;
    let export_targets = ops::export_targets(&settings.processors).map_err(Error::Processors)?;
    let tls = TlsMaterial::load(&settings.tls)?;
    let keyservice_tls = match &settings.keyservice.ca_file {
        Some(ca_file) => TlsMaterial::load(&TlsFiles {
            ca_file: ca_file.clone(),
            ..settings.tls.clone()
        })?,
        None => tls.clone(),
    };
    // This vault's name among the vaults sharing a database (PostgreSQL only).
    let node = match settings.storage.engine {
        config::EngineKind::Postgres => Some(node_name(settings)?),
        config::EngineKind::Rocksdb => None,
    };
    let store = Arc::new(open_store(settings, node.as_deref()).await?);
    let keys = keys::Keys::connect(
        &settings.keyservice,
        keyservice_tls.client_config(settings.keyservice.server_name()),
        tasks::keyring_generation(store.as_ref()).await?,
        shutdown.clone(),
    )
    .await?;
    tasks::store_keyring_generation(store.as_ref(), keys.generation_floor()).await?;
    // The name the keyservice keeps this vault's audit checkpoint under: configured (or
    // the host's), never read from the data directory, which may be an older copy.
    let audit_node = match (&settings.audit.node_name, &node) {
        (Some(name), _) => name.clone(),
        (None, Some(node)) => node.clone(),
        (None, None) => {
            node_name(settings).unwrap_or_else(|_| format!("vault:{}", settings.listen_addr.port()))
        }
    };
    // Gaps in this vault's audit log: while one is not acknowledged, no card data.
    let gaps = Arc::new(audit::Gaps::default());
    let auditor = if settings.audit.enabled {
        let kept = read_checkpoint(&keys, &audit_node, &shutdown).await?;
        audit::learn(&gaps, &kept);
        if node.is_some() {
            audit::register_writer(store.as_ref(), &audit_node)
                .await
                .map_err(|e| Error::Storage {
                    path: "the database's audit writers".into(),
                    detail: e.to_string(),
                })?;
        }
        Some(
            audit::Auditor::start(
                Arc::clone(&store),
                Arc::clone(&keys),
                &kept,
                node.is_some(),
                Arc::clone(&gaps),
            )
            .await
            .map_err(|e| Error::Storage {
                path: settings.data_dir.display().to_string(),
                detail: e.to_string(),
            })?,
        )
    } else {
        tracing::warn!(
            "[audit] enabled = false: calls are NOT audited; this vault does not meet PCI DSS 10 \
             (use only to measure what auditing costs)"
        );
        None
    };
    let rewrap = Arc::new(rewrap::Rewrapper::new(
        Arc::clone(&store),
        Arc::clone(&keys),
        settings.rewrap.clone(),
    ));
    let listener = TcpListener::bind(settings.listen_addr)
        .await
        .map_err(|source| Error::Bind {
            addr: settings.listen_addr,
            source,
        })?;
    let admin_listener = TcpListener::bind(settings.admin.listen_addr)
        .await
        .map_err(|source| Error::Bind {
            addr: settings.admin.listen_addr,
            source,
        })?;
    let audit_heads = auditor.as_ref().map(audit::Auditor::heads);
    let audit_floor = auditor
        .as_ref()
        .filter(|_| node.is_some())
        .map(audit::Auditor::floor);
    let journal = Arc::new(ops::Journal::new(
        auditor,
        Arc::new(metrics::Metrics::default()),
    ));
    let policy = Arc::new(policy::SharedPolicy::new(policy));
    let lockout = Arc::new(lockout::Lockout::new(settings.lockout.clone()));
    let guessing = guessing::Detector::new(
        settings.guessing.clone(),
        tasks::guessing_bucket_key(store.as_ref()).await?,
    );
    let records = Arc::new(ops::Records::new(
        Arc::clone(&store),
        Arc::clone(&keys),
        Arc::clone(&journal),
        Arc::new(cvc::CvcStore::new(
            Duration::from_secs(settings.forwarding.cvc_ttl_secs),
            cvc::CvcLimits {
                max_total: settings.forwarding.max_cvcs,
                max_per_tenant: settings.forwarding.max_cvcs_per_tenant,
            },
        )),
        guessing,
        ops::RecordSettings {
            tenant_ttl_secs: settings.retention.tenant_ttl_secs.clone(),
            outcome_ttl: Duration::from_secs(settings.forwarding.idempotency_ttl_secs),
            tombstone_ttl: Duration::from_secs(settings.retention.tombstone_days * 86_400),
            max_batch_size: settings.max_batch_size,
            sealed_intake: settings.sealed_intake.clone(),
            tokens: settings.tokens.clone(),
        },
    ));
    let flags = records
        .load_guessing_flags()
        .await
        .map_err(|e| Error::Storage {
            path: "the guessing flags".into(),
            detail: e.to_string(),
        })?;
    if flags > 0 {
        tracing::warn!(
            flags,
            "identities flagged for card guessing (vaultctl blocks list)"
        );
    }
    // A store older than erasures made since (a restore) brings them back: erased
    // again here, before anything is served.
    let store_id = catch_up_erasures(&records, &shutdown).await?;
    let vault = ops::Vault {
        forwarder: ops::Forwarder::new(
            Arc::clone(&records),
            ops::ForwardSettings {
                processors,
                velocity: settings.velocity.clone(),
                idempotency_ttl: Duration::from_secs(settings.forwarding.idempotency_ttl_secs),
            },
        ),
        admin: ops::Admin::new(
            Arc::clone(&records),
            Arc::clone(&rewrap),
            Arc::clone(&policy),
            Arc::clone(&lockout),
            ops::AdminSettings {
                backup_dir: settings.backup_dir.clone(),
                policy_file: settings.policy_file.clone(),
            },
        ),
        audit_log: ops::AuditLog::new(
            Arc::clone(&store),
            Arc::clone(&keys),
            (audit_node.clone(), tls.identity().unwrap_or_default()),
            node.is_some(),
        ),
        exporter: ops::Exporter::new(
            Arc::clone(&records),
            export_targets,
            forward::Processors::from_settings(&settings.processors).map_err(Error::Processors)?,
            settings.export_dir(),
        ),
        importer: ops::Importer::new(
            Arc::clone(&records),
            ops::ImportSettings {
                spool_dir: settings.import_spool_dir(),
                max_file_bytes: settings.import.max_file_mb.saturating_mul(1024 * 1024),
                flag_existing_share: settings.import.flag_existing_share,
                max_cards_per_bucket: settings.import.max_cards_per_bucket,
            },
        ),
        records,
        low_disk_bytes: settings.storage.low_disk_mb.saturating_mul(1024 * 1024),
    };
    Ok(Bound {
        listener,
        admin_listener,
        store,
        keys,
        rewrap,
        node,
        store_id,
        purge_interval_secs: settings.retention.purge_interval_secs,
        grpc_reflection: settings.grpc_reflection,
        vault: Arc::new(vault),
        audit_node,
        audit_heads,
        audit_floor,
        guards: api::Guards {
            policy,
            lockout,
            refusals: Arc::new(refusals::Refusals::default()),
            journal,
            gaps,
        },
        refusal_summary: Duration::from_secs(settings.lockout.summary_secs),
        tls,
        limits: settings.limits.clone(),
    })
}

/// This vault's checkpoint at the keyservice (and its identity's other nodes'), read
/// again until it comes (or `shutdown`
/// fires): a vault that started without it could continue a log restored from an older
/// copy as if nothing were missing. The keyservice answered for the keys a moment ago.
async fn read_checkpoint(
    keys: &keys::Keys,
    node: &str,
    shutdown: &Shutdown,
) -> Result<audit::Kept, Error> {
    let mut wait = Duration::from_millis(100);
    loop {
        match audit::checkpoints(keys, node, true).await {
            Ok(kept) => return Ok(kept),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                return Err(Error::Storage {
                    path: "the keyservice's audit checkpoint".into(),
                    detail: "the keyservice does not keep audit checkpoints: upgrade it \
                             before the vaults"
                        .into(),
                });
            }
            Err(status) => tracing::warn!(
                code = ?status.code(),
                "this vault's audit checkpoint could not be read from the keyservice; \
                 trying again"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.clone().wait() => {
                return Err(Error::Storage {
                    path: "the keyservice's audit checkpoint".into(),
                    detail: "stopped before it could be read".into(),
                });
            }
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// The store's id at the keyservice, once the store reflects every erasure the
/// keyservice keeps for it ([`ops::erasures::catch_up`]), trying again while the
/// keyservice does not answer (until `shutdown`).
async fn catch_up_erasures(
    records: &ops::Records<Engine>,
    shutdown: &Shutdown,
) -> Result<Vec<u8>, Error> {
    let failed = |detail: String| Error::Storage {
        path: "the erasures kept at the keyservice".into(),
        detail,
    };
    let store_id = ops::erasures::store_id(records.store().as_ref())
        .await
        .map_err(|e| failed(e.to_string()))?;
    let mut wait = Duration::from_millis(100);
    loop {
        match ops::erasures::catch_up(records, &store_id).await {
            Ok(_) => return Ok(store_id),
            Err(error::VaultError::Erasures(e)) if !e.contains("upgrade") => tracing::warn!(
                error = %e,
                "the erasures could not be read from the keyservice; trying again"
            ),
            Err(e) => return Err(failed(e.to_string())),
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.clone().wait() => {
                return Err(failed("stopped before they could be read".into()));
            }
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// Offline restore: copies the backup `name` from `backup_dir` into the (absent or
/// empty) data directory. The vault must be stopped; start it afterwards as usual. The
/// restored records need the keyservice's keys, as the originals did. Returns the
/// number of files copied.
pub fn restore_backup(settings: &Settings, name: &str) -> Result<usize, Error> {
    let restore_error = |detail: String| Error::Storage {
        path: settings.data_dir.display().to_string(),
        detail,
    };
    let backup_dir = settings
        .backup_dir
        .as_ref()
        .ok_or_else(|| restore_error("no backup_dir is configured".into()))?;
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(restore_error(format!("invalid backup name {name:?}")));
    }
    let source = backup_dir.join(name);
    if !source.is_dir() {
        return Err(restore_error(format!("no backup at {}", source.display())));
    }
    let data = &settings.data_dir;
    if data.exists()
        && std::fs::read_dir(data)
            .map_err(|e| restore_error(e.to_string()))?
            .next()
            .is_some()
    {
        return Err(restore_error(
            "the data directory is not empty: move it aside first, restore never overwrites".into(),
        ));
    }
    let mut dir = std::fs::DirBuilder::new();
    dir.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut dir, 0o700);
    dir.create(data).map_err(|e| restore_error(e.to_string()))?;
    let mut copied = 0;
    for entry in std::fs::read_dir(&source).map_err(|e| restore_error(e.to_string()))? {
        let entry = entry.map_err(|e| restore_error(e.to_string()))?;
        let target = data.join(entry.file_name());
        std::fs::copy(entry.path(), &target).map_err(|e| restore_error(e.to_string()))?;
        std::fs::File::open(&target)
            .and_then(|f| f.sync_all())
            .map_err(|e| restore_error(e.to_string()))?;
        copied += 1;
    }
    std::fs::File::open(data)
        .and_then(|d| d.sync_all())
        .map_err(|e| restore_error(e.to_string()))?;
    Ok(copied)
}

/// The configured engine: PostgreSQL when the vault has a node name for it, else
/// RocksDB in `data_dir`.
async fn open_store(settings: &Settings, node: Option<&str>) -> Result<Engine, Error> {
    if let (Some(node), Some(postgres)) = (node, &settings.storage.postgres) {
        let store = store::postgres::PgStore::open(postgres, node)
            .await
            .map_err(|e| Error::Storage {
                path: "PostgreSQL (storage.postgres.url)".into(),
                detail: e.to_string(),
            })?;
        return Ok(Engine::Postgres(Box::new(store)));
    }
    let storage_error = |detail: String| Error::Storage {
        path: settings.data_dir.display().to_string(),
        detail,
    };
    let mut dir = std::fs::DirBuilder::new();
    dir.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut dir, 0o700);
    dir.create(&settings.data_dir)
        .map_err(|e| storage_error(e.to_string()))?;
    let tuning = store::rocks::Tuning {
        block_cache_bytes: settings.storage.block_cache_mb.saturating_mul(1024 * 1024),
    };
    let old_audit_dir = settings.old_audit_dir();
    store::rocks::RocksStore::open(
        &settings.data_dir,
        &old_audit_dir,
        record::indexes_of,
        &tuning,
    )
    .map(Engine::Rocks)
    .map_err(|e| storage_error(e.to_string()))
}

/// This vault's name among the vaults sharing a PostgreSQL database:
/// `storage.postgres.node_name`, or the host name and the gRPC port.
fn node_name(settings: &Settings) -> Result<String, Error> {
    if let Some(name) = settings
        .storage
        .postgres
        .as_ref()
        .and_then(|p| p.node_name.clone())
    {
        return Ok(name);
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty());
    match host {
        Some(host) => Ok(format!("{host}:{}", settings.listen_addr.port())),
        None => Err(Error::Storage {
            path: "storage.postgres.node_name".into(),
            detail: "the host name cannot be read: set storage.postgres.node_name".into(),
        }),
    }
}

/// `vault-server migrate`: applies the PostgreSQL schema migrations the database
/// lacks and returns their versions.
pub async fn migrate(settings: &Settings) -> Result<Vec<i32>, Error> {
    let storage_error = |detail: String| Error::Storage {
        path: "PostgreSQL (storage.postgres.url)".into(),
        detail,
    };
    match (settings.storage.engine, &settings.storage.postgres) {
        (config::EngineKind::Postgres, Some(postgres)) => store::postgres::migrate_only(postgres)
            .await
            .map_err(|e| storage_error(e.to_string())),
        _ => Err(storage_error(
            "storage.type is not \"postgres\": RocksDB needs no migration".into(),
        )),
    }
}

/// Health service name whose status says whether the keyservice link is up. While it
/// is NOT_SERVING the vault still serves with the keys it holds (degraded).
pub const KEYSERVICE_LINK_HEALTH: &str = "tokenvault.vault.v1.Vault/keyservice";

/// Health service name that is NOT_SERVING while the data or audit log filesystem has
/// less than `[storage] low_disk_mb` free. The vault still serves (degraded).
pub const STORAGE_HEALTH: &str = "tokenvault.vault.v1.Vault/storage";

impl Bound {
    /// The admin port (`/metrics`, `/healthz`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until `shutdown` fires, then closes the database.
    pub async fn serve(self, shutdown: Shutdown) -> Result<(), Error> {
        let store = Arc::clone(&self.store);
        // A client only (not the key set, whose usage reports hold the store).
        let last_head = self.audit_heads.clone().map(|heads| {
            (
                self.keys.keyservice(),
                self.audit_node.clone(),
                heads,
                Arc::clone(&self.guards.gaps),
            )
        });
        let (keys, store_id) = (Arc::clone(&self.keys), self.store_id.clone());
        let served = self.serve_until(shutdown).await;
        // Every call has ended: what they erased goes to the keyservice now.
        ops::erasures::send_last(store.as_ref(), &keys, &store_id).await;
        drop(keys);
        // Background tasks (key watch, reports, rewrap, audit writer) hold the store
        // and stop on shutdown; the database closes (and its lock is released, for a
        // restart in the same process) only once the last of them has let go.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&store) > 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if Arc::strong_count(&store) > 1 {
            tracing::warn!("background tasks still hold the database after 10 s");
        }
        drop(store);
        // The audit writer has stopped with the store: its last head is final.
        if let Some((client, node, heads, gaps)) = last_head {
            audit::report_last(client, &node, &heads, &gaps).await;
        }
        tracing::info!("vault-server stopped");
        served
    }

    async fn serve_until(self, shutdown: Shutdown) -> Result<(), Error> {
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_service_status(api::SERVICE_NAME, tonic_health::ServingStatus::Serving)
            .await;
        let instance = match tasks::instance_id(self.store.as_ref(), self.node.as_deref()).await {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(error = %e, "cannot read or store this vault's instance id");
                String::new()
            }
        };
        // Only the store and the CVCs: `Keys` keeps this closure, and anything holding
        // the audit log's writer here would keep the writer (and the database) open.
        let store = Arc::clone(&self.store);
        let cvcs = Arc::clone(self.vault.records.cvcs());
        self.keys.spawn_watch(
            instance,
            move || tasks::usage_report(store.as_ref(), &cvcs),
            shutdown.clone(),
        );
        if let Some(floor) = self.audit_floor.clone() {
            tokio::spawn(audit::learn_shared_heads(
                Arc::clone(&self.store),
                Arc::clone(&self.keys),
                self.audit_node.clone(),
                floor,
                shutdown.clone(),
            ));
        }
        if let Some(heads) = self.audit_heads.clone() {
            tokio::spawn(audit::report_checkpoints(
                Arc::clone(&self.keys),
                self.audit_node.clone(),
                heads,
                Arc::clone(&self.guards.gaps),
                shutdown.clone(),
            ));
        }
        tokio::spawn(ops::guessing::refresh_flags(
            Arc::clone(&self.vault.records),
            shutdown.clone(),
        ));
        tokio::spawn(ops::erasures::send_periodically(
            Arc::clone(&self.vault.records),
            self.store_id.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(tasks::report_keyservice_link(
            self.keys.connected(),
            health_reporter.clone(),
        ));
        tokio::spawn(tasks::report_storage(
            Arc::clone(&self.vault),
            health_reporter.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(tasks::audit_key_changes(
            Arc::clone(&self.keys),
            Arc::clone(&self.vault),
            shutdown.clone(),
        ));
        tokio::spawn(tasks::keep_keyring_generation(
            Arc::clone(&self.keys),
            Arc::clone(&self.store),
            shutdown.clone(),
        ));
        tracing::info!(addr = %self.admin_addr(), "admin port serving /metrics and /healthz");
        tokio::spawn(metrics::serve_admin(
            self.admin_listener,
            Arc::clone(&self.vault) as Arc<dyn metrics::Observed>,
            shutdown.clone(),
        ));
        let (refusals, journal) = (
            Arc::clone(&self.guards.refusals),
            Arc::clone(&self.guards.journal),
        );
        let summaries = tokio::spawn(tasks::summarise_refusals(
            Arc::clone(&refusals),
            Arc::clone(&journal),
            self.refusal_summary,
        ));
        tokio::spawn(tasks::purge_periodically(
            Arc::clone(&self.vault),
            Duration::from_secs(self.purge_interval_secs),
            shutdown.clone(),
        ));
        #[cfg(unix)]
        tokio::spawn(tasks::reload_policy_on_sighup(
            Arc::clone(&self.vault),
            shutdown.clone(),
        ));
        if let Err(e) = self.rewrap.resume(shutdown.clone()).await {
            tracing::error!(error = %e, "cannot read the rewrap job state; start it again with `vaultctl keys rewrap`");
        }
        tracing::info!(addr = %self.listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()), "vault-server serving");
        let limits = &self.limits;
        let (incoming, listening) = runtime::accept::incoming(
            self.listener,
            self.tls.server_config()?,
            limits.accept(),
            shutdown.clone(),
        );
        let mut router = tonic::transport::Server::builder()
            .layer(runtime::accept::TrackCallsLayer)
            .timeout(Duration::from_millis(limits.request_timeout_ms))
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(health_service)
            .add_service(api::service(
                self.vault,
                self.guards,
                limits.max_request_bytes,
            ));
        if self.grpc_reflection {
            tracing::warn!(
                "grpc_reflection = true: any mutual-TLS peer can read the services' schema"
            );
            router = runtime::grpc::add_reflection(
                router,
                &[
                    api::FILE_DESCRIPTOR_SET,
                    tonic_health::pb::FILE_DESCRIPTOR_SET,
                ],
            )?;
        }
        let served = router
            .serve_with_incoming_shutdown(incoming, shutdown.wait())
            .await;
        match &served {
            Ok(()) => listening.closed().await,
            Err(_) => listening.abort(),
        }
        // Every call has ended: what was refused since the last summary goes on record.
        summaries.abort();
        tasks::flush_refusals(&refusals, &journal).await;
        served?;
        Ok(())
    }
}
