//! The development stack: a throwaway development CA and certificates for every
//! identity, the config files that wire keyservice, vault-server and vaultctl together,
//! and (in the binary) one command that runs them. Tests use the CA to make their
//! certificates at test time; nothing here is ever committed or used in production.
//!
//! Must never be a dependency of the servers or the client library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// URI SAN prefix of every development identity.
pub const IDENTITY_PREFIX: &str = "spiffe://tokenvault.dev/";

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{dir} was set up with other storage settings (its vault-server.toml is not on the database asked for): use a fresh --dir"
    )]
    StorageMismatch { dir: PathBuf },
}

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issued { key_pem: [REDACTED], .. }")
    }
}

/// A development certificate authority, held in memory only.
#[derive(Debug)]
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A client identity only (callers, admins).
    Client,
    /// A server on localhost that is also a client (the vault calls the keyservice).
    ServerAndClient,
}

impl DevCa {
    pub fn generate(name: &str) -> Result<Self, DevError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
        })
    }

    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a certificate whose identity is `spiffe://tokenvault.dev/<name>` (URI SAN)
    /// with CN `<name>`. Server certificates also name `localhost` and `127.0.0.1`.
    pub fn issue(&self, name: &str, usage: Usage) -> Result<Issued, DevError> {
        let dns = match usage {
            Usage::Client => Vec::new(),
            Usage::ServerAndClient => vec!["localhost".to_owned()],
        };
        let mut params = CertificateParams::new(dns)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .subject_alt_names
            .push(SanType::URI(format!("{IDENTITY_PREFIX}{name}").try_into()?));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if usage == Usage::ServerAndClient {
            params
                .subject_alt_names
                .push(SanType::IpAddress([127, 0, 0, 1].into()));
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a client certificate with subject CN `cn` and no SAN at all (for tests of
    /// how identities are read: a CN that merely looks like a URI).
    pub fn issue_cn_only(&self, cn: &str) -> Result<Issued, DevError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `<dir>/<name>.pem` and `<dir>/<name>.key` (mode 0600).
    pub fn write_identity(&self, dir: &Path, name: &str, usage: Usage) -> Result<(), DevError> {
        let issued = self.issue(name, usage)?;
        write_file(
            &dir.join(format!("{name}.pem")),
            issued.cert_pem.as_bytes(),
            false,
        )?;
        write_file(
            &dir.join(format!("{name}.key")),
            issued.key_pem.as_bytes(),
            true,
        )
    }
}

/// Writes a file; secret files are created with mode 0600 from the start.
pub fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), DevError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    // Never group- or other-writable, whatever the umask: vaultctl refuses a config
    // that someone else could have written.
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let write = || -> std::io::Result<()> {
        let mut file = options.open(path)?;
        file.write_all(contents)?;
        file.sync_all()
    };
    write().map_err(|source| DevError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Addresses of the dev stack's services.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub keyservice: SocketAddr,
    /// The keyservice's admin port (`/metrics`, `/healthz`, plain HTTP).
    pub keyservice_admin: SocketAddr,
    pub vault: SocketAddr,
    /// The vault's admin port (`/metrics`, `/healthz`, plain HTTP).
    pub vault_admin: SocketAddr,
    pub sandbox: SocketAddr,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            keyservice: SocketAddr::from(([127, 0, 0, 1], 7443)),
            keyservice_admin: SocketAddr::from(([127, 0, 0, 1], 9465)),
            vault: SocketAddr::from(([127, 0, 0, 1], 8443)),
            vault_admin: SocketAddr::from(([127, 0, 0, 1], 9464)),
            sandbox: SocketAddr::from(([127, 0, 0, 1], 9443)),
        }
    }
}

impl Ports {
    /// Five loopback ports free right now (each bound to port 0, read back, released),
    /// for a stack beside another one, as the end-to-end tests run it. Another program
    /// could take one before the stack binds it; the stack then fails to start and says
    /// which address was in use.
    pub fn free() -> std::io::Result<Self> {
        let listeners = (0..5)
            .map(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let addrs = listeners
            .iter()
            .map(std::net::TcpListener::local_addr)
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            keyservice: addrs[0],
            keyservice_admin: addrs[1],
            vault: addrs[2],
            vault_admin: addrs[3],
            sandbox: addrs[4],
        })
    }
}

/// Identities of the dev stack. `admin` is what vaultctl uses; `officer` is the
/// second key admin that dual control needs (and the second importer); `auditor` reads and verifies the audit log
/// and nothing else (PCI DSS keeps those who review the log apart from those who
/// administer keys); `privacy` answers data-subject requests (card lookups, which no
/// service identity may make); `checkout` is an example internal service in another
/// tenant.
pub const DEV_IDENTITIES: &[(&str, Usage)] = &[
    ("keyservice", Usage::ServerAndClient),
    ("vault-server", Usage::ServerAndClient),
    ("sandbox", Usage::ServerAndClient),
    ("admin", Usage::Client),
    ("officer", Usage::Client),
    ("auditor", Usage::Client),
    ("privacy", Usage::Client),
    ("checkout", Usage::Client),
];

/// Config files of the dev stack, with paths relative to the directory they live in.
pub fn keyservice_config(ports: &Ports) -> String {
    format!(
        r#"# Development keyservice. Generated by devstack; see deploy/keyservice.toml for the reference.
listen_addr = "{ks}"
# For grpcurl and other tools (schema only, any mutual-TLS peer); off in deploy/.
grpc_reflection = true
keyring_file = "keyring.sealed"
root_key_file = "root.key"

[tls]
ca_file = "ca.pem"
cert_file = "keyservice.pem"
key_file = "keyservice.key"

[access]
vault_identities = ["uri:{p}vault-server"]
# Two admins: dual control (retire, destroy, un-retire, root key change) needs both.
admin_identities = ["uri:{p}admin", "uri:{p}officer"]

[admin]
# GET /metrics and /healthz, plain HTTP on loopback.
listen_addr = "{ks_admin}"

[lifecycle]
# Short for trying things out; the reference (deploy/keyservice.toml) waits 120 s.
destroy_grace_secs = 10
"#,
        ks = ports.keyservice,
        ks_admin = ports.keyservice_admin,
        p = IDENTITY_PREFIX
    )
}

/// Where the dev vault keeps its records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Storage {
    /// RocksDB in `<dir>/vault-data` (the default).
    #[default]
    Rocksdb,
    /// A PostgreSQL database (`[storage.postgres]`), e.g. the throwaway one the
    /// `pgcluster` binary starts (`make bench`).
    Postgres(PostgresStorage),
}

/// The vault's `[storage.postgres]` connection. No password here: it is in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresStorage {
    /// libpq connection string without a password, e.g. `host=127.0.0.1 port=5432
    /// user=vault dbname=tokenvault`.
    pub conninfo: String,
    /// The role's password (its first line).
    pub password_file: PathBuf,
    /// PEM CA of the database server's certificate (the vault always uses TLS).
    pub ca_file: PathBuf,
}

/// A TOML basic string: `"..."` with `\`, `"` and control characters escaped.
fn toml_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `data_dir` line (RocksDB) or the `[storage]` tables (PostgreSQL).
fn storage_config(storage: &Storage) -> (String, String) {
    match storage {
        Storage::Rocksdb => ("data_dir = \"vault-data\"\n".to_owned(), String::new()),
        Storage::Postgres(pg) => (
            String::new(),
            format!(
                r#"
# Records, audit chain and counts in PostgreSQL (devstack --postgres-*); no data_dir.
# Pool size, writers and timeouts: the defaults (deploy/vault-server.toml).
[storage]
type = "postgres"

[storage.postgres]
url = {}
password_file = {}
ca_file = {}
"#,
                toml_string(&pg.conninfo),
                toml_string(&pg.password_file.to_string_lossy()),
                toml_string(&pg.ca_file.to_string_lossy()),
            ),
        ),
    }
}

pub fn vault_config(ports: &Ports, storage: &Storage) -> String {
    let (data_dir, storage_tables) = storage_config(storage);
    format!(
        r#"# Development vault-server. Generated by devstack; see deploy/vault-server.toml for the reference.
listen_addr = "{vault}"
# For grpcurl and other tools (schema only, any mutual-TLS peer); off in deploy/.
grpc_reflection = true
{data_dir}policy_file = "policy.toml"

[tls]
ca_file = "ca.pem"
cert_file = "vault-server.pem"
key_file = "vault-server.key"

[keyservice]
endpoint = "https://localhost:{ks_port}"

[admin]
# GET /metrics and /healthz, plain HTTP on loopback.
listen_addr = "{vault_admin}"

# The sandbox processor that `make run` starts (deploy/sandbox-processor).
[[processor]]
name = "sandbox"
base_url = "https://localhost:{sandbox_port}"
ca_file = "ca.pem"
# A sandbox on loopback: never set this for a real processor.
allow_private_network = true
allowed_identities = ["uri:{p}admin", "uri:{p}checkout"]
inject = {{ number = ["body"], exp_month = ["body"], exp_year = ["body"], name = ["body"], cvc = ["body"] }}
timeout_ms = 10000

# The requests callers may have sent to the sandbox: the config owns method, path,
# body and credentials; a caller names a route and gives its fields.
[[processor.route]]
name = "charge"
method = "POST"
path = "/v1/charges"
content_type = "application/json"
body = '{{"amount":"{{{{field.amount}}}}","number":"{{{{card.number}}}}","exp_month":"{{{{card.exp_month}}}}","exp_year":"{{{{card.exp_year}}}}","name":"{{{{card.name}}}}"}}'
secret_headers = {{ authorization = {{ file = "sandbox-api-key", prefix = "Bearer " }} }}
fields = {{ amount = {{ kind = "amount", max_len = 12 }} }}

# The same with the CVC: the one route that may carry it.
[[processor.route]]
name = "authorize"
method = "POST"
path = "/v1/charges"
content_type = "application/json"
body = '{{"amount":"{{{{field.amount}}}}","number":"{{{{card.number}}}}","exp_month":"{{{{card.exp_month}}}}","exp_year":"{{{{card.exp_year}}}}","cvc":"{{{{card.cvc}}}}"}}'
secret_headers = {{ authorization = {{ file = "sandbox-api-key", prefix = "Bearer " }} }}
fields = {{ amount = {{ kind = "amount", max_len = 12 }} }}
{storage_tables}"#,
        vault = ports.vault,
        vault_admin = ports.vault_admin,
        ks_port = ports.keyservice.port(),
        sandbox_port = ports.sandbox.port(),
        p = IDENTITY_PREFIX
    )
}

pub fn policy() -> String {
    format!(
        r#"# Development access policy. Generated by devstack; see deploy/policy.toml.
[[identity]]
id = "uri:{p}admin"
tenant = "dev"
permissions = ["tokenize", "read", "delete", "fingerprint", "forward:sandbox", "admin", "import"]

# The second identity that import jobs need (dual control): admin proposes, officer
# approves (`vaultctl --config vaultctl-officer.toml import approve JOB`).
[[identity]]
id = "uri:{p}officer"
tenant = "dev"
permissions = ["import"]

[[identity]]
id = "uri:{p}auditor"
tenant = "dev"
permissions = ["audit"]

[[identity]]
id = "uri:{p}privacy"
tenant = "dev"
permissions = ["subject"]

[[identity]]
id = "uri:{p}checkout"
tenant = "checkout"
permissions = ["tokenize", "read", "forward:sandbox"]
"#,
        p = IDENTITY_PREFIX
    )
}

/// vaultctl settings acting as `identity` (`admin`, `officer`, `auditor` or
/// `privacy`).
pub fn vaultctl_config(ports: &Ports, identity: &str) -> String {
    format!(
        r#"# vaultctl settings for the dev stack, acting as {identity}. Generated by devstack.
vault_endpoint = "https://localhost:{vault}"
keyservice_endpoint = "https://localhost:{ks}"
ca_file = "ca.pem"
cert_file = "{identity}.pem"
key_file = "{identity}.key"
"#,
        vault = ports.vault.port(),
        ks = ports.keyservice.port()
    )
}

/// Creates the dev CA, every identity's certificate and the config files in `dir`,
/// unless `dir/ca.pem` already exists (then nothing is touched, so data survives).
/// Returns true when it created them. An existing `dir` asked to run on PostgreSQL
/// must have been made for the same database (its vault-server.toml has that url),
/// or this refuses it rather than switch its storage underneath it.
pub fn init_dir(dir: &Path, ports: &Ports, storage: &Storage) -> Result<bool, DevError> {
    if dir.join("ca.pem").exists() {
        if let Storage::Postgres(postgres) = storage {
            // The same database: its url is in the config (settings tuned by hand, such
            // as the pool size, stay).
            let url = format!("url = {}", toml_string(&postgres.conninfo));
            let existing = std::fs::read_to_string(dir.join("vault-server.toml"));
            if !existing.is_ok_and(|config| config.contains(&url)) {
                return Err(DevError::StorageMismatch {
                    dir: dir.to_owned(),
                });
            }
        }
        return Ok(false);
    }
    let mkdir = |path: &Path| {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(path).map_err(|source| DevError::Write {
            path: path.to_owned(),
            source,
        })
    };
    mkdir(dir)?;
    let ca = DevCa::generate("tokenvault development CA")?;
    for (name, usage) in DEV_IDENTITIES {
        ca.write_identity(dir, name, *usage)?;
    }
    write_file(
        &dir.join("keyservice.toml"),
        keyservice_config(ports).as_bytes(),
        false,
    )?;
    write_file(
        &dir.join("vault-server.toml"),
        vault_config(ports, storage).as_bytes(),
        false,
    )?;
    write_file(&dir.join("policy.toml"), policy().as_bytes(), false)?;
    // The sandbox's "API key", which the vault sends itself (callers never see it).
    let mut key = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(|source| DevError::Write {
            path: "/dev/urandom".into(),
            source,
        })?,
        &mut key,
    )
    .map_err(|source| DevError::Write {
        path: "/dev/urandom".into(),
        source,
    })?;
    let key: String = key.iter().map(|b| format!("{b:02x}")).collect();
    write_file(&dir.join("sandbox-api-key"), key.as_bytes(), true)?;
    write_file(
        &dir.join("vaultctl.toml"),
        vaultctl_config(ports, "admin").as_bytes(),
        false,
    )?;
    for identity in ["officer", "auditor", "privacy"] {
        write_file(
            &dir.join(format!("vaultctl-{identity}.toml")),
            vaultctl_config(ports, identity).as_bytes(),
            false,
        )?;
    }
    // The CA certificate last: its presence marks a complete directory.
    write_file(&dir.join("ca.pem"), ca.ca_pem().as_bytes(), false)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn postgres(conninfo: &str) -> Storage {
        Storage::Postgres(PostgresStorage {
            conninfo: conninfo.to_owned(),
            password_file: PathBuf::from("/run/pg \"secret\"\\password"),
            ca_file: PathBuf::from("/tmp/pg/ca.pem"),
        })
    }

    #[test]
    fn rocksdb_config_has_a_data_dir_and_no_storage_table() {
        let config: toml::Table = vault_config(&Ports::default(), &Storage::Rocksdb)
            .parse()
            .unwrap();
        assert_eq!(config["data_dir"].as_str(), Some("vault-data"));
        assert!(!config.contains_key("storage"));
        assert_eq!(config["processor"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn postgres_config_has_the_storage_tables_and_no_data_dir() {
        let conninfo =
            "host=127.0.0.1 port=5433 user=vault dbname=tokenvault application_name='dev vault'";
        let config: toml::Table = vault_config(&Ports::default(), &postgres(conninfo))
            .parse()
            .unwrap();
        assert!(!config.contains_key("data_dir"));
        let storage = config["storage"].as_table().unwrap();
        assert_eq!(storage["type"].as_str(), Some("postgres"));
        let pg = storage["postgres"].as_table().unwrap();
        assert_eq!(pg["url"].as_str(), Some(conninfo));
        // Quotes and backslashes survive the TOML round trip.
        assert_eq!(
            pg["password_file"].as_str(),
            Some("/run/pg \"secret\"\\password")
        );
        assert_eq!(pg["ca_file"].as_str(), Some("/tmp/pg/ca.pem"));
        // The rest of the config is the RocksDB one's.
        assert_eq!(config["processor"].as_array().unwrap().len(), 1);
        assert_eq!(toml_string("a\nb"), "\"a\\u000Ab\"");
    }

    #[test]
    fn an_existing_dir_keeps_its_storage() {
        let ports = Ports::default();
        let dir = tempfile::tempdir().unwrap();
        let pg_dir = dir.path().join("pg");
        let a = postgres("host=127.0.0.1 port=5433 user=vault dbname=tokenvault");
        let b = postgres("host=127.0.0.1 port=5434 user=vault dbname=tokenvault");
        assert!(init_dir(&pg_dir, &ports, &a).unwrap());
        // The same database again, or no flags: the directory as it is.
        assert!(!init_dir(&pg_dir, &ports, &a).unwrap());
        assert!(!init_dir(&pg_dir, &ports, &Storage::Rocksdb).unwrap());
        // Another database: refused, not rewritten.
        assert!(matches!(
            init_dir(&pg_dir, &ports, &b),
            Err(DevError::StorageMismatch { .. })
        ));
        let written = std::fs::read_to_string(pg_dir.join("vault-server.toml")).unwrap();
        assert_eq!(written, vault_config(&ports, &a));

        // A RocksDB directory is not switched to PostgreSQL either.
        let rocks_dir = dir.path().join("rocks");
        assert!(init_dir(&rocks_dir, &ports, &Storage::Rocksdb).unwrap());
        assert!(matches!(
            init_dir(&rocks_dir, &ports, &a),
            Err(DevError::StorageMismatch { .. })
        ));
    }
}
