//! Mutual TLS for every hop, and the caller's identity taken from its certificate.
//!
//! rustls with the ring provider: TLS 1.2 and 1.3 only, client certificates required
//! and verified against the configured CA. Servers accept through the
//! `accept` module, which builds on [`TlsMaterial::server_config`]; clients use tonic's
//! rustls integration.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

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
    /// The private key file is missing, unreadable, or readable by group or others.
    #[error("private key file: {0}")]
    KeyFile(#[from] crate::secret_file::SecretFileError),
    #[error("unusable TLS material: {0}")]
    Unusable(String),
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    check_pem(what, path, &bytes)?;
    Ok(bytes)
}

/// The private key, from a file that group and others may not read (mode 0600 or
/// 0400): a key others can read is refused at start-up with the `chmod` to run, like
/// the root key and other secret files.
fn read_private_key(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, TlsError> {
    let bytes = crate::secret_file::read_owner_only(path)?;
    check_pem("private key file", path, &bytes)?;
    Ok(bytes)
}

fn check_pem(what: &'static str, path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
        });
    }
    Ok(())
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
            key: read_private_key(&files.key_file)?,
        })
    }

    /// Server side, for `accept::incoming`: present our certificate, require a
    /// client certificate signed by the CA, speak HTTP/2 (ALPN `h2`).
    pub fn server_config(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
        let unusable = |e: &dyn std::fmt::Display| TlsError::Unusable(e.to_string());
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut self.ca.as_slice()) {
            roots
                .add(cert.map_err(|e| unusable(&e))?)
                .map_err(|e| unusable(&e))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::clone(&provider),
        )
        .build()
        .map_err(|e| unusable(&e))?;
        let chain = rustls_pemfile::certs(&mut self.cert.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unusable(&e))?;
        let key = rustls_pemfile::private_key(&mut self.key.as_slice())
            .map_err(|e| unusable(&e))?
            .ok_or_else(|| TlsError::Unusable("no private key in the key file".into()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| unusable(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| unusable(&e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(std::sync::Arc::new(config))
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

/// The identity of a DER certificate, typed by where it came from:
/// - its URI SAN, as is (`spiffe://tokenvault.dev/checkout`): exactly one, and of the
///   form `scheme://...`, as SPIFFE ids are;
/// - else, with no URI SAN at all, `cn:` and its subject CN (`cn:checkout`).
///
/// A certificate whose SAN extension does not parse, with several URI SANs, or with a
/// URI SAN of another form has none: it is refused. A CN is therefore never taken for a
/// URI: a certificate whose CN merely reads `spiffe://...` is `cn:spiffe://...`, which
/// no `uri:` entry of a policy names.
pub fn identity_of_certificate(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris[..] {
        [uri] if is_hierarchical_uri(uri) => Some(uri.to_owned()),
        [] => {
            let mut names = cert.subject().iter_common_name();
            let cn = names.next()?.as_str().ok()?;
            // Two CNs: which one a policy meant is ambiguous.
            names.next().is_none().then(|| format!("{CN_PREFIX}{cn}"))
        }
        _ => None,
    }
}

/// How an identity from a certificate's CN is written (see [`identity_of_certificate`]).
pub const CN_PREFIX: &str = "cn:";
const URI_PREFIX: &str = "uri:";

fn is_hierarchical_uri(uri: &str) -> bool {
    uri.split_once("://").is_some_and(|(scheme, rest)| {
        !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
            && !rest.is_empty()
    })
}

/// An identity as a configuration names it (a policy entry, an allow list), typed:
/// `uri:<uri>` (a certificate's URI SAN) or `cn:<name>` (a certificate with no URI SAN
/// and that CN). An untyped entry of the form `scheme://...` is read as `uri:` (with a
/// warning: write the kind); anything else untyped is refused, since it would be
/// unclear whether a CN may match it. Returns the identity as
/// [`identity_of_certificate`] writes it.
pub fn configured_identity(entry: &str) -> Result<String, String> {
    if let Some(uri) = entry.strip_prefix(URI_PREFIX) {
        return match is_hierarchical_uri(uri) {
            true => Ok(uri.to_owned()),
            false => Err(format!(
                "{entry:?}: a uri: identity is of the form scheme://..."
            )),
        };
    }
    if let Some(cn) = entry.strip_prefix(CN_PREFIX) {
        return match cn.is_empty() {
            true => Err(format!("{entry:?}: a cn: identity names a CN")),
            false => Ok(entry.to_owned()),
        };
    }
    if is_hierarchical_uri(entry) {
        tracing::warn!(
            identity = entry,
            "an untyped identity is read as uri:{entry}; write the kind (uri: or cn:)"
        );
        return Ok(entry.to_owned());
    }
    Err(format!(
        "{entry:?}: name the kind of identity: uri:<the certificate's URI SAN> or \
         cn:<the certificate's CN, for one with no URI SAN>"
    ))
}

#[cfg(test)]
mod identity_tests {
    use super::*;

    /// Control: PCI-8.2.1 (docs/compliance.md).
    /// Attack: a certificate whose CN reads like a URI identity is taken for it; identities
    /// are typed and never compared across types.
    #[test]
    fn configured_identities_are_typed_and_a_cn_never_reads_as_a_uri() {
        let uri = "spiffe://payments.example/checkout";
        assert_eq!(configured_identity(&format!("uri:{uri}")).unwrap(), uri);
        // Untyped but plainly a URI: read as one (with a warning).
        assert_eq!(configured_identity(uri).unwrap(), uri);
        assert_eq!(
            configured_identity("cn:legacy-pos").unwrap(),
            "cn:legacy-pos"
        );
        // A CN entry that reads like a URI stays a CN: it can only match a certificate
        // with no URI SAN and that CN.
        assert_eq!(
            configured_identity(&format!("cn:{uri}")).unwrap(),
            format!("cn:{uri}")
        );
        for refused in [
            "legacy-pos",
            "uri:legacy-pos",
            "uri:",
            "cn:",
            "://x",
            "spiffe://",
        ] {
            let err = configured_identity(refused).unwrap_err();
            assert!(err.contains(refused), "{err}");
        }
    }
}

#[cfg(all(test, unix))]
mod key_file_tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Control: PCI-8.3.2 (docs/compliance.md).
    /// Attack: read a service's TLS private key (its authentication factor) as another
    /// local user, from a key file left group- or world-readable; the service refuses
    /// to start with such a file, naming it and the `chmod` to run, and starts with
    /// mode 0600 or 0400.
    #[test]
    fn a_private_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pem = b"-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n";
        let files = TlsFiles {
            ca_file: dir.path().join("ca.pem"),
            cert_file: dir.path().join("cert.pem"),
            key_file: dir.path().join("service.key"),
        };
        for path in [&files.ca_file, &files.cert_file, &files.key_file] {
            std::fs::write(path, pem).unwrap();
        }
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&files.key_file, std::fs::Permissions::from_mode(mode))
                .unwrap();
            let error = TlsMaterial::load(&files).unwrap_err().to_string();
            assert!(
                error.contains("service.key") && error.contains("chmod 600"),
                "{mode:o}: {error}"
            );
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&files.key_file, std::fs::Permissions::from_mode(mode))
                .unwrap();
            TlsMaterial::load(&files).unwrap();
        }
    }
}
