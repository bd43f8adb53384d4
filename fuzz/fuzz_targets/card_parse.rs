//! Card fields as a caller types them: parsing never panics, and whatever parses is
//! what the rules say.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault_server::card::{CardholderName, Cvc, Expiry, Pan, Today, luhn_valid};

fuzz_target!(|data: (&str, &str, &str, u32, u32)| {
    let (number, name, cvc, month, year) = data;
    if let Ok(pan) = Pan::parse(number) {
        let digits = pan.expose_digits();
        assert!((12..=19).contains(&digits.len()));
        assert!(luhn_valid(digits.as_bytes()));
        let _ = pan.brand();
        let _ = pan.last_four();
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
