//! A small, safe-by-default client for the vault and the keyservice: TLS always
//! (mutual, with our certificate), timeouts on every call, retries only for idempotent
//! calls, domain types in and out, `#[non_exhaustive]` errors.
//!
//! Must never depend on storage or key-handling crates: a client holds a certificate,
//! never a data key.
//!
//! ```no_run
//! use vault_client::{Card, ClientConfig, VaultClient};
//!
//! # async fn example() -> Result<(), vault_client::Error> {
//! let config = ClientConfig::new(
//!     "https://localhost:8443",
//!     "/etc/checkout/ca.pem",
//!     "/etc/checkout/client.pem",
//!     "/etc/checkout/client.key",
//! );
//! let mut vault = VaultClient::connect(&config).await?;
//! let card = Card::new("4242 4242 4242 4242", 12, 2030);
//! let stored = vault.tokenize(card, false).await?;
//! println!("token {} for a {} card ending {}", stored.token, stored.brand, stored.last_four);
//! vault.delete(&stored.token).await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use vault_proto::keys::v1 as keys_pb;
use vault_proto::vault::v1 as pb;
use zeroize::Zeroizing;

/// Where a service is and how to prove who we are.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `https://host:port`. Plain http is refused.
    pub endpoint: String,
    /// Name to verify in the server certificate; defaults to the endpoint's host.
    pub server_name: Option<String>,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Deadline of each call.
    pub timeout: Duration,
}

impl ClientConfig {
    pub fn new(
        endpoint: impl Into<String>,
        ca_file: impl Into<PathBuf>,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            endpoint: endpoint.into(),
            server_name: None,
            ca_file: ca_file.into(),
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            timeout: Duration::from_secs(10),
        }
    }

    fn host(&self) -> &str {
        let rest = self
            .endpoint
            .strip_prefix("https://")
            .unwrap_or(&self.endpoint);
        let authority = rest.split('/').next().unwrap_or(rest);
        let host = match authority.rsplit_once(':') {
            Some((host, _)) => host,
            None => authority,
        };
        host.trim_start_matches('[').trim_end_matches(']')
    }

    async fn channel(&self) -> Result<Channel, Error> {
        if !self.endpoint.starts_with("https://") {
            return Err(Error::Config(format!(
                "endpoint {} must start with https://",
                self.endpoint
            )));
        }
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path)
                .map_err(|e| Error::Config(format!("cannot read {what} {}: {e}", path.display())))
        };
        let ca = read(&self.ca_file, "CA file")?;
        let cert = read(&self.cert_file, "certificate file")?;
        let key = Zeroizing::new(read(&self.key_file, "private key file")?);
        let server_name = self
            .server_name
            .clone()
            .unwrap_or_else(|| self.host().to_owned());
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key.as_slice()))
            .domain_name(server_name);
        let endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| Error::Config(format!("invalid endpoint {}: {e}", self.endpoint)))?
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .tls_config(tls)
            .map_err(|e| Error::Config(format!("invalid TLS settings: {e}")))?;
        endpoint
            .connect()
            .await
            .map_err(|e| Error::Connect(format!("{}: {}", self.endpoint, error_chain(&e))))
    }
}

/// An error and its causes on one line: tonic's transport errors keep the useful part
/// ("Connection refused", "certificate unknown") a few sources down. (The servers have
/// the same helper in `runtime`; the client depends on `vault-proto` only.)
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot connect to {0}")]
    Connect(String),
    /// The server answered with an error status.
    #[error("{code:?}: {message}{}", request_id.as_ref().map(|id| format!(" (request id {id})")).unwrap_or_default())]
    Rejected {
        code: tonic::Code,
        message: String,
        request_id: Option<String>,
    },
    #[error("the server sent an incomplete response")]
    Incomplete,
}

impl Error {
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Rejected {
            code: status.code(),
            message: status.message().to_owned(),
            request_id: status
                .metadata()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }
    }
}

/// Card data to tokenize. The number and name are zeroized on drop and never printed.
pub struct Card {
    number: Zeroizing<String>,
    pub exp_month: u32,
    pub exp_year: u32,
    cardholder_name: Option<Zeroizing<String>>,
    cvc: Option<Zeroizing<String>>,
}

impl Card {
    pub fn new(number: &str, exp_month: u32, exp_year: u32) -> Self {
        Self {
            number: Zeroizing::new(number.to_owned()),
            exp_month,
            exp_year,
            cardholder_name: None,
            cvc: None,
        }
    }

    /// The card security code: the vault keeps it in memory only, for one forward.
    pub fn with_cvc(mut self, cvc: &str) -> Self {
        self.cvc = Some(Zeroizing::new(cvc.to_owned()));
        self
    }

    pub fn with_cardholder_name(mut self, name: &str) -> Self {
        self.cardholder_name = Some(Zeroizing::new(name.to_owned()));
        self
    }

    fn to_wire(&self) -> pb::Card {
        pb::Card {
            number: self.number.as_str().to_owned(),
            exp_month: self.exp_month,
            exp_year: self.exp_year,
            cardholder_name: self
                .cardholder_name
                .as_ref()
                .map(|n| n.as_str().to_owned())
                .unwrap_or_default(),
            cvc: self
                .cvc
                .as_ref()
                .map(|c| c.as_str().to_owned())
                .unwrap_or_default(),
        }
    }
}

impl fmt::Debug for Card {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Card")
            .field("number", &"[REDACTED]")
            .field("exp_month", &self.exp_month)
            .field("exp_year", &self.exp_year)
            .field(
                "cardholder_name",
                &self.cardholder_name.as_ref().map(|_| "[REDACTED]"),
            )
            .finish()
    }
}

/// A token and the metadata the vault keeps in the clear.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenInfo {
    pub token: String,
    pub brand: String,
    pub last_four: String,
    pub exp_month: u32,
    pub exp_year: u32,
    pub fingerprint: String,
    pub created_at_unix_ms: i64,
    pub key_version: u32,
    /// True when `tokenize` with `reuse_existing` returned an existing token.
    pub reused: bool,
}

fn brand_name(brand: i32) -> String {
    let name = pb::Brand::try_from(brand)
        .map(|b| {
            b.as_str_name()
                .trim_start_matches("BRAND_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into());
    if name == "unspecified" {
        "unknown".into()
    } else {
        name
    }
}

impl TokenInfo {
    fn from_wire(info: Option<pb::TokenInfo>, reused: bool) -> Result<Self, Error> {
        let info = info.ok_or(Error::Incomplete)?;
        Ok(Self {
            brand: brand_name(info.brand),
            token: info.token,
            last_four: info.last_four,
            exp_month: info.exp_month,
            exp_year: info.exp_year,
            fingerprint: info.fingerprint,
            created_at_unix_ms: info.created_at_unix_ms,
            key_version: info.key_version,
            reused,
        })
    }
}

/// One card's outcome in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchItem {
    Stored(TokenInfo),
    /// The card was refused: the field and rule, never the value.
    Invalid {
        field: String,
        rule: String,
        description: String,
    },
}

/// A request for the vault to send to an allowlisted processor, with the card of
/// `token` filled into placeholders such as `{{card.number}}`.
#[derive(Clone, Default)]
pub struct ForwardRequest {
    pub processor: String,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub token: String,
    /// A retry with the same key returns the stored outcome instead of charging again.
    pub idempotency_key: Option<String>,
}

impl fmt::Debug for ForwardRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values may hold the caller's processor credentials.
        f.debug_struct("ForwardRequest")
            .field("processor", &self.processor)
            .field("method", &self.method)
            .field("path", &self.path)
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// The processor's answer, card-number-like digit runs masked by the vault.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ForwardResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// True when the vault returned a stored outcome for a repeated idempotency key.
    pub replayed: bool,
}

/// What `verify_backup` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BackupReport {
    pub records: u64,
    pub verified: u64,
    pub failed: u64,
}

/// Retries an idempotent call while the server is unavailable.
async fn idempotent<T, F, Fut>(mut call: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    const ATTEMPTS: u32 = 3;
    let mut attempt = 1;
    loop {
        match call().await {
            Err(status) if status.code() == tonic::Code::Unavailable && attempt < ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                attempt += 1;
            }
            result => return result.map_err(Error::from),
        }
    }
}

/// A connection to the vault.
#[derive(Debug, Clone)]
pub struct VaultClient {
    vault: pb::vault_client::VaultClient<Channel>,
    health: tonic_health::pb::health_client::HealthClient<Channel>,
}

impl VaultClient {
    pub async fn connect(config: &ClientConfig) -> Result<Self, Error> {
        let channel = config.channel().await?;
        Ok(Self {
            vault: pb::vault_client::VaultClient::new(channel.clone()),
            health: tonic_health::pb::health_client::HealthClient::new(channel),
        })
    }

    /// Tokenizes one card. Not retried: a retry could store the card twice.
    pub async fn tokenize(&mut self, card: Card, reuse_existing: bool) -> Result<TokenInfo, Error> {
        let request = pb::TokenizeRequest {
            card: Some(card.to_wire()),
            reuse_existing,
        };
        let response = self.vault.tokenize(request).await?.into_inner();
        TokenInfo::from_wire(response.info, response.reused)
    }

    /// Tokenizes several cards in one durable write; one result per card, in order.
    pub async fn tokenize_batch(
        &mut self,
        cards: &[Card],
        reuse_existing: bool,
    ) -> Result<Vec<BatchItem>, Error> {
        let request = pb::TokenizeBatchRequest {
            cards: cards.iter().map(Card::to_wire).collect(),
            reuse_existing,
        };
        let response = self.vault.tokenize_batch(request).await?.into_inner();
        response
            .results
            .into_iter()
            .map(|item| match item.outcome {
                Some(pb::batch_item_result::Outcome::Stored(stored)) => {
                    TokenInfo::from_wire(stored.info, stored.reused).map(BatchItem::Stored)
                }
                Some(pb::batch_item_result::Outcome::Invalid(v)) => Ok(BatchItem::Invalid {
                    field: v.field,
                    rule: v.rule,
                    description: v.description,
                }),
                None => Err(Error::Incomplete),
            })
            .collect()
    }

    pub async fn token_info(&mut self, token: &str) -> Result<TokenInfo, Error> {
        let response = idempotent(|| {
            let mut vault = self.vault.clone();
            let token = token.to_owned();
            async move {
                vault
                    .get_token_info(pb::GetTokenInfoRequest { token })
                    .await
            }
        })
        .await?;
        TokenInfo::from_wire(response.into_inner().info, false)
    }

    pub async fn delete(&mut self, token: &str) -> Result<(), Error> {
        self.vault
            .delete_token(pb::DeleteTokenRequest {
                token: token.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// Has the vault send a request to a processor with the card filled in. Not retried
    /// automatically: set an idempotency key and retry yourself.
    pub async fn forward(&mut self, request: ForwardRequest) -> Result<ForwardResponse, Error> {
        let response = self
            .vault
            .forward(pb::ForwardRequest {
                processor: request.processor,
                method: request.method,
                path: request.path,
                headers: request
                    .headers
                    .into_iter()
                    .map(|(name, value)| pb::Header { name, value })
                    .collect(),
                body: request.body,
                token: request.token,
                idempotency_key: request.idempotency_key.unwrap_or_default(),
            })
            .await?
            .into_inner();
        Ok(ForwardResponse {
            status: u16::try_from(response.status).map_err(|_| Error::Incomplete)?,
            headers: response
                .headers
                .into_iter()
                .map(|h| (h.name, h.value))
                .collect(),
            body: response.body,
            replayed: response.replayed,
        })
    }

    /// Has the vault write a consistent online backup named `name` into its backup
    /// directory; returns where (on the vault host) and its size in bytes.
    pub async fn create_backup(&mut self, name: &str) -> Result<(String, u64), Error> {
        let response = self
            .vault
            .create_backup(pb::CreateBackupRequest {
                name: name.to_owned(),
            })
            .await?
            .into_inner();
        Ok((response.path, response.size_bytes))
    }

    /// Has the vault authenticate every record of backup `name`.
    pub async fn verify_backup(&mut self, name: &str) -> Result<BackupReport, Error> {
        let response = self
            .vault
            .verify_backup(pb::VerifyBackupRequest {
                name: name.to_owned(),
            })
            .await?
            .into_inner();
        Ok(BackupReport {
            records: response.records,
            verified: response.verified,
            failed: response.failed,
        })
    }

    /// gRPC health of the vault: `Ok(true)` when serving.
    pub async fn health(&mut self) -> Result<bool, Error> {
        health(&self.health).await
    }
}

async fn health(
    client: &tonic_health::pb::health_client::HealthClient<Channel>,
) -> Result<bool, Error> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let response = idempotent(|| {
        let mut client = client.clone();
        async move {
            client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
        }
    })
    .await?;
    Ok(response.into_inner().status == ServingStatus::Serving as i32)
}

/// One key version as the keyservice lists it to an admin (never material).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyVersion {
    pub purpose: String,
    pub version: u32,
    pub state: String,
    pub created_at_unix_ms: i64,
}

/// A connection to the keyservice, as an admin.
#[derive(Debug, Clone)]
pub struct KeyServiceClient {
    keys: keys_pb::key_service_client::KeyServiceClient<Channel>,
    health: tonic_health::pb::health_client::HealthClient<Channel>,
}

impl KeyServiceClient {
    pub async fn connect(config: &ClientConfig) -> Result<Self, Error> {
        let channel = config.channel().await?;
        Ok(Self {
            keys: keys_pb::key_service_client::KeyServiceClient::new(channel.clone()),
            health: tonic_health::pb::health_client::HealthClient::new(channel),
        })
    }

    pub async fn list_versions(&mut self) -> Result<Vec<KeyVersion>, Error> {
        let response = idempotent(|| {
            let mut keys = self.keys.clone();
            async move {
                keys.list_key_versions(keys_pb::ListKeyVersionsRequest {})
                    .await
            }
        })
        .await?;
        let name = |s: &str, prefix: &str| {
            s.trim_start_matches(prefix)
                .to_ascii_lowercase()
                .replace('_', "-")
        };
        Ok(response
            .into_inner()
            .versions
            .into_iter()
            .map(|v| KeyVersion {
                purpose: keys_pb::KeyPurpose::try_from(v.purpose)
                    .map(|p| name(p.as_str_name(), "KEY_PURPOSE_"))
                    .unwrap_or_else(|_| "unknown".into()),
                version: v.version,
                state: keys_pb::KeyState::try_from(v.state)
                    .map(|s| name(s.as_str_name(), "KEY_STATE_"))
                    .unwrap_or_else(|_| "unknown".into()),
                created_at_unix_ms: v.created_at_unix_ms,
            })
            .collect())
    }

    pub async fn health(&mut self) -> Result<bool, Error> {
        health(&self.health).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_debug_is_redacted() {
        let card = Card::new("4242424242424242", 12, 2030).with_cardholder_name("Ada Lovelace");
        let printed = format!("{card:?}");
        assert!(
            !printed.contains("4242") && !printed.contains("Ada"),
            "{printed}"
        );
    }

    #[test]
    fn server_name_defaults_to_host() {
        let config = ClientConfig::new("https://localhost:8443", "a", "b", "c");
        assert_eq!(config.host(), "localhost");
        let config = ClientConfig::new("https://[::1]:8443", "a", "b", "c");
        assert_eq!(config.host(), "::1");
    }

    #[tokio::test]
    async fn plain_http_is_refused() {
        let config = ClientConfig::new("http://localhost:8443", "a", "b", "c");
        let err = VaultClient::connect(&config).await.unwrap_err();
        assert!(
            matches!(err, Error::Config(ref m) if m.contains("https://")),
            "{err}"
        );
    }
}
