//! Tokens: `tok_` followed by 128 random bits in base62 (22 characters). Random from
//! the OS CSPRNG, never derived from the card.

use std::fmt;

use crate::card::Violation;

pub const PREFIX: &str = "tok_";
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// 62^22 > 2^128 > 62^21, so every 128-bit value fits in 22 base62 digits.
const DIGITS: usize = 22;
/// Bytes in every token.
pub const LEN: usize = PREFIX.len() + DIGITS;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(String);

impl Token {
    pub fn generate() -> Result<Self, envelope::Error> {
        let mut bytes = [0u8; 16];
        envelope::fill_random(&mut bytes)?;
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

    /// Checks the shape of a token a caller sent (not whether it exists).
    pub fn parse(input: &str) -> Result<Self, Violation> {
        let bad = Violation {
            field: "token",
            rule: "format",
            description: "must be `tok_` followed by 22 base62 characters",
        };
        let digits = input.strip_prefix(PREFIX).ok_or(bad)?;
        if digits.len() != DIGITS || !digits.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(bad);
        }
        Ok(Self(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Rebuilds a token from a storage key the vault wrote itself.
    pub fn from_stored(bytes: &[u8]) -> Option<Self> {
        std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| Self::parse(s).ok())
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

    #[test]
    fn generated_tokens_parse_and_differ() {
        let a = Token::generate().unwrap();
        let b = Token::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 26);
        assert_eq!(Token::parse(a.as_str()).unwrap(), a);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "tok_",
            "tok_abc",
            "xyz_0123456789012345678901",
            "tok_012345678901234567890!",
        ] {
            assert_eq!(Token::parse(bad).unwrap_err().field, "token", "{bad}");
        }
    }
}
