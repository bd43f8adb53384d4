//! The key service: owns the keyring, keeps it on disk only sealed under a root key,
//! and serves data keys over mutual TLS to vault-server identities only.
//!
//! Must never depend on the vault's storage or card-data code: it knows keys, not
//! cards.

pub mod checkpoints;
pub mod config;
pub mod erasures;
mod error;
pub mod history;
pub mod keyring;
pub mod lifecycle;
pub mod metrics;
mod service;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use runtime::shutdown::Shutdown;
use tokio::net::TcpListener;
use vault_proto::keys::v1::key_service_server::KeyServiceServer;

pub use config::Settings;
use keyring::{Keyring, KeyringError, RootKey};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error(transparent)]
    Tls(#[from] runtime::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Reflection(#[from] runtime::grpc::ReflectionError),
    #[error("cannot open the key history {path}: {source}")]
    History {
        path: String,
        source: std::io::Error,
    },
}

/// Where an approved root key change stages the new key until the keyring is sealed
/// under it.
pub fn pending_root_key_file(root_key_file: &Path) -> PathBuf {
    let mut name = root_key_file.as_os_str().to_owned();
    name.push(".pending");
    PathBuf::from(name)
}

/// Opens the keyring, finishing a root key change that a crash interrupted: if the
/// keyring opens only under the staged key, that key moves into place; if it opens
/// under the current key, a staged key is stale and removed.
fn open_keyring(settings: &Settings) -> Result<(Keyring, RootKey), Error> {
    let root = RootKey::from_file(&settings.root_key_file)?;
    let staged = pending_root_key_file(&settings.root_key_file);
    match Keyring::load(&settings.keyring_file, &root) {
        Ok(keyring) => {
            if staged.exists() {
                tracing::warn!(file = %staged.display(), "removing a staged root key of an unfinished root key change");
                let _ = std::fs::remove_file(&staged);
            }
            Ok((keyring, root))
        }
        Err(KeyringError::Integrity) if staged.exists() => {
            let new_root = RootKey::from_file(&staged)?;
            let keyring = Keyring::load(&settings.keyring_file, &new_root)?;
            let io = |source| KeyringError::Io {
                path: settings.root_key_file.display().to_string(),
                source,
            };
            std::fs::rename(&staged, &settings.root_key_file).map_err(io)?;
            keyring::sync_parent(&settings.root_key_file).map_err(io)?;
            tracing::warn!("finished an interrupted root key change");
            Ok((keyring, new_root))
        }
        Err(e) => Err(e.into()),
    }
}

/// `keyservice init`: creates the keyring with version 1 of every purpose, sealed
/// under the root key. Refuses to replace an existing keyring.
pub fn init(settings: &Settings) -> Result<(), Error> {
    let root = RootKey::from_file(&settings.root_key_file)?;
    let now = runtime::now_unix_ms();
    Keyring::generate(now)?.create_file(&settings.keyring_file, &root)?;
    Ok(())
}

/// A key service that has opened its keyring and bound its port, ready to serve.
#[derive(Debug)]
pub struct Bound {
    listener: TcpListener,
    /// Plain HTTP: `/metrics` and `/healthz`.
    admin_listener: TcpListener,
    shared: Arc<service::Shared>,
    access: config::Access,
    tls: runtime::tls::TlsMaterial,
    grpc_reflection: bool,
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has an address; fall back to unspecified for form.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The admin port (`/metrics`, `/healthz`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until `shutdown` fires.
    pub async fn serve(self, shutdown: Shutdown) -> Result<(), Error> {
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<KeyServiceServer<service::KeyServiceImpl>>()
            .await;
        tracing::info!(addr = %self.local_addr(), "keyservice serving");
        let service =
            service::KeyServiceImpl::new(Arc::clone(&self.shared), &self.access, shutdown.clone());
        let rotations = tokio::spawn(scheduled_rotations(Arc::clone(&self.shared)));
        tracing::info!(addr = %self.admin_addr(), "admin port serving /metrics and /healthz");
        tokio::spawn(runtime::admin::serve_admin(
            self.admin_listener,
            Arc::clone(&self.shared) as Arc<dyn runtime::admin::Observed>,
            shutdown.clone(),
        ));
        // The keyservice has few callers (vaults and admins): the default limits.
        let (incoming, listening) = runtime::accept::incoming(
            self.listener,
            self.tls.server_config()?,
            runtime::accept::Limits::default(),
            shutdown.clone(),
        );
        let mut router = tonic::transport::Server::builder()
            .layer(runtime::accept::TrackCallsLayer)
            .timeout(std::time::Duration::from_secs(30))
            .add_service(health_service)
            .add_service(KeyServiceServer::new(service));
        if self.grpc_reflection {
            tracing::warn!(
                "grpc_reflection = true: any mutual-TLS peer can read the services' schema"
            );
            router = runtime::grpc::add_reflection(
                router,
                &[
                    vault_proto::keys::v1::FILE_DESCRIPTOR_SET,
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
        served?;
        rotations.abort();
        tracing::info!("keyservice stopped");
        Ok(())
    }
}

/// Opens the keyring (the root key file must be mode 0600) and binds the listener.
pub async fn bind(settings: &Settings) -> Result<Bound, Error> {
    let (mut keyring, root) = open_keyring(settings)?;
    let now = runtime::now_unix_ms();
    if keyring.add_missing(now)? {
        keyring.save(&settings.keyring_file, &root)?;
        tracing::info!("added what this keyring from an older keyservice lacked");
    }
    let history_file = settings
        .lifecycle
        .history_file
        .clone()
        .unwrap_or_else(|| settings.keyring_file.with_file_name("key-history.jsonl"));
    let history_key = keyring
        .history_key()
        .ok_or(keyring::KeyringError::Malformed)?;
    let history =
        history::History::open(&history_file, history_key).map_err(|source| Error::History {
            path: history_file.display().to_string(),
            source,
        })?;
    let checkpoints_file = history_file.with_file_name("audit-checkpoints.json");
    let checkpoints =
        checkpoints::Checkpoints::open(&checkpoints_file).map_err(|source| Error::History {
            path: checkpoints_file.display().to_string(),
            source,
        })?;
    let erasures_file = history_file.with_file_name("erasures.bin");
    let erasures = erasures::Erasures::open(&erasures_file).map_err(|source| Error::History {
        path: erasures_file.display().to_string(),
        source,
    })?;
    let tls = runtime::tls::TlsMaterial::load(&settings.tls)?;
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
    Ok(Bound {
        listener,
        admin_listener,
        shared: Arc::new(service::Shared::new(
            keyring,
            root,
            settings,
            history,
            checkpoints,
            erasures,
        )),
        access: settings.access.clone(),
        tls,
        grpc_reflection: settings.grpc_reflection,
    })
}

/// Checks once a minute whether a purpose is due for its scheduled rotation.
async fn scheduled_rotations(shared: Arc<service::Shared>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tick.tick().await;
        let shared = Arc::clone(&shared);
        // Saving the keyring is blocking file I/O.
        let _ = tokio::task::spawn_blocking(move || shared.rotate_due()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keyservice directory with a root key, a keyring and a config.
    fn setup(dir: &Path) -> Settings {
        std::fs::write(
            dir.join("keyservice.toml"),
            r#"
listen_addr = "127.0.0.1:0"
keyring_file = "keyring.sealed"
root_key_file = "root.key"
[tls]
ca_file = "ca.pem"
cert_file = "ks.pem"
key_file = "ks.key"
[access]
vault_identities = ["spiffe://test/vault"]
"#,
        )
        .unwrap();
        let settings = Settings::load(&dir.join("keyservice.toml")).unwrap();
        RootKey::generate_file(&settings.root_key_file).unwrap();
        init(&settings).unwrap();
        settings
    }

    /// The keyservice's shared state as `bind` makes it, without TLS or ports.
    fn shared(settings: &Settings) -> service::Shared {
        let (keyring, root) = open_keyring(settings).unwrap();
        let history_file = settings.keyring_file.with_file_name("key-history.jsonl");
        let history =
            history::History::open(&history_file, keyring.history_key().unwrap()).unwrap();
        let checkpoints =
            checkpoints::Checkpoints::open(&history_file.with_file_name("audit-checkpoints.json"))
                .unwrap();
        let erasures =
            erasures::Erasures::open(&history_file.with_file_name("erasures.bin")).unwrap();
        service::Shared::new(keyring, root, settings, history, checkpoints, erasures)
    }

    /// Scheduled rotations done, of every purpose.
    fn scheduled_rotations(shared: &service::Shared) -> u64 {
        keyring::Purpose::ALL
            .iter()
            .map(|purpose| {
                shared
                    .metrics
                    .rotations
                    .get_or_create(&metrics::RotationLabels {
                        purpose: purpose.name(),
                        reason: "scheduled",
                    })
                    .get()
            })
            .sum()
    }

    /// Control: PCI-3.7.4, NIST-800-57 (docs/compliance.md).
    /// Attack: keep a key in use past its cryptoperiod by keeping the scheduled rotation
    /// from running (a listed vault identity that never reports, e.g. a decommissioned
    /// vault left in `[access] vault_identities`). The task's check rotates nothing
    /// before the period ends; after it, with a silent vault, it postpones visibly (the
    /// `scheduled_rotations_postponed` metric counts every check, a WARN once an hour)
    /// rather than silently; with every vault reported it rotates every purpose.
    #[test]
    fn the_scheduled_rotation_runs_when_due_and_a_postponement_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = setup(dir.path());
        settings.lifecycle.rotate_after_days = Some(1);
        let now = runtime::now_unix_ms();
        let two_days_later = now + 2 * 24 * 60 * 60 * 1000;

        let waiting = shared(&settings);
        waiting.rotate_due_at(now);
        assert_eq!(waiting.metrics.scheduled_rotations_postponed.get(), 0);
        // Due, but spiffe://test/vault has not reported since start.
        waiting.rotate_due_at(two_days_later);
        waiting.rotate_due_at(two_days_later);
        assert_eq!(waiting.metrics.scheduled_rotations_postponed.get(), 2);
        assert_eq!(scheduled_rotations(&waiting), 0);
        drop(waiting);

        // No vault identity to wait for: every purpose rotates, once.
        settings.access.vault_identities.clear();
        let serving = shared(&settings);
        serving.rotate_due_at(two_days_later);
        assert_eq!(
            scheduled_rotations(&serving),
            keyring::Purpose::ALL.len() as u64
        );
        assert_eq!(serving.metrics.scheduled_rotations_postponed.get(), 0);
        // The new versions are fresh: not due again now.
        serving.rotate_due_at(runtime::now_unix_ms());
        assert_eq!(
            scheduled_rotations(&serving),
            keyring::Purpose::ALL.len() as u64
        );
    }

    #[test]
    fn a_root_key_change_interrupted_by_a_crash_is_finished_or_undone_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let settings = setup(dir.path());
        let staged = pending_root_key_file(&settings.root_key_file);

        // Crashed before the keyring was resealed: the staged key is stale.
        RootKey::generate_file(&staged).unwrap();
        let (mut keyring, _) = open_keyring(&settings).unwrap();
        assert!(!staged.exists());

        // Crashed after resealing, before the new key file moved into place.
        RootKey::generate_file(&staged).unwrap();
        let new_root_text = std::fs::read(&staged).unwrap();
        keyring
            .save(
                &settings.keyring_file,
                &RootKey::from_file(&staged).unwrap(),
            )
            .unwrap();
        let (reopened, root) = open_keyring(&settings).unwrap();
        assert_eq!(reopened.versions().len(), keyring::Purpose::ALL.len());
        assert!(!staged.exists());
        assert_eq!(
            std::fs::read(&settings.root_key_file).unwrap(),
            new_root_text
        );
        let sealed = std::fs::read(&settings.keyring_file).unwrap();
        Keyring::open(&sealed, &root).unwrap();
    }
}
