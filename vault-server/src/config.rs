//! Vault settings: a TOML file, validated before any port is bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use runtime::tls::TlsFiles;
use serde::Deserialize;

/// The vault-server configuration file. See `deploy/vault-server.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address of the gRPC (mutual TLS) listener.
    pub listen_addr: SocketAddr,
    /// Answer gRPC server reflection (`grpc.reflection.v1` and `v1alpha`) on the gRPC
    /// port, so that grpcurl, grpcui or Postman can list and call the services without
    /// the .proto files. It serves the schema only, never data, but any peer that passes
    /// mutual TLS can call it, whatever the policy says. Off by default; the dev stack
    /// turns it on.
    #[serde(default)]
    pub grpc_reflection: bool,
    /// RocksDB directory. Holds ciphertext and allowed metadata only. Required with
    /// the RocksDB engine; unused with PostgreSQL.
    #[serde(default)]
    pub data_dir: PathBuf,
    /// Where a vault before the audit log moved into `data_dir` kept it, as a RocksDB
    /// database of its own (default: `data_dir` with `-audit` appended). Read once, at
    /// the first start of this version, to move the log in; unused after that.
    #[serde(default)]
    pub audit_dir: Option<PathBuf>,
    /// The access policy (identities → tenant and permissions).
    pub policy_file: PathBuf,
    /// Where `CreateBackup` writes backups (one directory each). Unset: no backups.
    #[serde(default)]
    pub backup_dir: Option<PathBuf>,
    /// Most cards accepted in one TokenizeBatch call.
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: usize,
    /// Server certificate, key, and the CA that signs accepted clients. The same
    /// certificate is presented to the keyservice as this vault's identity.
    pub tls: TlsFiles,
    pub keyservice: KeyserviceSettings,
    /// CVC and idempotency retention.
    #[serde(default)]
    pub forwarding: crate::forward::settings::ForwardingSettings,
    /// Bounds on what one caller can make the server hold or wait for.
    #[serde(default)]
    pub limits: LimitsSettings,
    #[serde(default)]
    pub rewrap: RewrapSettings,
    #[serde(default)]
    pub audit: AuditSettings,
    #[serde(default)]
    pub retention: RetentionSettings,
    /// `[tokens]`: the shape of each tenant's tokens.
    #[serde(default)]
    pub tokens: TokenSettings,
    #[serde(default)]
    pub lockout: crate::lockout::LockoutSettings,
    #[serde(default)]
    pub velocity: crate::velocity::VelocitySettings,
    #[serde(default)]
    pub guessing: crate::guessing::GuessingSettings,
    /// `[sealed_intake]`: sealed cards' windows and the intake key overlap.
    #[serde(default)]
    pub sealed_intake: crate::intake::IntakeSettings,
    #[serde(default)]
    pub admin: AdminSettings,
    #[serde(default)]
    pub storage: StorageSettings,
    /// `[memory]`: whether all memory must be locked against swapping.
    #[serde(default)]
    pub memory: runtime::harden::MemorySettings,
    /// The processor allowlist: `[[processor]]` entries.
    #[serde(default, rename = "processor")]
    pub processors: Vec<crate::forward::settings::ProcessorSettings>,
    /// `[import]`: bulk import of encrypted card files.
    #[serde(default)]
    pub import: ImportSettings,
    /// `[export]`: card exports to a processor's key.
    #[serde(default)]
    pub export: ExportSettings,
}

/// `[export]`: where export files are written (docs/operations.md, "Moving cards out").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSettings {
    /// Default: beside `data_dir`, named after it with `-export` appended. Required
    /// with PostgreSQL. Files here are encrypted to the processor's key and readable by
    /// the vault's user only.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

/// `[import]`: bulk import of OpenPGP-encrypted card files (docs/operations.md,
/// "Moving cards in").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportSettings {
    /// Where import jobs keep the uploaded file (still encrypted) and their state.
    /// Default: beside `data_dir`, named after it with `-import` appended. Required
    /// with PostgreSQL (no `data_dir`); a job runs on the vault that holds its file.
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// Largest encrypted file accepted.
    #[serde(default = "default_import_max_file_mb")]
    pub max_file_mb: u64,
    /// A job whose rows match cards the tenant holds already, for more than this share
    /// of its rows (0 to 1), is flagged: a warning in the vault's log and in the job's
    /// `ImportFinished` audit event, never to the importers.
    #[serde(default = "default_import_existing_share")]
    pub flag_existing_share: f64,
    /// Most cards of one file that may share a first six and last four (1 to 65,535):
    /// a file with more is refused whole, as a guessing file (imports skip the
    /// guessing detector).
    #[serde(default = "default_import_max_cards_per_bucket")]
    pub max_cards_per_bucket: u16,
}

impl Default for ImportSettings {
    fn default() -> Self {
        Self {
            spool_dir: None,
            max_file_mb: default_import_max_file_mb(),
            flag_existing_share: default_import_existing_share(),
            max_cards_per_bucket: default_import_max_cards_per_bucket(),
        }
    }
}

fn default_import_max_file_mb() -> u64 {
    16 * 1024
}

fn default_import_existing_share() -> f64 {
    0.05
}

fn default_import_max_cards_per_bucket() -> u16 {
    1000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyserviceSettings {
    /// e.g. `https://keys.internal:7443`. Only https is accepted.
    pub endpoint: String,
    /// Name to verify in the keyservice certificate; defaults to the endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// CA that signs the keyservice certificate; defaults to `tls.ca_file`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest wait between two attempts to reach the keyservice (at start-up, and
    /// to re-establish the key watch).
    #[serde(default = "default_max_retry_backoff_ms")]
    pub max_retry_backoff_ms: u64,
    /// How often the vault reports its record count per key version (a destroy
    /// needs a fresh report showing none).
    #[serde(default = "default_usage_report_interval_ms")]
    pub usage_report_interval_ms: u64,
}

/// `[admin]`: the plain-HTTP admin port (`/metrics`, `/healthz`). It serves no card
/// data and no tokens; keep it on loopback or a monitoring network.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    #[serde(default = "default_admin_addr")]
    pub listen_addr: SocketAddr,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            listen_addr: default_admin_addr(),
        }
    }
}

fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

/// `[storage]`: the storage engine's memory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// `rocksdb` (the embedded engine, in `data_dir`) or `postgres` (a database shared
    /// by several vault-servers, `[storage.postgres]`).
    #[serde(default, rename = "type")]
    pub engine: EngineKind,
    /// The PostgreSQL connection (required with `type = "postgres"`).
    #[serde(default)]
    pub postgres: Option<crate::store::postgres::PostgresSettings>,
    /// RocksDB's block cache, shared by every column family; index and filter blocks
    /// are charged to it too, so it bounds the memory reads use whatever the number of
    /// records.
    #[serde(default = "default_block_cache_mb")]
    pub block_cache_mb: usize,
    /// Below this much free space on the data or the audit log filesystem the vault is
    /// degraded: it still serves, and says so in its health (gRPC service
    /// `tokenvault.vault.v1.Vault/storage`, `/healthz`, `vaultctl health`).
    #[serde(default = "default_low_disk_mb")]
    pub low_disk_mb: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    #[default]
    Rocksdb,
    Postgres,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            engine: EngineKind::default(),
            postgres: None,
            block_cache_mb: default_block_cache_mb(),
            low_disk_mb: default_low_disk_mb(),
        }
    }
}

fn default_block_cache_mb() -> usize {
    128
}

fn default_low_disk_mb() -> u64 {
    256
}

/// `[retention]`: token lifetimes and the purge job.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Lifetime of a tenant's tokens when `Tokenize` names none, e.g.
    /// `tenant_ttl_secs = { "shop-eu" = 63072000 }`. Unlisted tenants: forever.
    #[serde(default)]
    pub tenant_ttl_secs: HashMap<String, u64>,
    /// How often expired tokens are purged and deleted records compacted away.
    #[serde(default = "default_purge_interval_secs")]
    pub purge_interval_secs: u64,
    /// How long a deleted token is remembered, as a keyed id (never the token): within
    /// it, looking the token up answers NOT_FOUND without counting towards the
    /// lockout (a service whose customers deleted saved cards is not probing).
    #[serde(default = "default_tombstone_days")]
    pub tombstone_days: u64,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            tenant_ttl_secs: Default::default(),
            purge_interval_secs: default_purge_interval_secs(),
            tombstone_days: default_tombstone_days(),
        }
    }
}

fn default_tombstone_days() -> u64 {
    90
}

fn default_purge_interval_secs() -> u64 {
    60
}

/// `[tokens]`: which tenants get card-shaped tokens by default, and which keep the
/// card's first six digits in them. See docs/api.md ("Token formats").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// The format of a tenant's new tokens when `Tokenize` leaves it unspecified, e.g.
    /// `tenant_default_format = { "shop-eu" = "card" }`. Unlisted tenants: `opaque`.
    #[serde(default)]
    pub tenant_default_format: HashMap<String, crate::token::Format>,
    /// Tenants whose card-shaped tokens keep the card's first six digits as well as its
    /// last four. A 16-digit card then leaves 6 digits to draw: 9 x 10^5 tokens per
    /// first six and last four (fewer for shorter cards), so the vault can run out of
    /// them (RESOURCE_EXHAUSTED). Unlisted tenants keep the last four only.
    #[serde(default)]
    pub keep_first_six_tenants: Vec<String>,
}

impl TokenSettings {
    /// The format of the tenant's tokens when a call names none.
    pub fn default_format(&self, tenant: &str) -> crate::token::Format {
        self.tenant_default_format
            .get(tenant)
            .copied()
            .unwrap_or(crate::token::Format::Opaque)
    }

    pub fn keeps_first_six(&self, tenant: &str) -> bool {
        self.keep_first_six_tenants.iter().any(|t| t == tenant)
    }

    fn validate(&self) -> Result<(), String> {
        for tenant in self.tenant_default_format.keys() {
            crate::policy::Tenant::parse(tenant).map_err(|why| {
                format!("tokens.tenant_default_format: {tenant:?} is not a tenant name: {why}")
            })?;
        }
        let mut seen = std::collections::HashSet::new();
        for tenant in &self.keep_first_six_tenants {
            crate::policy::Tenant::parse(tenant).map_err(|why| {
                format!("tokens.keep_first_six_tenants: {tenant:?} is not a tenant name: {why}")
            })?;
            if !seen.insert(tenant) {
                return Err(format!(
                    "tokens.keep_first_six_tenants: {tenant:?} is listed twice"
                ));
            }
        }
        Ok(())
    }
}

/// `[audit]`: the tamper-evident audit log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// Only for measuring what auditing costs: a vault without its audit log does not
    /// meet PCI DSS 10 and says so in its log at start.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The name the keyservice keeps this vault's audit checkpoint under, beside its
    /// certificate identity (default: `storage.postgres.node_name`, else the host name
    /// and the gRPC port). Keep it stable across restarts and unique per vault.
    #[serde(default)]
    pub node_name: Option<String>,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            node_name: None,
        }
    }
}

fn default_true() -> bool {
    true
}

/// `[rewrap]`: the background re-encryption onto the active key versions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewrapSettings {
    /// Most records re-encrypted per second, so that rewrap never starves live
    /// traffic of disk or CPU.
    #[serde(default = "default_rewrap_rate")]
    pub rate_per_sec: u32,
    /// Records read and written per step (one durable write each).
    #[serde(default = "default_rewrap_batch")]
    pub batch_size: u32,
}

impl Default for RewrapSettings {
    fn default() -> Self {
        Self {
            rate_per_sec: default_rewrap_rate(),
            batch_size: default_rewrap_batch(),
        }
    }
}

fn default_rewrap_rate() -> u32 {
    5_000
}
fn default_rewrap_batch() -> u32 {
    256
}
fn default_usage_report_interval_ms() -> u64 {
    5_000
}

/// `[limits]`: message size, time and concurrency bounds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSettings {
    /// Largest request message accepted; larger ones are refused before decoding.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Deadline of every call on the server side (forwards included).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// A client that has not finished its TLS handshake by then is disconnected
    /// (slowloris).
    #[serde(default = "default_tls_handshake_timeout_ms")]
    pub tls_handshake_timeout_ms: u64,
    /// Concurrent calls on one connection.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Established connections at most; a new one beyond closes the connection idle
    /// the longest (see `runtime::accept`). Each costs a file descriptor: keep it well
    /// under the process's open-files limit (`LimitNOFILE` in the systemd unit).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// TLS handshakes in progress at most; a new connection beyond closes the oldest
    /// one still in its handshake.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// A connection with no call in flight for this long is closed.
    #[serde(default = "default_idle_secs")]
    pub idle_secs: u64,
}

impl LimitsSettings {
    pub fn accept(&self) -> runtime::accept::Limits {
        runtime::accept::Limits {
            max_connections: self.max_connections,
            max_handshakes: self.max_handshakes,
            handshake_timeout: std::time::Duration::from_millis(self.tls_handshake_timeout_ms),
            idle: std::time::Duration::from_secs(self.idle_secs),
        }
    }
}

impl Default for LimitsSettings {
    fn default() -> Self {
        Self {
            max_request_bytes: default_max_request_bytes(),
            request_timeout_ms: default_request_timeout_ms(),
            tls_handshake_timeout_ms: default_tls_handshake_timeout_ms(),
            max_concurrent_streams: default_max_concurrent_streams(),
            max_connections: default_max_connections(),
            max_handshakes: default_max_handshakes(),
            idle_secs: default_idle_secs(),
        }
    }
}

fn default_max_connections() -> usize {
    runtime::accept::Limits::default().max_connections
}
fn default_max_handshakes() -> usize {
    runtime::accept::Limits::default().max_handshakes
}
fn default_idle_secs() -> u64 {
    runtime::accept::Limits::default().idle.as_secs()
}

fn default_max_request_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_request_timeout_ms() -> u64 {
    60_000
}
fn default_tls_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_max_concurrent_streams() -> u32 {
    256
}

fn default_max_batch_size() -> usize {
    1000
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_max_retry_backoff_ms() -> u64 {
    10_000
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl KeyserviceSettings {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn max_retry_backoff(&self) -> Duration {
        Duration::from_millis(self.max_retry_backoff_ms)
    }

    pub fn usage_report_interval(&self) -> Duration {
        Duration::from_millis(self.usage_report_interval_ms.max(100))
    }

    /// The name the keyservice certificate must carry.
    pub fn server_name(&self) -> &str {
        if let Some(name) = &self.server_name {
            return name;
        }
        let rest = self
            .endpoint
            .strip_prefix("https://")
            .unwrap_or(&self.endpoint);
        let authority = rest.split('/').next().unwrap_or(rest);
        match authority.rsplit_once(':') {
            Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
            None => authority,
        }
    }
}

impl Settings {
    /// Reads and validates a config file. Relative paths inside it are taken relative
    /// to the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut settings: Settings =
            toml::from_str(&text).map_err(|e| invalid(e.message().to_owned()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        settings.resolve_relative_paths(base);
        settings.validate().map_err(invalid)?;
        Ok(settings)
    }

    /// Where an older vault kept its audit log (see `audit_dir`).
    pub fn old_audit_dir(&self) -> PathBuf {
        self.audit_dir.clone().unwrap_or_else(|| {
            // By name, not by appending to the path: "data/" must give "data-audit",
            // beside the data directory, never inside it.
            let name = self
                .data_dir
                .file_name()
                .map_or_else(|| "vault".into(), |n| n.to_string_lossy().into_owned());
            self.data_dir.with_file_name(format!("{name}-audit"))
        })
    }

    /// Where import jobs spool their files; `None` without `import.spool_dir` or a
    /// `data_dir` to put it beside.
    pub fn import_spool_dir(&self) -> Option<PathBuf> {
        if let Some(dir) = &self.import.spool_dir {
            return Some(dir.clone());
        }
        if self.data_dir.as_os_str().is_empty() {
            return None;
        }
        let name = self
            .data_dir
            .file_name()
            .map_or_else(|| "vault".into(), |n| n.to_string_lossy().into_owned());
        Some(self.data_dir.with_file_name(format!("{name}-import")))
    }

    /// Where export files go; `None` without `export.dir` or a `data_dir`.
    pub fn export_dir(&self) -> Option<PathBuf> {
        if let Some(dir) = &self.export.dir {
            return Some(dir.clone());
        }
        if self.data_dir.as_os_str().is_empty() {
            return None;
        }
        let name = self
            .data_dir
            .file_name()
            .map_or_else(|| "vault".into(), |n| n.to_string_lossy().into_owned());
        Some(self.data_dir.with_file_name(format!("{name}-export")))
    }

    fn resolve_relative_paths(&mut self, base: &Path) {
        let mut files = vec![
            &mut self.policy_file,
            &mut self.tls.ca_file,
            &mut self.tls.cert_file,
            &mut self.tls.key_file,
        ];
        if let Some(ca) = &mut self.keyservice.ca_file {
            files.push(ca);
        }
        if let Some(dir) = &mut self.export.dir {
            files.push(dir);
        }
        for processor in &mut self.processors {
            files.push(&mut processor.ca_file);
            if let Some(export) = &mut processor.export {
                files.push(&mut export.public_key_file);
            }
            for route in &mut processor.named_routes {
                for secret in route.secret_headers.values_mut() {
                    files.push(&mut secret.file);
                }
            }
        }
        if let Some(dir) = &mut self.backup_dir {
            files.push(dir);
        }
        if let Some(dir) = &mut self.audit_dir {
            files.push(dir);
        }
        if let Some(dir) = &mut self.import.spool_dir {
            files.push(dir);
        }
        if !self.data_dir.as_os_str().is_empty() {
            files.push(&mut self.data_dir);
        }
        if let Some(postgres) = &mut self.storage.postgres {
            files.push(&mut postgres.password_file);
            files.push(&mut postgres.ca_file);
        }
        for file in files {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.keyservice.endpoint.starts_with("https://") {
            return Err("keyservice.endpoint must start with https://".into());
        }
        // The codec refuses larger batches on the wire, before decoding them.
        if !(1..=vault_proto::codec::MAX_BATCH_CARDS).contains(&self.max_batch_size) {
            return Err(format!(
                "max_batch_size must be 1 to {}",
                vault_proto::codec::MAX_BATCH_CARDS
            ));
        }
        if !(0.0..=1.0).contains(&self.import.flag_existing_share) {
            return Err("import.flag_existing_share must be 0 to 1".into());
        }
        if self.import.max_cards_per_bucket == 0 {
            return Err("import.max_cards_per_bucket must be 1 to 65535".into());
        }
        if self.import.max_file_mb == 0 {
            return Err("import.max_file_mb must be greater than 0".into());
        }
        if !(8..=1_048_576).contains(&self.storage.block_cache_mb) {
            return Err("storage.block_cache_mb must be 8 to 1048576".into());
        }
        if self.keyservice.connect_timeout_ms == 0 || self.keyservice.max_retry_backoff_ms == 0 {
            return Err("keyservice timeouts must be greater than 0".into());
        }
        let limits = &self.limits;
        if limits.max_request_bytes < 1024
            || limits.request_timeout_ms == 0
            || limits.tls_handshake_timeout_ms == 0
            || limits.max_concurrent_streams == 0
            || limits.max_connections == 0
            || limits.max_handshakes == 0
            || limits.idle_secs == 0
        {
            return Err(
                "limits: max_request_bytes must be at least 1024 and the others greater than 0"
                    .into(),
            );
        }
        match (self.storage.engine, &self.storage.postgres) {
            (EngineKind::Postgres, None) => {
                return Err(
                    "storage.type = \"postgres\" needs a [storage.postgres] section".into(),
                );
            }
            (EngineKind::Postgres, Some(postgres)) => postgres.validate()?,
            (EngineKind::Rocksdb, Some(_)) => {
                return Err(
                    "[storage.postgres] is set but storage.type is \"rocksdb\": set \
                            storage.type = \"postgres\" to use it"
                        .into(),
                );
            }
            (EngineKind::Rocksdb, None) if self.data_dir.as_os_str().is_empty() => {
                return Err("data_dir is required with storage.type = \"rocksdb\"".into());
            }
            (EngineKind::Rocksdb, None) => {}
        }
        if self.storage.engine == EngineKind::Rocksdb
            && self.old_audit_dir().starts_with(&self.data_dir)
        {
            return Err(
                "audit_dir (where an older vault kept its audit log) must not be data_dir \
                 or inside it"
                    .into(),
            );
        }
        if self.velocity.window_secs == 0 {
            return Err("velocity.window_secs must be greater than 0".into());
        }
        if self.retention.purge_interval_secs == 0 {
            return Err("retention.purge_interval_secs must be greater than 0".into());
        }
        if !(1..=3650).contains(&self.retention.tombstone_days) {
            return Err("retention.tombstone_days must be 1 to 3650".into());
        }
        if let Some((tenant, _)) = self
            .retention
            .tenant_ttl_secs
            .iter()
            .find(|(_, ttl)| **ttl == 0 || **ttl > 3_155_760_000)
        {
            return Err(format!(
                "retention.tenant_ttl_secs.{tenant}: must be 1 to 3155760000 (100 years)"
            ));
        }
        self.tokens.validate()?;
        if self.lockout.max_failures == 0
            || self.lockout.max_unknown_tokens == 0
            || self.lockout.window_secs == 0
            || self.lockout.block_secs == 0
            || self.lockout.summary_secs == 0
        {
            return Err("lockout: every number must be greater than 0".into());
        }
        self.lockout.alert_only_identities()?;
        if self.rewrap.rate_per_sec == 0 || !(1..=10_000).contains(&self.rewrap.batch_size) {
            return Err(
                "rewrap: rate_per_sec must be greater than 0 and batch_size 1 to 10000".into(),
            );
        }
        if self.forwarding.cvc_ttl_secs == 0 || self.forwarding.idempotency_ttl_secs == 0 {
            return Err("forwarding TTLs must be greater than 0".into());
        }
        if self.forwarding.max_cvcs == 0 || self.forwarding.max_cvcs_per_tenant == 0 {
            return Err(
                "forwarding.max_cvcs and max_cvcs_per_tenant must be greater than 0".into(),
            );
        }
        let guessing = &self.guessing;
        if guessing.window_secs == 0
            || guessing.max_cards_per_bucket < 2
            || guessing.find_subject_per_minute == 0
        {
            return Err(
                "guessing: window_secs and find_subject_per_minute must be greater than 0, \
                 max_cards_per_bucket at least 2"
                    .into(),
            );
        }
        self.sealed_intake.validate()?;
        for processor in &self.processors {
            processor.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_config_parses_with_its_rewrap_settings() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/vault-server.toml");
        let settings = Settings::load(&path).unwrap();
        assert_eq!(settings.rewrap.rate_per_sec, 5000);
        assert_eq!(
            settings.keyservice.usage_report_interval(),
            Duration::from_secs(5)
        );
        assert_eq!(settings.admin.listen_addr.port(), 9464);
        assert!(!settings.memory.require_lock);
        assert_eq!(settings.storage.engine, EngineKind::Rocksdb);
    }

    /// The reference config switched to PostgreSQL the way the operations guide says.
    fn on_postgres(storage: &str) -> Result<Settings, ConfigError> {
        let reference = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/vault-server.toml"),
        )
        .unwrap();
        let text = reference
            .replace("type = \"rocksdb\"", "")
            .replace("data_dir = ", "# data_dir = ")
            .replace("\n[memory]\n", &format!("\n{storage}\n[memory]\n"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault-server.toml");
        std::fs::write(&path, text).unwrap();
        Settings::load(&path)
    }

    const POSTGRES: &str = r#"type = "postgres"
[storage.postgres]
url = "host=db1,db2 user=vault dbname=tokenvault target_session_attrs=read-write"
password_file = "db-password"
ca_file = "db-ca.pem"
"#;

    #[test]
    fn a_postgres_config_needs_no_data_dir_and_resolves_its_files() {
        let settings = on_postgres(POSTGRES).unwrap();
        assert_eq!(settings.storage.engine, EngineKind::Postgres);
        let postgres = settings.storage.postgres.unwrap();
        assert!(postgres.password_file.is_absolute());
        assert!(postgres.ca_file.ends_with("db-ca.pem"));
        assert_eq!((postgres.pool_size, postgres.writers), (16, 2));
        assert!(postgres.migrate);
    }

    #[test]
    fn bad_postgres_settings_are_refused_with_the_setting_named() {
        let cases = [
            (
                POSTGRES.replace("user=vault", "user=vault password=hunter2"),
                "password_file",
            ),
            (
                "type = \"postgres\"".to_owned(),
                "needs a [storage.postgres] section",
            ),
            (
                POSTGRES.replace("type = \"postgres\"", "type = \"rocksdb\""),
                "storage.type is \"rocksdb\"",
            ),
            (
                POSTGRES.replace("ca_file", "pool_size = 2\nwriters = 2\nca_file"),
                "writers",
            ),
            (
                POSTGRES.replace("host=db1,db2", "host=db1 port=notaport"),
                "storage.postgres.url",
            ),
            (
                POSTGRES.replace("type = \"postgres\"", "type = \"mysql\""),
                "unknown variant",
            ),
        ];
        for (storage, expected) in cases {
            let error = on_postgres(&storage).unwrap_err().to_string();
            assert!(error.contains(expected), "{storage}: {error}");
            // The password in a refused URL is not repeated back.
            assert!(!error.contains("hunter2"), "{error}");
        }
        let error = on_postgres("").unwrap_err().to_string();
        assert!(error.contains("data_dir is required"), "{error}");
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;
    use crate::token::Format;

    fn with_tokens(section: &str) -> Result<Settings, ConfigError> {
        let reference = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/vault-server.toml"),
        )
        .unwrap();
        let text = reference.replace("\n[memory]\n", &format!("\n{section}\n[memory]\n"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault-server.toml");
        std::fs::write(&path, text).unwrap();
        Settings::load(&path)
    }

    #[test]
    fn token_formats_are_per_tenant_with_opaque_the_default() {
        let settings = with_tokens(
            "[tokens]\ntenant_default_format = { \"shop-eu\" = \"card\", acme = \"opaque\" }\n\
             keep_first_six_tenants = [\"shop-eu\"]",
        )
        .unwrap();
        let tokens = &settings.tokens;
        assert_eq!(tokens.default_format("shop-eu"), Format::Card);
        assert_eq!(tokens.default_format("acme"), Format::Opaque);
        assert_eq!(tokens.default_format("other"), Format::Opaque);
        assert!(tokens.keeps_first_six("shop-eu"));
        assert!(!tokens.keeps_first_six("acme"));
        let none = with_tokens("").unwrap();
        assert_eq!(none.tokens.default_format("shop-eu"), Format::Opaque);
        assert!(!none.tokens.keeps_first_six("shop-eu"));
    }

    #[test]
    fn bad_token_settings_are_refused_with_the_setting_named() {
        for (section, expected) in [
            (
                "[tokens]\ntenant_default_format = { shop = \"digits\" }",
                "unknown variant",
            ),
            (
                "[tokens]\ntenant_default_format = { \"a b\" = \"card\" }",
                "tokens.tenant_default_format",
            ),
            (
                "[tokens]\nkeep_first_six_tenants = [\"\"]",
                "tokens.keep_first_six_tenants",
            ),
            (
                "[tokens]\nkeep_first_six_tenants = [\"a\", \"a\"]",
                "listed twice",
            ),
            ("[tokens]\nkeep_first_six = true", "unknown field"),
        ] {
            let error = with_tokens(section).unwrap_err().to_string();
            assert!(error.contains(expected), "{section}: {error}");
        }
    }
}

#[cfg(test)]
mod audit_dir_tests {
    use super::*;

    #[test]
    fn the_old_audit_dir_is_beside_the_data_dir_whatever_its_spelling() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/vault-server.toml");
        let mut settings = Settings::load(&path).unwrap();
        for data in ["/var/lib/vault/data", "/var/lib/vault/data/"] {
            settings.data_dir = PathBuf::from(data);
            assert_eq!(
                settings.old_audit_dir(),
                PathBuf::from("/var/lib/vault/data-audit")
            );
            assert!(settings.validate().is_ok());
        }
        settings.audit_dir = Some(PathBuf::from("/var/lib/vault/data/audit"));
        assert!(settings.validate().unwrap_err().contains("audit_dir"));
    }
}
