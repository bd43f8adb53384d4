//! Forwarding: the only way a card number leaves the vault. A caller names an
//! allowlisted processor, a method and path it allows, headers and a body template;
//! the vault renders the card into the placeholders the processor accepts, sends it over
//! verified TLS, and returns the answer with card-number-like runs masked.

mod address;
pub mod idempotency;
pub mod mask;
pub mod net;
pub mod route;
pub mod settings;
pub mod template;

use std::collections::{BTreeMap, HashMap};

use zeroize::Zeroizing;

use settings::ProcessorSettings;
use template::{Encoding, Field, Template};

/// Headers a caller may not set: the vault sets them itself, or they would let the
/// answer reach the caller in a form the masker cannot read (compressed, in ranges).
const RESERVED_HEADERS: [&str; 12] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "accept",
    "accept-encoding",
    "accept-charset",
    "range",
    "if-range",
    "proxy-authorization",
];

/// Characters allowed in a forward path: RFC 3986 `pchar` and `/`, nothing that a URL
/// parser would drop or reinterpret.
fn path_char_allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || "/-._~!$&'()*+,;=:@".contains(c)
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Unknown processor, identity not allowed, method, path or field not allowed. The
    /// caller learns nothing more (no help for probing); the log says which.
    #[error("forward not allowed: {0}")]
    Denied(&'static str),
    #[error("the processor could not be reached: {detail}")]
    Unreachable { detail: String, sent: bool },
    #[error("the processor did not answer within its timeout")]
    Timeout,
    #[error(
        "the request was sent and the processor answered (HTTP {status}), but its answer \
         exceeds max_response_bytes ({limit}): it is withheld"
    )]
    TooLarge { limit: usize, status: u16 },
    /// The request was sent and the processor answered, in a form the masker cannot
    /// read (compressed, binary, another charset): the answer is withheld. Never names
    /// the processor's header values.
    #[error(
        "the request was sent and the processor answered (HTTP {status}), but {what}, which \
         the vault cannot mask: the answer is withheld. Check the outcome with the processor \
         before sending again"
    )]
    Unreadable { status: u16, what: &'static str },
    /// A header value rendered from the card is not a valid header value.
    #[error("a header rendered from the card data is not a valid header value")]
    BadHeader,
}

impl ForwardError {
    /// The processor's status when it answered but the answer is withheld.
    pub fn withheld_status(&self) -> Option<u16> {
        match self {
            ForwardError::Unreadable { status, .. } | ForwardError::TooLarge { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }

    /// True when the request certainly never reached the processor (so a CVC is still
    /// unused and a retry cannot charge twice).
    pub fn nothing_sent(&self) -> bool {
        matches!(
            self,
            ForwardError::Denied(_)
                | ForwardError::BadHeader
                | ForwardError::Unreachable { sent: false, .. }
        )
    }
}

/// A processor's answer, card-number-like runs already masked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A configured processor, ready to be called.
#[derive(Debug)]
pub struct Processor {
    name: String,
    /// Base URL without a trailing slash.
    base_url: String,
    /// Path of the base URL without a trailing slash ("" or "/prefix").
    base_path: String,
    routes: Vec<(String, Vec<String>)>,
    inject: BTreeMap<String, Vec<String>>,
    allowed_identities: Vec<String>,
    max_response_bytes: usize,
    require_reason: bool,
    /// The declared routes, by name.
    named: HashMap<String, route::Route>,
    free_form: bool,
    client: reqwest::Client,
}

/// The allowlist.
#[derive(Debug, Default)]
pub struct Processors(HashMap<String, Processor>);

fn segments(path: &str) -> Vec<String> {
    path.trim_start_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect()
}

impl Processors {
    pub fn from_settings(list: &[ProcessorSettings]) -> Result<Self, String> {
        let mut processors = HashMap::new();
        for settings in list {
            settings.validate()?;
            let processor = Processor {
                name: settings.name.clone(),
                base_url: settings.base_url.trim_end_matches('/').to_owned(),
                base_path: reqwest::Url::parse(&settings.base_url)
                    .map(|u| u.path().trim_end_matches('/').to_owned())
                    .unwrap_or_default(),
                routes: settings
                    .routes
                    .iter()
                    .map(|r| (r.method.clone(), segments(&r.path)))
                    .collect(),
                inject: settings.inject.clone(),
                allowed_identities: settings
                    .allowed_identities
                    .iter()
                    .map(|entry| runtime::tls::configured_identity(entry))
                    .collect::<Result<_, _>>()
                    .map_err(|e| {
                        format!("processor {:?}: allowed_identities: {e}", settings.name)
                    })?,
                max_response_bytes: settings.max_response_bytes,
                require_reason: settings.require_reason,
                named: settings
                    .named_routes
                    .iter()
                    .map(|r| {
                        route::Route::from_settings(r, &settings.inject)
                            .map(|route| (r.name.clone(), route))
                            .map_err(|e| format!("processor {:?}: {e}", settings.name))
                    })
                    .collect::<Result<_, _>>()?,
                free_form: settings.dangerous_free_form,
                client: net::client(settings)?,
            };
            if processors
                .insert(settings.name.clone(), processor)
                .is_some()
            {
                return Err(format!("processor {:?} is configured twice", settings.name));
            }
        }
        Ok(Self(processors))
    }

    pub fn get(&self, name: &str) -> Option<&Processor> {
        self.0.get(name)
    }
}

/// What a caller asked to send, parsed but not yet rendered.
pub struct Outbound {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Template)>,
    pub body: Template,
    /// The route's secret header values: masked in the answer like card values.
    pub secrets: Vec<String>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values may hold the caller's processor credentials.
        f.debug_struct("Outbound")
            .field("method", &self.method)
            .field("path", &self.path)
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Outbound {
    pub fn uses(&self, field: Field) -> bool {
        self.body.fields().any(|f| f == field)
            || self
                .headers
                .iter()
                .any(|(_, t)| t.fields().any(|f| f == field))
    }

    pub fn content_type(&self) -> Option<&Template> {
        self.headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
            .map(|(_, t)| t)
    }
}

impl Processor {
    /// Everything the allowlist says about this request, before any card is decrypted.
    /// `declared`: it was built from one of the processor's routes (else it is a
    /// free-form forward, refused unless the processor allows them).
    pub fn check(
        &self,
        identity: &str,
        outbound: &Outbound,
        declared: bool,
    ) -> Result<(), ForwardError> {
        if !self.allowed_identities.iter().any(|i| i == identity) {
            return Err(ForwardError::Denied(
                "identity not allowed for this processor",
            ));
        }
        if !declared && !self.free_form {
            return Err(ForwardError::Denied(
                "free-form forward to a processor that takes declared routes only",
            ));
        }
        let path = &outbound.path;
        if !path.starts_with('/') || !path.chars().all(path_char_allowed) {
            return Err(ForwardError::Denied("path shape"));
        }
        let wanted = segments(path);
        if wanted.iter().any(|s| s == "." || s == "..") {
            return Err(ForwardError::Denied("dot segment in path"));
        }
        let route_allowed = declared
            || self.routes.iter().any(|(method, route)| {
                *method == outbound.method
                    && route.len() == wanted.len()
                    && route
                        .iter()
                        .zip(&wanted)
                        .all(|(r, w)| r == "*" && !w.is_empty() || r == w)
            });
        if !route_allowed {
            return Err(ForwardError::Denied("method and path not allowed"));
        }
        let allowed = |field: Field, location: &str| {
            self.inject
                .get(field.config_name())
                .is_some_and(|locations| locations.iter().any(|l| l == location))
        };
        if outbound.body.fields().any(|f| !allowed(f, "body")) {
            return Err(ForwardError::Denied("field not allowed in the body"));
        }
        if outbound
            .headers
            .iter()
            .any(|(_, value)| value.fields().any(|f| !allowed(f, "header")))
        {
            return Err(ForwardError::Denied("field not allowed in a header"));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether every forward must give a reason.
    pub fn requires_reason(&self) -> bool {
        self.require_reason
    }

    /// A declared route.
    pub fn route(&self, name: &str) -> Option<&route::Route> {
        self.named.get(name)
    }

    /// Sends an export file (ciphertext only: encrypted to the processor's own key) to
    /// its declared upload path; returns the processor's status. The answer is not
    /// read beyond its status.
    pub async fn upload(&self, path: &str, body: Vec<u8>) -> Result<u16, ForwardError> {
        let url = reqwest::Url::parse(&format!("{}{path}", self.base_url))
            .map_err(|_| ForwardError::Denied("path does not form a URL"))?;
        if url.path() != format!("{}{path}", self.base_path) || url.query().is_some() {
            return Err(ForwardError::Denied("path changed when forming the URL"));
        }
        let response = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/pgp-encrypted")
            .body(body)
            .send()
            .await
            .map_err(classify)?;
        Ok(response.status().as_u16())
    }

    /// Renders the card into the request, sends it, and reads the masked answer.
    pub async fn send(
        &self,
        outbound: &Outbound,
        card: &crate::card::CardData,
        cvc: Option<&str>,
    ) -> Result<Answer, ForwardError> {
        let content_type = outbound
            .content_type()
            .map(|t| t.render(card, cvc, Encoding::Raw));
        let body = outbound.body.render(
            card,
            cvc,
            Encoding::for_content_type(content_type.as_deref().map(String::as_str)),
        );
        let method = reqwest::Method::from_bytes(outbound.method.as_bytes())
            .map_err(|_| ForwardError::Denied("method"))?;
        // The URL must be exactly base + checked path: a parser that normalises
        // anything away would send the card somewhere the allowlist did not approve.
        let url = reqwest::Url::parse(&format!("{}{}", self.base_url, outbound.path))
            .map_err(|_| ForwardError::Denied("path does not form a URL"))?;
        let expected_path = format!("{}{}", self.base_path, outbound.path);
        if url.path() != expected_path || url.query().is_some() || url.fragment().is_some() {
            return Err(ForwardError::Denied("path changed when forming the URL"));
        }
        let mut request = self
            .client
            .request(method, url)
            .header(reqwest::header::ACCEPT_ENCODING, "identity");
        for (name, value) in &outbound.headers {
            let value = value.render(card, cvc, Encoding::Raw);
            let value = reqwest::header::HeaderValue::from_str(&value)
                .map_err(|_| ForwardError::BadHeader)?;
            request = request.header(name.as_str(), value);
        }
        // reqwest copies the body into its own buffer, which is not zeroized; the
        // rendered copy here is.
        let body: Zeroizing<Vec<u8>> = Zeroizing::new(body.as_bytes().to_vec());
        let response = request.body(body.to_vec()).send().await.map_err(classify)?;
        let status = response.status().as_u16();
        if let Some(what) = unreadable(response.headers()) {
            tracing::warn!(
                status,
                what,
                "processor answer withheld: the masker cannot read it"
            );
            return Err(ForwardError::Unreadable { status, what });
        }
        let injected = mask::Injected {
            number: card.pan.expose_digits(),
            cvc,
            name: card.name.as_ref().map(|n| n.expose()),
            secrets: &outbound.secrets,
        };
        let Some(headers) = scrub_headers(response.headers(), &injected) else {
            return Err(ForwardError::Unreadable {
                status,
                what: "in characters the masker cannot read in bounded time",
            });
        };
        let mut response = response;
        let mut answer = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if answer.len() + chunk.len() > self.max_response_bytes {
                return Err(ForwardError::TooLarge {
                    limit: self.max_response_bytes,
                    status,
                });
            }
            answer.extend_from_slice(&chunk);
        }
        // What the headers say is not all: a body that is not text (compressed under a
        // transfer-encoding, UTF-16 without a charset) is withheld too.
        let text = std::str::from_utf8(&answer).is_ok_and(|t| {
            !t.chars()
                .any(|c| c.is_control() && !matches!(c, '\t' | '\r' | '\n'))
        });
        if !text {
            tracing::warn!(
                status,
                "processor answer withheld: its body is not UTF-8 text"
            );
            return Err(ForwardError::Unreadable {
                status,
                what: "in bytes that are not UTF-8 text",
            });
        }
        // A small answer (most of them) is masked here: a hand-off to the blocking
        // pool would cost more than the masking.
        let readable = if answer.len() <= MASK_INLINE_BYTES {
            mask::scrub(&mut answer, &injected)
        } else {
            let (masked, readable) =
                mask_off_thread(answer, &injected)
                    .await
                    .map_err(|_| ForwardError::Unreadable {
                        status,
                        what: "in a form whose masking failed",
                    })?;
            answer = masked;
            readable
        };
        if !readable {
            return Err(ForwardError::Unreadable {
                status,
                what: "in characters the masker cannot read in bounded time",
            });
        }
        Ok(Answer {
            status,
            headers,
            body: answer,
        })
    }
}

/// Masks a large answer off the async threads (it takes a while), on copies of the
/// card values that are wiped after. Fails only if the blocking task panicked.
async fn mask_off_thread(
    mut answer: Vec<u8>,
    injected: &mask::Injected<'_>,
) -> Result<(Vec<u8>, bool), tokio::task::JoinError> {
    let values = Zeroizing::new((
        injected.number.to_owned(),
        injected.cvc.map(str::to_owned),
        injected.name.map(str::to_owned),
    ));
    let secrets = injected.secrets.to_vec();
    tokio::task::spawn_blocking(move || {
        let (number, cvc, name) = &*values;
        let injected = mask::Injected {
            number,
            cvc: cvc.as_deref(),
            name: name.as_deref(),
            secrets: &secrets,
        };
        let readable = mask::scrub(&mut answer, &injected);
        (answer, readable)
    })
    .await
}

fn classify(error: reqwest::Error) -> ForwardError {
    if error.is_timeout() {
        return ForwardError::Timeout;
    }
    let detail = runtime::error_chain(&error);
    // A connect error (TCP, TLS handshake, certificate, address rule) happens before
    // any byte of the request is written.
    ForwardError::Unreachable {
        detail,
        sent: !error.is_connect(),
    }
}

/// Why the masker cannot read an answer with these headers, if it cannot: a
/// content-encoding (compressed), a content type that is not text, or a charset other
/// than UTF-8 (UTF-16 digits are not ASCII digits).
fn unreadable(headers: &reqwest::header::HeaderMap) -> Option<&'static str> {
    if headers
        .get_all(reqwest::header::CONTENT_ENCODING)
        .iter()
        .any(|encoding| !encoding.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Some("in a content-encoding");
    }
    // The HTTP client undoes chunking only: `gzip, chunked` leaves the body compressed.
    let coded = |value: &[u8]| {
        String::from_utf8_lossy(value)
            .split(',')
            .any(|coding| !coding.trim().eq_ignore_ascii_case("chunked"))
    };
    if headers
        .get_all(reqwest::header::TRANSFER_ENCODING)
        .iter()
        .any(|value| coded(value.as_bytes()))
    {
        return Some("in a transfer-encoding");
    }
    let content_type = headers.get(reqwest::header::CONTENT_TYPE)?;
    let content_type = String::from_utf8_lossy(content_type.as_bytes()).to_ascii_lowercase();
    let mut parts = content_type.split(';');
    let media = parts.next().unwrap_or("").trim();
    let textual = media.starts_with("text/")
        || matches!(
            media,
            "application/json"
                | "application/xml"
                | "application/x-www-form-urlencoded"
                | "application/problem+json"
                | "application/javascript"
                | ""
        )
        || media.ends_with("+json")
        || media.ends_with("+xml");
    if !textual {
        return Some("in a content type that is not text");
    }
    let charset = parts
        .filter_map(|p| p.split_once('='))
        .filter(|(key, _)| key.trim() == "charset")
        .map(|(_, value)| value.trim().trim_matches('"').to_owned())
        .next();
    // Latin-1 and its Windows cousin are accepted for ASCII bodies: the body must be
    // UTF-8 text anyway (checked once read), which any non-ASCII byte of theirs is not.
    let known = [
        "utf-8",
        "utf8",
        "us-ascii",
        "iso-8859-1",
        "latin1",
        "windows-1252",
    ];
    if charset.is_some_and(|c| !known.contains(&c.as_str())) {
        return Some("in a charset other than UTF-8");
    }
    None
}

/// The largest answer masked on the async thread that read it (tens of microseconds at
/// most); a larger one goes to the blocking pool.
const MASK_INLINE_BYTES: usize = 8 * 1024;

/// The answer's headers the caller gets, scrubbed: the values together, as one text
/// with a line break between them, so that the injected number or name cut over several
/// headers is found too; the names likewise. (A line break, not a space: the shape
/// rule joins digit runs across a space, and a digit glued in front of another
/// header's card number would make it fail the Luhn check and pass unmasked.)
fn scrub_headers(
    headers: &reqwest::header::HeaderMap,
    injected: &mask::Injected<'_>,
) -> Option<Vec<(String, String)>> {
    let kept: Vec<(&reqwest::header::HeaderName, &reqwest::header::HeaderValue)> = headers
        .iter()
        .filter(|(name, _)| !RESERVED_HEADERS.contains(&name.as_str()))
        .collect();
    fn joined<'a>(parts: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
        let mut buffer = Vec::new();
        for part in parts {
            buffer.extend_from_slice(part);
            buffer.push(b'\n');
        }
        buffer
    }
    let mut values = joined(kept.iter().map(|(_, value)| value.as_bytes()));
    let mut names = joined(kept.iter().map(|(name, _)| name.as_str().as_bytes()));
    if !mask::scrub(&mut values, injected) {
        return None;
    }
    // A header name is a short token: nothing in it expands.
    let _ = mask::scrub(&mut names, injected);
    let (mut values, mut names) = (values.as_slice(), names.as_slice());
    let next = |rest: &mut &[u8], len: usize| {
        let (this, after) = rest.split_at(len);
        *rest = after.get(1..).unwrap_or_default();
        String::from_utf8_lossy(this).into_owned()
    };
    let scrubbed = kept
        .iter()
        .map(|(name, value)| {
            (
                next(&mut names, name.as_str().len()),
                next(&mut values, value.as_bytes().len()),
            )
        })
        .collect();
    Some(scrubbed)
}

/// Checks a caller's header name: a valid token, not one the vault sets itself.
pub fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        && !RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

    /// Attack: a processor puts another card number (not the injected one, so only the
    /// shape rule can catch it) in a header right after a header ending in a digit, in
    /// the value and in the name. Joined with a space, the digit would be glued in
    /// front of the number, the 17-digit run would fail the Luhn check and the number
    /// would pass unmasked.
    #[test]
    fn a_card_number_in_a_header_is_masked_whatever_precedes_it() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.insert("x-b", HeaderValue::from_static("5555555555554444"));
        headers.insert("x-1", HeaderValue::from_static("ok"));
        headers.insert(
            HeaderName::from_static("5555555555554444"),
            HeaderValue::from_static("ok"),
        );
        let injected = mask::Injected {
            number: "4242424242424242",
            cvc: None,
            name: None,
            secrets: &[],
        };
        let scrubbed = scrub_headers(&headers, &injected).expect("readable");
        let text = format!("{scrubbed:?}");
        assert!(!text.contains("5555555555554444"), "{text}");
        assert!(text.contains("************4444"), "{text}");
        // Nothing else changed: names and values keep their lengths and the rest.
        assert!(scrubbed.contains(&("x-a".into(), "1".into())), "{text}");
        assert!(scrubbed.contains(&("x-1".into(), "ok".into())), "{text}");
        assert_eq!(scrubbed.len(), 4);
    }
}
