//! Forward templates: parsing and rendering never panic; JSON rendering of a name keeps
//! the name inside its string.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault_server::card::{CardData, CardholderName, Expiry, Pan};
use vault_server::forward::template::{Encoding, Template};

fuzz_target!(|data: (&str, &str)| {
    let (template, name) = data;
    let Ok(template) = Template::parse(template) else {
        return;
    };
    let Ok(name) = CardholderName::parse(name) else {
        return;
    };
    let card = CardData {
        pan: Pan::parse("4242424242424242").expect("test number"),
        expiry: Expiry {
            year: 2030,
            month: 12,
        },
        name,
        cvc: None,
    };
    for encoding in [Encoding::Json, Encoding::Form, Encoding::Raw] {
        let _ = template.render(&card, Some("123"), encoding);
    }
    // A lone name placeholder inside a JSON string stays one JSON string.
    let json = Template::parse("\"{{card.name}}\"").expect("valid template");
    let rendered = json.render(&card, None, Encoding::Json);
    let inner = &rendered[1..rendered.len() - 1];
    let mut escaped = false;
    for c in inner.chars() {
        assert!(escaped || c != '"', "an unescaped quote in {rendered:?}");
        escaped = !escaped && c == '\\';
    }
});
