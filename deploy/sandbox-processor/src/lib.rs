//! A sandbox card processor: HTTPS, one charge endpoint, rules a test can rely on.
//!
//! `POST /v1/charges` with a JSON or form body holding `number`, `exp_month`,
//! `exp_year`, optional `cvc` and `amount`:
//!
//! | card | answer |
//! | --- | --- |
//! | fails Luhn / not 12-19 digits | 400 `invalid_number` |
//! | expired / month not 1-12 | 400 `expired_card` / `invalid_expiry` |
//! | 4000000000000002 | 402 `card_declined` |
//! | 4000000000009995 | 402 `insufficient_funds` |
//! | cvc `000` | 402 `incorrect_cvc` |
//! | any other | 200 `approved`, with a charge id and the last four |
//!
//! Request headers that change its behaviour (for tests):
//! `x-sandbox-delay-ms: N` waits N ms first; `x-sandbox-status: N` answers status N;
//! `x-sandbox-redirect: URL` answers 302 to URL; `x-sandbox-echo: 1` answers 200 with
//! the request's headers and body echoed back (card number included: the vault must
//! mask it); `x-sandbox-echo-as: MODE` echoes the request body as a hostile processor
//! might, for the masker's tests: `upper` (upper-cased), `unicode` (a JSON string with
//! every character `\uXXXX`-escaped), `split-headers` (the body cut into 4-byte pieces,
//! one response header each), `gzip` (with `content-encoding: gzip`), `utf16` (the body
//! in UTF-16, `charset=utf-16`), `binary` (`application/octet-stream`).
//!
//! `POST /v1/imports` takes a card export (`vaultctl export` to a processor whose
//! `[processor.export]` names this route): an OpenPGP message encrypted to the
//! sandbox's test processor key, which it generates at start ([`Bound::export_key`]).
//! It decrypts it, answers 200 with the number of lines, and keeps the plaintext for
//! tests ([`Journal::exports`]); anything it cannot decrypt is 400 `undecryptable`.
//!
//! It keeps every request it received in memory, for tests to inspect. It never logs a
//! card number: only method, path and status.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use runtime::shutdown::Shutdown;
use tokio::net::TcpListener;

const MAX_BODY_BYTES: usize = 64 * 1024;
/// Card exports are larger than charges.
const MAX_EXPORT_BYTES: usize = 64 * 1024 * 1024;

/// A request as the sandbox received it.
#[derive(Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The body holds card data.
        write!(
            f,
            "Received {{ {} {}, body: [{} bytes] }}",
            self.method,
            self.path,
            self.body.len()
        )
    }
}

/// Everything the sandbox received, shared with tests.
#[derive(Debug, Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<Received>>>, Arc<Mutex<Vec<String>>>);

impl Journal {
    pub fn requests(&self) -> Vec<Received> {
        self.0.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The card exports received, decrypted (test data: the sandbox is not a vault).
    pub fn exports(&self) -> Vec<String> {
        self.1.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn push(&self, received: Received) {
        if let Ok(mut requests) = self.0.lock() {
            requests.push(received);
        }
    }

    fn push_export(&self, plaintext: String) {
        if let Ok(mut exports) = self.1.lock() {
            exports.push(plaintext);
        }
    }
}

/// The sandbox's test processor key for card exports: made at start, never stored.
struct ExportKey {
    secret: pgp::composed::SignedSecretKey,
    armored_public: String,
    fingerprint: String,
}

fn export_key() -> Result<ExportKey, Error> {
    use pgp::composed::{EncryptionCaps, KeyType, SecretKeyParamsBuilder, SubkeyParamsBuilder};
    use pgp::crypto::ecc_curve::ECCCurve;
    use pgp::types::KeyDetails as _;
    use rand_chacha::rand_core::SeedableRng as _;
    let failed = |_| Error::Tls("the export test key could not be made".into());
    let mut seed = [0u8; 32];
    envelope::fill_random(&mut seed).map_err(|_| Error::Tls("no randomness".into()))?;
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(seed);
    let subkey = SubkeyParamsBuilder::default()
        .key_type(KeyType::ECDH(ECCCurve::Curve25519Legacy))
        .can_encrypt(EncryptionCaps::All)
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let secret = SecretKeyParamsBuilder::default()
        .key_type(KeyType::Ed25519Legacy)
        .can_certify(true)
        .primary_user_id("Sandbox Processor <exports@sandbox.invalid>".into())
        .subkey(subkey)
        .build()
        .map_err(|e| failed(e.to_string()))?
        .generate(&mut rng)
        .map_err(|e| failed(e.to_string()))?;
    let public = secret.to_public_key();
    Ok(ExportKey {
        armored_public: public
            .to_armored_string(None.into())
            .map_err(|e| failed(e.to_string()))?,
        fingerprint: hex::encode_upper(public.fingerprint().as_bytes()),
        secret,
    })
}

/// An export's plaintext, or `None` when it does not decrypt to the sandbox's key.
fn decrypt_export(key: &ExportKey, body: &[u8]) -> Option<String> {
    use std::io::Read as _;
    let message = pgp::composed::Message::from_bytes(body).ok()?;
    let message = message
        .decrypt(&pgp::types::Password::empty(), &key.secret)
        .ok()?;
    let mut message = if message.is_compressed() {
        message.decompress().ok()?
    } else {
        message
    };
    let mut text = String::new();
    message.read_to_string(&mut text).ok()?;
    Some(text)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid TLS certificate or key: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A bound sandbox, ready to serve.
pub struct Bound {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    journal: Journal,
    export_key: Arc<ExportKey>,
}

/// Binds `addr` with the PEM certificate chain and key at the given paths.
pub async fn bind(
    addr: SocketAddr,
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<Bound, Error> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })
    };
    let certs = rustls_pemfile::certs(&mut read(cert_file)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut read(key_file)?.as_slice())
        .map_err(|e| Error::Tls(e.to_string()))?
        .ok_or_else(|| Error::Tls("no private key in the key file".into()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| Error::Tls(e.to_string()))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    Ok(Bound {
        listener,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        journal: Journal::default(),
        export_key: Arc::new(export_key()?),
    })
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn journal(&self) -> Journal {
        self.journal.clone()
    }

    /// The test processor key card exports are encrypted to: the armored public key
    /// and its fingerprint, for the vault's `[processor.export]`.
    pub fn export_key(&self) -> (String, String) {
        (
            self.export_key.armored_public.clone(),
            self.export_key.fingerprint.clone(),
        )
    }

    pub async fn serve(self, shutdown: Shutdown) {
        let stop = shutdown.wait();
        tokio::pin!(stop);
        loop {
            let (stream, _) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                },
                _ = &mut stop => return,
            };
            // As a real processor's front end would: no Nagle delay on small answers,
            // which would otherwise show in the vault's forward latency.
            let _ = stream.set_nodelay(true);
            let acceptor = self.acceptor.clone();
            let journal = self.journal.clone();
            let key = Arc::clone(&self.export_key);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request| {
                    handle(request, journal.clone(), Arc::clone(&key))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// The request body echoed back the way `mode` says (see the module's doc).
fn hostile_echo(mode: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let text = String::from_utf8_lossy(body);
    let (content_type, bytes): (&str, Vec<u8>) = match mode {
        "upper" => ("text/plain", text.to_uppercase().into_bytes()),
        "unicode" => {
            let escaped: String = text
                .chars()
                .map(|c| format!("\\u{:04x}", c as u32))
                .collect();
            (
                "application/json",
                format!("{{\"echo\":\"{escaped}\"}}").into_bytes(),
            )
        }
        "utf16" => (
            "text/plain; charset=utf-16le",
            text.encode_utf16().flat_map(u16::to_le_bytes).collect(),
        ),
        "binary" => ("application/octet-stream", body.to_vec()),
        _ => ("text/plain", b"ok".to_vec()),
    };
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    let headers = response.headers_mut();
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        headers.insert("content-type", value);
    }
    match mode {
        "gzip" => {
            headers.insert(
                "content-encoding",
                hyper::header::HeaderValue::from_static("gzip"),
            );
        }
        "split-headers" => {
            for (k, piece) in body.chunks(4).enumerate() {
                if let (Ok(name), Ok(value)) = (
                    hyper::header::HeaderName::from_bytes(format!("x-echo-{k:03}").as_bytes()),
                    hyper::header::HeaderValue::from_bytes(piece),
                ) {
                    headers.insert(name, value);
                }
            }
        }
        _ => {}
    }
    response
}

fn header<'a>(request: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn handle(
    request: Request<Incoming>,
    journal: Journal,
    export_key: Arc<ExportKey>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let delay_ms = header(&request, "x-sandbox-delay-ms").and_then(|v| v.parse::<u64>().ok());
    let forced_status = header(&request, "x-sandbox-status").and_then(|v| v.parse::<u16>().ok());
    let redirect = header(&request, "x-sandbox-redirect").map(str::to_owned);
    let echo = header(&request, "x-sandbox-echo").is_some();
    let echo_as = header(&request, "x-sandbox-echo-as").map(str::to_owned);
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let content_type = header(&request, "content-type").unwrap_or("").to_owned();
    let limit = match path.as_str() {
        "/v1/imports" => MAX_EXPORT_BYTES,
        _ => MAX_BODY_BYTES,
    };
    let body = match Limited::new(request.into_body(), limit).collect().await {
        Ok(body) => body.to_bytes().to_vec(),
        Err(_) => {
            return Ok(json(
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::json!({"error": "body_too_large"}),
            ));
        }
    };
    journal.push(Received {
        method: method.clone(),
        path: path.clone(),
        headers: headers.clone(),
        body: body.clone(),
    });
    // The request is in the journal before the delay: a caller that times out has
    // still reached the processor, as with a real one.
    if let Some(ms) = delay_ms {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }

    let response = if let Some(location) = redirect {
        let mut response = json(StatusCode::FOUND, serde_json::json!({"redirect": location}));
        if let Ok(value) = hyper::header::HeaderValue::from_str(&location) {
            response.headers_mut().insert("location", value);
        }
        response
    } else if let Some(status) = forced_status {
        json(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            serde_json::json!({"error": "forced_by_test"}),
        )
    } else if let Some(mode) = echo_as {
        hostile_echo(&mode, &body)
    } else if echo {
        json(
            StatusCode::OK,
            serde_json::json!({
                "echo": {
                    "method": method,
                    "path": path,
                    "headers": headers.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>(),
                    "body": String::from_utf8_lossy(&body),
                }
            }),
        )
    } else if method == "POST" && path == "/v1/charges" {
        charge(&content_type, &body)
    } else if method == "POST" && path == "/v1/imports" {
        match decrypt_export(&export_key, &body) {
            Some(text) => {
                let lines = text.lines().count();
                journal.push_export(text);
                json(StatusCode::OK, serde_json::json!({"received_lines": lines}))
            }
            None => json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "undecryptable"}),
            ),
        }
    } else {
        json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found"}),
        )
    };
    tracing::info!(%method, %path, status = response.status().as_u16(), "request");
    Ok(response)
}

/// The fields of a charge, from a JSON or form body.
fn fields(content_type: &str, body: &[u8]) -> Option<std::collections::HashMap<String, String>> {
    if content_type.starts_with("application/x-www-form-urlencoded") {
        return Some(form_urlencoded::parse(body).into_owned().collect());
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object()?;
    Some(
        object
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                )
            })
            .collect(),
    )
}

fn luhn(digits: &str) -> bool {
    let mut sum = 0;
    for (i, c) in digits.chars().rev().enumerate() {
        let Some(mut d) = c.to_digit(10) else {
            return false;
        };
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum % 10 == 0
}

fn charge(content_type: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let decline = |status: StatusCode, code: &str| {
        json(
            status,
            serde_json::json!({"status": "declined", "error": code}),
        )
    };
    let Some(fields) = fields(content_type, body) else {
        return decline(StatusCode::BAD_REQUEST, "malformed_body");
    };
    let number = fields.get("number").map(String::as_str).unwrap_or("");
    if !(12..=19).contains(&number.len()) || !luhn(number) {
        return decline(StatusCode::BAD_REQUEST, "invalid_number");
    }
    let month: u32 = fields
        .get("exp_month")
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let year: i32 = fields
        .get("exp_year")
        .and_then(|y| y.parse().ok())
        .unwrap_or(0);
    if !(1..=12).contains(&month) {
        return decline(StatusCode::BAD_REQUEST, "invalid_expiry");
    }
    let now = time::OffsetDateTime::now_utc();
    if (year, month) < (now.year(), u32::from(u8::from(now.month()))) {
        return decline(StatusCode::BAD_REQUEST, "expired_card");
    }
    match (number, fields.get("cvc").map(String::as_str)) {
        ("4000000000000002", _) => decline(StatusCode::PAYMENT_REQUIRED, "card_declined"),
        ("4000000000009995", _) => decline(StatusCode::PAYMENT_REQUIRED, "insufficient_funds"),
        (_, Some("000")) => decline(StatusCode::PAYMENT_REQUIRED, "incorrect_cvc"),
        _ => {
            let mut id = [0u8; 8];
            let _ = envelope::fill_random(&mut id);
            json(
                StatusCode::OK,
                serde_json::json!({
                    "id": format!("ch_{}", hex::encode(id)),
                    "status": "approved",
                    "last4": &number[number.len() - 4..],
                    "amount": fields.get("amount"),
                }),
            )
        }
    }
}
