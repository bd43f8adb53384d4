//! Stored record bytes: decoding and opening never panic, and only the genuine record
//! authenticates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault_server::record;
use vault_server::token::Token;

fuzz_target!(|data: &[u8]| {
    let Ok(stored) = record::decode(data) else {
        return;
    };
    let key = envelope::SecretKey::from_slice(&[7; 32]).expect("32 bytes");
    let token = Token::parse("tok_0000000000000000000000").expect("valid token");
    // Random bytes never authenticate under a key they were not sealed with.
    assert!(stored.open(&token, &key).is_err());
});
