//! The PostgreSQL engine: several vault-servers over one database (PostgreSQL with
//! synchronous standbys, or an engine that speaks its protocol). Only this file names
//! PostgreSQL.
//!
//! - Writes go through `writers` tasks per vault, each committing everything queued
//!   as one transaction (group commit, as in the RocksDB engine). A caller is answered
//!   after COMMIT returns, that is after the commit is durable on the primary and, with
//!   `synchronous_standby_names` set, on the synchronous standbys.
//! - Vaults (and writers) serialise on what they share with transaction-scoped
//!   advisory locks on the fingerprint index keys a transaction reads or writes, taken
//!   in one sorted step, then row locks on the records it changes, also sorted: the
//!   fingerprint index cannot get two tokens for one card, and no two transactions
//!   wait on each other in a cycle. A deadlock or a token taken meanwhile by another
//!   vault rolls the group back and it is planned again.
//! - The audit log is one chain for all vaults: an append locks the chain's end,
//!   reads the last entry, and chains onto it in the same transaction.
//! - A lost connection fails the calls in flight with `StoreError::Unavailable`; the
//!   pool opens new connections (to whichever host `target_session_attrs=read-write`
//!   finds) on the next call.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool::Runtime;
use deadpool_postgres::ClientWrapper;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::{
    AuditSeal, Delete, DeleteOutcome, InsertOutcome, JobLock, KeyUse, KeyVersions, NewRecord,
    Rewrite, RewriteOutcome, Store, StoreError, StoreStats,
};
use crate::token::Token;

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

fn default_pool_size() -> usize {
    16
}

fn default_writers() -> usize {
    2
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}

fn default_commit_timeout_ms() -> u64 {
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

/// The schema, in order. Each runs once, in its own transaction, recorded in
/// `schema_migrations`. Never edit a released one: add the next.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "records, fingerprint index, outcomes, meta, audit chain, version counts",
    include_str!("0001_initial.sql"),
)];

/// Advisory lock keys (64-bit, the vault's own range).
const MIGRATION_LOCK: i64 = 0x746f_6b76_0000_0001;
const AUDIT_LOCK: i64 = 0x746f_6b76_0000_0002;
const INDEX_LOCK: i64 = 0x746f_6b76_0000_0003;

const MAX_GROUP: usize = 1024;
/// Records in one write group at most (a group holds a lock per fingerprint key it
/// touches: see `MAX_KEY_LOCKS`).
const MAX_GROUP_RECORDS: usize = 4096;
/// A group touching more fingerprint keys than this takes one exclusive lock on the
/// whole index instead of a lock per key (others take it shared), so that no
/// transaction fills PostgreSQL's lock table (max_locks_per_transaction x
/// connections, shared by the whole server).
const MAX_KEY_LOCKS: usize = 128;
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
const QUEUE_DEPTH: usize = 4096;
/// Tries of one group when it loses a race with another transaction (deadlock,
/// token taken meanwhile, serialization failure).
const GROUP_TRIES: usize = 5;
/// How often the counts other vaults write are read.
const COUNTS_REFRESH: Duration = Duration::from_secs(2);
/// Longest a recount of this vault's counts waits for its write groups in flight.
const RECOUNT_TIMEOUT: Duration = Duration::from_secs(5);

enum Op {
    Insert {
        records: Vec<NewRecord>,
        reply: oneshot::Sender<Result<Vec<InsertOutcome>, StoreError>>,
    },
    Delete {
        delete: Delete,
        reply: oneshot::Sender<Result<DeleteOutcome, StoreError>>,
    },
    Rewrite {
        rewrite: Rewrite,
        reply: oneshot::Sender<Result<RewriteOutcome, StoreError>>,
    },
    PutMeta {
        key: String,
        value: Vec<u8>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    PutOutcome {
        key: Vec<u8>,
        value: Vec<u8>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    RemoveOutcomes {
        keys: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// What one op did, kept until the group commits.
enum Done {
    Insert(Vec<InsertOutcome>),
    Delete(DeleteOutcome),
    Rewrite(RewriteOutcome),
    Unit,
}

impl Op {
    /// Records the op writes (for the group's size).
    fn records(&self) -> usize {
        match self {
            Op::Insert { records, .. } => records.len(),
            Op::RemoveOutcomes { keys, .. } => keys.len(),
            _ => 1,
        }
    }

    /// Sends the op's result (what `try_group` did for it, or the group's error). A
    /// caller that gave up is not waiting for it.
    fn answer(self, result: Result<Done, StoreError>) {
        let mismatch = || StoreError::Engine("mismatched write result".into());
        match self {
            Op::Insert { reply, .. } => {
                let _ = reply.send(result.and_then(|done| match done {
                    Done::Insert(outcomes) => Ok(outcomes),
                    _ => Err(mismatch()),
                }));
            }
            Op::Delete { reply, .. } => {
                let _ = reply.send(result.and_then(|done| match done {
                    Done::Delete(outcome) => Ok(outcome),
                    _ => Err(mismatch()),
                }));
            }
            Op::Rewrite { reply, .. } => {
                let _ = reply.send(result.and_then(|done| match done {
                    Done::Rewrite(outcome) => Ok(outcome),
                    _ => Err(mismatch()),
                }));
            }
            Op::PutMeta { reply, .. }
            | Op::PutOutcome { reply, .. }
            | Op::RemoveOutcomes { reply, .. } => {
                let _ = reply.send(result.map(drop));
            }
        }
    }
}

type CountMap = BTreeMap<(KeyUse, u32), i64>;

/// Records per key version: this vault's own slots, exact (changed after each commit),
/// and the other vaults', read every `COUNTS_REFRESH`.
#[derive(Debug, Default)]
struct Counts {
    own: Mutex<CountMap>,
    others: Mutex<CountMap>,
    /// Writers hold it shared from before a commit until its deltas are in `own`; a
    /// recount of `own` holds it exclusively, so that it sees no commit half-counted.
    gate: tokio::sync::RwLock<()>,
    /// A commit's outcome was unknown (its answer lost with the connection): `own` is
    /// recounted from the database at the next refresh.
    own_unsure: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Counts {
    fn add(&self, deltas: &CountMap) {
        let mut own = lock(&self.own);
        for (key, delta) in deltas {
            *own.entry(*key).or_insert(0) += delta;
        }
    }

    fn total(&self) -> BTreeMap<(KeyUse, u32), u64> {
        let mut total = lock(&self.own).clone();
        for (key, n) in lock(&self.others).iter() {
            *total.entry(*key).or_insert(0) += n;
        }
        total
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(key, n)| (key, n as u64))
            .collect()
    }
}

/// The PostgreSQL store. Cheap to share; writer tasks end when it is dropped.
#[derive(Debug)]
pub struct PgStore {
    pool: Pool,
    connect: Connector,
    /// The audit log's commits.
    audit_lane: CommitLane,
    /// Dropped with the store: ends the task holding this vault's node name.
    _node_name: oneshot::Sender<()>,
    queue: mpsc::Sender<Op>,
    counts: Arc<Counts>,
    health: Arc<Health>,
}

/// What the store's health (`Store::stats().unreachable`) is made of.
#[derive(Debug, Default)]
struct Health {
    /// The counts refresh every `COUNTS_REFRESH` (or a call) could not reach the
    /// database.
    unreachable: AtomicBool,
    /// The last write group was not confirmed (connection lost, or its commit not
    /// confirmed in time, e.g. a synchronous standby down); cleared by the next
    /// confirmed one.
    unconfirmed: AtomicBool,
    /// This vault lost its node name's lock and has not taken it back.
    node_lost: AtomicBool,
}

impl Health {
    fn troubled(&self) -> bool {
        self.unreachable.load(Ordering::Relaxed)
            || self.unconfirmed.load(Ordering::Relaxed)
            || self.node_lost.load(Ordering::Relaxed)
    }
}

/// One writer task's own settings.
#[derive(Debug, Clone)]
struct Writer {
    /// Its slot in `version_counts`.
    slot: String,
    /// This vault's counts lock: every write group takes it shared, a recount of the
    /// vault's own counts exclusively (see `recount_own`).
    counts_lock: i64,
    lane: CommitLane,
}

/// A commit path (one per writer, one for the audit log) with at most one commit the
/// database has not answered for.
///
/// A commit not confirmed in time may still be waiting for the synchronous standby,
/// its server process with it, and cancelling or ending that process would make the
/// commit visible before the standby has it. So its connection is kept until the
/// database answers for it, and meanwhile the lane starts no other commit: a long
/// standby outage holds one server process per lane, not one more for every call that
/// timed out (which would end in `max_connections` refusing everyone).
#[derive(Debug, Clone)]
struct CommitLane {
    free: Arc<tokio::sync::Mutex<()>>,
    /// See `PostgresSettings::commit_timeout_ms`.
    timeout: Duration,
}

/// The lane taken, for one commit: freed when dropped.
struct InFlight {
    _taken: tokio::sync::OwnedMutexGuard<()>,
}

impl CommitLane {
    fn new(timeout: Duration) -> Self {
        Self {
            free: Arc::default(),
            timeout,
        }
    }

    /// Waits, within the commit timeout, for the lane's unanswered commit (if any).
    async fn enter(&self) -> Result<InFlight, StoreError> {
        match tokio::time::timeout(self.timeout, Arc::clone(&self.free).lock_owned()).await {
            Ok(taken) => Ok(InFlight { _taken: taken }),
            Err(_) => Err(StoreError::Unavailable(format!(
                "the database has not answered for an earlier commit in {} s (is the \
                 synchronous standby answering?)",
                self.timeout.as_secs_f64()
            ))),
        }
    }

    /// The error for a commit not confirmed in time, `what` naming it.
    fn timed_out(&self, what: &str) -> StoreError {
        StoreError::Unavailable(format!(
            "the database did not confirm {what} within {} s (is the synchronous standby \
             answering?)",
            self.timeout.as_secs_f64()
        ))
    }
}

impl InFlight {
    /// Keeps `client`, whose commit timed out, until the database answers for it, then
    /// closes it and frees the lane. The rollback queues behind whatever the
    /// connection was doing: it answers once that has, and ends a transaction whose
    /// COMMIT was never sent.
    fn keep_until_answered(self, client: Object) {
        let client = Object::take(client);
        tokio::spawn(async move {
            match client.batch_execute("ROLLBACK").await {
                Ok(()) => tracing::info!("the database answered for a commit that had timed out"),
                Err(e) => {
                    tracing::warn!(error = %describe(&e), "the connection of a commit that had timed out ended")
                }
            }
            drop(client);
            drop(self);
        });
    }
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
struct Connector {
    /// One configuration per host, in the order of `url`.
    hosts: Arc<[tokio_postgres::Config]>,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// Longest one host's attempt may take.
    attempt_timeout: Duration,
    /// The host that answered last.
    preferred: Arc<AtomicUsize>,
}

/// Why no host gave a connection: what each one did.
#[derive(Debug)]
struct ConnectError(String);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

impl From<ConnectError> for StoreError {
    fn from(e: ConnectError) -> Self {
        StoreError::Unavailable(e.0)
    }
}

type Pool = deadpool::managed::Pool<Connector>;
type Object = deadpool::managed::Object<Connector>;

impl Connector {
    fn from_settings(settings: &PostgresSettings) -> Result<Self, StoreError> {
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
    fn budget(&self) -> Duration {
        self.attempt_timeout * self.hosts.len() as u32
    }

    /// A connection to the first host (the one that answered last, then the others in
    /// order; a random one first with `load_balance_hosts=random`) that accepts it
    /// within the attempt timeout and takes writes. Each address a host name resolves
    /// to is an attempt of its own, so one that swallows packets does not use up the
    /// others' time. The connection task runs on its own.
    async fn connect(
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
    async fn session_lock(
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
fn one_per_host(
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
fn host_name(config: &tokio_postgres::Config) -> String {
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

/// A PostgreSQL error as the store reports it: the SQLSTATE and message only (a
/// message's DETAIL can quote the values of a row).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("database error {}: {}", db.code().code(), db.message()),
        None => format!("database connection: {e}"),
    }
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    let message = describe(&e);
    let Some(db) = e.as_db_error() else {
        // No server answer: the connection broke or could not be opened.
        return StoreError::Unavailable(message);
    };
    let code = db.code();
    if *code == SqlState::DISK_FULL {
        StoreError::NoSpace(message)
    } else if code.code().starts_with("08")
        || code.code().starts_with("57P")
        || code.code().starts_with("28")
        || code.code().starts_with("53")
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
        || *code == SqlState::QUERY_CANCELED
        || *code == SqlState::LOCK_NOT_AVAILABLE
        || *code == SqlState::INVALID_CATALOG_NAME
        || *code == SqlState::INSUFFICIENT_PRIVILEGE
    {
        // Connection trouble, shutdown, failover in progress, a host that is now a
        // standby, the server out of resources (connections, memory, lock table), a
        // lock wait or commit that timed out, or the role refused: nothing was done;
        // another try may succeed once the operator or the database has acted.
        StoreError::Unavailable(message)
    } else {
        StoreError::Engine(message)
    }
}

fn pool_error(e: deadpool::managed::PoolError<ConnectError>) -> StoreError {
    match e {
        deadpool::managed::PoolError::Closed => StoreError::Closed,
        deadpool::managed::PoolError::Backend(e) => e.into(),
        other => StoreError::Unavailable(format!("database connection: {other}")),
    }
}

/// Whether a group that failed with `e` should be planned and tried again.
fn lost_a_race(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|code| {
        *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::UNIQUE_VIOLATION
    })
}

/// The advisory lock key of a fingerprint index key: the first 8 bytes of its
/// SHA-256 (index keys start with the tenant, so their own bytes are not spread).
fn index_lock(index_key: &[u8]) -> i64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, index_key);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    i64::from_be_bytes(first)
}

/// Takes the node name for this process, so that two vaults configured with one name
/// (which would share count slots and a usage-report instance, and could let a key
/// version be destroyed under the other's records) cannot both run. A vault restarted
/// in place may find its predecessor's session still closing: it waits a little.
async fn hold_node_name(
    connect: &Connector,
    node: &str,
    wait: Duration,
    health: Arc<Health>,
) -> Result<oneshot::Sender<()>, StoreError> {
    let key = index_lock(format!("node/{node}").as_bytes());
    let deadline = tokio::time::Instant::now() + wait;
    let (held, lost) = loop {
        if let Some(held) = connect.session_lock(key).await? {
            break held;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::Engine(format!(
                "another vault-server runs as node {node:?} on this database: give each vault \
                 its own storage.postgres.node_name"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (closed, on_close) = oneshot::channel();
    tokio::spawn(keep_node_name(
        connect.clone(),
        node.to_owned(),
        key,
        (held, lost),
        on_close,
        health,
    ));
    Ok(closed)
}

/// Holds the node name until the store is dropped (`on_close`), taking it back when
/// its connection breaks (a database restart, a failover). While it is not held the
/// store's health says so: another vault could start under the name.
async fn keep_node_name(
    connect: Connector,
    node: String,
    key: i64,
    held: (HeldLock, oneshot::Receiver<()>),
    mut on_close: oneshot::Receiver<()>,
    health: Arc<Health>,
) {
    let (mut _lock, mut lost) = held;
    loop {
        tokio::select! {
            _ = &mut on_close => return,
            _ = &mut lost => {}
        }
        health.node_lost.store(true, Ordering::Relaxed);
        tracing::warn!(node = %node, "this vault's hold on its node name was lost with its connection; taking it back");
        loop {
            tokio::select! {
                _ = &mut on_close => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match connect.session_lock(key).await {
                Ok(Some((again, now_lost))) => {
                    (_lock, lost) = (again, now_lost);
                    health.node_lost.store(false, Ordering::Relaxed);
                    tracing::info!(node = %node, "this vault holds its node name again");
                    break;
                }
                Ok(None) => {
                    tracing::error!(node = %node, "another vault-server took this vault's node name: give each vault its own storage.postgres.node_name")
                }
                Err(e) => tracing::debug!(error = %e, "node name not taken back yet"),
            }
        }
    }
}

impl PgStore {
    /// Connects, applies (or, with `migrate` off, checks) the schema, loads the record
    /// counts and starts the writers. `node` names this vault among those sharing the
    /// database.
    pub async fn open(settings: &PostgresSettings, node: &str) -> Result<Self, StoreError> {
        let connect = Connector::from_settings(settings)?;
        let timeout = Duration::from_millis(settings.connect_timeout_ms);
        // A new connection bounds itself (`Connector::connect`: each address within the
        // connect timeout); a call waiting for a free one may wait while another tries
        // every host in turn.
        let pool = Pool::builder(connect.clone())
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(connect.budget() + timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| StoreError::Engine(format!("database pool: {e}")))?;
        let health = Arc::new(Health::default());
        let node_name = hold_node_name(&connect, node, timeout, Arc::clone(&health)).await?;
        {
            let mut client = pool.get().await.map_err(pool_error)?;
            if settings.migrate {
                migrate(&mut client).await?;
            } else {
                check_schema(&client).await?;
            }
        }
        let slots: Vec<String> = (0..settings.writers)
            .map(|i| format!("{node}#{i}"))
            .collect();
        let counts = Arc::new(Counts::default());
        let counts_lock = index_lock(format!("counts/{node}").as_bytes());
        load_counts(&pool, &slots, counts_lock, &counts).await?;
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        let commit_timeout = Duration::from_millis(settings.commit_timeout_ms);
        for slot in &slots {
            let writer = Writer {
                slot: slot.clone(),
                counts_lock,
                lane: CommitLane::new(commit_timeout),
            };
            tokio::spawn(write(
                pool.clone(),
                Arc::clone(&receiver),
                Arc::clone(&counts),
                writer,
                Arc::clone(&health),
            ));
        }
        tokio::spawn(refresh_counts(
            pool.clone(),
            slots,
            counts_lock,
            Arc::downgrade(&counts),
            Arc::clone(&health),
        ));
        Ok(Self {
            pool,
            connect,
            audit_lane: CommitLane::new(commit_timeout),
            _node_name: node_name,
            queue,
            counts,
            health,
        })
    }

    async fn client(&self) -> Result<Object, StoreError> {
        let client = self.pool.get().await.map_err(pool_error);
        if let Err(e) = &client {
            // Only bad news here: a connection from the pool proves nothing yet.
            note(
                &self.health.unreachable,
                Some(e),
                "the database cannot be reached",
            );
        }
        client
    }

    /// One audit append: under the chain's lock, reads the last entry, chains the new
    /// ones onto it, and moves the anchor (`audit::HEAD_KEY`) with them, so that it
    /// never goes backwards whichever vault appends.
    async fn append_audit_once(&self, seal: AuditSeal) -> Result<Vec<u64>, StoreError> {
        let in_flight = self.audit_lane.enter().await?;
        let client = self.client().await?;
        let Ok(appended) =
            tokio::time::timeout(self.audit_lane.timeout, append_audit(&client, seal)).await
        else {
            in_flight.keep_until_answered(client);
            return Err(self.audit_lane.timed_out("an audit commit"));
        };
        if appended.is_err() {
            release_after_failure(client).await;
        }
        appended.map_err(pg)
    }

    async fn submit<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(op(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// Applies the migrations this database lacks, one transaction each, under a lock so
/// that vaults starting together do not race. Refuses a schema newer than this
/// vault-server knows.
async fn migrate(client: &mut Object) -> Result<Vec<i32>, StoreError> {
    let mut applied = Vec::new();
    let transaction = client.transaction().await.map_err(pg)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version integer PRIMARY KEY,
                 description text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(pg)?;
    let have: BTreeSet<i32> = transaction
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(pg)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    refuse_newer(&have)?;
    for (version, description, sql) in MIGRATIONS {
        if have.contains(version) {
            continue;
        }
        transaction.batch_execute(sql).await.map_err(pg)?;
        transaction
            .execute(
                "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
                &[version, description],
            )
            .await
            .map_err(pg)?;
        tracing::info!(version, description, "database schema migrated");
        applied.push(*version);
    }
    transaction.commit().await.map_err(pg)?;
    Ok(applied)
}

fn refuse_newer(have: &BTreeSet<i32>) -> Result<(), StoreError> {
    let known = MIGRATIONS.iter().map(|(v, _, _)| *v).max().unwrap_or(0);
    match have.iter().max() {
        Some(newest) if *newest > known => Err(StoreError::Engine(format!(
            "the database schema is at version {newest}, newer than this vault-server knows \
             ({known}): upgrade the vault-server"
        ))),
        _ => Ok(()),
    }
}

async fn check_schema(client: &Object) -> Result<(), StoreError> {
    let rows = client
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(|e| {
            StoreError::Engine(format!(
                "the database has no vault schema ({}); run `vault-server migrate` or set \
                 storage.postgres.migrate = true",
                pg(e)
            ))
        })?;
    let have: BTreeSet<i32> = rows.iter().map(|row| row.get(0)).collect();
    refuse_newer(&have)?;
    if let Some((missing, _, _)) = MIGRATIONS.iter().find(|(v, _, _)| !have.contains(v)) {
        return Err(StoreError::Engine(format!(
            "the database schema lacks migration {missing}; run `vault-server migrate` or set \
             storage.postgres.migrate = true"
        )));
    }
    Ok(())
}

/// Sets `flag` to whether `error` says the database was unavailable, and logs the
/// change.
fn note(flag: &AtomicBool, error: Option<&StoreError>, what: &str) {
    let now = matches!(error, Some(StoreError::Unavailable(_)));
    if flag.swap(now, Ordering::Relaxed) != now {
        if now {
            tracing::warn!("{what}");
        } else {
            tracing::info!("no longer: {what}");
        }
    }
}

/// One audit append in two round trips (the chain's lock is held across them, so
/// they are kept few): BEGIN, the lock and the last entry; then the new entries, the
/// anchor and COMMIT.
async fn append_audit(client: &Object, seal: AuditSeal) -> Result<Vec<u64>, tokio_postgres::Error> {
    let lock = client
        .prepare_cached("SELECT pg_advisory_xact_lock($1)")
        .await?;
    let last = client
        .prepare_cached("SELECT sequence, entry FROM audit ORDER BY sequence DESC LIMIT 1")
        .await?;
    let insert = client
        .prepare_cached(
            "INSERT INTO audit (sequence, entry) SELECT * FROM unnest($1::int8[], $2::bytea[])",
        )
        .await?;
    let anchor = client
        .prepare_cached(
            "INSERT INTO meta (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .await?;
    let lock_params: Param = [&AUDIT_LOCK];
    let (_, _, last) = tokio::try_join!(
        client.batch_execute(BEGIN),
        client.query(&lock, &lock_params),
        client.query_opt(&last, &[]),
    )?;
    let last = last.map(|row| (row.get::<_, i64>(0) as u64, row.get::<_, Vec<u8>>(1)));
    // Inside the transaction, holding the chain's lock: a panic here must not hand the
    // connection back to the pool mid-transaction. Nothing is appended instead.
    let entries = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| seal(last)))
        .unwrap_or_else(|_| {
            tracing::error!("audit entries could not be made; nothing was appended");
            Vec::new()
        });
    let sequences: Vec<i64> = entries.iter().map(|(s, _)| *s as i64).collect();
    let bytes: Vec<&[u8]> = entries.iter().map(|(_, e)| e.as_slice()).collect();
    let Some(head) = sequences.last().map(|last| (*last as u64).to_be_bytes()) else {
        client.batch_execute("COMMIT").await?;
        return Ok(Vec::new());
    };
    let insert_params: [&(dyn ToSql + Sync); 2] = [&sequences, &bytes];
    let anchor_params: [&(dyn ToSql + Sync); 2] = [&crate::audit::HEAD_KEY, &head.as_slice()];
    tokio::try_join!(
        client.execute(&insert, &insert_params),
        client.execute(&anchor, &anchor_params),
        client.batch_execute("COMMIT"),
    )?;
    Ok(entries.into_iter().map(|(s, _)| s).collect())
}

fn key_use_of(code: i16) -> Result<KeyUse, StoreError> {
    u8::try_from(code)
        .ok()
        .and_then(KeyUse::from_code)
        .ok_or_else(|| StoreError::Engine(format!("unknown key use {code} in version_counts")))
}

async fn load_counts(
    pool: &Pool,
    own_slots: &[String],
    counts_lock: i64,
    counts: &Counts,
) -> Result<(), StoreError> {
    let client = pool.get().await.map_err(pool_error)?;
    // After every write group of this vault's last run has ended: one whose commit
    // was left waiting (for a synchronous standby) counts once it is visible.
    let read = async {
        client.batch_execute(BEGIN).await?;
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&counts_lock])
            .await?;
        let rows = client
            .query(
                "SELECT slot = ANY($1), key_use, version, sum(records)::bigint
                 FROM version_counts GROUP BY 1, 2, 3",
                &[&own_slots],
            )
            .await?;
        client.batch_execute("COMMIT").await?;
        Ok(rows)
    };
    let rows = match read.await {
        Ok(rows) => rows,
        Err(e) => {
            release_after_failure(client).await;
            return Err(pg(e));
        }
    };
    let (mut own, mut others) = (CountMap::new(), CountMap::new());
    for row in rows {
        let key = (key_use_of(row.get(1))?, row.get::<_, i32>(2) as u32);
        let n: i64 = row.get(3);
        if row.get(0) {
            own.insert(key, n);
        } else {
            others.insert(key, n);
        }
    }
    *lock(&counts.own) = own;
    *lock(&counts.others) = others;
    Ok(())
}

/// This vault's own counts as the database has them, once no write group of this
/// vault is in flight anywhere: the exclusive counts lock waits for every transaction
/// holding it shared, including one whose answer was lost and whose commit is still
/// waiting (for a synchronous standby); PostgreSQL releases a transaction's locks only
/// after its commit is visible.
async fn recount_own(
    client: &Object,
    own_slots: &[String],
    counts_lock: i64,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    // The server gives up the lock wait before the client's timeout would drop the
    // connection (a dropped connection's server process would wait on regardless).
    let lock_timeout_ms = RECOUNT_TIMEOUT.as_millis().saturating_sub(1_000);
    client
        .batch_execute(&format!(
            "{BEGIN}; SET LOCAL lock_timeout = {lock_timeout_ms}"
        ))
        .await?;
    client
        .execute("SELECT pg_advisory_xact_lock($1)", &[&counts_lock])
        .await?;
    let rows = client
        .query(
            "SELECT key_use, version, sum(records)::bigint FROM version_counts
             WHERE slot = ANY($1) GROUP BY 1, 2",
            &[&own_slots],
        )
        .await?;
    client.batch_execute("COMMIT").await?;
    Ok(rows)
}

/// A connection whose transaction failed halfway goes back to the pool only once it
/// is rolled back; if it cannot be, it is closed.
async fn release_after_failure(client: Object) {
    if client.is_closed() || client.batch_execute("ROLLBACK").await.is_err() {
        drop(Object::take(client));
    }
}

async fn recount_own_counts(
    pool: &Pool,
    own_slots: &[String],
    counts_lock: i64,
) -> Result<CountMap, StoreError> {
    let client = pool.get().await.map_err(pool_error)?;
    let rows = match tokio::time::timeout(
        RECOUNT_TIMEOUT,
        recount_own(&client, own_slots, counts_lock),
    )
    .await
    {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            release_after_failure(client).await;
            return Err(pg(e));
        }
        Err(_) => {
            drop(Object::take(client));
            return Err(StoreError::Unavailable(
                "a write group of this vault is still waiting for its commit".into(),
            ));
        }
    };
    let mut own = CountMap::new();
    for row in rows {
        own.insert(
            (key_use_of(row.get(0))?, row.get::<_, i32>(1) as u32),
            row.get(2),
        );
    }
    Ok(own)
}

async fn refresh_counts(
    pool: Pool,
    own_slots: Vec<String>,
    counts_lock: i64,
    counts: std::sync::Weak<Counts>,
    health: Arc<Health>,
) {
    loop {
        tokio::time::sleep(COUNTS_REFRESH).await;
        let Some(counts) = counts.upgrade() else {
            return;
        };
        let read = async {
            let client = pool.get().await.map_err(pool_error)?;
            let rows = client
                .query(
                    "SELECT key_use, version, sum(records)::bigint FROM version_counts
                     WHERE NOT slot = ANY($1) GROUP BY 1, 2",
                    &[&own_slots],
                )
                .await
                .map_err(pg)?;
            let mut others = CountMap::new();
            for row in rows {
                others.insert(
                    (key_use_of(row.get(0))?, row.get::<_, i32>(1) as u32),
                    row.get(2),
                );
            }
            Ok::<_, StoreError>(others)
        };
        let read = read.await;
        note(
            &health.unreachable,
            read.as_ref().err(),
            "the database cannot be reached",
        );
        match read {
            Ok(others) => *lock(&counts.others) = others,
            Err(e) => tracing::debug!(error = %e, "other vaults' record counts not refreshed"),
        }
        if counts.own_unsure.load(Ordering::Relaxed) {
            let _no_commit_in_flight = counts.gate.write().await;
            match recount_own_counts(&pool, &own_slots, counts_lock).await {
                Ok(own) => {
                    *lock(&counts.own) = own;
                    counts.own_unsure.store(false, Ordering::Relaxed);
                    tracing::info!(
                        "this vault's record counts were read again after a commit with an unknown outcome"
                    );
                }
                Err(e) => tracing::debug!(error = %e, "record counts not recounted yet"),
            }
        }
    }
}

/// One writer: takes everything queued (up to `MAX_GROUP`) and commits it as one
/// transaction, while the other writers gather or commit theirs.
async fn write(
    pool: Pool,
    receiver: Arc<tokio::sync::Mutex<mpsc::Receiver<Op>>>,
    counts: Arc<Counts>,
    writer: Writer,
    health: Arc<Health>,
) {
    loop {
        let group = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut records = first.records();
            let mut group = vec![first];
            while group.len() < MAX_GROUP && records < MAX_GROUP_RECORDS {
                match receiver.try_recv() {
                    Ok(op) => {
                        records += op.records();
                        group.push(op);
                    }
                    Err(_) => break,
                }
            }
            group
        };
        let gate = counts.gate.read().await;
        let result = commit_group(&pool, &group, &writer).await;
        note(
            &health.unconfirmed,
            result.as_ref().err(),
            "writes are not confirmed by the database",
        );
        match &result {
            Ok((_, deltas)) => counts.add(deltas),
            // The outcome is unknown (the answer was lost, or the commit not
            // confirmed in time): count again from the database.
            Err(StoreError::Unavailable(_)) => counts.own_unsure.store(true, Ordering::Relaxed),
            Err(_) => {}
        }
        drop(gate);
        match result {
            Ok((done, _)) => {
                for (op, done) in group.into_iter().zip(done) {
                    op.answer(Ok(done));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, writes = group.len(), "database write failed; nothing of it was acknowledged");
                for op in group {
                    op.answer(Err(e.clone()));
                }
            }
        }
    }
}

async fn commit_group(
    pool: &Pool,
    group: &[Op],
    writer: &Writer,
) -> Result<(Vec<Done>, CountMap), StoreError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let in_flight = writer.lane.enter().await?;
        let mut client = pool.get().await.map_err(pool_error)?;
        let Ok(tried) =
            tokio::time::timeout(writer.lane.timeout, try_group(&mut client, group, writer)).await
        else {
            // Whether it committed is unknown; it was not acknowledged.
            in_flight.keep_until_answered(client);
            return Err(writer.lane.timed_out("a commit"));
        };
        match tried {
            Ok(done) => return Ok(done),
            Err(e) => {
                // Leave no connection inside a failed transaction in the pool.
                release_after_failure(client).await;
                if lost_a_race(&e) && tries < GROUP_TRIES {
                    tracing::debug!(error = %pg(e), "write group lost a race; planned again");
                    tokio::time::sleep(Duration::from_millis(5 * tries as u64)).await;
                    continue;
                }
                return Err(pg(e));
            }
        }
    }
}

/// How a group locks the fingerprint index: the index shared and each key it reads or
/// writes (sorted), or, past `MAX_KEY_LOCKS` keys, the whole index.
enum IndexLocks {
    Keys(Vec<i64>),
    Whole,
}

impl IndexLocks {
    /// The keys to lock one by one (none when the whole index is locked).
    fn keys(&self) -> &[i64] {
        match self {
            IndexLocks::Keys(keys) => keys,
            IndexLocks::Whole => &[],
        }
    }
}

/// The index locks of a group, and the tokens of the records it changes, sorted.
fn locks_of(group: &[Op]) -> (IndexLocks, Vec<&str>) {
    let mut keys = BTreeSet::new();
    let mut tokens = BTreeSet::new();
    for op in group {
        match op {
            Op::Insert { records, .. } => {
                for record in records {
                    keys.insert(index_lock(&record.index_key));
                    if record.reuse_existing {
                        keys.extend(record.older_index_keys.iter().map(|k| index_lock(k)));
                    }
                }
            }
            Op::Delete { delete, .. } => {
                keys.insert(index_lock(&delete.index_key));
                tokens.insert(delete.token.as_str());
            }
            Op::Rewrite { rewrite, .. } => {
                keys.insert(index_lock(&rewrite.old_index_key));
                keys.insert(index_lock(&rewrite.new_index_key));
                tokens.insert(rewrite.token.as_str());
            }
            Op::PutMeta { .. } | Op::PutOutcome { .. } | Op::RemoveOutcomes { .. } => {}
        }
    }
    let keys = if keys.len() > MAX_KEY_LOCKS {
        IndexLocks::Whole
    } else {
        IndexLocks::Keys(keys.into_iter().collect())
    };
    (keys, tokens.into_iter().collect())
}

fn count(deltas: &mut CountMap, versions: KeyVersions, delta: i64) {
    for key_use in KeyUse::ALL {
        *deltas.entry((key_use, versions.get(key_use))).or_insert(0) += delta;
    }
}

async fn try_group(
    client: &mut Object,
    group: &[Op],
    writer: &Writer,
) -> Result<(Vec<Done>, CountMap), tokio_postgres::Error> {
    let statements = Statements::prepare(client).await?;
    if group.iter().all(|op| matches!(op, Op::Insert { .. })) {
        return insert_group(client, &statements, group, writer).await;
    }
    let slot = writer.slot.as_str();
    let (locks, tokens) = locks_of(group);
    let keys = locks.keys();
    let (counts, index, keys_param): (Param, Param, Param) =
        ([&writer.counts_lock], [&INDEX_LOCK], [&keys]);
    tokio::try_join!(
        client.batch_execute(BEGIN),
        client.query(&statements.lock_index_shared, &counts),
        client.query(statements.index_lock(&locks), &index),
        client.query(&statements.lock_keys, &keys_param),
    )?;
    if !tokens.is_empty() {
        client.query(&statements.lock_rows, &[&tokens]).await?;
    }
    let mut deltas = CountMap::new();
    let mut done = Vec::with_capacity(group.len());
    for op in group {
        done.push(match op {
            Op::Insert { records, .. } => {
                let (tokens, index_keys) = lookup_params(records.iter());
                let (tokens, index_keys): (Param, Param) = ([&tokens], [&index_keys]);
                let (taken, live) = tokio::try_join!(
                    client.query(&statements.taken, &tokens),
                    client.query(&statements.live, &index_keys),
                )?;
                let mut found = Lookups::from_rows(&taken, &live);
                let mut planned = Planned::default();
                let outcomes = plan(records, &mut found, &mut planned, &mut deltas);
                planned.write(client, &statements).await?;
                Done::Insert(outcomes)
            }
            Op::Delete { delete, .. } => {
                Done::Delete(delete_one(client, &statements, delete, &mut deltas).await?)
            }
            Op::Rewrite { rewrite, .. } => {
                Done::Rewrite(rewrite_one(client, &statements, rewrite, &mut deltas).await?)
            }
            Op::PutMeta { key, value, .. } => {
                client.execute(&statements.put_meta, &[key, value]).await?;
                Done::Unit
            }
            Op::PutOutcome { key, value, .. } => {
                client
                    .execute(&statements.put_outcome, &[key, value])
                    .await?;
                Done::Unit
            }
            Op::RemoveOutcomes { keys, .. } => {
                client.execute(&statements.remove_outcomes, &[keys]).await?;
                Done::Unit
            }
        });
    }
    deltas.retain(|_, delta| *delta != 0);
    tokio::try_join!(
        add_counts(client, &statements, slot, &deltas),
        client.batch_execute("COMMIT"),
    )?;
    Ok((done, deltas))
}

/// The common group, only tokenizations, in two round trips: BEGIN, the locks and
/// the look-ups in one; the writes, the counts and COMMIT in the other. (PostgreSQL
/// runs pipelined statements in order, and a failed one aborts the transaction, so
/// COMMIT then rolls back and the error comes back from the statement that failed.)
async fn insert_group(
    client: &Object,
    statements: &Statements,
    group: &[Op],
    writer: &Writer,
) -> Result<(Vec<Done>, CountMap), tokio_postgres::Error> {
    let slot = writer.slot.as_str();
    let records = || {
        group.iter().flat_map(|op| match op {
            Op::Insert { records, .. } => records.as_slice(),
            _ => &[],
        })
    };
    let (locks, _) = locks_of(group);
    let (tokens, index_keys) = lookup_params(records());
    let keys = locks.keys();
    let (counts, index, keys, tokens, index_keys): (Param, Param, Param, Param, Param) = (
        [&writer.counts_lock],
        [&INDEX_LOCK],
        [&keys],
        [&tokens],
        [&index_keys],
    );
    let (_, _, _, _, taken, live) = tokio::try_join!(
        client.batch_execute(BEGIN),
        client.query(&statements.lock_index_shared, &counts),
        client.query(statements.index_lock(&locks), &index),
        client.query(&statements.lock_keys, &keys),
        client.query(&statements.taken, &tokens),
        client.query(&statements.live, &index_keys),
    )?;
    let mut found = Lookups::from_rows(&taken, &live);
    let mut planned = Planned::default();
    let mut deltas = CountMap::new();
    let done = group
        .iter()
        .map(|op| match op {
            Op::Insert { records, .. } => {
                Done::Insert(plan(records, &mut found, &mut planned, &mut deltas))
            }
            _ => Done::Unit,
        })
        .collect();
    tokio::try_join!(
        planned.write(client, statements),
        add_counts(client, statements, slot, &deltas),
        client.batch_execute("COMMIT"),
    )?;
    Ok((done, deltas))
}

/// Every write transaction: the locking (advisory locks, then look-ups under them)
/// relies on each statement seeing what committed before it, whatever the database's
/// default isolation level.
const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// One statement parameter, bound before statements are pipelined.
type Param<'a> = [&'a (dyn ToSql + Sync); 1];

/// Every statement a write group uses, prepared once per connection (the pool keeps
/// them), so that pipelined calls are sent in the order they are made.
struct Statements {
    lock_index_shared: tokio_postgres::Statement,
    lock_index: tokio_postgres::Statement,
    lock_keys: tokio_postgres::Statement,
    lock_rows: tokio_postgres::Statement,
    taken: tokio_postgres::Statement,
    live: tokio_postgres::Statement,
    insert_records: tokio_postgres::Statement,
    put_entries: tokio_postgres::Statement,
    add_counts: tokio_postgres::Statement,
    current: tokio_postgres::Statement,
    remove_record: tokio_postgres::Statement,
    remove_entry: tokio_postgres::Statement,
    rewrite_record: tokio_postgres::Statement,
    put_entry_if_stale: tokio_postgres::Statement,
    put_meta: tokio_postgres::Statement,
    put_outcome: tokio_postgres::Statement,
    remove_outcomes: tokio_postgres::Statement,
}

impl Statements {
    /// The statement taking the index lock the way `locks` needs it.
    fn index_lock(&self, locks: &IndexLocks) -> &tokio_postgres::Statement {
        match locks {
            IndexLocks::Keys(_) => &self.lock_index_shared,
            IndexLocks::Whole => &self.lock_index,
        }
    }

    async fn prepare(client: &Object) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            lock_index_shared: client
                .prepare_cached("SELECT pg_advisory_xact_lock_shared($1)")
                .await?,
            lock_index: client
                .prepare_cached("SELECT pg_advisory_xact_lock($1)")
                .await?,
            lock_keys: client
                .prepare_cached(
                    "SELECT pg_advisory_xact_lock(k)
                     FROM (SELECT unnest($1::int8[]) AS k ORDER BY 1) s",
                )
                .await?,
            lock_rows: client
                .prepare_cached(
                    "SELECT token FROM records WHERE token = ANY($1) ORDER BY token FOR UPDATE",
                )
                .await?,
            taken: client
                .prepare_cached("SELECT token FROM records WHERE token = ANY($1)")
                .await?,
            live: client
                .prepare_cached(
                    "SELECT f.index_key, f.token FROM fingerprints f
                     JOIN records r ON r.token = f.token
                     WHERE f.index_key = ANY($1)",
                )
                .await?,
            insert_records: client
                .prepare_cached(
                    "INSERT INTO records (token, value, card_data_version, fingerprint_version,
                         expires_at_unix_ms, card_key)
                     SELECT * FROM unnest($1::text[], $2::bytea[], $3::int4[], $4::int4[],
                         $5::int8[], $6::bytea[])",
                )
                .await?,
            // Written only where the look-up found no live entry, under the key's lock.
            put_entries: client
                .prepare_cached(
                    "INSERT INTO fingerprints (index_key, token)
                     SELECT * FROM unnest($1::bytea[], $2::text[])
                     ON CONFLICT (index_key) DO UPDATE SET token = excluded.token",
                )
                .await?,
            add_counts: client
                .prepare_cached(
                    "INSERT INTO version_counts (slot, key_use, version, records)
                     SELECT $1, u, v, n FROM unnest($2::int2[], $3::int4[], $4::int8[]) AS t(u, v, n)
                     ON CONFLICT (slot, key_use, version)
                     DO UPDATE SET records = version_counts.records + excluded.records",
                )
                .await?,
            current: client
                .prepare_cached("SELECT value FROM records WHERE token = $1")
                .await?,
            remove_record: client
                .prepare_cached("DELETE FROM records WHERE token = $1")
                .await?,
            // Only if it names this token: another live token may own it.
            remove_entry: client
                .prepare_cached("DELETE FROM fingerprints WHERE index_key = $1 AND token = $2")
                .await?,
            rewrite_record: client
                .prepare_cached(
                    "UPDATE records SET value = $2, card_data_version = $3,
                         fingerprint_version = $4, expires_at_unix_ms = $5, card_key = $6
                     WHERE token = $1",
                )
                .await?,
            // Another live token of the same card may own the entry already; a stale
            // one (its record gone) is replaced.
            put_entry_if_stale: client
                .prepare_cached(
                    "INSERT INTO fingerprints (index_key, token) VALUES ($1, $2)
                     ON CONFLICT (index_key) DO UPDATE SET token = excluded.token
                     WHERE NOT EXISTS (SELECT 1 FROM records r WHERE r.token = fingerprints.token)",
                )
                .await?,
            put_meta: client
                .prepare_cached(
                    "INSERT INTO meta (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )
                .await?,
            put_outcome: client
                .prepare_cached(
                    "INSERT INTO outcomes (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )
                .await?,
            remove_outcomes: client
                .prepare_cached("DELETE FROM outcomes WHERE key = ANY($1)")
                .await?,
        })
    }
}

async fn add_counts(
    client: &Object,
    statements: &Statements,
    slot: &str,
    deltas: &CountMap,
) -> Result<(), tokio_postgres::Error> {
    let changed: Vec<_> = deltas.iter().filter(|(_, n)| **n != 0).collect();
    if changed.is_empty() {
        return Ok(());
    }
    let uses: Vec<i16> = changed
        .iter()
        .map(|((u, _), _)| i16::from(u.code()))
        .collect();
    let versions: Vec<i32> = changed.iter().map(|((_, v), _)| *v as i32).collect();
    let ns: Vec<i64> = changed.iter().map(|(_, n)| **n).collect();
    client
        .execute(&statements.add_counts, &[&slot, &uses, &versions, &ns])
        .await
        .map(drop)
}

/// The tokens and the fingerprint index keys (with older versions' where reuse may
/// look there) that inserting `records` looks up.
fn lookup_params<'a>(
    records: impl Iterator<Item = &'a NewRecord>,
) -> (Vec<&'a str>, Vec<&'a [u8]>) {
    let mut tokens = Vec::new();
    let mut index_keys = Vec::new();
    for record in records {
        tokens.push(record.token.as_str());
        index_keys.push(record.index_key.as_slice());
        if record.reuse_existing {
            index_keys.extend(record.older_index_keys.iter().map(Vec::as_slice));
        }
    }
    (tokens, index_keys)
}

/// What the look-ups found, updated as records are planned (a later record of the
/// same group sees the earlier ones).
struct Lookups {
    taken: HashSet<String>,
    /// Index key to the live token it names.
    live: HashMap<Vec<u8>, String>,
}

impl Lookups {
    fn from_rows(taken: &[tokio_postgres::Row], live: &[tokio_postgres::Row]) -> Self {
        Self {
            taken: taken.iter().map(|row| row.get(0)).collect(),
            live: live.iter().map(|row| (row.get(0), row.get(1))).collect(),
        }
    }
}

/// The rows an insert step writes.
#[derive(Default)]
struct Planned<'a> {
    rows: Vec<&'a NewRecord>,
    entries: Vec<(&'a [u8], &'a str)>,
}

/// Decides each record's outcome as `RocksStore` does: a token already stored is
/// taken; with `reuse_existing`, a live token the fingerprint index names (under the
/// current or an older fingerprint version) is returned instead; the index entry is
/// written when it is missing or names a record that is gone. The index keys are
/// locked (see `locks_of`), so what the look-ups found holds until COMMIT.
fn plan<'a>(
    records: &'a [NewRecord],
    found: &mut Lookups,
    planned: &mut Planned<'a>,
    deltas: &mut CountMap,
) -> Vec<InsertOutcome> {
    let mut outcomes = Vec::with_capacity(records.len());
    for record in records {
        let token = record.token.as_str();
        if found.taken.contains(token) {
            outcomes.push(InsertOutcome::TokenTaken);
            continue;
        }
        let indexed = found.live.get(&record.index_key).cloned();
        let mut reusable = indexed.clone();
        if record.reuse_existing && reusable.is_none() {
            reusable = record
                .older_index_keys
                .iter()
                .find_map(|older| found.live.get(older).cloned());
        }
        if let (true, Some(existing)) = (record.reuse_existing, reusable) {
            match Token::from_stored(existing.as_bytes()) {
                Some(existing) => outcomes.push(InsertOutcome::Existing(existing)),
                None => {
                    tracing::error!("the fingerprint index holds a malformed token");
                    outcomes.push(InsertOutcome::TokenTaken);
                }
            }
            continue;
        }
        if indexed.is_none() {
            planned.entries.push((&record.index_key, token));
            found
                .live
                .insert(record.index_key.clone(), token.to_owned());
        }
        found.taken.insert(token.to_owned());
        planned.rows.push(record);
        count(deltas, record.versions, 1);
        outcomes.push(InsertOutcome::Stored);
    }
    outcomes
}

impl Planned<'_> {
    async fn write(
        &self,
        client: &Object,
        statements: &Statements,
    ) -> Result<(), tokio_postgres::Error> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let rows = &self.rows;
        let tokens: Vec<&str> = rows.iter().map(|r| r.token.as_str()).collect();
        let values: Vec<&[u8]> = rows.iter().map(|r| r.value.as_slice()).collect();
        let card_versions: Vec<i32> = rows.iter().map(|r| r.versions.card_data as i32).collect();
        let fingerprint_versions: Vec<i32> =
            rows.iter().map(|r| r.versions.fingerprint as i32).collect();
        let expiries: Vec<i64> = rows.iter().map(|r| r.indexes.expires_at_unix_ms).collect();
        let card_keys: Vec<&[u8]> = rows.iter().map(|r| r.indexes.card_key.as_slice()).collect();
        let entry_keys: Vec<&[u8]> = self.entries.iter().map(|(k, _)| *k).collect();
        let entry_tokens: Vec<&str> = self.entries.iter().map(|(_, t)| *t).collect();
        let record_params: [&(dyn ToSql + Sync); 6] = [
            &tokens,
            &values,
            &card_versions,
            &fingerprint_versions,
            &expiries,
            &card_keys,
        ];
        let entry_params: [&(dyn ToSql + Sync); 2] = [&entry_keys, &entry_tokens];
        if self.entries.is_empty() {
            client
                .execute(&statements.insert_records, &record_params)
                .await?;
        } else {
            tokio::try_join!(
                client.execute(&statements.insert_records, &record_params),
                client.execute(&statements.put_entries, &entry_params),
            )?;
        }
        Ok(())
    }
}

/// The record's current bytes (its row is locked by `try_group`).
async fn current(
    client: &Object,
    statements: &Statements,
    token: &str,
) -> Result<Option<Vec<u8>>, tokio_postgres::Error> {
    Ok(client
        .query_opt(&statements.current, &[&token])
        .await?
        .map(|row| row.get(0)))
}

async fn delete_one(
    client: &Object,
    statements: &Statements,
    delete: &Delete,
    deltas: &mut CountMap,
) -> Result<DeleteOutcome, tokio_postgres::Error> {
    let token = delete.token.as_str();
    match current(client, statements, token).await? {
        None => return Ok(DeleteOutcome::NotFound),
        Some(value) if value != delete.expected => return Ok(DeleteOutcome::Changed),
        Some(_) => {}
    }
    let record_params: [&(dyn ToSql + Sync); 1] = [&token];
    let entry_params: [&(dyn ToSql + Sync); 2] = [&delete.index_key, &token];
    tokio::try_join!(
        client.execute(&statements.remove_record, &record_params),
        client.execute(&statements.remove_entry, &entry_params),
    )?;
    count(deltas, delete.versions, -1);
    Ok(DeleteOutcome::Deleted)
}

async fn rewrite_one(
    client: &Object,
    statements: &Statements,
    rewrite: &Rewrite,
    deltas: &mut CountMap,
) -> Result<RewriteOutcome, tokio_postgres::Error> {
    let token = rewrite.token.as_str();
    if current(client, statements, token).await?.as_deref() != Some(rewrite.expected.as_slice()) {
        return Ok(RewriteOutcome::Changed);
    }
    let new = rewrite.new_versions;
    client
        .execute(
            &statements.rewrite_record,
            &[
                &token,
                &rewrite.value,
                &(new.card_data as i32),
                &(new.fingerprint as i32),
                &rewrite.new_indexes.expires_at_unix_ms,
                &rewrite.new_indexes.card_key,
            ],
        )
        .await?;
    if rewrite.old_index_key != rewrite.new_index_key {
        let old_params: [&(dyn ToSql + Sync); 2] = [&rewrite.old_index_key, &token];
        let new_params: [&(dyn ToSql + Sync); 2] = [&rewrite.new_index_key, &token];
        tokio::try_join!(
            client.execute(&statements.remove_entry, &old_params),
            client.execute(&statements.put_entry_if_stale, &new_params),
        )?;
    }
    count(deltas, rewrite.old_versions, -1);
    count(deltas, rewrite.new_versions, 1);
    Ok(RewriteOutcome::Rewritten)
}

fn tokens_of(rows: &[tokio_postgres::Row]) -> Result<Vec<Token>, StoreError> {
    rows.iter()
        .map(|row| {
            let token: &str = row.get(0);
            Token::from_stored(token.as_bytes()).ok_or_else(|| {
                StoreError::Engine("the records table holds a malformed token".into())
            })
        })
        .collect()
}

/// A session-level advisory lock held on its own connection: closing the connection
/// (dropping the guard, or the vault dying) releases it.
struct HeldLock {
    _client: tokio_postgres::Client,
}

impl Store for PgStore {
    async fn insert(&self, records: Vec<NewRecord>) -> Result<Vec<InsertOutcome>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        self.submit(|reply| Op::Insert { records, reply }).await
    }

    async fn get(&self, token: &Token) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT value FROM records WHERE token = $1")
            .await
            .map_err(pg)?;
        Ok(client
            .query_opt(&statement, &[&token.as_str()])
            .await
            .map_err(pg)?
            .map(|row| row.get(0)))
    }

    async fn delete(&self, delete: Delete) -> Result<DeleteOutcome, StoreError> {
        self.submit(|reply| Op::Delete { delete, reply }).await
    }

    async fn rewrite(&self, rewrite: Rewrite) -> Result<RewriteOutcome, StoreError> {
        self.submit(|reply| Op::Rewrite { rewrite, reply }).await
    }

    fn version_counts(&self) -> BTreeMap<(KeyUse, u32), u64> {
        self.counts.total()
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            unreachable: self.health.troubled(),
            ..StoreStats::default()
        }
    }

    async fn records_off_versions(
        &self,
        active: KeyVersions,
        cursor: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Token)>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT token FROM records
                 WHERE token > $1 AND (card_data_version <> $2 OR fingerprint_version <> $3)
                 ORDER BY token LIMIT $4",
            )
            .await
            .map_err(pg)?;
        let after = cursor.map(String::from_utf8_lossy).unwrap_or_default();
        let rows = client
            .query(
                &statement,
                &[
                    &after.as_ref(),
                    &(active.card_data as i32),
                    &(active.fingerprint as i32),
                    &(limit as i64),
                ],
            )
            .await
            .map_err(pg)?;
        Ok(tokens_of(&rows)?
            .into_iter()
            .map(|token| (token.as_str().as_bytes().to_vec(), token))
            .collect())
    }

    async fn append_audit(&self, seal: AuditSeal) -> Result<Vec<u64>, StoreError> {
        // The log's end is read again by every append, in the transaction that appends:
        // a failed append leaves nothing uncertain, so any failure is one to retry.
        self.append_audit_once(seal).await.map_err(|e| match e {
            StoreError::Unavailable(_) => e,
            other => StoreError::Unavailable(other.to_string()),
        })
    }

    fn anchors_audit_log(&self) -> bool {
        true
    }

    async fn read_audit(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT sequence, entry FROM audit WHERE sequence > $1 ORDER BY sequence LIMIT $2",
                &[&(after.min(i64::MAX as u64) as i64), &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|row| (row.get::<_, i64>(0) as u64, row.get(1)))
            .collect())
    }

    async fn last_audit(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT sequence, entry FROM audit ORDER BY sequence DESC LIMIT 1",
                &[],
            )
            .await
            .map_err(pg)?
            .map(|row| (row.get::<_, i64>(0) as u64, row.get(1))))
    }

    async fn prune_outcomes(
        &self,
        expired: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<usize, StoreError> {
        let keys: Vec<Vec<u8>> = {
            let client = self.client().await?;
            client
                .query("SELECT key, value FROM outcomes", &[])
                .await
                .map_err(pg)?
                .iter()
                .filter(|row| expired(row.get::<_, &[u8]>(1)))
                .map(|row| row.get(0))
                .collect()
        };
        let pruned = keys.len();
        for chunk in keys.chunks(1000) {
            let keys = chunk.to_vec();
            self.submit(|reply| Op::RemoveOutcomes { keys, reply })
                .await?;
        }
        Ok(pruned)
    }

    async fn expired(&self, now_unix_ms: i64, limit: usize) -> Result<Vec<Token>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT token FROM records
                 WHERE expires_at_unix_ms > 0 AND expires_at_unix_ms <= $1
                 ORDER BY expires_at_unix_ms LIMIT $2",
                &[&now_unix_ms, &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        tokens_of(&rows)
    }

    async fn tokens_of_card(&self, card_key: &[u8]) -> Result<Vec<Token>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT token FROM records WHERE card_key = $1 ORDER BY token",
                &[&card_key],
            )
            .await
            .map_err(pg)?;
        tokens_of(&rows)
    }

    async fn compact(&self) -> Result<(), StoreError> {
        // Deleted rows are gone from queries at once; VACUUM removes their tuples and
        // index entries from the pages. (Freed page space, WAL and the standbys' copies
        // are overwritten by PostgreSQL over time: see docs/operations.md.)
        let client = self.client().await?;
        client
            .batch_execute("VACUUM records, fingerprints, outcomes")
            .await
            .map_err(pg)
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
            .await
            .map_err(pg)?
            .map(|row| row.get(0)))
    }

    async fn put_meta(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.submit(|reply| Op::PutMeta { key, value, reply }).await
    }

    async fn get_outcome(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT value FROM outcomes WHERE key = $1")
            .await
            .map_err(pg)?;
        Ok(client
            .query_opt(&statement, &[&key])
            .await
            .map_err(pg)?
            .map(|row| row.get(0)))
    }

    async fn create_backup(&self, _dir: &Path) -> Result<u64, StoreError> {
        Err(StoreError::Unsupported(
            "this vault stores in PostgreSQL: back it up with PostgreSQL's tools \
             (pg_basebackup and WAL archiving, see docs/operations.md)",
        ))
    }

    fn scan_backup(_dir: &Path, _visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), StoreError> {
        Err(StoreError::Unsupported(
            "PostgreSQL stores have no vault backups to scan",
        ))
    }

    async fn put_outcome(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        self.submit(|reply| Op::PutOutcome { key, value, reply })
            .await
    }

    async fn lock_job(&self, job: &str) -> Result<Option<JobLock>, StoreError> {
        let key = index_lock(format!("job/{job}").as_bytes());
        Ok(self
            .connect
            .session_lock(key)
            .await?
            .map(|(held, lost)| JobLock::held(held, lost)))
    }
}

impl std::fmt::Debug for HeldLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeldLock")
    }
}

/// `vault-server migrate`: applies the migrations and says which.
pub async fn migrate_only(settings: &PostgresSettings) -> Result<Vec<i32>, StoreError> {
    // One connection, which bounds itself (see `Connector::connect`).
    let pool = Pool::builder(Connector::from_settings(settings)?)
        .max_size(1)
        .build()
        .map_err(|e| StoreError::Engine(format!("database pool: {e}")))?;
    let mut client = pool.get().await.map_err(pool_error)?;
    migrate(&mut client).await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pgcluster::Cluster;

    use super::*;
    use crate::store::conformance::numbered;
    use crate::store::{KeyVersions, RecordIndexes};

    fn settings(cluster: &Cluster, dbname: &str) -> PostgresSettings {
        PostgresSettings {
            url: cluster.conninfo_for(dbname),
            password_file: cluster.password_file().to_owned(),
            ca_file: cluster.ca_file().to_owned(),
            pool_size: default_pool_size(),
            writers: default_writers(),
            connect_timeout_ms: 2_000,
            commit_timeout_ms: default_commit_timeout_ms(),
            migrate: true,
            node_name: None,
        }
    }

    async fn start() -> Cluster {
        tokio::task::spawn_blocking(Cluster::start)
            .await
            .unwrap()
            .unwrap()
    }

    /// A store on a fresh database of `cluster`.
    async fn fresh(cluster: &Cluster, dbname: &str, node: &str) -> PgStore {
        cluster.create_database(dbname).unwrap();
        PgStore::open(&settings(cluster, dbname), node)
            .await
            .unwrap()
    }

    /// Stores one new record under `index_key`, checking it was stored; its token.
    async fn store_one(store: &PgStore, index_key: &[u8]) -> Token {
        let token = Token::generate().unwrap();
        assert_eq!(
            store.insert(vec![record(&token, index_key)]).await.unwrap(),
            vec![InsertOutcome::Stored]
        );
        token
    }

    fn record(token: &Token, index_key: &[u8]) -> NewRecord {
        NewRecord {
            token: token.clone(),
            value: b"sealed".to_vec(),
            index_key: index_key.to_vec(),
            reuse_existing: true,
            older_index_keys: Vec::new(),
            versions: KeyVersions {
                card_data: 1,
                fingerprint: 1,
            },
            indexes: RecordIndexes::default(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let cluster = start().await;
        let cluster = &cluster;
        let mut n = 0;
        crate::store::conformance::run_all(|| {
            n += 1;
            let name = format!("conformance{n}");
            async move { fresh(cluster, &name, "node").await }
        })
        .await;
    }

    /// Two vaults on one database tokenizing the same card at once (duplicate
    /// detection on): every call gets the one token the card has, and both chain their
    /// audit entries onto one log without a fork.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_vaults_share_the_index_counts_audit_log_and_jobs() {
        let cluster = start().await;
        let a = Arc::new(fresh(&cluster, "shared", "a").await);
        let b = Arc::new(
            PgStore::open(&settings(&cluster, "shared"), "b")
                .await
                .unwrap(),
        );

        let mut calls = Vec::new();
        for i in 0..40 {
            let store = if i % 2 == 0 {
                Arc::clone(&a)
            } else {
                Arc::clone(&b)
            };
            calls.push(tokio::spawn(async move {
                let token = Token::generate().unwrap();
                let outcome = store
                    .insert(vec![record(&token, b"one card")])
                    .await
                    .unwrap();
                match outcome.as_slice() {
                    [InsertOutcome::Stored] => token,
                    [InsertOutcome::Existing(existing)] => existing.clone(),
                    other => panic!("unexpected outcome {other:?}"),
                }
            }));
        }
        let mut tokens = BTreeSet::new();
        for call in calls {
            tokens.insert(call.await.unwrap().as_str().to_owned());
        }
        assert_eq!(tokens.len(), 1, "one card got several tokens: {tokens:?}");

        // Batches past MAX_KEY_LOCKS keys lock the whole index instead of each key: the
        // same 200 cards from both vaults at once still get one token each.
        let batch = |store: Arc<PgStore>| {
            tokio::spawn(async move {
                let records: Vec<NewRecord> = (0..200)
                    .map(|i| record(&Token::generate().unwrap(), format!("card {i}").as_bytes()))
                    .collect();
                let tokens: Vec<Token> = records.iter().map(|r| r.token.clone()).collect();
                let outcomes = store.insert(records).await.unwrap();
                tokens
                    .into_iter()
                    .zip(outcomes)
                    .map(|(token, outcome)| match outcome {
                        InsertOutcome::Stored => token,
                        InsertOutcome::Existing(existing) => existing,
                        InsertOutcome::TokenTaken => panic!("a fresh token was taken"),
                    })
                    .collect::<Vec<_>>()
            })
        };
        let (from_a, from_b) = tokio::join!(batch(Arc::clone(&a)), batch(Arc::clone(&b)));
        assert_eq!(from_a.unwrap(), from_b.unwrap(), "a card got two tokens");

        // Each vault counts its own writes at once and the other's within a refresh.
        let one = Some(&201u64);
        let own = |store: &PgStore| store.version_counts().get(&(KeyUse::CardData, 1)).copied();
        assert!(
            own(&a).is_some() || own(&b).is_some(),
            "a vault does not count its own writes at once"
        );
        let deadline = std::time::Instant::now() + COUNTS_REFRESH * 10;
        while (a.version_counts().get(&(KeyUse::CardData, 1)) != one
            || b.version_counts().get(&(KeyUse::CardData, 1)) != one)
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(a.version_counts().get(&(KeyUse::CardData, 1)), one);
        assert_eq!(b.version_counts().get(&(KeyUse::CardData, 1)), one);

        // Audit appends from both, at once: one chain, each seal sees the true end.
        let mut appends = Vec::new();
        for i in 0..20u64 {
            let store = if i % 2 == 0 {
                Arc::clone(&a)
            } else {
                Arc::clone(&b)
            };
            appends.push(tokio::spawn(async move {
                store
                    .append_audit(Box::new(|end: Option<(u64, Vec<u8>)>| {
                        let (last, previous) = end.unwrap_or((0, b"0".to_vec()));
                        // Each entry names its predecessor's sequence: a fork would
                        // show as two entries naming one.
                        let previous = String::from_utf8(previous).unwrap();
                        let previous: u64 = previous.split(':').next().unwrap().parse().unwrap();
                        assert_eq!(previous, last);
                        vec![(last + 1, format!("{}:{last}", last + 1).into_bytes())]
                    }))
                    .await
                    .unwrap()
            }));
        }
        let mut sequences: Vec<u64> = Vec::new();
        for append in appends {
            sequences.extend(append.await.unwrap());
        }
        sequences.sort_unstable();
        assert_eq!(sequences, (1..=20).collect::<Vec<_>>());
        let log = a.read_audit(0, 100).await.unwrap();
        for (sequence, entry) in &log {
            assert_eq!(entry, format!("{sequence}:{}", sequence - 1).as_bytes());
        }

        // A job runs on one vault at a time; the other gets it once the first lets go.
        let held = a.lock_job("rewrap").await.unwrap();
        assert!(held.is_some());
        assert!(b.lock_job("rewrap").await.unwrap().is_none());
        drop(held);
        let mut taken = None;
        for _ in 0..50 {
            taken = b.lock_job("rewrap").await.unwrap();
            if taken.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(taken.is_some(), "the job lock was not released");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migrations_are_versioned_idempotent_and_checked() {
        let cluster = start().await;
        cluster.create_database("empty").unwrap();
        let mut unmigrated = settings(&cluster, "empty");
        unmigrated.migrate = false;
        let refused = PgStore::open(&unmigrated, "n")
            .await
            .unwrap_err()
            .to_string();
        assert!(refused.contains("vault-server migrate"), "{refused}");

        assert_eq!(migrate_only(&unmigrated).await.unwrap(), vec![1]);
        assert_eq!(migrate_only(&unmigrated).await.unwrap(), Vec::<i32>::new());
        let store = PgStore::open(&unmigrated, "n").await.unwrap();
        // The password is in the store's connection settings, never in its Debug.
        let password = std::fs::read_to_string(cluster.password_file()).unwrap();
        let debug = format!("{store:?} {:?}", settings(&cluster, "empty"));
        assert!(debug.contains("Pool"), "{debug}");
        assert!(
            !debug.contains(password.trim()),
            "the password shows in Debug"
        );
        assert_eq!(
            cluster
                .psql("empty", "SELECT count(*) FROM schema_migrations")
                .unwrap(),
            "1"
        );
        // A schema from a newer vault-server is refused, not used.
        cluster
            .psql(
                "empty",
                "INSERT INTO schema_migrations (version, description) VALUES (999, 'future')",
            )
            .unwrap();
        let refused = PgStore::open(&settings(&cluster, "empty"), "m")
            .await
            .unwrap_err()
            .to_string();
        assert!(refused.contains("upgrade the vault-server"), "{refused}");

        // Two vaults under one node name would share count slots and a usage-report
        // instance: the second is refused while the first runs, and welcome after.
        let twin = PgStore::open(&unmigrated, "n")
            .await
            .unwrap_err()
            .to_string();
        assert!(twin.contains("another vault-server runs as node"), "{twin}");
        drop(store);
        cluster
            .psql("empty", "DELETE FROM schema_migrations WHERE version = 999")
            .unwrap();
        PgStore::open(&unmigrated, "n").await.unwrap();
    }

    /// With a synchronous standby, a commit counts only once the standby has it: while
    /// the standby is down nothing is acknowledged (the calls fail as unavailable after
    /// the commit timeout, audit appends too), and once it is back writes go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_acknowledged_while_the_synchronous_standby_is_down() {
        let primary = start().await;
        let primary = tokio::task::spawn_blocking(move || {
            let standby = primary.start_standby(true).unwrap();
            (primary, standby)
        })
        .await
        .unwrap();
        let (primary, mut standby) = primary;
        primary.create_database("sync").unwrap();
        // A role statement timeout shorter than the wait: were it to cancel the commit
        // waiting for the standby, PostgreSQL would report that commit as done.
        primary
            .psql(
                "postgres",
                &format!(
                    "ALTER ROLE {} SET statement_timeout = '300ms'",
                    pgcluster::APP_USER
                ),
            )
            .unwrap();
        let mut settings = settings(&primary, "sync");
        settings.commit_timeout_ms = 1_500;
        let store = PgStore::open(&settings, "n").await.unwrap();
        let before = store_one(&store, b"before").await;

        standby.stop_immediate().unwrap();
        // More timed-out calls than the store has commit lanes (two writers and the
        // audit log): each fails after the timeout, but no more server processes than
        // lanes are left waiting for the standby.
        let mut unconfirmed = Vec::new();
        for n in 0..4 {
            let started = std::time::Instant::now();
            let token = Token::generate().unwrap();
            let error = store
                .insert(vec![record(&token, format!("unconfirmed {n}").as_bytes())])
                .await
                .unwrap_err();
            assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
            assert!(
                started.elapsed() >= Duration::from_millis(1_400),
                "{:?}",
                started.elapsed()
            );
            unconfirmed.push(token);
        }
        assert!(
            store.stats().unreachable,
            "health must say writes are not confirmed"
        );
        for _ in 0..2 {
            let error = store.append_audit(numbered(1, 1)).await.unwrap_err();
            assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
        }
        let waiting = |primary: &Cluster| -> u64 {
            primary
                .psql(
                    "sync",
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep' \
                     AND application_name = 'vault-server'",
                )
                .unwrap()
                .parse()
                .unwrap()
        };
        let stuck = waiting(&primary);
        assert!(
            (2..=3).contains(&stuck),
            "{stuck} server processes wait for the standby (a writer's and the audit \
             log's at least, one per lane at most)"
        );

        let mut standby = tokio::task::spawn_blocking(move || {
            standby.restart().unwrap();
            standby
        })
        .await
        .unwrap();
        let after = Token::generate().unwrap();
        let mut stored = None;
        for _ in 0..40 {
            match store.insert(vec![record(&after, b"after")]).await {
                Ok(outcome) => {
                    stored = Some(outcome);
                    break;
                }
                Err(StoreError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(
            stored,
            Some(vec![InsertOutcome::Stored]),
            "writes did not resume"
        );
        assert!(!store.stats().unreachable);
        // The unconfirmed inserts that reached the database landed once the standby
        // had them: this vault's own counts (they feed key destroy checks) catch up
        // with the rows, not stay short.
        let rows = || -> u64 {
            primary
                .psql("sync", "SELECT count(*) FROM records")
                .unwrap()
                .parse()
                .unwrap()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let counted = store
                .version_counts()
                .get(&(KeyUse::CardData, 1))
                .copied()
                .unwrap_or(0);
            if counted == rows() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "counted {counted} records, the table has {}",
                rows()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let landed = |token: &Token| {
            primary
                .psql(
                    "sync",
                    &format!("SELECT count(*) FROM records WHERE token = '{token}'"),
                )
                .unwrap()
                == "1"
        };
        assert!(landed(&before) && landed(&after));
        assert!(
            landed(&unconfirmed[0]),
            "the first unconfirmed record is there now"
        );
        // The connections kept for the unanswered commits are closed.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while waiting(&primary) > 0 {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // The audit log goes on from what is stored: the end the failed append may
        // have left behind (it may land any moment now), or nothing.
        let appended = store
            .append_audit(Box::new(|end: Option<(u64, Vec<u8>)>| {
                let next = end.map_or(1, |(sequence, _)| sequence + 1);
                vec![(next, b"after".to_vec())]
            }))
            .await
            .unwrap();
        assert_eq!(appended.len(), 1);
        standby.stop_immediate().unwrap();
    }

    /// Each host's configuration is the whole configuration but for the other hosts:
    /// nothing set in `url` is lost on the way (the client library's `Config` compares
    /// every field, those added in later versions too).
    #[test]
    fn one_config_per_host_keeps_every_other_setting() {
        let rest = "user=vault password=synthetic dbname=tokenvault options='-c a=b' \
                    application_name=v sslmode=require sslnegotiation=direct \
                    connect_timeout=3 tcp_user_timeout=4 keepalives=1 keepalives_idle=5 \
                    keepalives_interval=6 keepalives_retries=7 \
                    target_session_attrs=read-write channel_binding=require \
                    load_balance_hosts=disable";
        let both: tokio_postgres::Config =
            format!("host=db1,db2 hostaddr=192.0.2.1,192.0.2.2 port=5432,5433 {rest}")
                .parse()
                .unwrap();
        let each = one_per_host(&both).unwrap();
        let expected: Vec<tokio_postgres::Config> = [
            "host=db1 hostaddr=192.0.2.1 port=5432",
            "host=db2 hostaddr=192.0.2.2 port=5433",
        ]
        .iter()
        .map(|host| format!("{host} {rest}").parse().unwrap())
        .collect();
        assert_eq!(each, expected);
        assert_eq!(host_name(&each[1]), "db2:5433 (192.0.2.2)");
        let mismatched: tokio_postgres::Config = "host=a,b hostaddr=192.0.2.1".parse().unwrap();
        assert!(one_per_host(&mismatched).is_err());

        // One port for every host; no port at all (the library's default).
        let one_port: tokio_postgres::Config = "host=a,b port=6000".parse().unwrap();
        let ports: Vec<Vec<u16>> = one_per_host(&one_port)
            .unwrap()
            .iter()
            .map(|c| c.get_ports().to_vec())
            .collect();
        assert_eq!(ports, [vec![6000], vec![6000]]);
        let no_port: tokio_postgres::Config = "host=a,b".parse().unwrap();
        assert!(
            one_per_host(&no_port)
                .unwrap()
                .iter()
                .all(|c| c.get_ports().is_empty())
        );
        let no_host: tokio_postgres::Config = "user=vault".parse().unwrap();
        assert_eq!(one_per_host(&no_host).unwrap(), [no_host]);
    }

    /// A host name is resolved and tried at its addresses (each an attempt of its
    /// own), and TLS verifies the name, not the address.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_name_is_resolved_and_tls_verifies_the_name() {
        let cluster = start().await;
        cluster.create_database("named").unwrap();
        let mut settings = settings(&cluster, "named");
        settings.url = format!(
            "host=localhost port={} user=vault dbname=named",
            cluster.port()
        );
        let store = PgStore::open(&settings, "n").await.unwrap();
        let token = store_one(&store, b"k").await;
        assert!(store.get(&token).await.unwrap().is_some());
        // The certificate names localhost and 127.0.0.1 only: a name it does not hold
        // is refused, even at the right address.
        let connector = Connector::from_settings(&PostgresSettings {
            url: format!(
                "host=not-the-server hostaddr=127.0.0.1 port={} user=vault dbname=named",
                cluster.port()
            ),
            ..settings
        })
        .unwrap();
        let Err(refused) = connector.connect().await else {
            panic!("connected under a name the certificate does not hold");
        };
        assert!(refused.to_string().contains("not-the-server"), "{refused}");
    }

    /// A first host that takes TCP connections but never answers (a hung server, a
    /// stuck proxy) is passed over within the connect timeout, and afterwards the host
    /// that answered is tried first: only the first connection pays for the hung one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_first_host_is_passed_over() {
        let cluster = start().await;
        cluster.create_database("hung").unwrap();
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hung_port = hung.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        // Accepts every connection and holds it without a byte in answer.
        let hung_server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = hung.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        let mut settings = settings(&cluster, "hung");
        settings.url = format!(
            "host=127.0.0.1,127.0.0.1 port={hung_port},{} user=vault dbname=hung",
            cluster.port()
        );
        settings.connect_timeout_ms = 1_000;
        settings.pool_size = 4;
        settings.writers = 2;
        let store = PgStore::open(&settings, "n").await.unwrap();
        for n in 0..8 {
            let token = store_one(&store, format!("hung {n}").as_bytes()).await;
            assert!(store.get(&token).await.unwrap().is_some());
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "only the first connection tried the hung host"
        );
        hung_server.abort();
    }

    /// A first host that cannot be reached (TEST-NET-1, never routed) is skipped: a
    /// new connection goes on to the next host, within one connect timeout per host.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_first_host_is_skipped() {
        let cluster = start().await;
        cluster.create_database("hosts").unwrap();
        let mut settings = settings(&cluster, "hosts");
        settings.url = format!(
            "host=192.0.2.1,127.0.0.1 port=5432,{} user=vault dbname=hosts",
            cluster.port()
        );
        settings.connect_timeout_ms = 500;
        settings.pool_size = 2;
        settings.writers = 1;
        let store = PgStore::open(&settings, "n").await.unwrap();
        let token = store_one(&store, b"k").await;
        assert!(store.get(&token).await.unwrap().is_some());
    }

    /// The database goes away under the store and comes back: calls meanwhile fail as
    /// unavailable, and the store reconnects by itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_database_is_unavailable_then_reconnected() {
        let mut cluster = start().await;
        let store = fresh(&cluster, "tokenvault2", "n").await;
        let kept = Token::generate().unwrap();
        store.insert(vec![record(&kept, b"kept")]).await.unwrap();

        cluster.stop_immediate().unwrap();
        let token = Token::generate().unwrap();
        let error = store
            .insert(vec![record(&token, b"lost")])
            .await
            .unwrap_err();
        assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
        let error = store.get(&kept).await.unwrap_err();
        assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
        assert!(
            store.stats().unreachable,
            "health must say the database is gone"
        );

        let mut cluster = tokio::task::spawn_blocking(move || {
            cluster.restart().unwrap();
            cluster
        })
        .await
        .unwrap();
        assert_eq!(
            store.get(&kept).await.unwrap().as_deref(),
            Some(&b"sealed"[..])
        );
        assert_eq!(
            store.insert(vec![record(&token, b"after")]).await.unwrap(),
            vec![InsertOutcome::Stored]
        );
        // Health clears by itself: the counts refresh reaches the database again and
        // the node name's lock, lost with its connection, is taken back.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.stats().unreachable && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!store.stats().unreachable, "health stayed degraded");
        assert!(!store.health.node_lost.load(Ordering::Relaxed));
        cluster.stop_immediate().unwrap();
    }
}
