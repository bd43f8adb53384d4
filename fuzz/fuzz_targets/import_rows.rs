//! An import file's plaintext (another party's export, after decryption): reading
//! rows never panics, never reads a line past the limit, and whatever a row makes is
//! a valid card or a violation naming a field (never the value). Zipped too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault_server::import::rows::{self, Fields, FileFormat};

fuzz_target!(|data: (bool, &[u8])| {
    let (json, bytes) = data;
    let (format, fields) = match json {
        true => (FileFormat::JsonLines, Fields::stripe()),
        false => (
            FileFormat::Csv,
            Fields {
                id: "id".into(),
                number: "number".into(),
                exp_month: "exp_month".into(),
                exp_year: "exp_year".into(),
                name: "name".into(),
            },
        ),
    };
    let Ok(mut rows) = rows::open(bytes, format, fields) else {
        return;
    };
    let mut last = 0;
    while let Ok(Some(row)) = rows.next_row() {
        assert!(row.row > last);
        last = row.row;
        assert!(row.source_id.chars().count() <= 128);
        if let Err(violation) = row.card {
            assert!(violation.field.starts_with("card."));
        }
    }
});
