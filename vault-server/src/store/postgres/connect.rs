//! Connections: the connector that opens them (each host of the connection string
//! in turn, each attempt bounded, TLS always on), the pool that keeps them, and the
//! session-level locks held on connections of their own.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool_postgres::ClientWrapper;
use tokio::sync::oneshot;
use tokio_postgres::config::SslMode;

use super::errors::{ConnectError, describe, pg};
use super::settings::PostgresSettings;
use crate::store::StoreError;

/// Session settings of every connection (`session_options`): commits wait for the
/// synchronous standbys whatever the role's defaults say; a transaction left open by a
/// vault that vanished releases its locks; a lock wait ends in an error, not a hang.
/// (A role's `statement_timeout` is left alone: PostgreSQL stops it before a commit,
/// so it cannot cut a commit's wait for the standby; a test checks that.)
fn session_options(commit_timeout_ms: u64) -> String {
    // A lock wait ends well within the commit timeout, so that contention shows as a
    // lock timeout, not as an unconfirmed commit.
    let lock_timeout_ms = (commit_timeout_ms / 2).clamp(100, 20_000);
    format!(
        "-c synchronous_commit=on -c idle_in_transaction_session_timeout=30000 \
         -c lock_timeout={lock_timeout_ms}"
    )
}

/// Opens connections to the database host that accepts writes.
///
/// The hosts of `url` are tried in turn, the one that answered last first, and each
/// attempt (TCP, TLS, authentication, the read-write check) has `connect_timeout_ms`
/// in all. The client library's own timeout covers only TCP, so a host that accepts
/// connections but never answers (a hung server, a stuck proxy) would hold every new
/// connection; here it is passed over like a host that refuses. Serves the pool and
/// the connections of their own that session locks need.
#[derive(Clone)]
pub(super) struct Connector {
    /// One configuration per host, in the order of `url`.
    hosts: Arc<[tokio_postgres::Config]>,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// Longest one host's attempt may take.
    attempt_timeout: Duration,
    /// The host that answered last.
    preferred: Arc<AtomicUsize>,
}

pub(super) type Pool = deadpool::managed::Pool<Connector>;
pub(super) type Object = deadpool::managed::Object<Connector>;

impl Connector {
    pub(super) fn from_settings(settings: &PostgresSettings) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|e| StoreError::Engine(format!("storage.postgres.url: {e}")))?;
        config.password(read_password(&settings.password_file)?.as_slice());
        config.ssl_mode(SslMode::Require);
        config.connect_timeout(Duration::from_millis(settings.connect_timeout_ms));
        // A primary that vanishes without closing its connections (power loss, a cut
        // network) is noticed in seconds, not after the kernel's default of minutes.
        config.keepalives_idle(Duration::from_secs(5));
        config.keepalives_interval(Duration::from_secs(2));
        config.keepalives_retries(3);
        config.tcp_user_timeout(Duration::from_secs(10));
        config.application_name("vault-server");
        // Only a host that accepts writes: after a failover, the new primary.
        config.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        let ours = session_options(settings.commit_timeout_ms);
        let options = match config.get_options() {
            Some(theirs) => format!("{theirs} {ours}"),
            None => ours,
        };
        config.options(&options);
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(&settings.ca_file)?);
        Ok(Self {
            hosts: one_per_host(&config)?.into(),
            tls,
            attempt_timeout: Duration::from_millis(settings.connect_timeout_ms),
            preferred: Arc::default(),
        })
    }

    /// Longest a new connection takes when each host has one address: every host's
    /// attempt.
    pub(super) fn budget(&self) -> Duration {
        self.attempt_timeout * self.hosts.len() as u32
    }

    /// A connection to the first host (the one that answered last, then the others in
    /// order; a random one first with `load_balance_hosts=random`) that accepts it
    /// within the attempt timeout and takes writes. Each address a host name resolves
    /// to is an attempt of its own, so one that swallows packets does not use up the
    /// others' time. The connection task runs on its own.
    pub(super) async fn connect(
        &self,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), ConnectError> {
        let count = self.hosts.len();
        let first = match self.hosts[0].get_load_balance_hosts() {
            tokio_postgres::config::LoadBalanceHosts::Random => random_below(count),
            _ => self.preferred.load(Ordering::Relaxed),
        };
        let mut failures = Vec::with_capacity(count);
        for n in 0..count {
            let host = (first + n) % count;
            let targets = match self.addresses(&self.hosts[host]).await {
                Ok(targets) => targets,
                Err(failure) => {
                    failures.push(format!("{}: {failure}", host_name(&self.hosts[host])));
                    continue;
                }
            };
            for target in targets {
                let attempt = target.connect(self.tls.clone());
                let failure = match tokio::time::timeout(self.attempt_timeout, attempt).await {
                    Ok(Ok((client, connection))) => {
                        self.preferred.store(host, Ordering::Relaxed);
                        let task = tokio::spawn(async move {
                            if let Err(e) = connection.await {
                                tracing::warn!(error = %describe(&e), "database connection ended");
                            }
                        });
                        return Ok((client, task));
                    }
                    Ok(Err(e)) => describe(&e),
                    Err(_) => format!("no answer within {} s", self.attempt_timeout.as_secs_f64()),
                };
                failures.push(format!("{}: {failure}", host_name(&target)));
            }
        }
        Err(ConnectError(format!(
            "no database host took the connection ({})",
            failures.join("; ")
        )))
    }

    /// What to try for one host: each address its name resolves to (the name kept for
    /// TLS), or the configuration as it is when it gives the address or a socket path.
    async fn addresses(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<Vec<tokio_postgres::Config>, String> {
        let (Some(tokio_postgres::config::Host::Tcp(name)), []) =
            (config.get_hosts().first(), config.get_hostaddrs())
        else {
            return Ok(vec![config.clone()]);
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let resolved = tokio::time::timeout(
            self.attempt_timeout,
            tokio::net::lookup_host((name.as_str(), port)),
        )
        .await
        .map_err(|_| "the name was not resolved in time".to_owned())?
        .map_err(|e| format!("the name was not resolved: {e}"))?;
        let mut seen = HashSet::new();
        Ok(resolved
            .filter(|addr| seen.insert(addr.ip()))
            .map(|addr| {
                let mut one = config.clone();
                one.hostaddr(addr.ip());
                one
            })
            .collect())
    }

    /// Takes session advisory lock `key` on a connection of its own, if free. The lock
    /// lasts as long as that connection: the returned guard holds it, and the receiver
    /// fires when the connection ends.
    pub(super) async fn session_lock(
        &self,
        key: i64,
    ) -> Result<Option<(HeldLock, oneshot::Receiver<()>)>, StoreError> {
        let (client, task) = self.connect().await?;
        let (ended, lost) = oneshot::channel();
        tokio::spawn(async move {
            let _ = task.await;
            let _ = ended.send(());
        });
        let held: bool = tokio::time::timeout(
            self.attempt_timeout,
            client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]),
        )
        .await
        .map_err(|_| StoreError::Unavailable("the database did not answer in time".into()))?
        .map_err(pg)?
        .get(0);
        Ok(held.then_some((HeldLock { _client: client }, lost)))
    }
}

impl deadpool::managed::Manager for Connector {
    type Type = ClientWrapper;
    type Error = ConnectError;

    async fn create(&self) -> Result<ClientWrapper, ConnectError> {
        let (client, task) = self.connect().await?;
        Ok(ClientWrapper::new(client, task))
    }

    async fn recycle(
        &self,
        client: &mut ClientWrapper,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<ConnectError> {
        // A broken connection is found by its next statement, which fails as
        // unavailable; a closed one is not handed out again.
        if client.is_closed() {
            return Err(deadpool::managed::RecycleError::message(
                "the connection is closed",
            ));
        }
        Ok(())
    }
}

/// `config` once per host it names (with that host's address and port), everything
/// else the same; `config` itself when it names no host (the client library then says
/// what is missing).
pub(super) fn one_per_host(
    config: &tokio_postgres::Config,
) -> Result<Vec<tokio_postgres::Config>, StoreError> {
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    let ports = config.get_ports();
    let count = hosts.len().max(addrs.len());
    if count == 0 {
        return Ok(vec![config.clone()]);
    }
    if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
        return Err(StoreError::Engine(
            "storage.postgres.url: give one hostaddr per host, or none".into(),
        ));
    }
    let port_of = |n: usize| match ports {
        [] => Ok(None),
        [port] => Ok(Some(*port)),
        ports if ports.len() == count => Ok(Some(ports[n])),
        _ => Err(StoreError::Engine(
            "storage.postgres.url: give one port, or one per host".into(),
        )),
    };
    (0..count)
        .map(|n| {
            let mut one = tokio_postgres::Config::new();
            if let Some(user) = config.get_user() {
                one.user(user);
            }
            if let Some(password) = config.get_password() {
                one.password(password);
            }
            if let Some(dbname) = config.get_dbname() {
                one.dbname(dbname);
            }
            if let Some(options) = config.get_options() {
                one.options(options);
            }
            if let Some(name) = config.get_application_name() {
                one.application_name(name);
            }
            one.ssl_mode(config.get_ssl_mode())
                .ssl_negotiation(config.get_ssl_negotiation());
            match hosts.get(n) {
                Some(tokio_postgres::config::Host::Tcp(host)) => {
                    one.host(host);
                }
                Some(tokio_postgres::config::Host::Unix(path)) => {
                    one.host_path(path);
                }
                None => {}
            }
            if let Some(addr) = addrs.get(n) {
                one.hostaddr(*addr);
            }
            if let Some(port) = port_of(n)? {
                one.port(port);
            }
            if let Some(timeout) = config.get_connect_timeout() {
                one.connect_timeout(*timeout);
            }
            if let Some(timeout) = config.get_tcp_user_timeout() {
                one.tcp_user_timeout(*timeout);
            }
            one.keepalives(config.get_keepalives())
                .keepalives_idle(config.get_keepalives_idle());
            if let Some(interval) = config.get_keepalives_interval() {
                one.keepalives_interval(interval);
            }
            if let Some(retries) = config.get_keepalives_retries() {
                one.keepalives_retries(retries);
            }
            one.target_session_attrs(config.get_target_session_attrs())
                .channel_binding(config.get_channel_binding())
                .load_balance_hosts(config.get_load_balance_hosts());
            Ok(one)
        })
        .collect()
}

/// How an error names the host (and address) of a one-host configuration.
pub(super) fn host_name(config: &tokio_postgres::Config) -> String {
    let addr = config.get_hostaddrs().first();
    let host = match (config.get_hosts().first(), addr) {
        (Some(tokio_postgres::config::Host::Tcp(host)), _) => host.clone(),
        (Some(tokio_postgres::config::Host::Unix(path)), _) => path.display().to_string(),
        (None, Some(addr)) => addr.to_string(),
        (None, None) => "(no host)".into(),
    };
    let host = match config.get_ports().first() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    };
    match (config.get_hosts().first(), addr) {
        (Some(_), Some(addr)) => format!("{host} ({addr})"),
        _ => host,
    }
}

/// A number below `n` (not 0), for a random first host; the first host if the
/// system's randomness fails.
fn random_below(n: usize) -> usize {
    let rng = ring::rand::SystemRandom::new();
    ring::rand::generate::<[u8; 4]>(&rng)
        .map_or(0, |bytes| u32::from_be_bytes(bytes.expose()) as usize % n)
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").finish_non_exhaustive()
    }
}

fn tls_config(ca_file: &Path) -> Result<rustls::ClientConfig, StoreError> {
    let roots = runtime::tls::root_store(ca_file)
        .map_err(|e| StoreError::Engine(format!("storage.postgres.ca_file: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Engine(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The role's password: the first line of a file only its owner may read.
fn read_password(file: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, StoreError> {
    let text = runtime::secret_file::read_owner_only(file)
        .map_err(|e| StoreError::Engine(format!("storage.postgres.password_file: {e}")))?;
    let line = text.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err(StoreError::Engine(format!(
            "storage.postgres.password_file: {} is empty",
            file.display()
        )));
    }
    Ok(zeroize::Zeroizing::new(line.to_vec()))
}

/// A connection whose transaction failed halfway goes back to the pool only once it
/// is rolled back; if it cannot be, it is closed.
pub(super) async fn release_after_failure(client: Object) {
    if client.is_closed() || client.batch_execute("ROLLBACK").await.is_err() {
        drop(Object::take(client));
    }
}

/// A session-level advisory lock held on its own connection: closing the connection
/// (dropping the guard, or the vault dying) releases it.
pub(super) struct HeldLock {
    _client: tokio_postgres::Client,
}

impl std::fmt::Debug for HeldLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeldLock")
    }
}
