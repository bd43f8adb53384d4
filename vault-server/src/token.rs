//! Tokens, in two shapes, both random from the OS CSPRNG and never derived from the
//! card:
//!
//! - **opaque** (the default): `tok_` followed by 128 random bits in base62 (22
//!   characters);
//! - **card-shaped** (`format = "card"`): as many digits as the card, its last four
//!   kept (and its first six where the tenant's config says so), every other digit
//!   uniformly random (the first never 0 unless the first six are kept), drawn again
//!   until the whole FAILS the Luhn check. So a card-shaped token is never a card
//!   number, never equal to its card, and a Luhn-valid digit string is never a token:
//!   [`Token::parse`] refuses one (without echoing it), since a caller who sends it
//!   most likely sent a card number where a token belongs.
//!
//! The grammar a token satisfies, wherever one is accepted:
//!
//! ```text
//! token = "tok_" 22*22(base62)          ; opaque
//!       / 12*19(DIGIT)                  ; card-shaped, failing the Luhn check
//! ```
//!
//! Both shapes are unique in the vault the same way: the store's put-if-absent on the
//! token (`InsertOutcome::TokenTaken`), and a fresh draw after a collision.
//!
//! When changing this: stored records and index entries hold tokens (see
//! `store/rocks/indexes.rs` for how a card-shaped one ends an index entry); a new shape
//! must not be a prefix or a suffix of an existing one, and must never pass for a card.

use std::fmt;

use serde::Deserialize;

use crate::card::{Pan, Violation, luhn_valid};

pub const PREFIX: &str = "tok_";
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// 62^22 > 2^128 > 62^21, so every 128-bit value fits in 22 base62 digits.
const DIGITS: usize = 22;
/// Bytes in every opaque token.
pub const OPAQUE_LEN: usize = PREFIX.len() + DIGITS;
/// The lengths of a card-shaped token (those of a card number).
pub const CARD_LENS: std::ops::RangeInclusive<usize> = 12..=19;
/// Candidates drawn for one card-shaped token before giving up: nine in ten candidates
/// fail the Luhn check, so reaching this means the random number generator is broken.
const MAX_CARD_DRAWS: usize = 1_000;

const BAD_FORMAT: Violation = Violation {
    field: "token",
    rule: "format",
    description: "must be `tok_` followed by 22 base62 characters, or a card-shaped token \
                  of 12 to 19 digits",
};

/// A digit string that passes the Luhn check: a card number, never a token.
const CARD_NUMBER: Violation = Violation {
    field: "token",
    rule: "luhn",
    description: "is shaped like a card number (it passes the Luhn check); tokens never \
                  do: send the token, never the card number",
};

/// The shape of a new token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `tok_` and 22 base62 characters.
    Opaque,
    /// As many digits as the card, failing the Luhn check.
    Card,
}

/// The shape of one new token: its format and, for a card-shaped one, which of the
/// card's digits it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Opaque,
    Card { keep_first_six: bool },
}

impl Shape {
    /// A new token of this shape for `pan` (an opaque one ignores the card).
    pub fn draw(self, pan: &Pan) -> Result<Token, envelope::Error> {
        match self {
            Shape::Opaque => Token::generate(),
            Shape::Card { keep_first_six } => Token::generate_card(pan, keep_first_six),
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(String);

impl Token {
    /// A new opaque token.
    pub fn generate() -> Result<Self, envelope::Error> {
        let mut bytes = [0u8; 16];
        envelope::fill_unique(&mut bytes)?;
        let mut value = u128::from_be_bytes(bytes);
        let mut digits = [b'0'; DIGITS];
        for slot in digits.iter_mut().rev() {
            *slot = BASE62[(value % 62) as usize];
            value /= 62;
        }
        let mut token = String::with_capacity(PREFIX.len() + DIGITS);
        token.push_str(PREFIX);
        token.extend(digits.iter().map(|&b| char::from(b)));
        Ok(Self(token))
    }

    /// A new card-shaped token for `pan`: its length, its last four (and its first six
    /// when `keep_first_six`), the other digits uniform, the whole uniform over the
    /// candidates of that shape that fail the Luhn check (rejection sampling: a
    /// Luhn-valid draw is thrown away whole, never patched, which would skew the
    /// digits). Random, not a function of the card's hidden digits. Whether it is free
    /// is the store's to say (put-if-absent).
    pub fn generate_card(pan: &Pan, keep_first_six: bool) -> Result<Self, envelope::Error> {
        let card = pan.expose_digits().as_bytes();
        let len = card.len();
        // `Pan` guarantees 12 to 19 digits: at least two are drawn.
        let head = if keep_first_six { 6 } else { 0 };
        let tail = len - 4;
        let mut token = [b'0'; 19];
        token[..head].copy_from_slice(&card[..head]);
        token[tail..len].copy_from_slice(&card[tail..]);
        let mut random = RandomDigits::default();
        for _ in 0..MAX_CARD_DRAWS {
            for (i, slot) in token.iter_mut().enumerate().take(tail).skip(head) {
                // A leading 0 would make the token look less like a card to systems
                // that keep it where a card number was (and some strip it).
                *slot = match i {
                    0 => random.nonzero_digit()?,
                    _ => random.digit()?,
                };
            }
            let candidate = &token[..len];
            // Never a card number, hence never this card; the second test says so
            // explicitly rather than by the arithmetic.
            if !luhn_valid(candidate) && candidate != card {
                return Ok(Self(candidate.iter().map(|&b| char::from(b)).collect()));
            }
        }
        Err(envelope::Error::Random)
    }

    /// Checks the shape of a token a caller sent (not whether it exists). The violation
    /// never holds the input: a refused "token" may be a card number.
    pub fn parse(input: &str) -> Result<Self, Violation> {
        if let Some(digits) = input.strip_prefix(PREFIX) {
            if digits.len() != DIGITS || !digits.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(BAD_FORMAT);
            }
            return Ok(Self(input.to_owned()));
        }
        if !CARD_LENS.contains(&input.len()) || !input.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BAD_FORMAT);
        }
        if luhn_valid(input.as_bytes()) {
            return Err(CARD_NUMBER);
        }
        Ok(Self(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn format(&self) -> Format {
        match self.0.starts_with(PREFIX) {
            true => Format::Opaque,
            false => Format::Card,
        }
    }

    /// Rebuilds a token from a storage key the vault wrote itself.
    pub fn from_stored(bytes: &[u8]) -> Option<Self> {
        std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| Self::parse(s).ok())
    }
}

/// Uniform decimal digits from the OS CSPRNG, drawn in blocks.
struct RandomDigits {
    bytes: [u8; 64],
    next: usize,
}

impl Default for RandomDigits {
    fn default() -> Self {
        Self {
            bytes: [0; 64],
            next: 64,
        }
    }
}

impl RandomDigits {
    fn byte(&mut self) -> Result<u8, envelope::Error> {
        if self.next == self.bytes.len() {
            envelope::fill_unique(&mut self.bytes)?;
            self.next = 0;
        }
        self.next += 1;
        Ok(self.bytes[self.next - 1])
    }

    /// 0 to 9, uniform: bytes from 250 up are thrown away (256 is not a multiple of 10).
    fn digit(&mut self) -> Result<u8, envelope::Error> {
        loop {
            let b = self.byte()?;
            if b < 250 {
                return Ok(b'0' + b % 10);
            }
        }
    }

    /// 1 to 9, uniform (bytes from 252 up are thrown away).
    fn nonzero_digit(&mut self) -> Result<u8, envelope::Error> {
        loop {
            let b = self.byte()?;
            if b < 252 {
                return Ok(b'1' + b % 9);
            }
        }
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.0)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Control: TOK-IRREVERSIBLE (docs/compliance.md).
    /// Attack: predict or derive one token from another; two fresh tokens differ and have
    /// the full length of 128 random bits.
    #[test]
    fn generated_tokens_parse_and_differ() {
        let a = Token::generate().unwrap();
        let b = Token::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 26);
        assert_eq!(Token::parse(a.as_str()).unwrap(), a);
    }

    /// Control: TOK-IRREVERSIBLE (docs/compliance.md).
    /// Attack: tokenize one card many times and look for a token that repeats (a token
    /// derived from the number, e.g. a hash or an encryption of it, would repeat every
    /// time). 1,000 draws for one card with the real generator: the opaque and the
    /// card-shaped tokens are all distinct; a card-shaped token keeps the card's length
    /// and last four, and its first six only when configured to. (With the first six
    /// kept, six digits are left to draw, about 900,000 candidates: repeats by chance are
    /// expected, and the store's put-if-absent draws again; nearly all still differ.)
    #[test]
    fn one_card_tokenized_a_thousand_times_gets_a_thousand_tokens() {
        let card = pan("4242424242424242");
        let draws = 1_000;
        for shape in [
            Shape::Opaque,
            Shape::Card {
                keep_first_six: false,
            },
            Shape::Card {
                keep_first_six: true,
            },
        ] {
            let tokens: std::collections::HashSet<Token> =
                (0..draws).map(|_| shape.draw(&card).unwrap()).collect();
            for token in &tokens {
                let text = token.as_str();
                match shape {
                    Shape::Opaque => assert!(text.starts_with("tok_") && text.len() == 26),
                    Shape::Card { keep_first_six } => {
                        assert_eq!(text.len(), 16, "{text}");
                        assert!(text.ends_with("4242"), "{text}");
                        // Without `keep_first_six` the first six are drawn like the
                        // rest (they may match the card's by chance, one in 900,000).
                        assert!(!keep_first_six || text.starts_with("424242"), "{text}");
                        assert_ne!(text, "4242424242424242");
                    }
                }
            }
            let least = match shape {
                Shape::Card {
                    keep_first_six: true,
                } => draws - 10,
                _ => draws,
            };
            assert!(
                tokens.len() >= least,
                "{shape:?}: {} distinct",
                tokens.len()
            );
        }
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "tok_",
            "tok_abc",
            "xyz_0123456789012345678901",
            "tok_012345678901234567890!",
            // Digits: too short, too long, with separators, with a letter.
            "10000000000",
            "10000000000000000000",
            "1000 0000 0000 0000",
            "1000-0000-0000-0000",
            "100000000000000a",
            "١٠٠٠٠٠٠٠٠٠٠٠",
        ] {
            let violation = Token::parse(bad).unwrap_err();
            assert_eq!(
                (violation.field, violation.rule),
                ("token", "format"),
                "{bad}"
            );
        }
    }

    fn pan(number: &str) -> Pan {
        Pan::parse(number).unwrap()
    }

    #[test]
    fn card_shaped_tokens_parse_and_card_numbers_are_refused_without_being_echoed() {
        for card in ["4242424242424242", "5555555555554444", "378282246310005"] {
            let violation = Token::parse(card).unwrap_err();
            assert_eq!((violation.field, violation.rule), ("token", "luhn"));
            assert!(!violation.description.contains(&card[card.len() - 4..]));
            assert!(!format!("{violation:?}").contains(card));
            assert!(
                !crate::error::VaultError::Invalid(violation)
                    .to_string()
                    .contains(card)
            );
        }
        for token in ["100000000000", "4242424242424241", "1000000000000000000"] {
            let parsed = Token::parse(token).unwrap();
            assert_eq!(parsed.as_str(), token);
            assert_eq!(parsed.format(), Format::Card);
            assert_eq!(Token::from_stored(token.as_bytes()), Some(parsed));
        }
        assert_eq!(Token::from_stored(b"4242424242424242"), None);
        assert_eq!(Token::generate().unwrap().format(), Format::Opaque);
    }

    /// Control: TOK-DISTINGUISH (docs/compliance.md).
    /// Attack: take a card-shaped token for a card (or use one as a card); it never passes
    /// Luhn.
    #[test]
    fn card_shaped_tokens_keep_the_shape_and_never_pass_luhn() {
        for (card, keep_first_six) in [
            ("4242424242424242", false),
            ("4242424242424242", true),
            ("5555555555554444", true),
            ("378282246310005", false),
            ("378282246310005", true),
        ] {
            let card_pan = pan(card);
            for _ in 0..2_000 {
                let token = Token::generate_card(&card_pan, keep_first_six).unwrap();
                let digits = token.as_str();
                assert_eq!(digits.len(), card.len());
                assert!(digits.bytes().all(|b| b.is_ascii_digit()));
                assert!(!luhn_valid(digits.as_bytes()));
                assert!(digits != card, "a token equals its card");
                assert_eq!(digits[card.len() - 4..], card[card.len() - 4..]);
                match keep_first_six {
                    true => assert_eq!(digits[..6], card[..6]),
                    false => assert_ne!(&digits[..1], "0"),
                }
                assert_eq!(Token::parse(digits).unwrap(), token);
            }
        }
    }

    /// Every drawn digit position is uniform (the Luhn rejection leaves each single
    /// position uniform, since another free digit spreads the sum): 200,000 tokens,
    /// 20,000 expected per digit, σ about 134; the bounds are 7σ away.
    ///
    /// Control: TOK-IRREVERSIBLE (docs/compliance.md).
    /// Attack: predict a card-shaped token's hidden digits from a bias; they are uniform.
    #[test]
    fn card_token_digits_are_uniform() {
        let card = pan("4242424242424242");
        let draws = 200_000;
        let mut counts = [[0u32; 10]; 12];
        for _ in 0..draws {
            let token = Token::generate_card(&card, false).unwrap();
            for (position, digit) in token.as_str().bytes().take(12).enumerate() {
                counts[position][usize::from(digit - b'0')] += 1;
            }
        }
        // The first digit: 1 to 9, never 0.
        assert_eq!(counts[0][0], 0);
        for &n in &counts[0][1..] {
            let expected = draws / 9;
            assert!(
                n.abs_diff(expected) < expected / 20,
                "first digit: {:?}",
                counts[0]
            );
        }
        for (position, row) in counts.iter().enumerate().skip(1) {
            for &n in row {
                let expected = draws / 10;
                assert!(n.abs_diff(expected) < 1_000, "position {position}: {row:?}");
            }
        }
    }
}
