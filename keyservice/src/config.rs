//! Keyservice settings: a TOML file, validated before any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use runtime::tls::TlsFiles;
use serde::Deserialize;

/// The keyservice configuration file. See `deploy/keyservice.toml`.
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
    /// The sealed keyring file.
    pub keyring_file: PathBuf,
    /// File holding the root key (64 hex characters), mode 0600. It must never be
    /// present on a vault-server host.
    pub root_key_file: PathBuf,
    pub tls: TlsFiles,
    pub access: Access,
    #[serde(default)]
    pub lifecycle: Lifecycle,
    #[serde(default)]
    pub admin: AdminSettings,
    /// `[memory]`: whether all memory must be locked against swapping.
    #[serde(default)]
    pub memory: runtime::harden::MemorySettings,
}

/// `[admin]`: the plain-HTTP admin port (`/metrics`, `/healthz`). It serves no key
/// material and no identities; keep it on loopback (the default) or a monitoring
/// network, never where the keyservice's clients are.
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

/// Beside the vault's 9464, so both fit on one development host.
fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9465))
}

/// `[lifecycle]`: budgets, schedules and dual control.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lifecycle {
    /// Most AES-GCM encryptions under one key version, across all vaults and restarts
    /// (NIST SP 800-38D allows 2^32 with random nonces). When spent, the keyservice
    /// rotates by itself.
    #[serde(default = "default_max_encryptions")]
    pub max_encryptions_per_version: u64,
    /// Encryptions leased to a vault at a time. A vault that crashes loses the unused
    /// rest of its lease (it is never handed out again).
    #[serde(default = "default_lease_size")]
    pub lease_size: u64,
    /// Rotate every purpose whose active version is older than this. Unset: only
    /// manual and budget rotations.
    #[serde(default)]
    pub rotate_after_days: Option<u32>,
    /// How long a dual-control proposal waits for its approval.
    #[serde(default = "default_approval_window_secs")]
    pub approval_window_secs: u64,
    /// A destroy needs a usage report at most this old from every vault that reports.
    #[serde(default = "default_usage_report_max_age_secs")]
    pub usage_report_max_age_secs: u64,
    /// A destroy needs usage reports made at least this long after the version stopped
    /// being active, so that records sealed under it just before (still in flight
    /// then) are counted. Keep it above the vault's request timeout.
    #[serde(default = "default_destroy_grace_secs")]
    pub destroy_grace_secs: u64,
    /// The key operation history (JSON lines). Default: `key-history.jsonl` beside the
    /// keyring file.
    #[serde(default)]
    pub history_file: Option<PathBuf>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            max_encryptions_per_version: default_max_encryptions(),
            lease_size: default_lease_size(),
            rotate_after_days: None,
            approval_window_secs: default_approval_window_secs(),
            usage_report_max_age_secs: default_usage_report_max_age_secs(),
            destroy_grace_secs: default_destroy_grace_secs(),
            history_file: None,
        }
    }
}

fn default_max_encryptions() -> u64 {
    crate::lifecycle::GCM_LIMIT
}
fn default_lease_size() -> u64 {
    100_000
}
fn default_approval_window_secs() -> u64 {
    24 * 60 * 60
}
fn default_usage_report_max_age_secs() -> u64 {
    60
}
fn default_destroy_grace_secs() -> u64 {
    120
}

/// Who may do what. Identities are client-certificate URI SANs (or CNs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// Identities that may fetch key material.
    pub vault_identities: Vec<String>,
    /// Identities that may list key versions (never material).
    #[serde(default)]
    pub admin_identities: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Settings {
    /// Reads and validates a config file. Relative paths inside it are taken relative
    /// to the file's directory, so a config works from any working directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut settings: Settings = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let history = settings
            .lifecycle
            .history_file
            .get_or_insert_with(|| settings.keyring_file.with_file_name("key-history.jsonl"));
        if history.is_relative() {
            *history = base.join(&*history);
        }
        for file in [
            &mut settings.keyring_file,
            &mut settings.root_key_file,
            &mut settings.tls.ca_file,
            &mut settings.tls.cert_file,
            &mut settings.tls.key_file,
        ] {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        let lifecycle = &settings.lifecycle;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        if lifecycle.max_encryptions_per_version == 0
            || lifecycle.max_encryptions_per_version > crate::lifecycle::GCM_LIMIT
        {
            return Err(invalid(format!(
                "lifecycle.max_encryptions_per_version must be 1 to {} (2^32)",
                crate::lifecycle::GCM_LIMIT
            )));
        }
        if lifecycle.lease_size == 0 {
            return Err(invalid("lifecycle.lease_size must be at least 1".into()));
        }
        const TEN_YEARS_SECS: u64 = 10 * 365 * 24 * 60 * 60;
        if [
            lifecycle.approval_window_secs,
            lifecycle.usage_report_max_age_secs,
            lifecycle.destroy_grace_secs,
        ]
        .iter()
        .any(|secs| *secs > TEN_YEARS_SECS)
            || lifecycle.rotate_after_days.is_some_and(|d| d > 3650)
        {
            return Err(invalid(
                "lifecycle: durations must be at most ten years".into(),
            ));
        }
        // Typed: a certificate's CN never passes for a URI (runtime::tls).
        for (list, ids) in [
            ("vault_identities", &mut settings.access.vault_identities),
            ("admin_identities", &mut settings.access.admin_identities),
        ] {
            for (i, id) in ids.iter_mut().enumerate() {
                *id = runtime::tls::configured_identity(id)
                    .map_err(|e| invalid(format!("access.{list}[{i}]: {e}")))?;
            }
        }
        if let Some(both) = settings
            .access
            .vault_identities
            .iter()
            .find(|id| settings.access.admin_identities.contains(id))
        {
            return Err(invalid(format!(
                "access: {both} is both a vault and an admin identity; a vault could then \
                 vouch for its own usage reports and propose a destroy"
            )));
        }
        if lifecycle.rotate_after_days == Some(0) {
            return Err(invalid(
                "lifecycle.rotate_after_days must be at least 1 (or unset)".into(),
            ));
        }
        if settings.admin.listen_addr == settings.listen_addr && settings.listen_addr.port() != 0 {
            return Err(invalid(
                "admin.listen_addr must differ from listen_addr (the gRPC port)".into(),
            ));
        }
        if settings.access.vault_identities.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: "access.vault_identities is empty: no vault could fetch keys".into(),
            });
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Control: NIST-800-57 (docs/compliance.md).
    /// Attack: a shipped reference config whose cryptoperiod setting is silently ignored;
    /// it parses with rotate_after_days = 365.
    #[test]
    fn the_reference_config_parses_with_its_lifecycle_settings() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/keyservice.toml");
        let settings = Settings::load(&path).unwrap();
        assert_eq!(settings.lifecycle.max_encryptions_per_version, 1 << 32);
        assert_eq!(settings.lifecycle.rotate_after_days, Some(365));
        assert_eq!(settings.access.admin_identities.len(), 2);
        assert_eq!(
            settings.admin.listen_addr,
            SocketAddr::from(([127, 0, 0, 1], 9465))
        );
        assert!(settings.memory.require_lock);
    }

    #[test]
    fn admin_and_memory_sections_parse_and_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyservice.toml");
        let minimal = r#"
listen_addr = "127.0.0.1:7443"
keyring_file = "keyring.sealed"
root_key_file = "root.key"
[tls]
ca_file = "ca.pem"
cert_file = "ks.pem"
key_file = "ks.key"
[access]
vault_identities = ["spiffe://test/vault"]
"#;
        std::fs::write(&path, minimal).unwrap();
        let settings = Settings::load(&path).unwrap();
        assert_eq!(settings.admin.listen_addr.port(), 9465);
        assert!(settings.admin.listen_addr.ip().is_loopback());
        assert!(!settings.memory.require_lock);

        std::fs::write(
            &path,
            format!(
                "{minimal}[admin]\nlisten_addr = \"0.0.0.0:9999\"\n[memory]\nrequire_lock = true\n"
            ),
        )
        .unwrap();
        let settings = Settings::load(&path).unwrap();
        assert_eq!(settings.admin.listen_addr.port(), 9999);
        assert!(settings.memory.require_lock);

        std::fs::write(
            &path,
            format!("{minimal}[admin]\nlisten_addr = \"127.0.0.1:7443\"\n"),
        )
        .unwrap();
        let err = Settings::load(&path).unwrap_err().to_string();
        assert!(err.contains("admin.listen_addr"), "{err}");

        std::fs::write(&path, format!("{minimal}[memory]\nlock = true\n")).unwrap();
        assert!(Settings::load(&path).is_err(), "unknown keys are errors");
    }

    /// Control: NIST-800-38D-8.3 (docs/compliance.md).
    /// Attack: configure a lease budget above 2^32 encryptions per key; the config is
    /// refused.
    #[test]
    fn a_budget_above_the_gcm_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyservice.toml");
        let reference = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/keyservice.toml"),
        )
        .unwrap();
        std::fs::write(
            &path,
            reference.replace(
                "max_encryptions_per_version = 4294967296",
                "max_encryptions_per_version = 4294967297",
            ),
        )
        .unwrap();
        let err = Settings::load(&path).unwrap_err().to_string();
        assert!(err.contains("max_encryptions_per_version"), "{err}");
    }
}
