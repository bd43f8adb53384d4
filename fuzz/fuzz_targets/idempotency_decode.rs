//! Stored forward outcomes and tokens: decoding never panics; what decodes re-encodes
//! to something that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault_server::forward::idempotency;

fuzz_target!(|data: &[u8]| {
    if let Some(outcome) = idempotency::decode(data) {
        let again = idempotency::encode(
            outcome.state,
            &outcome.request_digest,
            outcome.created_at_unix_ms,
            &outcome.answer,
        );
        let decoded = idempotency::decode(&again).expect("re-encoded outcome decodes");
        assert_eq!(decoded.answer, outcome.answer);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = vault_server::token::Token::parse(text);
    }
});
