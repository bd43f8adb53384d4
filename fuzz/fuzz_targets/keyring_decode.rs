//! Keyring files. A fuzzer cannot forge the AES-GCM seal, so the target seals each
//! input itself under a fixed root key: every input reaches the plaintext parser, which
//! must refuse anything malformed without panicking. Unsealed input never opens.
#![no_main]

use std::sync::OnceLock;

use keyservice::keyring::{Keyring, RootKey};
use libfuzzer_sys::fuzz_target;

const ROOT_HEX: &str = "0909090909090909090909090909090909090909090909090909090909090909";

fn root() -> &'static RootKey {
    static ROOT: OnceLock<RootKey> = OnceLock::new();
    ROOT.get_or_init(|| {
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join(format!("keyring-fuzz-{}.key", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .expect("root key file");
        std::io::Write::write_all(&mut file, ROOT_HEX.as_bytes()).expect("root key written");
        let root = RootKey::from_file(&path).expect("root key");
        let _ = std::fs::remove_file(&path);
        root
    })
}

fuzz_target!(|data: &[u8]| {
    // Random bytes are never a keyring.
    assert!(Keyring::open(data, root()).is_err());
    // The first byte picks the format (1 or 2); the rest is the plaintext.
    let Some((&format, plain)) = data.split_first() else {
        return;
    };
    let format = 1 + format % 2;
    let header = [b'T', b'V', b'K', b'R', format];
    let key = envelope::SecretKey::from_slice(&[9; 32]).expect("32 bytes");
    let sealed = envelope::seal(&key, &header, plain).expect("sealed");
    let mut file = header.to_vec();
    file.extend_from_slice(&sealed.nonce);
    file.extend_from_slice(&sealed.ciphertext);
    let _ = Keyring::open(&file, root());
});
