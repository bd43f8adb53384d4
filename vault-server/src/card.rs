//! Card data as a domain type: validated at the gRPC edge, zeroized on drop, never
//! printed. Validation errors name the field and the rule, never the value.

use std::fmt;

use zeroize::Zeroizing;

/// The longest cardholder name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Expiry years further ahead than this are refused as implausible.
pub const MAX_YEARS_AHEAD: u16 = 50;

/// Why a field was refused: the field, a stable rule name and a sentence. Never the
/// value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub field: &'static str,
    pub rule: &'static str,
    pub description: &'static str,
}

pub const fn violation(
    field: &'static str,
    rule: &'static str,
    description: &'static str,
) -> Violation {
    Violation {
        field,
        rule,
        description,
    }
}

/// A primary account number: 12 to 19 ASCII digits that pass the Luhn check.
/// `Debug` shows the last four only; the digits are reachable through
/// [`Pan::expose_digits`] alone.
pub struct Pan(Zeroizing<String>);

impl Pan {
    /// Parses a PAN as typed: spaces and dashes are removed.
    pub fn parse(input: &str) -> Result<Self, Violation> {
        const FIELD: &str = "card.number";
        let mut digits = Zeroizing::new(String::with_capacity(19));
        for c in input.chars() {
            match c {
                '0'..='9' => digits.push(c),
                ' ' | '-' => {}
                _ => {
                    return Err(violation(
                        FIELD,
                        "digits",
                        "must contain only digits, spaces and dashes",
                    ));
                }
            }
            if digits.len() > 19 {
                break;
            }
        }
        if digits.is_empty() {
            return Err(violation(FIELD, "required", "is required"));
        }
        if !(12..=19).contains(&digits.len()) {
            return Err(violation(FIELD, "length", "must have 12 to 19 digits"));
        }
        if !luhn_valid(digits.as_bytes()) {
            return Err(violation(FIELD, "luhn", "fails the Luhn check"));
        }
        Ok(Self(digits))
    }

    /// The digits. Named so that every use stands out in review.
    pub fn expose_digits(&self) -> &str {
        &self.0
    }

    pub fn last_four(&self) -> [u8; 4] {
        let bytes = self.0.as_bytes();
        let mut out = [0u8; 4];
        out.copy_from_slice(&bytes[bytes.len() - 4..]);
        out
    }

    pub fn brand(&self) -> Brand {
        Brand::detect(self.0.as_bytes())
    }
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.last_four();
        write!(f, "Pan(****{})", String::from_utf8_lossy(&last))
    }
}

/// The Luhn (mod 10) check over ASCII digits.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d.wrapping_sub(b'0'));
        if v > 9 {
            return false;
        }
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// Card brand. The discriminants are stored in records: never change one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Brand {
    Unknown = 0,
    Visa = 1,
    Mastercard = 2,
    Amex = 3,
    Discover = 4,
    Jcb = 5,
    Diners = 6,
    UnionPay = 7,
    Maestro = 8,
}

impl Brand {
    const ALL: [Brand; 9] = [
        Brand::Unknown,
        Brand::Visa,
        Brand::Mastercard,
        Brand::Amex,
        Brand::Discover,
        Brand::Jcb,
        Brand::Diners,
        Brand::UnionPay,
        Brand::Maestro,
    ];

    /// Brand from the issuer identification number ranges the networks publish.
    fn detect(digits: &[u8]) -> Self {
        let prefix = |n: usize| -> u32 {
            digits
                .iter()
                .take(n)
                .fold(0, |acc, d| acc * 10 + u32::from(d - b'0'))
        };
        let (p1, p2, p3, p4, p6) = (prefix(1), prefix(2), prefix(3), prefix(4), prefix(6));
        match () {
            _ if p1 == 4 => Brand::Visa,
            _ if (51..=55).contains(&p2) || (2221..=2720).contains(&p4) => Brand::Mastercard,
            _ if p2 == 34 || p2 == 37 => Brand::Amex,
            _ if p4 == 6011 || (644..=649).contains(&p3) || p2 == 65 => Brand::Discover,
            _ if (622126..=622925).contains(&p6) => Brand::Discover,
            _ if (3528..=3589).contains(&p4) => Brand::Jcb,
            _ if (300..=305).contains(&p3) || p2 == 36 || p2 == 38 || p2 == 39 => Brand::Diners,
            _ if p2 == 62 => Brand::UnionPay,
            _ if p2 == 50 || (56..=58).contains(&p2) || p2 == 67 || p4 == 6304 => Brand::Maestro,
            _ => Brand::Unknown,
        }
    }

    /// Stable one-byte code for the record format.
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.code() == code)
    }
}

/// A card's expiry: month 1..=12 and a four-digit year.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Expiry {
    pub year: u16,
    pub month: u8,
}

/// The year and month now (UTC), against which expiry is checked.
#[derive(Debug, Clone, Copy)]
pub struct Today {
    pub year: u16,
    pub month: u8,
}

impl Today {
    pub fn now() -> Self {
        let now = time::OffsetDateTime::now_utc();
        Self {
            year: u16::try_from(now.year()).unwrap_or(u16::MAX),
            month: u8::from(now.month()),
        }
    }
}

impl Expiry {
    pub fn parse(month: u32, year: u32, today: Today) -> Result<Self, Violation> {
        let month = u8::try_from(month)
            .ok()
            .filter(|m| (1..=12).contains(m))
            .ok_or(violation("card.exp_month", "range", "must be 1 to 12"))?;
        let year = u16::try_from(year)
            .ok()
            .filter(|y| (1000..=9999).contains(y))
            .ok_or(violation(
                "card.exp_year",
                "format",
                "must be a four-digit year",
            ))?;
        if year > today.year.saturating_add(MAX_YEARS_AHEAD) {
            return Err(violation(
                "card.exp_year",
                "range",
                "must be at most 50 years ahead",
            ));
        }
        // A card is valid through the last day of its expiry month.
        if (year, month) < (today.year, today.month) {
            return Err(violation(
                "card.exp_year",
                "expired",
                "the card has expired",
            ));
        }
        Ok(Self { year, month })
    }
}

/// The card fields, validated. The record stores `pan`, `expiry` and `name`; the CVC
/// never goes to the record (see `cvc.rs`).
#[derive(Debug)]
pub struct CardData {
    pub pan: Pan,
    pub expiry: Expiry,
    pub name: Option<CardholderName>,
    pub cvc: Option<Cvc>,
}

/// A card security code: 3 or 4 digits. Redacted in `Debug`, zeroized on drop.
pub struct Cvc(Zeroizing<String>);

impl Cvc {
    pub fn parse(input: &str) -> Result<Option<Self>, Violation> {
        const FIELD: &str = "card.cvc";
        if input.is_empty() {
            return Ok(None);
        }
        if !input.bytes().all(|b| b.is_ascii_digit()) {
            return Err(violation(FIELD, "digits", "must contain only digits"));
        }
        if !(3..=4).contains(&input.len()) {
            return Err(violation(FIELD, "length", "must have 3 or 4 digits"));
        }
        Ok(Some(Self(Zeroizing::new(input.to_owned()))))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Cvc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cvc([REDACTED])")
    }
}

/// A cardholder name: at most 128 characters, no control characters. Redacted in
/// `Debug`, zeroized on drop.
pub struct CardholderName(Zeroizing<String>);

impl CardholderName {
    pub fn parse(input: &str) -> Result<Option<Self>, Violation> {
        const FIELD: &str = "card.cardholder_name";
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Ok(None);
        }
        if trimmed.chars().count() > MAX_NAME_CHARS {
            return Err(violation(
                FIELD,
                "too_long",
                "must be at most 128 characters",
            ));
        }
        if trimmed.chars().any(char::is_control) {
            return Err(violation(
                FIELD,
                "characters",
                "must not contain control characters",
            ));
        }
        Ok(Some(Self(Zeroizing::new(trimmed.to_owned()))))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CardholderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CardholderName([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TODAY: Today = Today {
        year: 2026,
        month: 11,
    };

    #[test]
    fn published_test_numbers_are_valid_with_their_brand() {
        for (number, brand) in [
            ("4242424242424242", Brand::Visa),
            ("4242 4242 4242 4242", Brand::Visa),
            ("5555-5555-5555-4444", Brand::Mastercard),
            ("2223003122003222", Brand::Mastercard),
            ("378282246310005", Brand::Amex),
            ("6011111111111117", Brand::Discover),
            ("3566002020360505", Brand::Jcb),
            ("36227206271667", Brand::Diners),
            ("6200000000000005", Brand::UnionPay),
        ] {
            let pan = Pan::parse(number).unwrap();
            assert_eq!(pan.brand(), brand, "{number}");
        }
    }

    #[test]
    fn number_rules() {
        let rule = |n: &str| Pan::parse(n).unwrap_err().rule;
        assert_eq!(rule(""), "required");
        assert_eq!(rule("4242x424242424242"), "digits");
        assert_eq!(rule("42424242424"), "length");
        assert_eq!(rule("42424242424242424242"), "length");
        assert_eq!(rule("4242424242424241"), "luhn");
        assert_eq!(rule("４２４２４２４２４２４２４２４２"), "digits"); // full-width digits
    }

    /// Control: PCI-3.4.1 (docs/compliance.md).
    /// Attack: print a card number through `{:?}` in a log or error; only the last four
    /// show.
    #[test]
    fn debug_shows_last_four_only() {
        let pan = Pan::parse("4242424242424242").unwrap();
        assert_eq!(format!("{pan:?}"), "Pan(****4242)");
        let card = CardData {
            pan,
            expiry: Expiry {
                year: 2030,
                month: 1,
            },
            name: CardholderName::parse("Ada Lovelace").unwrap(),
            cvc: Cvc::parse("737").unwrap(),
        };
        let printed = format!("{card:?}");
        assert!(!printed.contains("737"), "{printed}");
        assert!(
            !printed.contains("424242424242") && !printed.contains("Ada"),
            "{printed}"
        );
    }

    #[test]
    fn expiry_rules() {
        assert!(Expiry::parse(11, 2026, TODAY).is_ok());
        assert_eq!(Expiry::parse(10, 2026, TODAY).unwrap_err().rule, "expired");
        assert_eq!(
            Expiry::parse(0, 2030, TODAY).unwrap_err().field,
            "card.exp_month"
        );
        assert_eq!(Expiry::parse(13, 2030, TODAY).unwrap_err().rule, "range");
        assert_eq!(Expiry::parse(1, 30, TODAY).unwrap_err().rule, "format");
        assert_eq!(Expiry::parse(1, 2090, TODAY).unwrap_err().rule, "range");
        assert_eq!(
            Expiry::parse(1, u32::MAX, TODAY).unwrap_err().rule,
            "format"
        );
    }

    #[test]
    fn cvc_rules() {
        assert!(Cvc::parse("").unwrap().is_none());
        assert_eq!(Cvc::parse("1234").unwrap().unwrap().expose(), "1234");
        assert_eq!(Cvc::parse("12").unwrap_err().rule, "length");
        assert_eq!(Cvc::parse("12a").unwrap_err().rule, "digits");
    }

    #[test]
    fn name_rules() {
        assert!(CardholderName::parse("  ").unwrap().is_none());
        assert_eq!(
            CardholderName::parse(&"é".repeat(128))
                .unwrap()
                .unwrap()
                .expose()
                .chars()
                .count(),
            128
        );
        assert_eq!(
            CardholderName::parse(&"a".repeat(129)).unwrap_err().rule,
            "too_long"
        );
        assert_eq!(
            CardholderName::parse("a\u{0}b").unwrap_err().rule,
            "characters"
        );
    }

    #[test]
    fn luhn_matches_a_generated_number() {
        // A synthetic number: 15 digits plus the computed check digit.
        let body = b"400000000000123";
        let check = (0..=9u8).find(|d| {
            let mut n = body.to_vec();
            n.push(b'0' + d);
            luhn_valid(&n)
        });
        assert!(check.is_some());
        assert!(!luhn_valid(b"4000000000001230a"));
    }
}
