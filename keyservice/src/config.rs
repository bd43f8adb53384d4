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
    /// The sealed keyring file.
    pub keyring_file: PathBuf,
    /// File holding the root key (64 hex characters), mode 0600. It must never be
    /// present on a vault-server host.
    pub root_key_file: PathBuf,
    pub tls: TlsFiles,
    pub access: Access,
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
        if settings.access.vault_identities.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: "access.vault_identities is empty: no vault could fetch keys".into(),
            });
        }
        Ok(settings)
    }
}
