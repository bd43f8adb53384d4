//! Test harness: real keyservice and vault-server instances with real mutual TLS on
//! 127.0.0.1, certificates generated at test time. Servers run in-process through
//! their libraries' `bind`/`start` + `serve` (the same code the binaries run), or as
//! the real binaries when a test needs a process (logs, signals, vaultctl).
//!
//! Ports are bound first (port 0) and their addresses read back; nothing sleeps to wait.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // test code

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use devstack::{DevCa, Usage};
use runtime::shutdown::{self, ShutdownTrigger};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinHandle;
use vault_client::{ClientConfig, VaultClient};

/// The identities every test stack has certificates for.
pub const VAULT: &str = "vault-server";
pub const KEYSERVICE: &str = "keyservice";
/// Tenant `acme`: tokenize, read, delete. Also a keyservice admin.
pub const ADMIN: &str = "admin";
/// The second keyservice admin (dual control); no vault permissions.
pub const OFFICER: &str = "officer";
/// Tenant `acme`: read only.
pub const READER: &str = "reader";
/// Tenant `globex`: tokenize, read, delete.
pub const OTHER_TENANT: &str = "globex-service";
/// A valid certificate from our CA that the policy does not list.
pub const STRANGER: &str = "stranger";
/// A certificate from another CA.
pub const FOREIGN: &str = "foreign";
/// The sandbox processor's server certificate.
pub const SANDBOX: &str = "sandbox";

pub fn identity(name: &str) -> String {
    format!("{}{name}", devstack::IDENTITY_PREFIX)
}

/// Certificates, keys, configs and data of one stack, in a temporary directory.
#[derive(Debug)]
pub struct StackDir {
    pub dir: tempfile::TempDir,
    /// The stack's CA, kept for certificates a test makes later.
    ca: DevCa,
    /// Lines for the vault config's `[storage]` section (see [`StackDir::set_storage`]).
    storage: Mutex<String>,
    /// More lines for its `[limits]` section (see [`StackDir::set_limits`]).
    limits: Mutex<String>,
    /// With `TOKENVAULT_TEST_STORAGE=postgres`: the throwaway database every vault of
    /// this stack uses (see [`StackDir::new`]).
    pub postgres: Option<pgcluster::Cluster>,
}

impl StackDir {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("test CA").unwrap();
        let path = dir.path();
        devstack::write_file(&path.join("ca.pem"), ca.ca_pem().as_bytes(), false).unwrap();
        for name in [VAULT, KEYSERVICE, SANDBOX] {
            ca.write_identity(path, name, Usage::ServerAndClient)
                .unwrap();
        }
        for name in [ADMIN, OFFICER, READER, OTHER_TENANT, STRANGER] {
            ca.write_identity(path, name, Usage::Client).unwrap();
        }
        let foreign = DevCa::generate("another CA").unwrap();
        foreign
            .write_identity(path, FOREIGN, Usage::Client)
            .unwrap();
        // Same name as a listed identity, but signed by the other CA.
        foreign
            .write_identity(path, "foreign-admin", Usage::Client)
            .unwrap();
        devstack::write_file(
            &path.join("foreign-ca.pem"),
            foreign.ca_pem().as_bytes(),
            false,
        )
        .unwrap();

        std::fs::write(
            path.join("policy.toml"),
            format!(
                r#"
[[identity]]
id = "{admin}"
tenant = "acme"
permissions = ["tokenize", "read", "delete", "subject", "fingerprint", "import", "export", "admin", "audit", "forward:sandbox", "forward:slow", "forward:down", "forward:tiny", "forward:pinned", "forward:foreign-ca", "forward:loopback-denied", "forward:reasoned", "forward:routed"]

[[identity]]
id = "{reader}"
tenant = "acme"
permissions = ["read"]

[[identity]]
id = "{other}"
tenant = "globex"
permissions = ["tokenize", "read", "delete", "subject", "forward:sandbox"]
"#,
                admin = identity(ADMIN),
                reader = identity(READER),
                other = identity(OTHER_TENANT),
            ),
        )
        .unwrap();
        // The dev stack's keyservice config (vault-server and admin identities), on a
        // free port.
        let ports = devstack::Ports {
            keyservice: SocketAddr::from(([127, 0, 0, 1], 0)),
            keyservice_admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..devstack::Ports::default()
        };
        // Tests destroy versions moments after rotating them.
        std::fs::write(
            path.join("keyservice.toml"),
            devstack::keyservice_config(&ports)
                .replace("destroy_grace_secs = 10", "destroy_grace_secs = 1"),
        )
        .unwrap();
        keyservice::keyring::RootKey::generate_file(&path.join("root.key")).unwrap();
        let settings = keyservice::Settings::load(&path.join("keyservice.toml")).unwrap();
        keyservice::init(&settings).unwrap();
        // The whole suite can run against PostgreSQL instead of RocksDB (a cluster per
        // stack): `TOKENVAULT_TEST_STORAGE=postgres cargo test -p integration-tests`.
        let postgres = on_postgres().then(|| pgcluster::Cluster::start().unwrap());
        let storage = postgres.as_ref().map_or_else(String::new, |cluster| {
            postgres_storage(
                &cluster.conninfo(),
                cluster.password_file(),
                cluster.ca_file(),
                "test",
            )
        });
        Self {
            dir,
            ca,
            storage: Mutex::new(storage),
            limits: Mutex::new(String::new()),
            postgres,
        }
    }

    /// TOML for the vault config's `[storage]` section, e.g. `type = "postgres"` and a
    /// `[storage.postgres]` table (see [`postgres_storage`]); used by every vault
    /// started from here on.
    /// Writes `<file>.pem` and `<file>.key`: a certificate from this stack's CA with
    /// subject CN `cn` and no SAN (for [`raw_channel`] as `file`).
    pub fn write_cn_only_identity(&self, file: &str, cn: &str) {
        let issued = self.ca.issue_cn_only(cn).unwrap();
        let path = self.dir.path();
        devstack::write_file(
            &path.join(format!("{file}.pem")),
            issued.cert_pem.as_bytes(),
            false,
        )
        .unwrap();
        devstack::write_file(
            &path.join(format!("{file}.key")),
            issued.key_pem.as_bytes(),
            true,
        )
        .unwrap();
    }

    pub fn set_storage(&self, toml: &str) {
        *self.storage.lock().unwrap() = toml.to_owned();
    }

    /// Lines added to the vault config's `[limits]` section at the next (re)start.
    pub fn set_limits(&self, toml: &str) {
        *self.limits.lock().unwrap() = toml.to_owned();
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `<name>.pem` and `<name>.key`: a client certificate from the stack's CA
    /// with identity [`identity`]`(name)`, for callers a test adds to the policy.
    pub fn add_client_identity(&self, name: &str) {
        self.ca
            .write_identity(self.path(), name, Usage::Client)
            .unwrap();
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path().join("vault-data")
    }

    /// Adds settings to the keyservice config's `[lifecycle]` section (its last).
    pub fn set_keyservice_lifecycle(&self, lifecycle: &str) {
        let path = self.path().join("keyservice.toml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(lifecycle);
        text.push('\n');
        std::fs::write(path, text).unwrap();
    }

    /// Writes the vault config pointing at a keyservice on `keyservice_port`.
    pub fn write_vault_config(&self, keyservice_port: u16) -> PathBuf {
        self.write_vault_config_with(keyservice_port, "")
    }

    /// The vault config with extra TOML (processors, forwarding settings) appended.
    pub fn write_vault_config_with(&self, keyservice_port: u16, extra: &str) -> PathBuf {
        let path = self.path().join("vault-server.toml");
        let storage = self.storage.lock().unwrap().clone();
        let limits = self.limits.lock().unwrap().clone();
        std::fs::write(
            &path,
            format!(
                r#"
listen_addr = "127.0.0.1:0"
data_dir = "vault-data"
policy_file = "policy.toml"
backup_dir = "backups"
max_batch_size = 1000
[tls]
ca_file = "ca.pem"
cert_file = "vault-server.pem"
key_file = "vault-server.key"
[keyservice]
endpoint = "https://localhost:{keyservice_port}"
max_retry_backoff_ms = 200
usage_report_interval_ms = 200
[limits]
tls_handshake_timeout_ms = 1000
{limits}
[admin]
listen_addr = "127.0.0.1:0"
[storage]
# Degraded below 1 MiB free only: tests must not depend on the machine's free space
# (the full-disk test fills a small tmpfs to reach it).
low_disk_mb = 1
{storage}
{extra}
"#
            ),
        )
        .unwrap();
        path
    }

    /// Client settings for `name`'s certificate against `addr`.
    pub fn client_config(&self, name: &str, addr: SocketAddr) -> ClientConfig {
        let mut config = ClientConfig::new(
            format!("https://localhost:{}", addr.port()),
            self.path().join("ca.pem"),
            self.path().join(format!("{name}.pem")),
            self.path().join(format!("{name}.key")),
        );
        config.timeout = std::time::Duration::from_secs(30);
        config
    }
}

impl Default for StackDir {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
struct Running {
    trigger: ShutdownTrigger,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.trigger.trigger();
        self.task.await.unwrap();
    }
}

/// The sandbox processor running in this process (a real HTTPS server on 127.0.0.1),
/// with the journal of what it received.
#[derive(Debug)]
pub struct SandboxServer {
    pub addr: SocketAddr,
    pub journal: sandbox_processor::Journal,
    /// The sandbox's test processor key for card exports: armored public key and
    /// fingerprint.
    pub export_key: (String, String),
    running: Running,
}

impl SandboxServer {
    pub async fn start(dir: &StackDir) -> Self {
        let bound = sandbox_processor::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &dir.path().join(format!("{SANDBOX}.pem")),
            &dir.path().join(format!("{SANDBOX}.key")),
        )
        .await
        .unwrap();
        let addr = bound.local_addr();
        let journal = bound.journal();
        let export_key = bound.export_key();
        let (trigger, shutdown) = shutdown::channel();
        let task = tokio::spawn(bound.serve(shutdown));
        Self {
            addr,
            journal,
            export_key,
            running: Running { trigger, task },
        }
    }

    pub async fn stop(self) {
        self.running.stop().await;
    }
}

/// A sandbox charge body with the card's number and expiry.
pub const CHARGE: &str = r#"{"number":"{{card.number}}","exp_month":"{{card.exp_month}}","exp_year":"{{card.exp_year}}"}"#;

/// The credentials the test processors' routes send (`secret_headers`).
pub const SANDBOX_API_KEY: &str = "sk_test_sandbox_0123456789";

/// A free-form POST /v1/charges forward of `token` to `processor` with `body` (a
/// template): the test processors take free-form forwards (`dangerous_free_form`), as
/// these tests are of that mode.
pub fn charge(processor: &str, token: &str, body: &str) -> vault_client::ForwardRequest {
    vault_client::ForwardRequest {
        processor: processor.into(),
        method: "POST".into(),
        path: "/v1/charges".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.into(),
        token: token.into(),
        ..Default::default()
    }
}

/// Polls `check` every 50 ms until it returns Some, for at most `limit`.
pub async fn within<T, F, Fut>(limit: std::time::Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = std::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Whether the suite runs with the vault on PostgreSQL (`TOKENVAULT_TEST_STORAGE`).
pub fn on_postgres() -> bool {
    std::env::var("TOKENVAULT_TEST_STORAGE").as_deref() == Ok("postgres")
}

/// For a test about RocksDB itself (its files, backups, disk): true, and says so, when
/// the suite runs on PostgreSQL, where it does not apply.
pub fn rocksdb_only(why: &str) -> bool {
    if on_postgres() {
        skipped(&format!("on PostgreSQL: {why}"));
    }
    on_postgres()
}

/// The variable naming the directory where a test that skips itself leaves a marker
/// (`make test` sets it per phase; `make compliance` reads it: scripts/compliance.py).
pub const SKIP_DIR_VAR: &str = "TOKENVAULT_TEST_SKIP_DIR";

/// Says that the running test skips itself, and why: the one way a test does (the
/// caller then returns). libtest shows a returning test as `ok` and keeps what it
/// printed to itself, so the compliance runner could not tell a skip from a pass; with
/// [`SKIP_DIR_VAR`] set, a file named after the test (libtest names each test's thread
/// after it: `module::test`) holds the reason. A thread whose name is not a test path
/// (a tokio worker, `spawn_blocking`, `main`, none) leaves `unattributed-*`, and the
/// runner fails the run on any marker that names no test that ran: a skip it cannot
/// attribute is never read as a pass.
///
/// Call it from the test's own thread (the body of a `#[tokio::test]` runs there), not
/// from a spawned task.
pub fn skipped(why: &str) {
    println!("skipped {why}");
    let Some(dir) = std::env::var_os(SKIP_DIR_VAR) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let thread = std::thread::current();
    let name = match thread.name() {
        Some(name) if name.contains("::") => name.replace(['/', '\\'], "_"),
        other => format!(
            "unattributed-{}-{}-{:?}",
            other.unwrap_or("unnamed").replace(['/', '\\'], "_"),
            std::process::id(),
            thread.id()
        ),
    };
    std::fs::create_dir_all(&dir).expect("create the skip marker directory");
    std::fs::write(dir.join(name), format!("{why}\n")).expect("write the skip marker");
}

/// The `[storage]` lines of a vault on PostgreSQL: the app role of a throwaway
/// cluster (or of several hosts, the one accepting writes), named `node`.
pub fn postgres_storage(
    conninfo: &str,
    password_file: &Path,
    ca_file: &Path,
    node: &str,
) -> String {
    format!(
        r#"type = "postgres"
[storage.postgres]
url = "{conninfo}"
password_file = "{}"
ca_file = "{}"
connect_timeout_ms = 2000
node_name = "{node}"
"#,
        password_file.display(),
        ca_file.display()
    )
}

/// A vault-server started beside a [`Stack`]'s own (see [`Stack::start_another_vault`]).
#[derive(Debug)]
pub struct OtherVault {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    running: Running,
}

impl OtherVault {
    pub async fn stop(self) {
        self.running.stop().await;
    }
}

/// Keyservice and vault-server running in this process.
#[derive(Debug)]
pub struct Stack {
    pub dir: StackDir,
    pub keyservice_addr: SocketAddr,
    /// The keyservice's admin port (`/metrics`, `/healthz`, plain HTTP).
    pub keyservice_admin_addr: SocketAddr,
    pub vault_addr: SocketAddr,
    /// The vault's admin port (`/metrics`, `/healthz`, plain HTTP).
    pub vault_admin_addr: SocketAddr,
    pub sandbox_addr: SocketAddr,
    /// Every request the sandbox processor received.
    pub sandbox: sandbox_processor::Journal,
    /// Processor and forwarding settings appended to the vault config.
    vault_extra: String,
    keyservice: Option<Running>,
    vault: Option<Running>,
    sandbox_server: Option<SandboxServer>,
}

/// The processors of every test stack, all pointing at the sandbox on `port` (or, for
/// `down`, at a port where nothing listens).
pub fn processors_config(
    dir: &Path,
    sandbox_port: u16,
    closed_port: u16,
    cvc_ttl_secs: u64,
) -> String {
    processors_config_with(
        dir,
        sandbox_port,
        closed_port,
        &format!("cvc_ttl_secs = {cvc_ttl_secs}\n"),
    )
}

/// [`processors_config`] with `forwarding`, the lines of its `[forwarding]` section.
pub fn processors_config_with(
    dir: &Path,
    sandbox_port: u16,
    closed_port: u16,
    forwarding: &str,
) -> String {
    let ca = dir.join("ca.pem").display().to_string();
    let foreign_ca = dir.join("foreign-ca.pem").display().to_string();
    let admin = identity(ADMIN);
    let other = identity(OTHER_TENANT);
    let key_file = dir.join("sandbox-api-key");
    std::fs::write(&key_file, SANDBOX_API_KEY).unwrap();
    let key_file = key_file.display().to_string();
    // Free-form forwards (`dangerous_free_form`): most forward tests are of that mode.
    let entry = |name: &str, url: &str, ca: &str, extra: &str| {
        format!(
            r#"
[[processor]]
name = "{name}"
base_url = "{url}"
ca_file = "{ca}"
allow_private_network = true
allowed_identities = ["{admin}", "{other}"]
dangerous_free_form = true
routes = [{{ method = "POST", path = "/v1/charges" }}, {{ method = "GET", path = "/v1/charges/*" }}]
inject = {{ number = ["body"], exp_month = ["body"], exp_year = ["body"], name = ["body"], cvc = ["body"] }}
{extra}
"#
        )
    };
    let sandbox = format!("https://localhost:{sandbox_port}");
    // Declared routes only: the config owns the request.
    let routed = format!(
        r#"
[[processor]]
name = "routed"
base_url = "{sandbox}"
ca_file = "{ca}"
allow_private_network = true
allowed_identities = ["{admin}", "{other}"]
inject = {{ number = ["body"], exp_month = ["body"], exp_year = ["body"], name = ["body"], cvc = ["body"] }}

[[processor.route]]
name = "charge"
method = "POST"
path = "/v1/charges"
content_type = "application/json"
body = '{{"amount":"{{{{field.amount}}}}","memo":"{{{{field.memo}}}}","number":"{{{{card.number}}}}","exp_month":"{{{{card.exp_month}}}}","exp_year":"{{{{card.exp_year}}}}"}}'
secret_headers = {{ authorization = {{ file = "{key_file}", prefix = "Bearer " }} }}
caller_headers = ["x-sandbox-echo", "x-request-source"]
fields = {{ amount = {{ kind = "amount", max_len = 12 }}, memo = {{ kind = "text", max_len = 40, required = false }} }}

[[processor.route]]
name = "authorize"
method = "POST"
path = "/v1/charges"
content_type = "application/json"
body = '{{"amount":"{{{{field.amount}}}}","number":"{{{{card.number}}}}","exp_month":"{{{{card.exp_month}}}}","exp_year":"{{{{card.exp_year}}}}","cvc":"{{{{card.cvc}}}}"}}'
secret_headers = {{ authorization = {{ file = "{key_file}", prefix = "Bearer " }} }}
fields = {{ amount = {{ kind = "amount", max_len = 12 }} }}

[[processor.route]]
name = "capture"
method = "POST"
path = "/v1/charges/{{{{field.charge_id}}}}/capture"
secret_headers = {{ authorization = {{ file = "{key_file}", prefix = "Bearer " }} }}
fields = {{ charge_id = {{ kind = "id", max_len = 40 }} }}
"#
    );
    [
        format!("[forwarding]\n{forwarding}"),
        entry("sandbox", &sandbox, &ca, "timeout_ms = 5000"),
        entry("slow", &sandbox, &ca, "timeout_ms = 1000"),
        entry(
            "down",
            &format!("https://localhost:{closed_port}"),
            &ca,
            "connect_timeout_ms = 1000",
        ),
        entry("tiny", &sandbox, &ca, "max_response_bytes = 16"),
        entry(
            "pinned",
            &sandbox,
            &ca,
            "spki_sha256_pins = [\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]",
        ),
        entry("foreign-ca", &sandbox, &foreign_ca, ""),
        entry("reasoned", &sandbox, &ca, "require_reason = true"),
        routed,
        entry("loopback-denied", &sandbox, &ca, "").replace(
            "allow_private_network = true",
            "allow_private_network = false",
        ),
    ]
    .concat()
}

/// Starts the keyservice, on `addr` when given (a restart keeps its port). Returns its
/// gRPC and admin addresses.
async fn start_keyservice(
    dir: &StackDir,
    addr: Option<SocketAddr>,
) -> (SocketAddr, SocketAddr, Running) {
    let mut settings = keyservice::Settings::load(&dir.path().join("keyservice.toml")).unwrap();
    if let Some(addr) = addr {
        settings.listen_addr = addr;
    }
    let bound = keyservice::bind(&settings).await.unwrap();
    let addr = bound.local_addr();
    let admin_addr = bound.admin_addr();
    let (trigger, shutdown) = shutdown::channel();
    let task = tokio::spawn(async move { bound.serve(shutdown).await.unwrap() });
    (addr, admin_addr, Running { trigger, task })
}

async fn start_vault(
    dir: &StackDir,
    keyservice_port: u16,
    extra: &str,
) -> (SocketAddr, SocketAddr, Running) {
    let config = dir.write_vault_config_with(keyservice_port, extra);
    let settings = vault_server::Settings::load(&config).unwrap();
    let (trigger, shutdown) = shutdown::channel();
    let bound = vault_server::start(&settings, shutdown.clone())
        .await
        .unwrap();
    let addr = bound.local_addr();
    let admin_addr = bound.admin_addr();
    let task = tokio::spawn(async move { bound.serve(shutdown).await.unwrap() });
    (addr, admin_addr, Running { trigger, task })
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_in(StackDir::new()).await
    }

    pub async fn start_in(dir: StackDir) -> Self {
        Self::start_with_cvc_ttl(dir, 3600).await
    }

    /// A stack whose vault keeps CVCs for `cvc_ttl_secs`.
    pub async fn start_with_cvc_ttl(dir: StackDir, cvc_ttl_secs: u64) -> Self {
        Self::start_with_forwarding(dir, &format!("cvc_ttl_secs = {cvc_ttl_secs}\n")).await
    }

    /// A stack whose vault's `[forwarding]` section holds `forwarding`.
    pub async fn start_with_forwarding(dir: StackDir, forwarding: &str) -> Self {
        let (keyservice_addr, keyservice_admin_addr, keyservice) =
            start_keyservice(&dir, None).await;
        let sandbox = SandboxServer::start(&dir).await;
        let sandbox_addr = sandbox.addr;
        let journal = sandbox.journal.clone();
        // A port that was free a moment ago: nothing listens there.
        let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let vault_extra =
            processors_config_with(dir.path(), sandbox_addr.port(), closed_port, forwarding);
        let (vault_addr, vault_admin_addr, vault) =
            start_vault(&dir, keyservice_addr.port(), &vault_extra).await;
        Self {
            dir,
            keyservice_addr,
            keyservice_admin_addr,
            vault_addr,
            vault_admin_addr,
            sandbox_addr,
            sandbox: journal,
            vault_extra,
            keyservice: Some(keyservice),
            vault: Some(vault),
            sandbox_server: Some(sandbox),
        }
    }

    pub async fn client(&self, name: &str) -> VaultClient {
        VaultClient::connect(&self.vault_config(name))
            .await
            .unwrap()
    }

    pub fn vault_config(&self, name: &str) -> ClientConfig {
        self.dir.client_config(name, self.vault_addr)
    }

    pub fn keyservice_config(&self, name: &str) -> ClientConfig {
        self.dir.client_config(name, self.keyservice_addr)
    }

    /// Starts one more vault-server on the stack's keyservice, config and storage (set
    /// [`StackDir::set_storage`] first, for example to another node name on a shared
    /// database).
    pub async fn start_another_vault(&self) -> OtherVault {
        let (addr, admin_addr, running) =
            start_vault(&self.dir, self.keyservice_addr.port(), &self.vault_extra).await;
        OtherVault {
            addr,
            admin_addr,
            running,
        }
    }

    /// Forwards `token`'s card to the sandbox through `vault` with `body`; returns the
    /// JSON the sandbox received.
    pub async fn forward_to_sandbox(
        &self,
        vault: &mut VaultClient,
        token: &str,
        body: &str,
    ) -> serde_json::Value {
        let before = self.sandbox.requests().len();
        let answer = vault.forward(charge("sandbox", token, body)).await.unwrap();
        assert_eq!(answer.status, 200);
        let received = self.sandbox.requests();
        assert_eq!(received.len(), before + 1);
        serde_json::from_slice(&received[before].body).unwrap()
    }

    /// The card number the sandbox receives when `token` is forwarded through `vault`.
    pub async fn forward_number(&self, vault: &mut VaultClient, token: &str) -> String {
        let sent = self.forward_to_sandbox(vault, token, CHARGE).await;
        sent["number"].as_str().unwrap().to_owned()
    }

    /// Client settings for `name` against another vault of this stack.
    pub fn other_vault_config(&self, name: &str, vault: &OtherVault) -> ClientConfig {
        self.dir.client_config(name, vault.addr)
    }

    /// Stops the vault (closing its database) and leaves the keyservice running.
    pub async fn stop_vault(&mut self) {
        if let Some(vault) = self.vault.take() {
            vault.stop().await;
        }
    }

    /// Adds TOML to the vault config (e.g. a `[rewrap]` section); it takes effect at
    /// the next restart.
    pub fn add_vault_config(&mut self, extra: &str) {
        self.vault_extra.push('\n');
        self.vault_extra.push_str(extra);
    }

    /// Lets `identities` (full identities, see [`identity`]) forward to every processor
    /// besides the default ones; it takes effect at the next restart. The policy must
    /// still grant them `forward:<processor>`.
    pub fn allow_forwarding(&mut self, identities: &[String]) {
        let listed: String = identities.iter().map(|i| format!("\"{i}\", ")).collect();
        let key = "allowed_identities = [";
        assert!(self.vault_extra.contains(key));
        self.vault_extra = self.vault_extra.replace(key, &format!("{key}{listed}"));
    }

    /// Writes the vault config this stack uses (with its processors and extras), for
    /// running the real vault-server binary on the stack's directory.
    pub fn write_vault_config(&self) -> PathBuf {
        self.dir
            .write_vault_config_with(self.keyservice_addr.port(), &self.vault_extra)
    }

    pub async fn stop_keyservice(&mut self) {
        if let Some(keyservice) = self.keyservice.take() {
            keyservice.stop().await;
        }
    }

    /// Starts the keyservice again on its port and keyring (after `stop_keyservice`).
    pub async fn start_keyservice(&mut self) {
        let (addr, admin_addr, keyservice) =
            start_keyservice(&self.dir, Some(self.keyservice_addr)).await;
        self.keyservice_addr = addr;
        self.keyservice_admin_addr = admin_addr;
        self.keyservice = Some(keyservice);
    }

    /// Stops the vault and starts it again on the same data directory.
    pub async fn restart_vault(&mut self) {
        self.stop_vault().await;
        let (addr, admin_addr, vault) =
            start_vault(&self.dir, self.keyservice_addr.port(), &self.vault_extra).await;
        self.vault_addr = addr;
        self.vault_admin_addr = admin_addr;
        self.vault = Some(vault);
    }

    pub async fn stop(mut self) -> StackDir {
        self.stop_vault().await;
        if let Some(keyservice) = self.keyservice.take() {
            keyservice.stop().await;
        }
        if let Some(sandbox) = self.sandbox_server.take() {
            sandbox.stop().await;
        }
        self.dir
    }
}

/// Path of a workspace binary built next to this test executable. `make test` builds
/// them (`cargo build --bins`) before running the tests.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/e2e-<hash> → target/<profile>/<name>
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first (`make test` does)",
        path.display()
    );
    path
}

/// Path of a program in the tests' Python virtualenv (`scripts/install-deps.sh` makes it
/// from `scripts/python-requirements.txt`; the Makefile passes its place in
/// `TOKENVAULT_VENV`). Called by absolute path: never a `python3` or a tool that merely
/// happens to be on this machine's PATH.
pub fn python_tool(name: &str) -> PathBuf {
    let venv = std::env::var_os("TOKENVAULT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            PathBuf::from(home).join(".cache/tokenvault/venv")
        });
    let path = venv.join("bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `make deps` (scripts/install-deps.sh makes the virtualenv)",
        path.display()
    );
    path
}

/// A server running as its real binary, with everything it prints captured.
#[derive(Debug)]
pub struct Process {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub output: Arc<Mutex<String>>,
    /// The tasks copying stdout and stderr; they end when the process's pipes close.
    readers: Vec<JoinHandle<()>>,
}

/// Copies a pipe line by line into `output`; reports the address of the first
/// "... listening on ADDR" line to `ready`.
fn copy_lines(
    pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    output: Arc<Mutex<String>>,
    mut ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addr) = line.split(" listening on ").nth(1)
                && let Some(tx) = ready.take()
            {
                let _ = tx.send(addr.trim().parse::<SocketAddr>().unwrap());
            }
            let mut out = output.lock().unwrap();
            out.push_str(&line);
            out.push('\n');
        }
    })
}

impl Process {
    /// Starts `binary --config config` with extra environment, and waits for its
    /// "listening on ADDR" line.
    pub async fn start(binary_name: &str, config: &Path, env: &[(&str, &str)]) -> Self {
        let mut command = tokio::process::Command::new(binary(binary_name));
        command.arg("--config").arg(config);
        for (key, value) in env {
            command.env(key, value);
        }
        Self::start_command(command, binary_name).await
    }

    /// Starts a prepared command (e.g. a server under a wrapper that changes its
    /// limits) and waits for its "listening on ADDR" line.
    pub async fn start_command(mut command: tokio::process::Command, binary_name: &str) -> Self {
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let readers = vec![
            copy_lines(stdout, Arc::clone(&output), Some(ready_tx)),
            copy_lines(stderr, Arc::clone(&output), None),
        ];
        let addr = tokio::time::timeout(std::time::Duration::from_secs(60), ready_rx)
            .await
            .unwrap_or_else(|_| panic!("{binary_name} did not start: {}", output.lock().unwrap()))
            .unwrap_or_else(|_| panic!("{binary_name} exited: {}", output.lock().unwrap()));
        Self {
            child,
            addr,
            output,
            readers,
        }
    }

    /// `kill -9`: no chance to flush or close anything.
    pub async fn kill9(mut self) -> String {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
        self.collect_output().await
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub async fn terminate(mut self) -> String {
        let pid = self.child.id().unwrap();
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.child.wait().await.unwrap();
        assert!(exit.success(), "exit status {exit}");
        self.collect_output().await
    }

    /// Everything the process printed, once both pipes are drained.
    async fn collect_output(self) -> String {
        for reader in self.readers {
            reader.await.unwrap();
        }
        self.output.lock().unwrap().clone()
    }
}

/// A synthetic Luhn-valid card number: `prefix`, then the digits of `n` zero-padded to
/// fill `len - 1` digits, then the check digit.
pub fn synthetic_pan(prefix: &str, n: u64, len: usize) -> String {
    let body_len = len - 1;
    let mut body = format!("{prefix}{n:0width$}", width = body_len - prefix.len());
    assert_eq!(body.len(), body_len);
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let d2 = d * 2;
                if d2 > 9 { d2 - 9 } else { d2 }
            } else {
                d
            }
        })
        .sum();
    body.push(char::from(b'0' + ((10 - sum % 10) % 10) as u8));
    body
}

/// Whether `word` stands in `bytes` as a word of its own, between characters that are
/// not ASCII letters or digits: how tests look for a short value such as a CVC. (A
/// CVC of four digits turns up inside random hexadecimal, such as request ids and TLS
/// dumps in a TRACE log, often enough to fail a run now and then.)
pub fn contains_word(bytes: &[u8], word: &[u8]) -> bool {
    word_line(bytes, word).is_some()
}

/// The line of `bytes` where `word` first stands as a word of its own, for a failing
/// test to show (tests only ever hold synthetic card data).
pub fn word_line(bytes: &[u8], word: &[u8]) -> Option<String> {
    let at = bytes.windows(word.len()).enumerate().position(|(i, w)| {
        w == word
            && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric())
            && bytes
                .get(i + word.len())
                .is_none_or(|b| !b.is_ascii_alphanumeric())
    })?;
    let start = bytes[..at]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |n| n + 1);
    let end = bytes[at..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |n| at + n);
    Some(String::from_utf8_lossy(&bytes[start..end]).into_owned())
}

/// Opens a stopped vault's RocksDB directly, every column family, as an attacker or
/// auditor with the disk would.
pub fn open_vault_db(path: &Path) -> rocksdb::DB {
    let families = rocksdb::DB::list_cf(&rocksdb::Options::default(), path).unwrap();
    rocksdb::DB::open_cf(&rocksdb::Options::default(), path, families).unwrap()
}

/// A raw mutual-TLS gRPC channel as `name`, for calls the client library does not make.
pub async fn raw_channel(
    dir: &StackDir,
    name: &str,
    addr: SocketAddr,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |file: &str| std::fs::read(dir.path().join(file)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read(&format!("{name}.pem")),
            read(&format!("{name}.key")),
        ))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

/// A plain HTTP GET on an admin port: the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Acknowledges every audit gap the vault reports, as the restore runbook does: one
/// admin proposes each, the officer approves it. Then waits until the vault serves card
/// data again (it asks the keyservice every second). Returns the gaps acknowledged.
pub async fn acknowledge_audit_gaps(stack: &Stack) -> Vec<(u64, u64)> {
    use vault_proto::vault::v1 as pb;
    let channel = raw_channel(&stack.dir, ADMIN, stack.vault_addr)
        .await
        .unwrap();
    let mut vault = pb::vault_client::VaultClient::new(channel);
    let report = vault
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut admin = vault_client::KeyServiceClient::connect(&stack.keyservice_config(ADMIN))
        .await
        .unwrap();
    let mut officer = vault_client::KeyServiceClient::connect(&stack.keyservice_config(OFFICER))
        .await
        .unwrap();
    let mut acknowledged = Vec::new();
    for gap in report.gaps.iter().filter(|gap| !gap.acknowledged) {
        let proposal = admin
            .propose_audit_gap(
                &report.vault_identity,
                &report.node,
                gap.first_sequence,
                gap.last_sequence,
            )
            .await
            .unwrap();
        officer.approve(&proposal.id).await.unwrap();
        acknowledged.push((gap.first_sequence, gap.last_sequence));
    }
    within(
        std::time::Duration::from_secs(20),
        "card data served after the acknowledgement",
        || async {
            let mut client = stack.client(ADMIN).await;
            client
                .tokenize(vault_client::Card::new("4242424242424242", 1, 2031), false)
                .await
                .ok()
        },
    )
    .await;
    acknowledged
}

/// Waits until the keyservice of `dir`'s stack keeps an audit checkpoint at `sequence`
/// or beyond (a vault sends its head at most once a second).
pub async fn wait_for_audit_checkpoint(dir: &StackDir, sequence: u64) {
    use std::time::Duration;
    let file = dir.path().join("audit-checkpoints.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let kept = std::fs::read(&file)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|kept| kept["checkpoints"].as_array().cloned())
            .into_iter()
            .flatten()
            .filter_map(|checkpoint| checkpoint["sequence"].as_u64())
            .max()
            .unwrap_or(0);
        if kept >= sequence {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit checkpoint at {sequence} after 20 s (kept: {kept})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_pans_pass_luhn() {
        for n in 0..100 {
            let pan = synthetic_pan("400000", n, 16);
            assert_eq!(pan.len(), 16);
            assert!(vault_server::card::luhn_valid(pan.as_bytes()), "{pan}");
        }
        assert_eq!(synthetic_pan("42424242424242", 4, 16), "4242424242424242");
    }
}
