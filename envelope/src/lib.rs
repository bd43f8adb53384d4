//! The cryptographic primitives shared by the key service and the vault.
//!
//! One implementation per primitive (STYLE.md rule 12): AES-256-GCM from `aes-gcm`,
//! randomness and HMAC-SHA256 from `ring`, HPKE (sealed cards, [`sealed`]) from `hpke`. Key bytes live only in [`SecretKey`], which
//! zeroizes on drop and never prints its bytes.
//!
//! Must never depend on storage, networking or gRPC crates.

mod dhkem;
pub mod sealed;

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

/// Length in bytes of every key this crate handles (AES-256 and HMAC-SHA256 keys).
pub const KEY_LEN: usize = 32;
/// AES-GCM nonce length: 96 bits, random per encryption (NIST SP 800-38D 8.2.2).
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The ciphertext, nonce, key or associated data do not match: the data was
    /// tampered with, moved, or sealed under another key.
    #[error("integrity check failed")]
    Integrity,
    #[error("the system random number generator failed")]
    Random,
    #[error("a key must be {KEY_LEN} bytes")]
    KeyLength,
    #[error("the plaintext is longer than the format allows")]
    TooLong,
}

/// A 256-bit secret key. Zeroized on drop; `Debug` prints `[REDACTED]`; not `Clone`
/// (share it behind an `Arc`). The bytes are reachable only through
/// [`SecretKey::expose_secret`].
pub struct SecretKey(Box<[u8; KEY_LEN]>);

impl SecretKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, Error> {
        let mut key = Box::new([0u8; KEY_LEN]);
        fill_random(key.as_mut_slice())?;
        Ok(Self(key))
    }

    /// Takes key bytes from a buffer, which the caller should zeroize (or which is
    /// already `Zeroizing`).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        let array: [u8; KEY_LEN] = bytes.try_into().map_err(|_| Error::KeyLength)?;
        let key = Self(Box::new(array));
        // `array` is a copy on the stack; clear it.
        let mut array = array;
        array.zeroize();
        Ok(key)
    }

    /// The raw key bytes. Named so that every use stands out in review.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey([REDACTED])")
    }
}

fn rng() -> &'static SystemRandom {
    static RNG: std::sync::OnceLock<SystemRandom> = std::sync::OnceLock::new();
    RNG.get_or_init(SystemRandom::new)
}

/// Fills `out` from the operating system's CSPRNG, one system call each time: for key
/// material.
pub fn fill_random(out: &mut [u8]) -> Result<(), Error> {
    rng().fill(out).map_err(|_| Error::Random)
}

/// Bytes of operating-system randomness each thread draws at once for [`fill_unique`].
const POOL_LEN: usize = 4096;

/// A thread's block of operating-system randomness, handed out front to back; each
/// byte is erased as it is handed out, so the block never holds a value given before.
struct Pool {
    bytes: Box<[u8; POOL_LEN]>,
    next: usize,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

thread_local! {
    static POOL: std::cell::RefCell<Pool> = std::cell::RefCell::new(Pool {
        bytes: Box::new([0u8; POOL_LEN]),
        next: POOL_LEN,
    });
}

/// Fills `out` with random bytes for values that must be unique and unguessable but
/// are not keys: tokens, nonces, request ids. They come from the operating system's
/// CSPRNG like [`fill_random`]'s, drawn 4 KiB per thread at a time (one system call per
/// block instead of one per value; a tokenization needs three). The process must not
/// fork (a child would repeat its parent's block); none of ours does.
pub fn fill_unique(out: &mut [u8]) -> Result<(), Error> {
    if out.len() > POOL_LEN / 4 {
        return fill_random(out);
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if POOL_LEN - pool.next < out.len() {
            fill_random(pool.bytes.as_mut_slice())?;
            pool.next = 0;
        }
        let range = pool.next..pool.next + out.len();
        out.copy_from_slice(&pool.bytes[range.clone()]);
        pool.bytes[range].zeroize();
        pool.next += out.len();
        Ok(())
    })
}

/// Output of [`seal`]: a random nonce and the ciphertext with its tag appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub nonce: [u8; NONCE_LEN],
    pub ciphertext: Vec<u8>,
}

/// Encrypts `plaintext` under `key` with AES-256-GCM and a fresh random nonce,
/// authenticating `aad` alongside it.
pub fn seal(key: &SecretKey, aad: &[u8], plaintext: &[u8]) -> Result<Sealed, Error> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_unique(&mut nonce)?;
    let ciphertext = seal_with_nonce(key, &nonce, aad, plaintext)?;
    Ok(Sealed { nonce, ciphertext })
}

/// Encrypts with a nonce the caller drew from [`fill_unique`], for formats that must
/// authenticate the nonce as part of the associated data. Never reuse a nonce.
pub fn seal_with_nonce(
    key: &SecretKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let cipher = Aes256Gcm::new(key.expose_secret().into());
    cipher
        .encrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        // aes-gcm fails only for inputs beyond GCM's length limit (about 64 GiB).
        .map_err(|_| Error::Integrity)
}

/// Decrypts and authenticates. Any change to the key, nonce, associated data or
/// ciphertext gives [`Error::Integrity`]. The plaintext zeroizes when dropped.
pub fn open(
    key: &SecretKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let cipher = Aes256Gcm::new(key.expose_secret().into());
    cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| Error::Integrity)
}

/// HMAC-SHA256 of `parts` (concatenated, each prefixed with its length so that no two
/// different part lists give the same input) under `key`.
pub fn hmac_sha256(key: &SecretKey, parts: &[&[u8]]) -> [u8; 32] {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.expose_secret());
    let mut context = ring::hmac::Context::with_key(&key);
    for part in parts {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    }
    let tag = context.sign();
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> SecretKey {
        SecretKey::generate().unwrap()
    }

    /// Values drawn across many refills of the pool, of odd sizes that straddle its
    /// end, and a request too large for it: all different, none left zero.
    ///
    /// Control: NIST-800-38D-8.2 (docs/compliance.md).
    /// Attack: a nonce repeats when the random pool refills; none does.
    #[test]
    fn unique_values_do_not_repeat_across_pool_refills() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..20_000 {
            let mut value = vec![0u8; 12 + n % 9];
            fill_unique(&mut value).unwrap();
            assert!(value.iter().any(|b| *b != 0));
            assert!(seen.insert(value), "a value repeated");
        }
        let mut large = vec![0u8; POOL_LEN];
        fill_unique(&mut large).unwrap();
        assert!(large.iter().filter(|b| **b == 0).count() < 64);
    }

    /// Control: PCI-3.6.1 (docs/compliance.md).
    /// Attack: get key bytes into a log through a `{:?}`; the key type prints none.
    #[test]
    fn debug_never_prints_key_bytes() {
        let key = SecretKey::from_slice(&[0x41; KEY_LEN]).unwrap();
        let printed = format!("{key:?} {key:#?}");
        assert_eq!(printed, "SecretKey([REDACTED]) SecretKey([REDACTED])");
    }

    /// Key material is exactly 256 bits.
    /// Attack: use a short or truncated key as an AES-256 key; it is refused.
    #[test]
    fn wrong_key_length_is_refused() {
        assert!(matches!(
            SecretKey::from_slice(&[0; 16]),
            Err(Error::KeyLength)
        ));
    }

    /// Control: NIST-800-38D-8.2 (docs/compliance.md).
    /// Attack: make two encryptions share a nonce under one key (which breaks GCM); nonces
    /// never repeat.
    #[test]
    fn nonces_are_fresh() {
        let key = key();
        let a = seal(&key, b"aad", b"x").unwrap();
        let b = seal(&key, b"aad", b"x").unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn another_key_fails() {
        let sealed = seal(&key(), b"aad", b"secret").unwrap();
        let err = open(&key(), &sealed.nonce, b"aad", &sealed.ciphertext).unwrap_err();
        assert!(matches!(err, Error::Integrity));
    }

    #[test]
    fn hmac_parts_are_unambiguous() {
        let key = key();
        assert_ne!(
            hmac_sha256(&key, &[b"ab", b"c"]),
            hmac_sha256(&key, &[b"a", b"bc"])
        );
        assert_eq!(
            hmac_sha256(&key, &[b"ab", b"c"]),
            hmac_sha256(&key, &[b"ab", b"c"])
        );
    }

    proptest! {
        #[test]
        fn open_inverts_seal(plaintext in proptest::collection::vec(any::<u8>(), 0..512),
                             aad in proptest::collection::vec(any::<u8>(), 0..64)) {
            let key = key();
            let sealed = seal(&key, &aad, &plaintext).unwrap();
            let opened = open(&key, &sealed.nonce, &aad, &sealed.ciphertext).unwrap();
            prop_assert_eq!(opened.as_slice(), plaintext.as_slice());
        }

        /// Control: PCI-3.5.1 (docs/compliance.md).
        /// Attack: flip any bit of a sealed record (ciphertext, nonce or tag) to make it
        /// decrypt as something else; it fails to open.
        #[test]
        fn any_bit_flip_fails(plaintext in proptest::collection::vec(any::<u8>(), 1..256),
                              bit in any::<usize>(), target in 0usize..3) {
            let key = key();
            let aad = b"token|tenant|1".to_vec();
            let sealed = seal(&key, &aad, &plaintext).unwrap();
            let (mut nonce, mut ciphertext, mut aad) = (sealed.nonce, sealed.ciphertext, aad);
            match target {
                0 => { let i = bit % (nonce.len() * 8); nonce[i / 8] ^= 1 << (i % 8); }
                1 => { let i = bit % (ciphertext.len() * 8); ciphertext[i / 8] ^= 1 << (i % 8); }
                _ => { let i = bit % (aad.len() * 8); aad[i / 8] ^= 1 << (i % 8); }
            }
            prop_assert!(matches!(open(&key, &nonce, &aad, &ciphertext), Err(Error::Integrity)));
        }
    }
}
