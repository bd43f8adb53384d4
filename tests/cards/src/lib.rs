//! Synthetic card numbers for tests and benchmarks. Each is Luhn-valid, under a
//! made-up issuer prefix with made-up middle digits: never a real customer's card.
//!
//! The first six digits spread over [`ISSUERS`] issuers the way a merchant's cards do:
//! issuer `k` (from 1) takes a share proportional to `k^-0.8` (a Zipf law), so the
//! largest holds about 5% of all cards and the smallest a few in a million. That
//! matters to the vault's guessing detector, which counts different cards per (first
//! six, last four): sequential numbers under one prefix would pile thousands of cards
//! into a few buckets, which no real card population does.

use std::sync::OnceLock;

/// Issuer prefixes (first six digits) the numbers spread over.
pub const ISSUERS: u64 = 3000;

/// The `n`th synthetic card number: the same `n` always gives the same number, and
/// two different `n` below 10^8 never give the same one.
pub fn card_number(n: u64) -> String {
    let rank = issuer(mix(n));
    let (prefix, len) = issuer_prefix(rank);
    // The middle digits are `n` scrambled by a multiplication modulo a power of ten (a
    // bijection, since the factor is prime to 10): distinct for distinct `n`, and
    // spread over the last digits (and so over the last four).
    let middle_len = len - 7;
    let modulus = 10u64.pow(middle_len as u32);
    let middle = (n % modulus) * 7_654_321_077 % modulus;
    let body = format!("{prefix}{middle:0middle_len$}");
    format!("{body}{}", luhn_digit(&body))
}

/// The issuer rank (from 1) a uniform 64-bit value falls on.
fn issuer(uniform: u64) -> u64 {
    let cumulative = cumulative();
    let total = cumulative[cumulative.len() - 1];
    let target = (uniform >> 11) as f64 / (1u64 << 53) as f64 * total;
    cumulative.partition_point(|&c| c <= target) as u64 + 1
}

/// Cumulative Zipf weights of issuers 1..=ISSUERS.
fn cumulative() -> &'static [f64] {
    static CUMULATIVE: OnceLock<Vec<f64>> = OnceLock::new();
    CUMULATIVE.get_or_init(|| {
        let mut sum = 0.0;
        (1..=ISSUERS)
            .map(|k| {
                sum += (k as f64).powf(-0.8);
                sum
            })
            .collect()
    })
}

/// Issuer `rank`'s six-digit prefix and its cards' length: six in ten Visa (16
/// digits), three Mastercard (16), one American Express (15).
fn issuer_prefix(rank: u64) -> (String, usize) {
    let digits = mix(rank ^ 0x5eed) % 100_000;
    match rank % 10 {
        0..=5 => (format!("4{digits:05}"), 16),
        6..=8 => (format!("5{}{:04}", 1 + digits % 5, digits % 10_000), 16),
        _ => (
            format!("3{}{:04}", [4, 7][digits as usize % 2], digits % 10_000),
            15,
        ),
    }
}

/// The Luhn check digit that completes `body`.
pub fn luhn_digit(body: &str) -> char {
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            match i % 2 {
                0 if d * 2 > 9 => d * 2 - 9,
                0 => d * 2,
                _ => d,
            }
        })
        .sum();
    char::from(b'0' + ((10 - sum % 10) % 10) as u8)
}

/// SplitMix64: a fixed, well-spread mixing of `x`.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn luhn_valid(number: &str) -> bool {
        let (body, check) = number.split_at(number.len() - 1);
        luhn_digit(body).to_string() == check
    }

    #[test]
    fn numbers_are_luhn_valid_distinct_and_spread_over_issuers() {
        let mut seen = HashSet::new();
        let mut issuers: HashMap<String, u64> = HashMap::new();
        let count = 200_000;
        for n in 0..count {
            let number = card_number(n);
            assert!(luhn_valid(&number), "{number}");
            assert!(matches!(number.len(), 15 | 16), "{number}");
            assert!(seen.insert(number.clone()), "{number} twice");
            *issuers.entry(number[..6].to_owned()).or_default() += 1;
        }
        assert_eq!(card_number(12_345), card_number(12_345));
        let largest = issuers.values().max().copied().unwrap_or(0);
        let share = largest as f64 / count as f64;
        assert!(
            (0.03..0.08).contains(&share),
            "largest issuer share {share}"
        );
        assert!(issuers.len() > 2000, "{} issuers", issuers.len());
    }
}
