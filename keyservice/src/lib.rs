//! The key service: owns the keyring, keeps it on disk only sealed under a root key,
//! and serves data keys over mutual TLS to vault-server identities only.
//!
//! Must never depend on the vault's storage or card-data code: it knows keys, not
//! cards.

pub mod config;
pub mod keyring;
mod service;

use std::net::SocketAddr;

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
}

/// `keyservice init`: creates the keyring with version 1 of every purpose, sealed
/// under the root key. Refuses to replace an existing keyring.
pub fn init(settings: &Settings) -> Result<(), Error> {
    let root = RootKey::from_file(&settings.root_key_file)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    Keyring::generate(now)?.create_file(&settings.keyring_file, &root)?;
    Ok(())
}

/// A key service that has opened its keyring and bound its port, ready to serve.
#[derive(Debug)]
pub struct Bound {
    listener: TcpListener,
    service: service::KeyServiceImpl,
    tls: runtime::tls::TlsMaterial,
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has an address; fall back to unspecified for form.
        self.listener
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
        tonic::transport::Server::builder()
            .tls_config(self.tls.server_config(std::time::Duration::from_secs(10)))?
            .timeout(std::time::Duration::from_secs(30))
            .add_service(health_service)
            .add_service(KeyServiceServer::new(self.service))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(self.listener),
                shutdown.wait(),
            )
            .await?;
        tracing::info!("keyservice stopped");
        Ok(())
    }
}

/// Opens the keyring (the root key file must be mode 0600) and binds the listener.
pub async fn bind(settings: &Settings) -> Result<Bound, Error> {
    let root = RootKey::from_file(&settings.root_key_file)?;
    let keyring = Keyring::load(&settings.keyring_file, &root)?;
    drop(root);
    let tls = runtime::tls::TlsMaterial::load(&settings.tls)?;
    let listener = TcpListener::bind(settings.listen_addr)
        .await
        .map_err(|source| Error::Bind {
            addr: settings.listen_addr,
            source,
        })?;
    Ok(Bound {
        listener,
        service: service::KeyServiceImpl::new(keyring, &settings.access),
        tls,
    })
}
