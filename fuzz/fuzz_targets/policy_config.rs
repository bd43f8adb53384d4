//! Policy and config files: parsing and validation never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = vault_server::policy::Policy::parse(text);
    if let Ok(settings) = toml::from_str::<vault_server::Settings>(text) {
        let _ = settings.validate();
    }
});
