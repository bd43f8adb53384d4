//! A demo merchant backend for sealed intake (docs/sealed-intake.md): it serves a
//! checkout page whose script seals the card in the browser (clients/web/sealer.js),
//! and relays the sealed card to the vault's `TokenizeSealed` as a `tokenize` identity.
//!
//! It logs every request it receives, bodies included, on purpose: the log shows what a
//! merchant backend holds, which is ciphertext, never a card (tests/e2e/checkout.rs
//! checks this log and a core dump of the process).
//!
//! Routes:
//! - `GET /` the page, `GET /checkout.js` its script, `GET /sealer.js` the sealer, and
//!   `GET /vendor/@hpke/{core,common}/esm/...` the ES modules of `@hpke/core` and the
//!   one package it imports, from clients/web/node_modules (the page's import map
//!   points there);
//! - `GET /api/sealing-key`: GetSealingKey as JSON: `public_key` and `key_id`
//!   base64url (no padding), `tenant`, `server_time_unix_ms`, `accepted_until_unix_ms`,
//!   `max_age_secs`;
//! - `POST /api/pay` with `{"sealed_card":"<base64url>"}`: TokenizeSealed; answers
//!   `{"token","brand","last_four"}`, or `{"error","code"}` with an HTTP error status.
//!
//! A demo, not a template for production: no CSRF protection, no sessions, no amounts.
//!
//! Talks to the vault through the client library (vault-client), as a merchant's
//! service would.

#![allow(clippy::print_stdout)] // the request log is the point of this program

mod vault;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

pub use vault::Vault;

/// The largest request body read: a sealed card is at most 1105 bytes (about 1500 in
/// base64url).
const MAX_BODY_BYTES: usize = 8 * 1024;
/// Time a connection has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const INDEX_HTML: &str = include_str!("../static/index.html");
const CHECKOUT_JS: &str = include_str!("../static/checkout.js");
const STYLE_CSS: &str = include_str!("../static/style.css");

/// The npm packages served under `/vendor/` (`@hpke/core` and what it imports).
const VENDOR_PACKAGES: &[&str] = &["@hpke/core", "@hpke/common"];

#[derive(Debug)]
pub struct App {
    vault: Vault,
    /// clients/web: `sealer.js` and its `node_modules`.
    web_dir: PathBuf,
}

impl App {
    pub fn new(vault: Vault, web_dir: PathBuf) -> Self {
        Self { vault, web_dir }
    }
}

/// Serves HTTP/1.1 on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    println!("accept failed: {e}");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let app = Arc::clone(&app);
                async move { Ok::<_, Infallible>(handle(&app, peer, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(app: &App, peer: SocketAddr, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            println!("request {peer} {method} {path}: body too large or cut");
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                &serde_json::json!({"error": "request too large"}),
            );
        }
    };
    // Everything the backend receives, as it receives it.
    println!(
        "request {peer} {method} {path} ({} bytes): {}",
        body.len(),
        String::from_utf8_lossy(&body)
    );
    let response = route(app, &method, &path, &body).await;
    println!("response {method} {path}: {}", response.status().as_u16());
    response
}

async fn route(app: &App, method: &Method, path: &str, body: &[u8]) -> Response<Full<Bytes>> {
    match (method, path) {
        (&Method::GET, "/" | "/index.html") => asset("text/html; charset=utf-8", INDEX_HTML),
        (&Method::GET, "/checkout.js") => asset("text/javascript", CHECKOUT_JS),
        (&Method::GET, "/style.css") => asset("text/css", STYLE_CSS),
        // Browsers ask; nothing to show.
        (&Method::GET, "/favicon.ico") => {
            respond(StatusCode::NO_CONTENT, "text/plain", Bytes::new())
        }
        (&Method::GET, "/sealer.js") => file(&app.web_dir.join("sealer.js")).await,
        (&Method::GET, "/api/sealing-key") => sealing_key(app).await,
        (&Method::POST, "/api/pay") => pay(app, body).await,
        (&Method::GET, path) if path.starts_with("/vendor/") => {
            match vendor_file(&app.web_dir, path) {
                Some(file_path) => file(&file_path).await,
                None => not_found(),
            }
        }
        _ => not_found(),
    }
}

async fn sealing_key(app: &App) -> Response<Full<Bytes>> {
    match app.vault.sealing_key().await {
        Ok(key) => json(
            StatusCode::OK,
            &serde_json::json!({
                "public_key": URL_SAFE_NO_PAD.encode(key.public_key),
                "key_id": URL_SAFE_NO_PAD.encode(key.key_id),
                "tenant": key.tenant,
                "server_time_unix_ms": key.server_time_unix_ms,
                "accepted_until_unix_ms": key.accepted_until_unix_ms,
                "max_age_secs": key.max_age_secs,
            }),
        ),
        Err(error) => vault_error(&error),
    }
}

async fn pay(app: &App, body: &[u8]) -> Response<Full<Bytes>> {
    let bad_request = |error: &str| {
        json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": error, "code": "BAD_REQUEST"}),
        )
    };
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
        return bad_request("the body must be JSON");
    };
    let Some(sealed_card) = request.get("sealed_card").and_then(|v| v.as_str()) else {
        return bad_request("sealed_card (a string) is required");
    };
    let Ok(sealed_card) = URL_SAFE_NO_PAD.decode(sealed_card.trim_end_matches('=')) else {
        return bad_request("sealed_card must be base64url");
    };
    match app.vault.tokenize_sealed(&sealed_card).await {
        // Never more than this: the page shows brand and last four.
        Ok(stored) => json(
            StatusCode::OK,
            &serde_json::json!({
                "token": stored.token,
                "brand": stored.brand,
                "last_four": stored.last_four,
            }),
        ),
        Err(error) => vault_error(&error),
    }
}

/// The vault's refusal for the page. The vault's messages name fields and rules,
/// never card data (DESIGN.md), so they are passed on; the `ErrorInfo` reason too.
fn vault_error(error: &vault_client::Error) -> Response<Full<Bytes>> {
    use tonic::Code;
    let Some(code) = error.code() else {
        // Not an answer from the vault: cannot connect, or a bad answer. The detail
        // (addresses, files) is for our log, not for the page.
        println!("  vault call failed: {error}");
        return json(
            StatusCode::BAD_GATEWAY,
            &serde_json::json!({"error": "the vault is unavailable", "code": "UNAVAILABLE"}),
        );
    };
    let (http, retry_with_new_key) = match code {
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, false),
        // An unknown key or an expired stamp: the page fetches a new key and reseals.
        Code::FailedPrecondition => (StatusCode::CONFLICT, true),
        // The same sealed card again after its token was deleted: sealed anew, it is
        // stored again.
        Code::NotFound => (StatusCode::CONFLICT, true),
        Code::AlreadyExists => (StatusCode::CONFLICT, false),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, false),
        Code::Unimplemented => (StatusCode::NOT_IMPLEMENTED, false),
        _ => (StatusCode::BAD_GATEWAY, false),
    };
    let message = match (code, error) {
        (Code::Unavailable, _) => "the vault is unavailable".to_owned(),
        (Code::Unimplemented, _) => "the vault does not offer sealed intake".to_owned(),
        (_, vault_client::Error::Rejected { message, .. }) => message.clone(),
        _ => error.to_string(),
    };
    json(
        http,
        &serde_json::json!({
            "error": message,
            "code": format!("{code:?}"),
            "reason": error.reason(),
            "retry_with_new_key": retry_with_new_key,
        }),
    )
}

/// The file under node_modules that `/vendor/<package>/esm/<path>` names, if it is a
/// JavaScript file of one of [`VENDOR_PACKAGES`]' `esm` directories.
fn vendor_file(web_dir: &Path, path: &str) -> Option<PathBuf> {
    let rest = path.strip_prefix("/vendor/")?;
    let package = VENDOR_PACKAGES
        .iter()
        .find(|package| rest.starts_with(&format!("{package}/esm/")))?;
    let inside = &rest[package.len() + "/esm/".len()..];
    let safe = inside.split('/').all(|segment| {
        !segment.is_empty()
            && !segment.starts_with('.')
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    });
    if !safe || !inside.ends_with(".js") {
        return None;
    }
    Some(
        web_dir
            .join("node_modules")
            .join(package)
            .join("esm")
            .join(inside),
    )
}

async fn file(path: &Path) -> Response<Full<Bytes>> {
    match tokio::fs::read(path).await {
        Ok(contents) => respond(StatusCode::OK, "text/javascript", Bytes::from(contents)),
        Err(e) => {
            println!("cannot read {}: {e}", path.display());
            not_found()
        }
    }
}

fn asset(content_type: &str, contents: &'static str) -> Response<Full<Bytes>> {
    respond(
        StatusCode::OK,
        content_type,
        Bytes::from_static(contents.as_bytes()),
    )
}

fn not_found() -> Response<Full<Bytes>> {
    json(
        StatusCode::NOT_FOUND,
        &serde_json::json!({"error": "not found"}),
    )
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = value.to_string();
    println!("  answer {}: {body}", status.as_u16());
    respond(status, "application/json", Bytes::from(body))
}

fn respond(status: StatusCode, content_type: &str, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .body(Full::new(body))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn vendor_paths_stay_inside_the_packages_esm_directories() {
        let web = Path::new("/srv/web");
        assert_eq!(
            vendor_file(web, "/vendor/@hpke/core/esm/mod.js"),
            Some(PathBuf::from("/srv/web/node_modules/@hpke/core/esm/mod.js"))
        );
        assert_eq!(
            vendor_file(web, "/vendor/@hpke/common/esm/src/kems/dhkem.js"),
            Some(PathBuf::from(
                "/srv/web/node_modules/@hpke/common/esm/src/kems/dhkem.js"
            ))
        );
        for refused in [
            "/vendor/@hpke/core/esm/../package.json",
            "/vendor/@hpke/core/esm/../../../etc/passwd.js",
            "/vendor/@hpke/core/esm//mod.js",
            "/vendor/@hpke/core/esm/.hidden.js",
            "/vendor/@hpke/core/package.json",
            "/vendor/@hpke/core/esm/mod.d.ts",
            "/vendor/@hpke/dhkem-x25519/esm/mod.js",
            "/vendor/left-pad/esm/index.js",
            "/vendor/@hpke/core/esm/a%2F..%2Fb.js",
        ] {
            assert_eq!(vendor_file(web, refused), None, "{refused}");
        }
    }
}
