//! Processor answers: scrubbing never panics and keeps the length; the injected card
//! number, CVC and name, planted in the answer in an encoding the fuzzer picks per
//! character (raw, JSON `\u`, percent, HTML reference, fullwidth, upper case, with
//! separators), never survive it: every byte that encoded them is masked (the number's
//! last four excepted).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault_server::forward::mask::{Injected, mask_card_numbers, scrub};

const NUMBER: &str = "4242424242424242";
const CVC: &str = "737";
const NAME: &str = "Ada Lovelace";

/// `c` encoded the way `how` says; every encoding decodes back to `c` (letters up to
/// case).
fn encode(c: char, how: u8) -> String {
    match how % 7 {
        0 => c.to_string(),
        1 => format!("\\u{:04x}", c as u32),
        2 => format!("%{:02X}", c as u32),
        3 => format!("&#{};", c as u32),
        4 if c.is_ascii_digit() => char::from_u32(0xFF10 + (c as u32 - '0' as u32))
            .map_or_else(|| c.to_string(), |f| f.to_string()),
        5 => c.to_ascii_uppercase().to_string(),
        _ => format!("&#x{:x};", c as u32),
    }
}

/// Plants `value` encoded char by char (choices from `how`), with a separator between
/// digits when `spaced`. Returns the byte ranges of each character's encoding.
fn plant(
    answer: &mut Vec<u8>,
    value: &str,
    how: &[u8],
    spaced: bool,
) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    for (k, c) in value.chars().enumerate() {
        if spaced && k > 0 && k % 4 == 0 {
            answer.push(b' ');
        }
        let start = answer.len();
        answer.extend_from_slice(encode(c, how.get(k).copied().unwrap_or(0)).as_bytes());
        ranges.push(start..answer.len());
    }
    ranges
}

fuzz_target!(|data: &[u8]| {
    let mut plain = data.to_vec();
    mask_card_numbers(&mut plain);
    assert_eq!(plain.len(), data.len());

    let (how, filler) = data.split_at(data.len().min(32));
    let mut answer = filler.to_vec();
    answer.extend_from_slice(b" \"");
    let number = plant(&mut answer, NUMBER, how, how.first().is_some_and(|b| b % 2 == 1));
    answer.extend_from_slice(b"\" cvc \"");
    let cvc = plant(&mut answer, CVC, &how[how.len().min(16)..], false);
    answer.extend_from_slice(b"\" holder ");
    let name = plant(&mut answer, NAME, &how[how.len().min(8)..], false);
    answer.extend_from_slice(b" end");
    let injected = Injected {
        number: NUMBER,
        cvc: Some(CVC),
        name: Some(NAME),
        secrets: &[],
    };
    let before = answer.len();
    // An answer that expands too much under NFKC is withheld, not masked.
    if !scrub(&mut answer, &injected) {
        return;
    }
    assert_eq!(answer.len(), before);
    let masked = |range: &std::ops::Range<usize>| answer[range.clone()].iter().all(|&b| b == b'*');
    assert!(number[..12].iter().all(masked), "number survived");
    assert!(cvc.iter().all(masked), "cvc survived");
    // The name's letters, not its space.
    let letters = NAME.chars().zip(&name).filter(|(c, _)| c.is_alphabetic());
    assert!(letters.map(|(_, r)| r).all(masked), "name survived");
});
