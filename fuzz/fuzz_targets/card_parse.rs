//! Card fields and tokens as a caller types them: parsing never panics, and whatever
//! parses is what the rules say (a token is never a Luhn-valid digit string).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault_server::card::{CardholderName, Cvc, Expiry, Pan, Today, luhn_valid};
use vault_server::token::{Format, Token};

fuzz_target!(|data: (&str, &str, &str, u32, u32)| {
    let (number, name, cvc, month, year) = data;
    if let Ok(pan) = Pan::parse(number) {
        let digits = pan.expose_digits();
        assert!((12..=19).contains(&digits.len()));
        assert!(luhn_valid(digits.as_bytes()));
        let _ = pan.brand();
        let _ = pan.last_four();
    }
    match Token::parse(number) {
        Ok(token) => match token.format() {
            Format::Opaque => assert_eq!(token.as_str().len(), 26),
            Format::Card => {
                let digits = token.as_str().as_bytes();
                assert!((12..=19).contains(&digits.len()));
                assert!(digits.iter().all(u8::is_ascii_digit));
                assert!(!luhn_valid(digits));
            }
        },
        // A violation is static text (`&'static str`): it cannot hold the input.
        Err(violation) => assert_eq!(violation.field, "token"),
    }
    if let Ok(pan) = Pan::parse(number) {
        let card = Token::generate_card(&pan, number.len() % 2 == 0).expect("randomness");
        assert!(!luhn_valid(card.as_str().as_bytes()));
        assert!(card.as_str() != pan.expose_digits());
    }
    if let Ok(Some(name)) = CardholderName::parse(name) {
        assert!(name.expose().chars().count() <= 128);
    }
    if let Ok(Some(cvc)) = Cvc::parse(cvc) {
        assert!((3..=4).contains(&cvc.expose().len()));
    }
    if let Ok(expiry) = Expiry::parse(
        month,
        year,
        Today {
            year: 2026,
            month: 11,
        },
    ) {
        assert!((1..=12).contains(&expiry.month));
    }
});
