//! A small, safe-by-default client for the vault and the keyservice: TLS always
//! (mutual, with our certificate), timeouts on every call, retries only for idempotent
//! calls, domain types in and out, `#[non_exhaustive]` errors.
//!
//! Must never depend on storage or key-handling crates: a client holds a certificate,
//! never a data key. (It uses `envelope`'s sealer only: sealing a card needs the
//! vault's public intake key, never a private one.)
//!
//! - [`VaultClient`]: tokenize (one card or a batch, or sealed cards: [`SealingKey`]
//!   seals a card on a device that then relays it), token info, delete, forward to a
//!   processor, backups, the rewrap job that re-encrypts records onto the active key
//!   versions after a rotation, the policy reload, the audit log (read and verify its
//!   chain) and the blocks put on identities and addresses after repeated failures.
//! - [`KeyServiceClient`], as an admin: key versions with their budget use and record
//!   counts, rotation, retirement, dual-control proposals (destroy, unretire, root key
//!   change) and their approval, and the key history. Never key material.
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

mod import;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use vault_proto::keys::v1 as keys_pb;
use vault_proto::vault::v1 as pb;
use zeroize::Zeroizing;

pub use import::{
    ExportJob, ExportResult, IMPORT_PIECE_BYTES, ImportFormat, ImportJob, ImportKeyAlgorithm,
    ImportKeyInfo, ImportStatus, ImportedRow, ImportedRows, file_sha256,
};

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
        check_owner_only(&self.key_file)?;
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

/// " (request id …)", unless the server's message names it already (it does for
/// internal failures).
fn request_id_suffix(message: &str, request_id: Option<&str>) -> String {
    match request_id {
        Some(id) if !message.contains(id) => format!(" (request id {id})"),
        _ => String::new(),
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot connect to {0}")]
    Connect(String),
    /// The server answered with an error status.
    #[error("{code:?}: {message}{}", request_id_suffix(message, request_id.as_deref()))]
    Rejected {
        code: tonic::Code,
        message: String,
        request_id: Option<String>,
        /// The `google.rpc.ErrorInfo` reason, where the vault gives one (e.g.
        /// `SEALED_CARD_EXPIRED`).
        reason: Option<String>,
    },
    #[error("the server sent an incomplete response")]
    Incomplete,
    /// The client refused a request before sending it: the field and the rule.
    #[error("invalid {field}: {rule}")]
    InvalidArgument {
        field: &'static str,
        rule: &'static str,
    },
}

impl Error {
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The `ErrorInfo` reason of a refusal, if the vault gave one.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Error::Rejected { reason, .. } => reason.as_deref(),
            _ => None,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        use tonic_types::StatusExt;
        Error::Rejected {
            reason: status.get_details_error_info().map(|info| info.reason),
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

    /// The card as a sealed card's JSON (docs/sealed-intake.md), in a buffer that
    /// zeroizes on drop and is never reallocated (a card too long for a sealed card is
    /// refused instead, leaving no copy behind).
    fn sealed_json(&self) -> Result<Zeroizing<Vec<u8>>, Error> {
        /// Writes into a vector's spare capacity only.
        struct Bounded<'a>(&'a mut Vec<u8>);
        impl std::io::Write for Bounded<'_> {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                if self.0.len() + bytes.len() > self.0.capacity() {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                self.0.extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        #[derive(serde::Serialize)]
        struct Json<'a> {
            number: &'a str,
            exp_month: u32,
            exp_year: u32,
            #[serde(skip_serializing_if = "Option::is_none")]
            cvc: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            name: Option<&'a str>,
        }
        let json = Json {
            number: &self.number,
            exp_month: self.exp_month,
            exp_year: self.exp_year,
            cvc: self.cvc.as_deref().map(String::as_str),
            name: self.cardholder_name.as_deref().map(String::as_str),
        };
        let mut out = Zeroizing::new(Vec::with_capacity(envelope::sealed::MAX_PLAINTEXT_LEN));
        serde_json::to_writer(Bounded(&mut out), &json).map_err(|_| too_long())?;
        Ok(out)
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

/// The vault's intake key as `GetSealingKey` gave it, and when it arrived: what a device
/// (a point of sale, a batch job; browsers use clients/web) needs to seal cards so that
/// whatever relays them never holds one (docs/sealed-intake.md).
#[derive(Debug, Clone)]
pub struct SealingKey {
    pub public_key: [u8; envelope::sealed::PUBLIC_KEY_LEN],
    pub key_id: [u8; envelope::sealed::KEY_ID_LEN],
    pub tenant: String,
    pub server_time_unix_ms: i64,
    pub accepted_until_unix_ms: i64,
    pub max_age_secs: u32,
    received_at: std::time::Instant,
}

impl SealingKey {
    fn from_wire(key: pb::SealingKey) -> Result<Self, Error> {
        let suite = (key.kem_id, key.kdf_id, key.aead_id);
        let (kem, kdf, aead) = envelope::sealed::SUITE;
        if suite != (kem.into(), kdf.into(), aead.into()) {
            return Err(Error::Config(
                "the vault's sealing key uses an HPKE suite this client does not know".into(),
            ));
        }
        let public_key: [u8; envelope::sealed::PUBLIC_KEY_LEN] =
            key.public_key.try_into().map_err(|_| Error::Incomplete)?;
        let key_id: [u8; envelope::sealed::KEY_ID_LEN] =
            key.key_id.try_into().map_err(|_| Error::Incomplete)?;
        if key_id != envelope::sealed::key_id(&public_key) {
            return Err(Error::Incomplete);
        }
        Ok(Self {
            public_key,
            key_id,
            tenant: key.tenant,
            server_time_unix_ms: key.server_time_unix_ms,
            accepted_until_unix_ms: key.accepted_until_unix_ms,
            max_age_secs: key.max_age_secs,
            received_at: std::time::Instant::now(),
        })
    }

    /// Seals `card` to this key, stamped with the vault's time (the time the key came
    /// with plus the time elapsed since, on this machine's monotonic clock).
    pub fn seal(&self, card: &Card) -> Result<Vec<u8>, Error> {
        let elapsed = i64::try_from(self.received_at.elapsed().as_millis()).unwrap_or(i64::MAX);
        let issued_at = self.server_time_unix_ms.saturating_add(elapsed).max(0) as u64;
        let json = card.sealed_json()?;
        envelope::sealed::seal(&self.public_key, &self.tenant, issued_at, &json).map_err(
            |e| match e {
                envelope::Error::TooLong => too_long(),
                envelope::Error::Random => {
                    Error::Config("the system random number generator failed".into())
                }
                _ => Error::Config("the sealing key is not a usable X25519 public key".into()),
            },
        )
    }
}

/// The shape of a new token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenFormat {
    /// The tenant's default (the vault's `[tokens]` config), else opaque.
    #[default]
    TenantDefault,
    /// `tok_` followed by 22 base62 characters.
    Opaque,
    /// Card-shaped: the card's length and last four digits (and its first six where
    /// the tenant's config says so), failing the Luhn check.
    Card,
}

impl TokenFormat {
    fn to_wire(self) -> i32 {
        match self {
            TokenFormat::TenantDefault => pb::TokenFormat::Unspecified,
            TokenFormat::Opaque => pb::TokenFormat::Opaque,
            TokenFormat::Card => pb::TokenFormat::Card,
        }
        .into()
    }
}

/// How to tokenize: everything but the card.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenizeOptions {
    /// Return the tenant's existing token for the same card and expiry, if any (in
    /// whatever format it was made).
    pub reuse_existing: bool,
    /// The token expires (answers NOT_FOUND, then is erased) after this long; `None`
    /// takes the tenant's default retention.
    pub ttl: Option<Duration>,
    pub format: TokenFormat,
}

fn too_long() -> Error {
    Error::InvalidArgument {
        field: "card",
        rule: "the card's JSON is longer than a sealed card holds (1024 bytes)",
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
    /// True when the card's CVC was not kept: the existing token holds one another
    /// identity sent.
    pub cvc_not_kept: bool,
    /// When the token stops answering and is erased; `None` for never.
    pub expires_at_unix_ms: Option<i64>,
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
    fn from_wire(
        info: Option<pb::TokenInfo>,
        reused: bool,
        cvc_not_kept: bool,
    ) -> Result<Self, Error> {
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
            cvc_not_kept,
            expires_at_unix_ms: (info.expires_at_unix_ms > 0).then_some(info.expires_at_unix_ms),
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

fn batch_items(response: pb::TokenizeBatchResponse) -> Result<Vec<BatchItem>, Error> {
    response
        .results
        .into_iter()
        .map(|item| match item.outcome {
            Some(pb::batch_item_result::Outcome::Stored(stored)) => {
                TokenInfo::from_wire(stored.info, stored.reused, stored.cvc_not_kept)
                    .map(BatchItem::Stored)
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
    /// Why the card is sent ("recurring charge 2026-12"): kept in the audit log;
    /// required by processors configured with `require_reason`.
    pub reason: Option<String>,
    /// A route the processor declares: then `method`, `path` and `body` stay empty,
    /// and `fields` holds the route's fields.
    pub route: Option<String>,
    pub fields: std::collections::BTreeMap<String, String>,
}

impl ForwardRequest {
    /// A forward along a route the processor declares, with its fields.
    pub fn route(processor: &str, route: &str, token: &str, fields: &[(&str, &str)]) -> Self {
        Self {
            processor: processor.to_owned(),
            route: Some(route.to_owned()),
            token: token.to_owned(),
            fields: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Self::default()
        }
    }
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
    /// Records erased since the backup was taken: a restore erases them again.
    pub erased: u64,
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
        self.tokenize_with_ttl(card, reuse_existing, None).await
    }

    /// Tokenizes one card whose token expires (answers NOT_FOUND, then is erased)
    /// after `ttl`; `None` takes the tenant's default retention.
    pub async fn tokenize_with_ttl(
        &mut self,
        card: Card,
        reuse_existing: bool,
        ttl: Option<Duration>,
    ) -> Result<TokenInfo, Error> {
        let options = TokenizeOptions {
            reuse_existing,
            ttl,
            format: TokenFormat::TenantDefault,
        };
        self.tokenize_with(card, options).await
    }

    /// Tokenizes one card with every option. Not retried: a retry could store the card
    /// twice.
    pub async fn tokenize_with(
        &mut self,
        card: Card,
        options: TokenizeOptions,
    ) -> Result<TokenInfo, Error> {
        let request = pb::TokenizeRequest {
            card: Some(card.to_wire()),
            reuse_existing: options.reuse_existing,
            ttl_secs: options.ttl.map_or(0, |ttl| ttl.as_secs().max(1)),
            format: options.format.to_wire(),
        };
        let response = self.vault.tokenize(request).await?.into_inner();
        TokenInfo::from_wire(response.info, response.reused, response.cvc_not_kept)
    }

    /// The intake key to seal cards to (permission `tokenize`). Safe to retry.
    pub async fn sealing_key(&mut self) -> Result<SealingKey, Error> {
        let response = idempotent(|| {
            let mut vault = self.vault.clone();
            async move { vault.get_sealing_key(pb::GetSealingKeyRequest {}).await }
        })
        .await?;
        SealingKey::from_wire(response.into_inner())
    }

    /// Tokenizes a sealed card. A retry with the same sealed card within its window
    /// gets the first answer, so this one is retried on transport failures.
    pub async fn tokenize_sealed(
        &mut self,
        sealed_card: &[u8],
        reuse_existing: bool,
    ) -> Result<TokenInfo, Error> {
        let options = TokenizeOptions {
            reuse_existing,
            ..TokenizeOptions::default()
        };
        self.tokenize_sealed_with(sealed_card, options).await
    }

    /// [`Self::tokenize_sealed`] with every option (retention, token format).
    pub async fn tokenize_sealed_with(
        &mut self,
        sealed_card: &[u8],
        options: TokenizeOptions,
    ) -> Result<TokenInfo, Error> {
        let response = idempotent(|| {
            let mut vault = self.vault.clone();
            let request = pb::TokenizeSealedRequest {
                sealed_card: sealed_card.to_vec(),
                reuse_existing: options.reuse_existing,
                ttl_secs: options.ttl.map_or(0, |ttl| ttl.as_secs().max(1)),
                format: options.format.to_wire(),
            };
            async move { vault.tokenize_sealed(request).await }
        })
        .await?
        .into_inner();
        TokenInfo::from_wire(response.info, response.reused, response.cvc_not_kept)
    }

    /// Tokenizes several sealed cards in one durable write; one result per card.
    pub async fn tokenize_sealed_batch(
        &mut self,
        sealed_cards: Vec<Vec<u8>>,
        options: TokenizeOptions,
    ) -> Result<Vec<BatchItem>, Error> {
        let request = pb::TokenizeSealedBatchRequest {
            sealed_cards,
            reuse_existing: options.reuse_existing,
            ttl_secs: options.ttl.map_or(0, |ttl| ttl.as_secs().max(1)),
            format: options.format.to_wire(),
        };
        let response = self
            .vault
            .tokenize_sealed_batch(request)
            .await?
            .into_inner();
        batch_items(response)
    }

    /// Every token of the card `number` in our tenant (a data-subject request).
    pub async fn find_subject(&mut self, number: &str) -> Result<Vec<String>, Error> {
        let request = pb::SubjectRequest {
            card: Some(Card::new(number, 1, 2000).to_wire()),
        };
        Ok(self.vault.find_subject(request).await?.into_inner().tokens)
    }

    /// Erases every token of the card `number` in our tenant; returns them.
    pub async fn erase_subject(&mut self, number: &str) -> Result<Vec<String>, Error> {
        let request = pb::SubjectRequest {
            card: Some(Card::new(number, 1, 2000).to_wire()),
        };
        Ok(self.vault.erase_subject(request).await?.into_inner().tokens)
    }

    /// Tokenizes several cards in one durable write; one result per card, in order.
    pub async fn tokenize_batch(
        &mut self,
        cards: &[Card],
        reuse_existing: bool,
    ) -> Result<Vec<BatchItem>, Error> {
        let options = TokenizeOptions {
            reuse_existing,
            ..TokenizeOptions::default()
        };
        self.tokenize_batch_with(cards, options).await
    }

    /// Tokenizes several cards in one durable write with every option; one result per
    /// card, in order.
    pub async fn tokenize_batch_with(
        &mut self,
        cards: &[Card],
        options: TokenizeOptions,
    ) -> Result<Vec<BatchItem>, Error> {
        let request = pb::TokenizeBatchRequest {
            cards: cards.iter().map(Card::to_wire).collect(),
            reuse_existing: options.reuse_existing,
            ttl_secs: options.ttl.map_or(0, |ttl| ttl.as_secs().max(1)),
            format: options.format.to_wire(),
        };
        let response = self.vault.tokenize_batch(request).await?.into_inner();
        batch_items(response)
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
        TokenInfo::from_wire(response.into_inner().info, false, false)
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
                reason: request.reason.unwrap_or_default(),
                route: request.route.unwrap_or_default(),
                fields: request.fields.into_iter().collect(),
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
            erased: response.erased,
        })
    }

    /// Starts the vault's background rewrap job (or joins the one running) and returns
    /// its status at once. Retried: a second start joins the first.
    pub async fn start_rewrap(&mut self) -> Result<RewrapStatus, Error> {
        let response = idempotent(|| {
            let mut vault = self.vault.clone();
            async move { vault.start_rewrap(pb::StartRewrapRequest {}).await }
        })
        .await?;
        Ok(RewrapStatus::from_wire(response.into_inner()))
    }

    /// The rewrap job's progress.
    pub async fn rewrap_status(&mut self) -> Result<RewrapStatus, Error> {
        let response = idempotent(|| {
            let mut vault = self.vault.clone();
            async move { vault.get_rewrap_status(pb::GetRewrapStatusRequest {}).await }
        })
        .await?;
        Ok(RewrapStatus::from_wire(response.into_inner()))
    }

    /// Has the vault re-read its policy file (as SIGHUP does) and returns how many
    /// identities the policy now in force has. An invalid file is refused with
    /// `FailedPrecondition` and a message naming the problem; the previous policy stays
    /// in force. Not retried: a reload is not a read.
    pub async fn reload_policy(&mut self) -> Result<u32, Error> {
        let response = self
            .vault
            .reload_policy(pb::ReloadPolicyRequest {})
            .await?
            .into_inner();
        Ok(response.identities)
    }

    /// Audit events with a sequence number above `after_sequence` (0: from the start),
    /// in sequence order, optionally within a time window (inclusive, Unix ms, both
    /// after 1970). At most `limit` events come back, and never more than
    /// [`AUDIT_PAGE_MAX`] (0: that many); page on with the last event's sequence.
    pub async fn read_audit(
        &mut self,
        after_sequence: u64,
        since_unix_ms: Option<i64>,
        until_unix_ms: Option<i64>,
        limit: u32,
    ) -> Result<AuditPage, Error> {
        let request = read_audit_request(after_sequence, since_unix_ms, until_unix_ms, limit)?;
        let response = idempotent(|| {
            let mut vault = self.vault.clone();
            async move { vault.read_audit(request).await }
        })
        .await?
        .into_inner();
        Ok(AuditPage {
            events: response
                .events
                .into_iter()
                .map(AuditEvent::from_wire)
                .collect(),
            last_sequence: response.last_sequence,
        })
    }

    /// Has the vault check its whole audit chain.
    pub async fn verify_audit(&mut self) -> Result<AuditVerification, Error> {
        let response = idempotent(|| {
            let mut vault = self.vault.clone();
            async move { vault.verify_audit(pb::VerifyAuditRequest {}).await }
        })
        .await?;
        Ok(AuditVerification::from_wire(response.into_inner()))
    }

    /// Identities and addresses the vault blocks after repeated failures.
    pub async fn list_blocks(&mut self) -> Result<Vec<Block>, Error> {
        let response = idempotent(|| {
            let mut vault = self.vault.clone();
            async move { vault.list_blocks(pb::ListBlocksRequest {}).await }
        })
        .await?;
        Ok(response
            .into_inner()
            .blocks
            .into_iter()
            .map(|b| Block {
                kind: b.kind,
                subject: b.subject,
                until_unix_ms: b.until_unix_ms,
                failures: b.failures,
            })
            .collect())
    }

    /// Lifts a block before it ends. `kind` is one of [`BLOCK_KINDS`]; `subject` is the
    /// identity or address as [`Self::list_blocks`] shows it. Not retried.
    pub async fn lift_block(&mut self, kind: &str, subject: &str) -> Result<(), Error> {
        check_block_kind(kind)?;
        if subject.trim().is_empty() {
            return Err(Error::InvalidArgument {
                field: "subject",
                rule: "must not be empty",
            });
        }
        self.vault
            .lift_block(pb::LiftBlockRequest {
                kind: kind.to_owned(),
                subject: subject.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// gRPC health of the vault: `Ok(true)` when serving.
    pub async fn health(&mut self) -> Result<bool, Error> {
        health(&self.health, "").await
    }

    /// Whether the vault's link to the keyservice is up. When it is down the vault is
    /// degraded: it serves with the keys it holds until its encryption budget runs out.
    pub async fn keyservice_link(&mut self) -> Result<bool, Error> {
        health(&self.health, KEYSERVICE_LINK_HEALTH).await
    }

    /// Whether the vault's data and audit log filesystems have room (above its
    /// `[storage] low_disk_mb`). When not, the vault is degraded but serves. A vault
    /// from before this check counts as having room.
    pub async fn storage_room(&mut self) -> Result<bool, Error> {
        match health(&self.health, STORAGE_HEALTH).await {
            Err(Error::Rejected {
                code: tonic::Code::NotFound,
                ..
            }) => Ok(true),
            other => other,
        }
    }
}

/// The vault's health service names for its keyservice link and its disk space (the
/// server defines them as `vault_server::KEYSERVICE_LINK_HEALTH` and `STORAGE_HEALTH`; a
/// client does not link the server).
const KEYSERVICE_LINK_HEALTH: &str = "tokenvault.vault.v1.Vault/keyservice";
const STORAGE_HEALTH: &str = "tokenvault.vault.v1.Vault/storage";

/// Progress of the vault's rewrap job, which re-encrypts records onto the active
/// card-data and fingerprint key versions.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RewrapStatus {
    /// True while records remain to be re-encrypted.
    pub running: bool,
    /// Records re-encrypted by this job so far.
    pub done: u64,
    /// Records still on another card-data or fingerprint version.
    pub remaining: u64,
    /// Records that could not be re-encrypted; they stay as they are, and the vault
    /// logs them.
    pub failed: u64,
    /// Records per second over the last few seconds.
    pub rate_per_sec: f64,
    /// The versions records are moved onto.
    pub card_data_version: u32,
    pub fingerprint_version: u32,
    /// `None` when no job has run since the vault's store was created.
    pub started_at_unix_ms: Option<i64>,
    /// `None` while running (or before any job).
    pub finished_at_unix_ms: Option<i64>,
}

impl RewrapStatus {
    fn from_wire(status: pb::RewrapStatus) -> Self {
        let timestamp = |ms: i64| (ms != 0).then_some(ms);
        Self {
            running: status.running,
            done: status.done,
            remaining: status.remaining,
            failed: status.failed,
            rate_per_sec: status.rate_per_sec,
            card_data_version: status.card_data_version,
            fingerprint_version: status.fingerprint_version,
            started_at_unix_ms: timestamp(status.started_at_unix_ms),
            finished_at_unix_ms: timestamp(status.finished_at_unix_ms),
        }
    }
}

/// The wire request of [`VaultClient::read_audit`], its time bounds checked.
fn read_audit_request(
    after_sequence: u64,
    since_unix_ms: Option<i64>,
    until_unix_ms: Option<i64>,
    limit: u32,
) -> Result<pb::ReadAuditRequest, Error> {
    // 0 is "unbounded" on the wire: a bound at or before the epoch cannot be sent.
    if since_unix_ms.is_some_and(|ms| ms <= 0) {
        return Err(Error::InvalidArgument {
            field: "since_unix_ms",
            rule: "must be after 1970-01-01T00:00:00Z",
        });
    }
    if until_unix_ms.is_some_and(|ms| ms <= 0) {
        return Err(Error::InvalidArgument {
            field: "until_unix_ms",
            rule: "must be after 1970-01-01T00:00:00Z",
        });
    }
    if let (Some(since), Some(until)) = (since_unix_ms, until_unix_ms)
        && since > until
    {
        return Err(Error::InvalidArgument {
            field: "until_unix_ms",
            rule: "must not be before since_unix_ms",
        });
    }
    Ok(pb::ReadAuditRequest {
        after_sequence,
        since_unix_ms: since_unix_ms.unwrap_or(0),
        until_unix_ms: until_unix_ms.unwrap_or(0),
        limit,
    })
}

/// Most events one [`VaultClient::read_audit`] call returns.
pub const AUDIT_PAGE_MAX: u32 = 1000;

/// One event of the vault's audit log. Never card data.
///
/// The vault leaves a field empty (or 0) when it does not apply to the event: such
/// fields are `None` here, so `Some` never holds an empty string or a zero.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEvent {
    /// Position in the chain, from 1.
    pub sequence: u64,
    pub at_unix_ms: i64,
    /// Client identity; "-" when the caller had none.
    pub actor: String,
    /// The RPC ("Tokenize", "Forward", ...) or a vault event ("PolicyReload",
    /// "KeyRotationSeen", "Lockout", "RewrapFinished").
    pub action: String,
    /// "ok", or the gRPC code name ("PERMISSION_DENIED", ...).
    pub outcome: String,
    pub tenant: Option<String>,
    pub token: Option<String>,
    /// Cards in a batch.
    pub count: Option<u32>,
    pub processor: Option<String>,
    /// Card-data key version of the record acted on.
    pub key_version: Option<u32>,
    /// Peer address of the connection.
    pub peer: Option<String>,
    pub request_id: Option<String>,
    /// Free detail without card data (e.g. the velocity rule that flagged a forward).
    pub detail: Option<String>,
    /// A forward's reason, as the caller gave it.
    pub reason: Option<String>,
    /// Version of the audit key that chains this entry.
    pub audit_key_version: u32,
    /// Hex of the entry's chain value (the MAC the next entry chains on, and what the
    /// keyservice's checkpoints record).
    pub chain: String,
    /// Hex of the head this entry chains on, on the first entry after a gap.
    pub chained_on: Option<String>,
}

impl AuditEvent {
    fn from_wire(e: pb::AuditEvent) -> Self {
        let text = |s: String| (!s.is_empty()).then_some(s);
        let number = |n: u32| (n != 0).then_some(n);
        Self {
            sequence: e.sequence,
            at_unix_ms: e.at_unix_ms,
            actor: e.actor,
            action: e.action,
            outcome: e.outcome,
            tenant: text(e.tenant),
            token: text(e.token),
            count: number(e.count),
            processor: text(e.processor),
            key_version: number(e.key_version),
            peer: text(e.peer),
            request_id: text(e.request_id),
            detail: text(e.detail),
            reason: text(e.reason),
            audit_key_version: e.audit_key_version,
            chain: hex::encode(&e.chain),
            chained_on: (!e.chained_on.is_empty()).then(|| hex::encode(&e.chained_on)),
        }
    }
}

/// What [`VaultClient::read_audit`] returns.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditPage {
    /// In sequence order.
    pub events: Vec<AuditEvent>,
    /// The highest sequence number the vault has written so far (0: none yet).
    pub last_sequence: u64,
}

/// What [`VaultClient::verify_audit`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuditVerification {
    /// Entries checked.
    pub entries: u64,
    /// True when the whole chain verifies.
    pub intact: bool,
    /// The first entry at fault; `None` when intact.
    pub first_bad_sequence: Option<u64>,
    /// "edited", "removed", "inserted", "reordered", "unverifiable" (its audit key
    /// version is not held), "replaced" (the entry a head kept elsewhere names has
    /// another chain value) or "head altered" (the vault's anchor does not verify);
    /// `None` when intact.
    pub problem: Option<String>,
    /// Entries missing from the log, each acknowledged under dual control or not (an
    /// unacknowledged gap makes the log not intact).
    pub gaps: Vec<AuditGap>,
    /// The vault's node name and certificate identity, which `propose_audit_gap`
    /// takes.
    pub node: String,
    pub vault_identity: String,
}

/// Entries `first_sequence..=last_sequence` missing from a vault's audit log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditGap {
    pub first_sequence: u64,
    pub last_sequence: u64,
    /// "proposer, approver" once two admins acknowledged it.
    pub acknowledged_by: Option<String>,
}

impl AuditVerification {
    fn from_wire(v: pb::VerifyAuditResponse) -> Self {
        // The fault fields mean nothing on an intact chain, whatever the server sent.
        let intact = v.intact;
        Self {
            entries: v.entries,
            intact,
            first_bad_sequence: (!intact && v.first_bad_sequence != 0)
                .then_some(v.first_bad_sequence),
            problem: (!intact && !v.problem.is_empty()).then_some(v.problem),
            gaps: v
                .gaps
                .into_iter()
                .map(|gap| AuditGap {
                    first_sequence: gap.first_sequence,
                    last_sequence: gap.last_sequence,
                    acknowledged_by: (gap.acknowledged && !gap.acknowledged_by.is_empty())
                        .then_some(gap.acknowledged_by),
                })
                .collect(),
            node: v.node,
            vault_identity: v.vault_identity,
        }
    }
}

/// The kinds of [`Block`], as [`VaultClient::lift_block`] takes them.
pub const BLOCK_KINDS: [&str; 3] = ["identity", "address", "guessing"];

fn check_block_kind(kind: &str) -> Result<(), Error> {
    // When adding a kind: add it to BLOCK_KINDS and to the rule below.
    if BLOCK_KINDS.contains(&kind) {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            field: "kind",
            rule: "must be identity, address or guessing",
        })
    }
}

/// An identity or address the vault refuses after repeated failures, until a time; or
/// an identity its guessing detector flagged in one bucket, until lifted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Block {
    /// One of [`BLOCK_KINDS`].
    pub kind: String,
    /// The client identity, the peer address, or "<identity> bucket <id>".
    pub subject: String,
    /// 0: until lifted.
    pub until_unix_ms: i64,
    /// Failures (or, for a guessing flag, different cards) that led to it.
    pub failures: u32,
}

async fn health(
    client: &tonic_health::pb::health_client::HealthClient<Channel>,
    service: &str,
) -> Result<bool, Error> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let response = idempotent(|| {
        let mut client = client.clone();
        async move {
            client
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
        }
    })
    .await?;
    Ok(response.into_inner().status == ServingStatus::Serving as i32)
}

/// The key purposes by name, as [`KeyServiceClient`] takes and returns them.
pub const KEY_PURPOSES: [&str; 7] = [
    "card-data",
    "fingerprint",
    "cvc",
    "audit",
    "intake",
    "import",
    "import-rsa",
];

/// A purpose name (one of [`KEY_PURPOSES`]) as the wire enum.
fn purpose_from_name(name: &str) -> Result<keys_pb::KeyPurpose, Error> {
    // When adding a purpose: add it here, to KEY_PURPOSES and to the rule below.
    match name {
        "card-data" => Ok(keys_pb::KeyPurpose::CardData),
        "fingerprint" => Ok(keys_pb::KeyPurpose::Fingerprint),
        "cvc" => Ok(keys_pb::KeyPurpose::Cvc),
        "audit" => Ok(keys_pb::KeyPurpose::Audit),
        "intake" => Ok(keys_pb::KeyPurpose::Intake),
        "import" => Ok(keys_pb::KeyPurpose::Import),
        "import-rsa" => Ok(keys_pb::KeyPurpose::ImportRsa),
        _ => Err(Error::InvalidArgument {
            field: "purpose",
            rule: "must be one of card-data, fingerprint, cvc, audit, intake, import, import-rsa",
        }),
    }
}

/// Version 0 is proto3's "not set": no key version has it.
fn check_version(version: u32) -> Result<(), Error> {
    if version == 0 {
        return Err(Error::InvalidArgument {
            field: "version",
            rule: "must be at least 1",
        });
    }
    Ok(())
}

/// A wire enum value as a readable name: `KEY_STATE_DECRYPT_ONLY` → `decrypt-only`;
/// `None` for the unspecified value, "unknown" for one this client does not know.
fn wire_name<E>(value: Result<&str, E>, prefix: &str) -> Option<String> {
    match value {
        Ok(name) => {
            let name = name
                .trim_start_matches(prefix)
                .to_ascii_lowercase()
                .replace('_', "-");
            (name != "unspecified").then_some(name)
        }
        Err(_) => Some("unknown".into()),
    }
}

fn purpose_name(purpose: i32) -> Option<String> {
    wire_name(
        keys_pb::KeyPurpose::try_from(purpose).map(|p| p.as_str_name()),
        "KEY_PURPOSE_",
    )
}

/// Versions start at 1; 0 is "none".
fn version_number(version: u32) -> Option<u32> {
    (version != 0).then_some(version)
}

/// One key version as the keyservice lists it to an admin (never material).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyVersion {
    /// One of [`KEY_PURPOSES`].
    pub purpose: String,
    pub version: u32,
    /// "active", "decrypt-only", "retired" or "destroyed".
    pub state: String,
    pub created_at_unix_ms: i64,
    /// Encryptions leased to vaults under this version: an upper bound of those made.
    pub encryptions_leased: u64,
    /// Most encryptions allowed under one version; 0 means no limit (HMAC purposes).
    pub encryption_limit: u64,
    /// Records using this version, summed over the latest report of every vault.
    pub records: u64,
}

impl KeyVersion {
    fn from_wire(v: keys_pb::KeyVersionInfo) -> Self {
        Self {
            purpose: purpose_name(v.purpose).unwrap_or_else(|| "unknown".into()),
            version: v.version,
            state: wire_name(
                keys_pb::KeyState::try_from(v.state).map(|s| s.as_str_name()),
                "KEY_STATE_",
            )
            .unwrap_or_else(|| "unknown".into()),
            created_at_unix_ms: v.created_at_unix_ms,
            encryptions_leased: v.encryptions_leased,
            encryption_limit: v.encryption_limit,
            records: v.records,
        }
    }
}

/// A vault that has reported how many records use each key version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageReporter {
    pub identity: String,
    /// One vault among those sharing the identity (an id kept in its data directory).
    pub instance: String,
    pub reported_at_unix_ms: i64,
}

/// What [`KeyServiceClient::list_versions`] returns.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyListing {
    pub versions: Vec<KeyVersion>,
    /// The vaults whose latest reports the `records` counts sum; empty until a vault
    /// has reported.
    pub reporters: Vec<UsageReporter>,
}

/// A dual-control operation: proposed by one admin, carried out when a different admin
/// approves it before it expires.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Proposal {
    /// E.g. "p-3f9c1a2b"; what `approve` takes.
    pub id: String,
    /// "destroy", "retire", "unretire", "root-key-change" or "audit-gap".
    pub kind: String,
    /// The key version a destroy or unretire is about; `None` for a root key change.
    pub purpose: Option<String>,
    pub version: Option<u32>,
    /// Root key change: the new root key file, on the keyservice host.
    pub new_root_key_file: Option<String>,
    pub proposed_by: String,
    pub proposed_at_unix_ms: i64,
    pub expires_at_unix_ms: i64,
    /// "pending", "approved" or "expired".
    pub state: String,
    pub approved_by: Option<String>,
    pub approved_at_unix_ms: Option<i64>,
    /// Audit gap: the vault identity, its node name, and the gap.
    pub audit_gap: Option<(String, String, u64, u64)>,
    /// Retire: proposed with `force`, and the records using the version then.
    pub force: bool,
    pub records: u64,
}

impl Proposal {
    fn from_wire(p: keys_pb::Proposal) -> Result<Self, Error> {
        if p.id.is_empty() {
            return Err(Error::Incomplete);
        }
        let text = |s: String| (!s.is_empty()).then_some(s);
        Ok(Self {
            id: p.id,
            kind: wire_name(
                keys_pb::OperationKind::try_from(p.kind).map(|k| k.as_str_name()),
                "OPERATION_KIND_",
            )
            .unwrap_or_else(|| "unknown".into()),
            purpose: purpose_name(p.purpose),
            version: version_number(p.version),
            new_root_key_file: text(p.new_root_key_file),
            proposed_by: p.proposed_by,
            proposed_at_unix_ms: p.proposed_at_unix_ms,
            expires_at_unix_ms: p.expires_at_unix_ms,
            state: wire_name(
                keys_pb::ProposalState::try_from(p.state).map(|s| s.as_str_name()),
                "PROPOSAL_STATE_",
            )
            .unwrap_or_else(|| "unknown".into()),
            approved_by: text(p.approved_by),
            approved_at_unix_ms: (p.approved_at_unix_ms != 0).then_some(p.approved_at_unix_ms),
            audit_gap: p.audit_gap.map(|gap| {
                (
                    gap.vault_identity,
                    gap.node,
                    gap.first_sequence,
                    gap.last_sequence,
                )
            }),
            force: p.force,
            records: p.records,
        })
    }
}

/// What the check of the key history's chain found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HistoryChain {
    pub events: u64,
    /// Lines from before the chain existed.
    pub unchained: u64,
    /// The first event that does not follow the one before; `None`: intact.
    pub broken_at: Option<u64>,
}

/// One entry of the keyservice's audit trail of key operations (never material).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyEvent {
    pub sequence: u64,
    pub at_unix_ms: i64,
    /// Client identity, or "keyservice" for automatic rotations.
    pub actor: String,
    /// E.g. "rotate", "retire", "propose", "approve", "destroy", "lease",
    /// "root-key-change".
    pub action: String,
    /// The key version acted on, if any.
    pub purpose: Option<String>,
    pub version: Option<u32>,
    /// "ok" or "refused: `<reason>`".
    pub outcome: String,
    /// Free detail: proposal id, lease size, reason for an automatic rotation.
    pub detail: String,
}

impl KeyEvent {
    fn from_wire(e: keys_pb::KeyEvent) -> Self {
        Self {
            sequence: e.sequence,
            at_unix_ms: e.at_unix_ms,
            actor: e.actor,
            action: e.action,
            purpose: purpose_name(e.purpose),
            version: version_number(e.version),
            outcome: e.outcome,
            detail: e.detail,
        }
    }
}

/// A connection to the keyservice, as an admin.
///
/// Only reads are retried; a rotation, retirement, proposal or approval is sent once
/// (a retry could rotate twice or open a second proposal).
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

    /// Every key version with its budget use and record count, and the vaults whose
    /// reports the record counts come from.
    pub async fn list_versions(&mut self) -> Result<KeyListing, Error> {
        let response = idempotent(|| {
            let mut keys = self.keys.clone();
            async move {
                keys.list_key_versions(keys_pb::ListKeyVersionsRequest {})
                    .await
            }
        })
        .await?
        .into_inner();
        Ok(KeyListing {
            versions: response
                .versions
                .into_iter()
                .map(KeyVersion::from_wire)
                .collect(),
            reporters: response
                .reporters
                .into_iter()
                .map(|r| UsageReporter {
                    identity: r.identity,
                    instance: r.instance,
                    reported_at_unix_ms: r.reported_at_unix_ms,
                })
                .collect(),
        })
    }

    /// Creates a new active version of `purpose` (one of [`KEY_PURPOSES`]) and returns
    /// it; the previous active version becomes decrypt-only.
    pub async fn rotate(&mut self, purpose: &str) -> Result<KeyVersion, Error> {
        let purpose = purpose_from_name(purpose)?;
        let response = self
            .keys
            .rotate_key(keys_pb::RotateKeyRequest {
                purpose: purpose.into(),
            })
            .await?
            .into_inner();
        response
            .created
            .map(KeyVersion::from_wire)
            .ok_or(Error::Incomplete)
    }

    /// Proposes retiring a decrypt-only version (the keyservice stops serving it to
    /// vaults once a second admin approves). Refused while records use it unless
    /// `force` (the proposal then shows how many); never allowed for an audit key.
    /// Undoing it needs dual control too ([`Self::propose_unretire`]).
    pub async fn propose_retire(
        &mut self,
        purpose: &str,
        version: u32,
        force: bool,
    ) -> Result<Proposal, Error> {
        let purpose = purpose_from_name(purpose)?;
        check_version(version)?;
        self.propose(keys_pb::ProposeOperationRequest {
            kind: keys_pb::OperationKind::Retire.into(),
            purpose: purpose.into(),
            version,
            force,
            ..Default::default()
        })
        .await
    }

    /// Proposes destroying a version's material for good; the keyservice refuses while
    /// any vault reports records under it.
    pub async fn propose_destroy(
        &mut self,
        purpose: &str,
        version: u32,
    ) -> Result<Proposal, Error> {
        self.propose_version(keys_pb::OperationKind::Destroy, purpose, version)
            .await
    }

    /// Proposes making a retired version decrypt-only again.
    pub async fn propose_unretire(
        &mut self,
        purpose: &str,
        version: u32,
    ) -> Result<Proposal, Error> {
        self.propose_version(keys_pb::OperationKind::Unretire, purpose, version)
            .await
    }

    /// Proposes accepting a keyring restored from an older copy (the keyservice refuses
    /// keys and leases until then): on approval every purpose is rotated and versions
    /// the history shows destroyed are destroyed again.
    pub async fn propose_accept_restore(&mut self) -> Result<Proposal, Error> {
        self.propose(keys_pb::ProposeOperationRequest {
            kind: keys_pb::OperationKind::AcceptRestore.into(),
            ..Default::default()
        })
        .await
    }

    /// Proposes re-sealing the keyring under the root key in `new_root_key_file`, a path
    /// on the keyservice host (made there with `keyservice gen-root-key`).
    pub async fn propose_root_key_change(
        &mut self,
        new_root_key_file: &str,
    ) -> Result<Proposal, Error> {
        if new_root_key_file.trim().is_empty() {
            return Err(Error::InvalidArgument {
                field: "new_root_key_file",
                rule: "must not be empty",
            });
        }
        self.propose(keys_pb::ProposeOperationRequest {
            kind: keys_pb::OperationKind::RootKeyChange.into(),
            new_root_key_file: new_root_key_file.to_owned(),
            ..Default::default()
        })
        .await
    }

    /// Proposes acknowledging a gap in a vault's audit log (entries `first..=last`
    /// missing, as its `verify_audit` reports them): once a second admin approves, the
    /// vault's verify lists the gap instead of failing on it.
    pub async fn propose_audit_gap(
        &mut self,
        vault_identity: &str,
        node: &str,
        first: u64,
        last: u64,
    ) -> Result<Proposal, Error> {
        if vault_identity.trim().is_empty() || node.trim().is_empty() {
            return Err(Error::InvalidArgument {
                field: "audit_gap.vault_identity",
                rule: "the vault's identity and node name must not be empty",
            });
        }
        if first == 0 || last < first {
            return Err(Error::InvalidArgument {
                field: "audit_gap.first_sequence",
                rule: "1 <= first <= last",
            });
        }
        self.propose(keys_pb::ProposeOperationRequest {
            kind: keys_pb::OperationKind::AuditGap.into(),
            audit_gap: Some(keys_pb::AuditGap {
                vault_identity: vault_identity.to_owned(),
                node: node.to_owned(),
                first_sequence: first,
                last_sequence: last,
            }),
            ..Default::default()
        })
        .await
    }

    async fn propose_version(
        &mut self,
        kind: keys_pb::OperationKind,
        purpose: &str,
        version: u32,
    ) -> Result<Proposal, Error> {
        let purpose = purpose_from_name(purpose)?;
        check_version(version)?;
        self.propose(keys_pb::ProposeOperationRequest {
            kind: kind.into(),
            purpose: purpose.into(),
            version,
            ..Default::default()
        })
        .await
    }

    async fn propose(
        &mut self,
        request: keys_pb::ProposeOperationRequest,
    ) -> Result<Proposal, Error> {
        let response = self.keys.propose_operation(request).await?.into_inner();
        Proposal::from_wire(response)
    }

    /// Approves proposal `id` and has the keyservice carry it out; returns the approved
    /// proposal. Refused for the proposer's own proposals and for expired ones.
    pub async fn approve(&mut self, id: &str) -> Result<Proposal, Error> {
        if id.trim().is_empty() {
            return Err(Error::InvalidArgument {
                field: "id",
                rule: "must not be empty",
            });
        }
        let response = self
            .keys
            .approve_operation(keys_pb::ApproveOperationRequest { id: id.to_owned() })
            .await?
            .into_inner();
        Proposal::from_wire(response)
    }

    /// Open and recent proposals.
    pub async fn proposals(&mut self) -> Result<Vec<Proposal>, Error> {
        let response = idempotent(|| {
            let mut keys = self.keys.clone();
            async move { keys.list_proposals(keys_pb::ListProposalsRequest {}).await }
        })
        .await?;
        response
            .into_inner()
            .proposals
            .into_iter()
            .map(Proposal::from_wire)
            .collect()
    }

    /// The last `limit` key events (0: all), oldest first.
    pub async fn history(&mut self, limit: u32) -> Result<Vec<KeyEvent>, Error> {
        let response = idempotent(|| {
            let mut keys = self.keys.clone();
            async move {
                keys.key_history(keys_pb::KeyHistoryRequest {
                    limit,
                    verify: false,
                })
                .await
            }
        })
        .await?;
        Ok(response
            .into_inner()
            .events
            .into_iter()
            .map(KeyEvent::from_wire)
            .collect())
    }

    /// Checks the key history's chain on the keyservice (every line from the first).
    pub async fn verify_history(&mut self) -> Result<HistoryChain, Error> {
        let response = idempotent(|| {
            let mut keys = self.keys.clone();
            async move {
                keys.key_history(keys_pb::KeyHistoryRequest {
                    limit: 1,
                    verify: true,
                })
                .await
            }
        })
        .await?;
        let chain = response.into_inner().chain.ok_or(Error::Incomplete)?;
        Ok(HistoryChain {
            events: chain.events,
            unchained: chain.unchained,
            broken_at: (!chain.intact).then_some(chain.broken_at_sequence),
        })
    }

    pub async fn health(&mut self) -> Result<bool, Error> {
        health(&self.health, "").await
    }
}

/// A private key file must be readable by its owner only (mode 0600 or 0400): the
/// client's authentication factor, refused with the `chmod` to run when group or
/// others may read it.
fn check_owner_only(path: &std::path::Path) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| {
                Error::Config(format!(
                    "cannot read private key file {}: {e}",
                    path.display()
                ))
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::Config(format!(
                "private key file {} has mode {mode:o}: it must be readable by its owner \
                 only (run `chmod 600 {}`)",
                path.display(),
                path.display()
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Control: PCI-8.3.2 (docs/compliance.md).
    /// Attack: read a vaultctl user's private key (their authentication factor) as
    /// another local user, from a key file left group- or world-readable; vaultctl and
    /// every other client refuse to use it, with the `chmod` to run.
    #[cfg(unix)]
    #[test]
    fn a_private_key_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!(
            "vault-client-key-test-{}-{:?}.key",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, b"-----BEGIN PRIVATE KEY-----\n").unwrap();
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let error = check_owner_only(&path).unwrap_err().to_string();
            assert!(error.contains("chmod 600"), "{mode:o}: {error}");
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            check_owner_only(&path).unwrap();
        }
        std::fs::remove_file(&path).unwrap();
    }

    /// A sealing key as GetSealingKey gives it, and the vault side's key pair.
    fn sealing_key() -> (SealingKey, envelope::sealed::IntakeKey) {
        let intake = envelope::sealed::IntakeKey::derive(
            &envelope::SecretKey::from_slice(&[5; 32]).unwrap(),
        );
        let (kem_id, kdf_id, aead_id) = envelope::sealed::SUITE;
        let wire = pb::SealingKey {
            public_key: intake.public_key().to_vec(),
            key_id: intake.id().to_vec(),
            kem_id: kem_id.into(),
            kdf_id: kdf_id.into(),
            aead_id: aead_id.into(),
            tenant: "shop".into(),
            server_time_unix_ms: 1_800_000_000_000,
            accepted_until_unix_ms: 1_800_086_400_000,
            max_age_secs: 600,
        };
        (SealingKey::from_wire(wire).unwrap(), intake)
    }

    #[test]
    fn the_rust_sealer_seals_what_the_vault_opens() {
        let (key, intake) = sealing_key();
        let card = Card::new("4242424242424242", 12, 2031)
            .with_cvc("123")
            .with_cardholder_name("Ada Lovelace");
        let blob = key.seal(&card).unwrap();
        let sealed = envelope::sealed::SealedCard::parse(&blob).unwrap();
        assert!(sealed.header.issued_at_unix_ms >= 1_800_000_000_000);
        let json = intake.open("shop", &sealed).unwrap();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"number":"4242424242424242","exp_month":12,"exp_year":2031,"cvc":"123","name":"Ada Lovelace"}"#
        );
        // A card too long for a sealed card is refused, naming no value.
        let long = Card::new("4242424242424242", 12, 2031).with_cardholder_name(&"x".repeat(2000));
        let error = key.seal(&long).unwrap_err();
        assert!(
            matches!(error, Error::InvalidArgument { field: "card", .. }),
            "{error}"
        );
        // A key whose id does not match is refused.
        let mut wire_key = pb::SealingKey {
            public_key: key.public_key.to_vec(),
            key_id: vec![0; 8],
            kem_id: 0x20,
            kdf_id: 1,
            aead_id: 2,
            ..Default::default()
        };
        assert!(SealingKey::from_wire(wire_key.clone()).is_err());
        wire_key.key_id = key.key_id.to_vec();
        wire_key.aead_id = 1;
        assert!(SealingKey::from_wire(wire_key).is_err());
    }

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

    #[test]
    fn purpose_names_round_trip() {
        for name in KEY_PURPOSES {
            let purpose = purpose_from_name(name).unwrap();
            assert_eq!(purpose_name(purpose.into()).as_deref(), Some(name));
        }
    }

    #[test]
    fn unknown_purpose_is_refused_with_the_valid_names() {
        for name in ["", "card_data", "Card-Data", "unspecified", "pan"] {
            let err = purpose_from_name(name).unwrap_err();
            let text = err.to_string();
            assert!(
                KEY_PURPOSES.iter().all(|p| text.contains(p)),
                "{name:?}: {text}"
            );
            assert!(
                matches!(
                    err,
                    Error::InvalidArgument {
                        field: "purpose",
                        ..
                    }
                ),
                "{err:?}"
            );
        }
    }

    #[test]
    fn wire_names_are_readable() {
        let state = |s: keys_pb::KeyState| {
            wire_name(Ok::<_, ()>(s.as_str_name()), "KEY_STATE_").unwrap_or_default()
        };
        assert_eq!(state(keys_pb::KeyState::DecryptOnly), "decrypt-only");
        assert_eq!(state(keys_pb::KeyState::Active), "active");
        let kind = |k: keys_pb::OperationKind| {
            wire_name(Ok::<_, ()>(k.as_str_name()), "OPERATION_KIND_").unwrap_or_default()
        };
        assert_eq!(
            kind(keys_pb::OperationKind::RootKeyChange),
            "root-key-change"
        );
        assert_eq!(kind(keys_pb::OperationKind::Destroy), "destroy");
        assert_eq!(purpose_name(0), None);
        assert_eq!(purpose_name(99).as_deref(), Some("unknown"));
    }

    #[test]
    fn proposal_without_target_has_no_purpose_or_version() {
        let proposal = Proposal::from_wire(keys_pb::Proposal {
            id: "p-1".into(),
            kind: keys_pb::OperationKind::RootKeyChange.into(),
            new_root_key_file: "/etc/keyservice/root-2.key".into(),
            proposed_by: "admin-a".into(),
            state: keys_pb::ProposalState::Pending.into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(proposal.kind, "root-key-change");
        assert_eq!(proposal.state, "pending");
        assert_eq!(proposal.purpose, None);
        assert_eq!(proposal.version, None);
        assert_eq!(proposal.approved_by, None);
        assert!(matches!(
            Proposal::from_wire(keys_pb::Proposal::default()),
            Err(Error::Incomplete)
        ));
    }

    #[test]
    fn version_zero_is_refused() {
        assert!(check_version(0).is_err());
        assert!(check_version(1).is_ok());
    }

    #[test]
    fn audit_event_empty_fields_are_none() {
        let event = AuditEvent::from_wire(pb::AuditEvent {
            sequence: 7,
            at_unix_ms: 1_700_000_000_000,
            actor: "spiffe://tokenvault.dev/checkout".into(),
            action: "Tokenize".into(),
            outcome: "ok".into(),
            tenant: "acme".into(),
            audit_key_version: 1,
            ..Default::default()
        });
        assert_eq!(event.tenant.as_deref(), Some("acme"));
        assert_eq!(
            (
                event.token,
                event.count,
                event.processor,
                event.key_version,
                event.peer,
                event.request_id,
                event.detail
            ),
            (None, None, None, None, None, None, None)
        );
        let event = AuditEvent::from_wire(pb::AuditEvent {
            count: 3,
            key_version: 2,
            detail: "velocity".into(),
            ..Default::default()
        });
        assert_eq!(
            (event.count, event.key_version, event.detail.as_deref()),
            (Some(3), Some(2), Some("velocity"))
        );
    }

    #[test]
    fn audit_verification_fault_only_when_not_intact() {
        let intact = AuditVerification::from_wire(pb::VerifyAuditResponse {
            entries: 10,
            intact: true,
            first_bad_sequence: 4,
            problem: "edited".into(),
            ..Default::default()
        });
        assert_eq!((intact.first_bad_sequence, intact.problem), (None, None));
        let broken = AuditVerification::from_wire(pb::VerifyAuditResponse {
            entries: 10,
            intact: false,
            first_bad_sequence: 4,
            problem: "edited".into(),
            ..Default::default()
        });
        assert_eq!(broken.first_bad_sequence, Some(4));
        assert_eq!(broken.problem.as_deref(), Some("edited"));
    }

    #[test]
    fn audit_time_bounds_are_checked() {
        let request = read_audit_request(5, None, Some(2_000), 10).unwrap();
        assert_eq!(
            (
                request.after_sequence,
                request.since_unix_ms,
                request.until_unix_ms,
                request.limit
            ),
            (5, 0, 2_000, 10)
        );
        assert!(read_audit_request(0, Some(1_000), Some(1_000), 0).is_ok());
        for (since, until, field) in [
            (Some(0), None, "since_unix_ms"),
            (None, Some(-5), "until_unix_ms"),
            (Some(2_000), Some(1_000), "until_unix_ms"),
        ] {
            let err = read_audit_request(0, since, until, 0).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument { field: f, .. } if f == field),
                "{since:?} {until:?}: {err}"
            );
        }
    }

    #[test]
    fn block_kinds() {
        for kind in BLOCK_KINDS {
            assert!(check_block_kind(kind).is_ok());
        }
        for kind in ["", "Identity", "ip", "tenant"] {
            assert!(
                matches!(
                    check_block_kind(kind),
                    Err(Error::InvalidArgument { field: "kind", .. })
                ),
                "{kind:?}"
            );
        }
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
