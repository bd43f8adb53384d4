//! Stored forward outcomes, for idempotent retries. An outcome is the processor's
//! masked answer plus a digest of the request it answered; it holds no card data.
//!
//! Value format: `1 | JSON` (when changing it, bump the leading byte and keep reading
//! the old one).

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::Answer;
use crate::policy::Tenant;

const FORMAT_V1: u8 = 1;

/// The store key of an idempotency key: scoped to the tenant.
pub fn store_key(tenant: &Tenant, key: &str) -> Vec<u8> {
    let tenant = tenant.as_str().as_bytes();
    let mut out = Vec::with_capacity(1 + tenant.len() + key.len());
    out.push(tenant.len() as u8);
    out.extend_from_slice(tenant);
    out.extend_from_slice(key.as_bytes());
    out
}

/// SHA-256 over the parts of a request, each length-prefixed.
pub fn request_digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// Where a forward under an idempotency key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Written before the request is sent: if it is still there later, the processor
    /// may have been called and the outcome is unknown.
    Pending,
    /// The processor answered; `answer` is what it said (masked).
    Done,
    /// It failed before anything was sent: the key may be used again.
    NotSent,
    /// The processor answered in a form the vault cannot mask (or too large): the
    /// answer is withheld, and so it is for every retry; `status` is the processor's.
    Withheld,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    state: State,
    /// Random per claim, so that a release written by one forward can never match
    /// another's claim of the same request (see `Forwarder`'s release).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    claim: String,
    request_sha256: String,
    created_at_unix_ms: i64,
    status: u16,
    headers: Vec<(String, String)>,
    body_base64: String,
}

/// A stored outcome.
#[derive(Debug)]
pub struct Outcome {
    pub state: State,
    pub request_digest: [u8; 32],
    pub created_at_unix_ms: i64,
    pub answer: Answer,
}

pub fn encode(
    state: State,
    digest: &[u8; 32],
    created_at_unix_ms: i64,
    answer: &Answer,
) -> Vec<u8> {
    // Unique per claim: random, and a process-wide counter for the case where the RNG
    // fails (two same-request claims in one millisecond must still differ).
    static CLAIMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut random = [0u8; 8];
    let _ = envelope::fill_random(&mut random);
    let count = CLAIMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let stored = Stored {
        state,
        claim: format!("{}-{count}", hex::encode(random)),
        request_sha256: hex::encode(digest),
        created_at_unix_ms,
        status: answer.status,
        headers: answer.headers.clone(),
        body_base64: base64::engine::general_purpose::STANDARD.encode(&answer.body),
    };
    let mut out = vec![FORMAT_V1];
    // Serializing plain strings and numbers cannot fail.
    out.extend_from_slice(&serde_json::to_vec(&stored).unwrap_or_default());
    out
}

/// Whether a stored outcome no longer holds its key: released before anything was
/// sent, or older than the idempotency window. An unreadable one holds it.
pub fn replaceable(stored: &[u8], window: std::time::Duration, now_unix_ms: i64) -> bool {
    decode(stored).is_some_and(|outcome| {
        outcome.state == State::NotSent
            || now_unix_ms.saturating_sub(outcome.created_at_unix_ms) >= window.as_millis() as i64
    })
}

pub fn decode(bytes: &[u8]) -> Option<Outcome> {
    let (&format, json) = bytes.split_first()?;
    if format != FORMAT_V1 {
        return None;
    }
    let stored: Stored = serde_json::from_slice(json).ok()?;
    let mut digest = [0u8; 32];
    hex::decode_to_slice(&stored.request_sha256, &mut digest).ok()?;
    Some(Outcome {
        state: stored.state,
        request_digest: digest,
        created_at_unix_ms: stored.created_at_unix_ms,
        answer: Answer {
            status: stored.status,
            headers: stored.headers,
            body: base64::engine::general_purpose::STANDARD
                .decode(stored.body_base64)
                .ok()?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let answer = Answer {
            status: 402,
            headers: vec![("content-type".into(), "application/json".into())],
            body: b"{\"status\":\"declined\"}".to_vec(),
        };
        let digest = request_digest(&[b"sandbox", b"POST"]);
        let outcome = decode(&encode(State::Done, &digest, 42, &answer)).unwrap();
        assert_eq!(outcome.state, State::Done);
        assert_eq!(outcome.answer, answer);
        assert_eq!(
            (outcome.request_digest, outcome.created_at_unix_ms),
            (digest, 42)
        );
        assert!(decode(&[9, b'{']).is_none());
        assert_ne!(
            request_digest(&[b"ab", b"c"]),
            request_digest(&[b"a", b"bc"])
        );
    }
}
