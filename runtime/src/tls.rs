//! Mutual TLS for every hop, and the caller's identity taken from its certificate.
//!
//! tonic's rustls integration (ring provider) is used as is: TLS 1.2 and 1.3 only,
//! client certificates required and verified against the configured CA.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The trust anchors in a PEM file of CA certificates, for a rustls client that talks
/// to something other than our own services (a processor, a database). The error says
/// what is wrong with the file; callers add which setting named it.
pub fn root_store(ca_file: &Path) -> Result<rustls::RootCertStore, String> {
    let file = ca_file.display();
    let pem = std::fs::read(ca_file).map_err(|e| format!("cannot read {file}: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("{file} is not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("{file} holds an unusable certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{file} holds no certificate"));
    }
    Ok(roots)
}

/// PEM files for one TLS endpoint: the CA that signs the peers we accept, our own
/// certificate chain and our private key.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM certificate or key")]
    NotPem { what: &'static str, path: PathBuf },
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// Loaded PEM material, checked to be present and PEM-shaped before any port is bound.
#[derive(Clone)]
pub struct TlsMaterial {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial { key: [REDACTED], .. }")
    }
}

impl TlsMaterial {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        Ok(Self {
            ca: read_pem("CA file", &files.ca_file)?,
            cert: read_pem("certificate file", &files.cert_file)?,
            key: zeroize::Zeroizing::new(read_pem("private key file", &files.key_file)?),
        })
    }

    /// Server side: present our certificate, require a client certificate signed by
    /// the CA.
    /// A client that has not completed its handshake within `handshake_timeout` is
    /// disconnected, so slow or silent connections cannot pile up.
    pub fn server_config(&self, handshake_timeout: std::time::Duration) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, self.key.as_slice()))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .timeout(handshake_timeout)
    }

    /// This side's own identity (URI SAN, else CN), as its peers see it.
    pub fn identity(&self) -> Option<String> {
        let der = rustls_pemfile::certs(&mut self.cert.as_slice())
            .next()?
            .ok()?;
        identity_of_certificate(der.as_ref())
    }

    /// Client side: verify the server against the CA and name `server_name`, present
    /// our certificate.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, self.key.as_slice()))
            .domain_name(server_name)
    }
}

/// The caller's identity from its verified client certificate: the first URI SAN
/// (e.g. `spiffe://tokenvault.dev/checkout`), or else the subject CN. `None` when the
/// connection carries no certificate or it cannot be parsed (deny).
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    let leaf = certs.first()?;
    identity_of_certificate(leaf.as_ref())
}

/// The identity (URI SAN, else CN) of a DER certificate.
pub fn identity_of_certificate(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                return Some((*uri).to_owned());
            }
        }
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}
