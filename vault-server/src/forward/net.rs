//! The network side of forwarding: which addresses may be dialled, how the processor's
//! certificate is checked, and the HTTP client that enforces both (no redirects, https
//! only, timeouts).

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::address::is_private;
use super::settings::ProcessorSettings;

/// Resolves processor host names, dropping private addresses unless allowed. The
/// client dials only what this returns, so a DNS answer cannot point the vault at an
/// internal address.
#[derive(Debug)]
struct CheckedResolver {
    allow_private_network: bool,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private_network;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| allow_private || !is_private(addr.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no public address").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// CA verification, then (when pins are configured) the leaf certificate's SPKI
/// SHA-256 must equal one of the pins.
#[derive(Debug)]
struct PinnedVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    pins: Vec<[u8; 32]>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if self.pins.is_empty() {
            return Ok(verified);
        }
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(end_entity.as_ref())
            .map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
            })?;
        let spki = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
        if self.pins.iter().any(|pin| pin.as_slice() == spki.as_ref()) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Builds the HTTP client of one processor: its own trust anchors and pins, the
/// private-network rule, no redirects, https only, its timeouts.
pub fn client(settings: &ProcessorSettings) -> Result<reqwest::Client, String> {
    let name = &settings.name;
    let roots = runtime::tls::root_store(&settings.ca_file)
        .map_err(|e| format!("processor {name:?}: ca_file: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| format!("processor {name:?}: {e}"))?;
    let pins = settings
        .spki_sha256_pins
        .iter()
        .filter_map(|pin| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(pin)
                .ok()?
                .try_into()
                .ok()
        })
        .collect();
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("processor {name:?}: {e}"))?
        .dangerous() // a custom verifier: CA verification plus pins, never less
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
            inner: webpki,
            pins,
        }))
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .dns_resolver(Arc::new(CheckedResolver {
            allow_private_network: settings.allow_private_network,
        }))
        .redirect(reqwest::redirect::Policy::none())
        // Proxies from the environment would resolve names themselves, around the
        // private-address rule.
        .no_proxy()
        .https_only(true)
        .connect_timeout(std::time::Duration::from_millis(
            settings.connect_timeout_ms,
        ))
        .timeout(std::time::Duration::from_millis(settings.timeout_ms))
        .build()
        .map_err(|e| format!("processor {name:?}: cannot build HTTP client: {e}"))
}
