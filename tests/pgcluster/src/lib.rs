//! Throwaway PostgreSQL clusters for tests.
//!
//! [`Cluster::start`] makes a primary with `initdb` and starts it with `pg_ctl` on a free
//! port on 127.0.0.1 (TLS on, with a certificate from a CA generated on the spot) and on
//! a unix socket in its own directory; [`Cluster::start_standby`] adds a streaming
//! standby made with `pg_basebackup`, synchronous or not. No system service, no shared
//! state: every cluster lives in its own temporary directory, which is removed (after an
//! immediate stop) when the [`Cluster`] is dropped, or by a small watchdog process when
//! the test process dies without dropping it.
//!
//! The application role is `vault`, with a random password (see
//! [`Cluster::password_file`]); it can only connect over TCP with TLS, with the password
//! (scram-sha-256). The superuser `postgres` connects over the unix socket without a
//! password ([`Cluster::psql`]).
//!
//! PostgreSQL refuses to run as root: when the tests run as root, the PostgreSQL
//! programs run as the `postgres` system user and the cluster directory belongs to it.
//!
//! The server binaries are taken from `$PG_BINDIR`, else the newest
//! `/usr/lib/postgresql/*/bin`, else `pg_config --bindir` (`apt-get install postgresql`).
//!
//! The `pgcluster` binary (src/main.rs) keeps one primary for as long as its stdin is
//! open, for `make bench` and manual trials.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// The application role.
pub const APP_USER: &str = "vault";
/// The application database made by [`Cluster::start`].
pub const APP_DATABASE: &str = "tokenvault";

/// How long to wait for a server to start, stop, stream or be promoted.
const WAIT_LIMIT: Duration = Duration::from_secs(30);
/// How often to look while waiting.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Start attempts, each on a new free port, when the port was taken meanwhile.
const START_ATTEMPTS: u32 = 5;
/// Lines of the server log quoted in errors.
const LOG_TAIL_LINES: usize = 30;

/// Names of standbys (`application_name`), unique in this process.
static NEXT_STANDBY: AtomicU32 = AtomicU32::new(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no PostgreSQL server binaries found ({0}); install them with `apt-get install postgresql`, or set PG_BINDIR to the directory holding initdb and pg_ctl"
    )]
    NoBinaries(String),
    #[error(
        "running as root, but there is no `postgres` system user to run PostgreSQL as (initdb refuses root): {0}"
    )]
    NoPostgresUser(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed ({status}): {output}{log}")]
    Command {
        what: String,
        status: ExitStatus,
        output: String,
        /// The tail of the server log, formatted (may be empty).
        log: String,
    },
    #[error("timed out after {}s waiting for {what}{log}", WAIT_LIMIT.as_secs())]
    Timeout { what: String, log: String },
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("no randomness for the app role's password")]
    Random,
    #[error("invalid database name {0:?}: use lowercase letters, digits and _ (at most 63)")]
    InvalidName(String),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The system user the PostgreSQL programs run as when we are root.
#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

impl Owner {
    /// `None` when not root: the programs run as ourselves.
    fn find() -> Result<Option<Owner>, Error> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        match nix::unistd::User::from_name("postgres") {
            Ok(Some(user)) => Ok(Some(Owner {
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            })),
            Ok(None) => Err(Error::NoPostgresUser(
                "no such user (apt-get install postgresql creates it)".to_owned(),
            )),
            Err(errno) => Err(Error::NoPostgresUser(errno.to_string())),
        }
    }
}

/// Gives `path` to the PostgreSQL user (when we are root).
fn give(path: &Path, owner: Option<Owner>) -> Result<(), Error> {
    match owner {
        Some(o) => std::os::unix::fs::chown(path, Some(o.uid), Some(o.gid))
            .map_err(io_error(format!("chown {}", path.display()))),
        None => Ok(()),
    }
}

/// Writes a file (replacing it), created with `mode`, and gives it to the PostgreSQL user
/// when `owner` is set. An existing file keeps its owner and gets `mode`.
fn write_file(path: &Path, contents: &[u8], mode: u32, owner: Option<Owner>) -> Result<(), Error> {
    let what = || format!("write {}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_error(what()))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_error(what()))?;
    file.write_all(contents).map_err(io_error(what()))?;
    drop(file);
    give(path, owner)
}

fn append_file(path: &Path, contents: &str) -> Result<(), Error> {
    let what = || format!("append to {}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_error(what()))?;
    file.write_all(contents.as_bytes())
        .map_err(io_error(what()))
}

/// Where the PostgreSQL programs are.
fn find_bindir() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
        return Err(Error::NoBinaries(format!(
            "PG_BINDIR={} has no initdb",
            dir.display()
        )));
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    Err(Error::NoBinaries(
        "no PG_BINDIR, no /usr/lib/postgresql/*/bin/initdb, no initdb in `pg_config --bindir`"
            .to_owned(),
    ))
}

/// Quotes a string for postgresql.conf or SQL ('...' with '' for ').
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Polls `ready` every [`POLL_EVERY`] for up to [`WAIT_LIMIT`].
fn wait_until(
    what: &str,
    log: &Path,
    mut ready: impl FnMut() -> Result<bool, Error>,
) -> Result<(), Error> {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        if ready()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                log: log_tail(log),
            });
        }
        std::thread::sleep(POLL_EVERY);
    }
}

/// The last lines of a server log, formatted for an error message ("" when unreadable).
fn log_tail(log: &Path) -> String {
    let Ok(bytes) = std::fs::read(log) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    let mut out = format!("\n--- last lines of {} ---", log.display());
    for line in &lines[start..] {
        let _ = write!(out, "\n{line}");
    }
    out
}

/// A random password for the app role: 24 random bytes, hex (48 characters).
fn random_password() -> Result<String, Error> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Random)?;
    Ok(hex::encode(bytes))
}

/// A free TCP port on 127.0.0.1 (free when we looked).
fn free_port() -> Result<u16, Error> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(io_error("bind 127.0.0.1:0 to find a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io_error("local address of the free-port listener"))?
        .port();
    Ok(port)
}

/// A throwaway CA's PEM and a server certificate (localhost, 127.0.0.1) with its key.
struct Tls {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn generate_tls() -> Result<Tls, Error> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "pgcluster throwaway test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

    let mut server = CertificateParams::new(vec!["localhost".to_owned()])?;
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = server.signed_by(&key, &issuer)?;
    Ok(Tls {
        ca_pem: issuer.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The settings pgcluster owns, in `<data>/pgcluster.conf` (included from
/// postgresql.conf; rewritten for a standby and when the port changes).
fn settings(port: u16, socket_dir: &Path) -> String {
    let socket_dir = quote(&socket_dir.to_string_lossy());
    format!(
        "# Written by pgcluster: a throwaway test cluster.
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = {socket_dir}
max_connections = 100
shared_buffers = '32MB'
fsync = on
synchronous_commit = on
full_page_writes = on
wal_level = replica
max_wal_senders = 5
wal_keep_size = '64MB'
hot_standby = on
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
password_encryption = 'scram-sha-256'
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d %a '
"
    )
}

/// The only ways in: the superuser over the unix socket, the app role over TLS with its
/// password, and replication (pg_basebackup, standbys) for the superuser on loopback.
const PG_HBA: &str = "# Written by pgcluster: a throwaway test cluster.
# TYPE   DATABASE     USER      ADDRESS        METHOD
local    all          postgres                 trust
hostssl  all          vault     127.0.0.1/32   scram-sha-256
host     replication  postgres  127.0.0.1/32   trust
";

/// A throwaway PostgreSQL cluster: a primary ([`Cluster::start`]) or a streaming standby
/// ([`Cluster::start_standby`]). Dropping it stops it (`pg_ctl stop -m immediate`) and
/// removes its directory.
#[derive(Debug)]
pub struct Cluster {
    bindir: PathBuf,
    owner: Option<Owner>,
    port: u16,
    /// The cluster directory: socket, log, ca.pem, password file; `data/` in it.
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    password_file: PathBuf,
    ca_file: PathBuf,
    /// Stops the cluster and removes its directory if this process dies without
    /// dropping the cluster (killed, or a cluster in a static).
    watchdog: Option<Child>,
    /// Removes the directory when dropped, which is after `Drop::drop` has stopped the
    /// server (fields are dropped after it).
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// A primary: TLS on, fsync on, listening on 127.0.0.1:<free port> and on a unix
    /// socket in its own directory, with the app role `vault` and its database
    /// `tokenvault`.
    pub fn start() -> Result<Cluster, Error> {
        let mut cluster = Cluster::new_dir(find_bindir()?, Owner::find()?)?;
        cluster.run(
            cluster
                .pg_command("initdb")
                .arg("-D")
                .arg(&cluster.data)
                .args([
                    "--auth-local=trust",
                    "--auth-host=reject",
                    "-U",
                    "postgres",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--data-checksums",
                    // Throwaway: no need to wait for the disk here; the server runs with fsync on.
                    "--no-sync",
                    "--no-instructions",
                ]),
            "initdb",
        )?;
        cluster.spawn_watchdog()?;

        let tls = generate_tls()?;
        write_file(
            &cluster.ca_file,
            tls.ca_pem.as_bytes(),
            0o644,
            cluster.owner,
        )?;
        // In the data directory, so that pg_basebackup copies them to standbys. The
        // server refuses a key that others can read (it must be 0600 and its own).
        let data = &cluster.data;
        write_file(
            &data.join("server.crt"),
            tls.cert_pem.as_bytes(),
            0o644,
            cluster.owner,
        )?;
        write_file(
            &data.join("server.key"),
            tls.key_pem.as_bytes(),
            0o600,
            cluster.owner,
        )?;
        write_file(
            &data.join("pg_hba.conf"),
            PG_HBA.as_bytes(),
            0o600,
            cluster.owner,
        )?;
        append_file(
            &data.join("postgresql.conf"),
            "\n# pgcluster's settings.\ninclude 'pgcluster.conf'\n",
        )?;
        cluster.start_on_free_port()?;

        let password = random_password()?;
        cluster.psql(
            "postgres",
            &format!(
                "SET password_encryption = 'scram-sha-256';
                 CREATE ROLE {APP_USER} LOGIN PASSWORD {};
                 CREATE DATABASE {APP_DATABASE} OWNER {APP_USER};",
                quote(&password)
            ),
        )?;
        write_file(&cluster.password_file, password.as_bytes(), 0o600, None)?;
        Ok(cluster)
    }

    /// A streaming standby of `self` made with `pg_basebackup -R`. With `synchronous`,
    /// the primary's `synchronous_standby_names` is set to this standby's
    /// `application_name` (and reloaded), so that a commit on the primary returns only
    /// once the standby has flushed it (`synchronous_commit = on`). Returns once the
    /// standby is streaming (and, with `synchronous`, is the primary's sync standby).
    pub fn start_standby(&self, synchronous: bool) -> Result<Cluster, Error> {
        let name = format!("standby{}", NEXT_STANDBY.fetch_add(1, Ordering::Relaxed));
        let mut standby = Cluster::new_dir(self.bindir.clone(), self.owner)?;
        let source = format!(
            "host=127.0.0.1 port={} user=postgres application_name={name}",
            self.port
        );
        standby
            .run(
                standby
                    .pg_command("pg_basebackup")
                    .arg("-D")
                    .arg(&standby.data)
                    .args(["-d", &source, "-R", "-X", "stream", "--checkpoint=fast"])
                    .arg("--no-sync"),
                "pg_basebackup",
            )
            // The primary's log says why it refused.
            .map_err(|e| with_log(e, &self.log))?;
        standby.spawn_watchdog()?;
        std::fs::copy(&self.ca_file, &standby.ca_file)
            .map_err(io_error(format!("copy {}", self.ca_file.display())))?;
        std::fs::copy(&self.password_file, &standby.password_file)
            .map_err(io_error(format!("copy {}", self.password_file.display())))?;
        // The copied postgresql.auto.conf has the primary's synchronous_standby_names
        // when an earlier standby was synchronous: a promoted standby must not wait for it.
        append_file(
            &standby.data.join("postgresql.auto.conf"),
            "synchronous_standby_names = ''\n",
        )?;
        standby.start_on_free_port()?;

        if synchronous {
            self.psql(
                "postgres",
                &format!(
                    "ALTER SYSTEM SET synchronous_standby_names = {};
                     SELECT pg_reload_conf();",
                    quote(&format!("\"{name}\""))
                ),
            )?;
        }
        let want = if synchronous { "sync" } else { "async" };
        let query = format!(
            "SELECT sync_state FROM pg_stat_replication
             WHERE application_name = {} AND state = 'streaming'",
            quote(&name)
        );
        wait_until(
            &format!("standby {name} to stream from the primary ({want})"),
            &standby.log,
            || Ok(self.psql("postgres", &query)? == want),
        )
        .map_err(|e| with_log(e, &self.log))?;
        Ok(standby)
    }

    /// The TCP port on 127.0.0.1 (also the unix socket's number).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection string for the app role over TCP (the server requires TLS for it):
    /// `host=127.0.0.1 port=N user=vault dbname=tokenvault`. No password and no TLS
    /// settings in it: see [`Cluster::password_file`] and [`Cluster::ca_file`].
    pub fn conninfo(&self) -> String {
        self.conninfo_for(APP_DATABASE)
    }

    /// [`Cluster::conninfo`] for another database.
    pub fn conninfo_for(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={APP_USER} dbname={dbname}",
            self.port
        )
    }

    /// Creates a fresh database owned by the app role (one per test, say). Names are
    /// lowercase letters, digits and `_`.
    pub fn create_database(&self, name: &str) -> Result<(), Error> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(Error::InvalidName(name.to_owned()));
        }
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {name} OWNER {APP_USER}"),
        )
        .map(drop)
    }

    /// The app role's password (mode 0600; no trailing newline).
    pub fn password_file(&self) -> &Path {
        &self.password_file
    }

    /// The PEM of the CA that signed the server certificate (localhost, 127.0.0.1).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The data directory (`PGDATA`): every file the server writes, its WAL
    /// (`pg_wal/`) included.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server log.
    pub fn log_file(&self) -> &Path {
        &self.log
    }

    /// Runs SQL as the superuser over the unix socket (`psql -X -A -t -q -v
    /// ON_ERROR_STOP=1`, the SQL on stdin, so statements run one by one, each in its own
    /// transaction unless the SQL says otherwise); returns the output, trimmed.
    pub fn psql(&self, dbname: &str, sql: &str) -> Result<String, Error> {
        let mut command = self.pg_command("psql");
        command
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.root)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", dbname])
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(io_error("start psql"))?;
        let stdin = child.stdin.take();
        // Written from another thread: psql may answer before it has read everything.
        let output = std::thread::scope(|scope| {
            let writer = scope.spawn(move || match stdin {
                Some(mut stdin) => stdin.write_all(sql.as_bytes()),
                None => Ok(()),
            });
            let output = child.wait_with_output();
            // A write error (psql stopped reading) shows in psql's own status.
            let _ = writer.join();
            output
        })
        .map_err(io_error("run psql"))?;
        let output = self.check(output, &format!("psql -d {dbname}"))?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// `pg_ctl stop -m immediate`: a crash, no checkpoint; [`Cluster::restart`] recovers.
    pub fn stop_immediate(&mut self) -> Result<(), Error> {
        self.run(
            self.pg_command("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "-t"])
                .arg(WAIT_LIMIT.as_secs().to_string()),
            "pg_ctl stop -m immediate",
        )
        .map(drop)
    }

    /// Starts it again on the same port (after [`Cluster::stop_immediate`]); returns once
    /// it accepts connections (crash recovery done).
    pub fn restart(&mut self) -> Result<(), Error> {
        self.pg_ctl_start().map_err(StartError::into_error)?;
        self.wait_accepting()
    }

    /// `pg_ctl promote` on a standby; returns once it accepts writes.
    pub fn promote(&self) -> Result<(), Error> {
        self.run(
            self.pg_command("pg_ctl")
                .arg("promote")
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-t"])
                .arg(WAIT_LIMIT.as_secs().to_string()),
            "pg_ctl promote",
        )?;
        wait_until("the promoted standby to accept writes", &self.log, || {
            Ok(self.psql("postgres", "SELECT NOT pg_is_in_recovery()")? == "t")
        })
    }

    /// A new cluster directory (owned by the PostgreSQL user), nothing in it yet.
    fn new_dir(bindir: PathBuf, owner: Option<Owner>) -> Result<Cluster, Error> {
        let dir = tempfile::Builder::new()
            .prefix("pgcluster-")
            .tempdir_in(std::env::temp_dir())
            .map_err(io_error("create a temporary directory"))?;
        let root = dir.path().to_owned();
        give(&root, owner)?;
        Ok(Cluster {
            bindir,
            owner,
            port: 0,
            data: root.join("data"),
            log: root.join("postgres.log"),
            password_file: root.join("app-password"),
            ca_file: root.join("ca.pem"),
            root,
            watchdog: None,
            _dir: dir,
        })
    }

    /// A PostgreSQL program, run as the PostgreSQL user, in the cluster directory, with
    /// no PG* variables from our environment.
    fn pg_command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        // psql and pg_isready may come from another package than the server.
        let mut command = if path.is_file() {
            Command::new(path)
        } else {
            Command::new(program)
        };
        command.current_dir(&self.root);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(key);
            }
        }
        command.env_remove("LC_ALL").env("LC_MESSAGES", "C");
        if let Some(owner) = self.owner {
            command.uid(owner.uid).gid(owner.gid);
        }
        command
    }

    /// Runs a command to completion; an error has its output and the log's tail.
    fn run(&self, command: &mut Command, what: &str) -> Result<Output, Error> {
        let output = command
            .stdin(Stdio::null())
            .output()
            .map_err(io_error(format!(
                "run {what} ({:?})",
                command.get_program()
            )))?;
        self.check(output, what)
    }

    fn check(&self, output: Output, what: &str) -> Result<Output, Error> {
        if output.status.success() {
            return Ok(output);
        }
        let mut text = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !stdout.trim().is_empty() {
            let _ = write!(text, "\n{}", stdout.trim());
        }
        Err(Error::Command {
            what: what.to_owned(),
            status: output.status,
            output: text,
            log: log_tail(&self.log),
        })
    }

    /// Starts the server on a free port; when the port was taken in the meantime, again
    /// on another one.
    fn start_on_free_port(&mut self) -> Result<(), Error> {
        let mut attempt = 1;
        loop {
            self.port = free_port()?;
            let settings = settings(self.port, &self.root);
            write_file(
                &self.data.join("pgcluster.conf"),
                settings.as_bytes(),
                0o600,
                self.owner,
            )?;
            match self.pg_ctl_start() {
                Ok(()) => return self.wait_accepting(),
                Err(StartError::PortTaken(_)) if attempt < START_ATTEMPTS => attempt += 1,
                Err(e) => return Err(e.into_error()),
            }
        }
    }

    /// `pg_ctl start -w`: returns once the server accepts connections (a standby: once
    /// it is consistent and accepts read-only ones).
    fn pg_ctl_start(&self) -> Result<(), StartError> {
        let log_before = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        let result = self.run(
            self.pg_command("pg_ctl")
                .arg("start")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&self.log)
                .args(["-w", "-t"])
                .arg(WAIT_LIMIT.as_secs().to_string()),
            &format!("pg_ctl start (port {})", self.port),
        );
        match result {
            Ok(_) => Ok(()),
            Err(e) => {
                let new_log = std::fs::read(&self.log)
                    .map(|bytes| {
                        let start = usize::try_from(log_before).unwrap_or(0).min(bytes.len());
                        String::from_utf8_lossy(&bytes[start..]).into_owned()
                    })
                    .unwrap_or_default();
                if new_log.contains("Address already in use") {
                    Err(StartError::PortTaken(e))
                } else {
                    Err(StartError::Other(e))
                }
            }
        }
    }

    /// Waits until the server answers on its unix socket (pg_isready).
    fn wait_accepting(&self) -> Result<(), Error> {
        let port = self.port.to_string();
        wait_until(
            &format!("the server on port {} to accept connections", self.port),
            &self.log,
            || {
                let status = self
                    .pg_command("pg_isready")
                    .arg("-q")
                    .arg("-h")
                    .arg(&self.root)
                    .args(["-p", &port, "-U", "postgres", "-d", "postgres"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map_err(io_error("run pg_isready"))?;
                Ok(status.success())
            },
        )
    }

    /// A process that outlives this one by a moment: when our end of its stdin closes
    /// (we exited, however), it stops the cluster and removes its directory. Ignores the
    /// terminal's signals, which reach the whole process group. [`Drop`] kills it first.
    fn spawn_watchdog(&mut self) -> Result<(), Error> {
        const SCRIPT: &str = r#"trap '' INT TERM HUP QUIT
while read -r _; do :; done
"$1" stop -D "$2" -m immediate -w >/dev/null 2>&1
rm -rf "$3"
"#;
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(SCRIPT)
            .arg("pgcluster-watchdog")
            .arg(self.bindir.join("pg_ctl"))
            .arg(&self.data)
            .arg(&self.root)
            .current_dir(&self.root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(owner) = self.owner {
            command.uid(owner.uid).gid(owner.gid);
        }
        self.watchdog = Some(command.spawn().map_err(io_error("start the watchdog"))?);
        Ok(())
    }
}

/// Why a start failed: the port was taken (try another) or something else.
enum StartError {
    PortTaken(Error),
    Other(Error),
}

impl StartError {
    fn into_error(self) -> Error {
        match self {
            StartError::PortTaken(e) | StartError::Other(e) => e,
        }
    }
}

/// Adds another log's tail (e.g. the primary's, for a standby that could not connect).
fn with_log(error: Error, log: &Path) -> Error {
    match error {
        Error::Command {
            what,
            status,
            output,
            log: mut text,
        } => {
            text.push_str(&log_tail(log));
            Error::Command {
                what,
                status,
                output,
                log: text,
            }
        }
        Error::Timeout {
            what,
            log: mut text,
        } => {
            text.push_str(&log_tail(log));
            Error::Timeout { what, log: text }
        }
        other => other,
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if self.data.join("postmaster.pid").exists() {
            let _ = self
                .pg_command("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "-t"])
                .arg(WAIT_LIMIT.as_secs().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A port taken while the cluster was down: `restart` (same port) fails and says
    /// why; a start on a free port tries again on another one.
    #[test]
    fn port_taken_meanwhile() {
        let mut cluster = Cluster::start().unwrap();
        let port = cluster.port();
        cluster.stop_immediate().unwrap();
        let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();

        let error = cluster.restart().unwrap_err().to_string();
        eprintln!("{error}");
        assert!(error.contains("pg_ctl start"), "{error}");
        assert!(error.contains("Address already in use"), "{error}");
        assert!(error.contains("--- last lines of"), "{error}");

        assert!(matches!(
            cluster.pg_ctl_start(),
            Err(StartError::PortTaken(_))
        ));
        cluster.start_on_free_port().unwrap();
        assert_ne!(cluster.port(), port);
        assert_eq!(cluster.psql("postgres", "SELECT 1").unwrap(), "1");
        drop(squatter);
    }

    #[test]
    fn clusters_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Cluster>();
        send_sync::<Error>();
    }

    #[test]
    fn database_names() {
        assert_eq!(quote("it's"), "'it''s'");
        let cluster = Cluster::start().unwrap();
        for bad in ["", "Caps", "1st", "a;b", "a b", &"x".repeat(64)] {
            assert!(
                matches!(cluster.create_database(bad), Err(Error::InvalidName(_))),
                "{bad:?}"
            );
        }
        cluster.create_database("t_1").unwrap();
        assert_eq!(
            cluster
                .psql(
                    "postgres",
                    "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 't_1'"
                )
                .unwrap(),
            APP_USER
        );
    }
}
