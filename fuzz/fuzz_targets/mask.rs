//! Processor answers: scrubbing never panics, keeps the length, and the injected card
//! number never survives it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault_server::forward::mask::{Injected, mask_card_numbers, scrub};

const NUMBER: &str = "4242424242424242";

fuzz_target!(|data: &[u8]| {
    let mut plain = data.to_vec();
    mask_card_numbers(&mut plain);
    assert_eq!(plain.len(), data.len());

    // Plant the number somewhere in the answer, then scrub.
    let mut answer = data.to_vec();
    let at = data
        .first()
        .map_or(0, |b| usize::from(*b) % (data.len() + 1));
    answer.splice(at..at, NUMBER.bytes());
    let injected = Injected {
        number: NUMBER,
        cvc: Some("123"),
        name: Some("Ada Lovelace"),
    };
    let before = answer.len();
    scrub(&mut answer, &injected);
    assert_eq!(answer.len(), before);
    assert!(!answer.windows(NUMBER.len()).any(|w| w == NUMBER.as_bytes()));
    assert!(!answer.windows(12).any(|w| w == b"Ada Lovelace"));
});
