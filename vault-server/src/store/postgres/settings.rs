//! `[storage.postgres]` in the vault config, checked before anything connects.

use std::path::PathBuf;

use serde::Deserialize;

/// `[storage.postgres]` in the vault config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// libpq-style connection string, without a password: `host=db1,db2 port=5432
    /// user=vault dbname=tokenvault target_session_attrs=read-write`, or a
    /// `postgresql://` URL. Several hosts: the first that accepts writes is used.
    pub url: String,
    /// File holding the role's password (only its first line is read).
    pub password_file: PathBuf,
    /// CA certificate(s), PEM, that sign the database servers' certificates. TLS is
    /// always on and the server's name is verified.
    pub ca_file: PathBuf,
    /// Connections this vault opens at most.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Writer tasks, each committing its own group of writes at a time.
    #[serde(default = "default_writers")]
    pub writers: usize,
    /// Longest one host may take to give a new connection (TCP, TLS, authentication),
    /// and the longest wait for a free one.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest a commit may take to be confirmed (a synchronous standby that stopped
    /// answering makes it wait forever): then the calls get UNAVAILABLE and nothing is
    /// acknowledged. Its connection is kept until the database answers for it, and its
    /// writer starts no other commit meanwhile (see `CommitLane`).
    #[serde(default = "default_commit_timeout_ms")]
    pub commit_timeout_ms: u64,
    /// Apply schema migrations at start-up. Off: the vault refuses to start on a
    /// schema older than it needs (run `vault-server migrate`).
    #[serde(default = "default_true")]
    pub migrate: bool,
    /// This vault's name among the vaults sharing the database (its counter slots and
    /// its instance in key usage reports). Default: host name and gRPC port. Must
    /// differ between vaults and stay the same across restarts of one.
    #[serde(default)]
    pub node_name: Option<String>,
}

pub(super) fn default_pool_size() -> usize {
    16
}

pub(super) fn default_writers() -> usize {
    2
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}

pub(super) fn default_commit_timeout_ms() -> u64 {
    30_000
}

fn default_true() -> bool {
    true
}

impl PostgresSettings {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=1024).contains(&self.pool_size) {
            return Err("storage.postgres.pool_size must be 1 to 1024".into());
        }
        if self.writers == 0 || self.writers >= self.pool_size {
            return Err("storage.postgres.writers must be at least 1 and below pool_size".into());
        }
        if self.connect_timeout_ms == 0 || self.commit_timeout_ms == 0 {
            return Err(
                "storage.postgres.connect_timeout_ms and commit_timeout_ms must be greater than 0"
                    .into(),
            );
        }
        let config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| format!("storage.postgres.url is not a connection string: {e}"))?;
        if config.get_password().is_some() {
            return Err("storage.postgres.url must not hold a password: put it in \
                        storage.postgres.password_file"
                .into());
        }
        Ok(())
    }
}
