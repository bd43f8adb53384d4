//! The import keys: the OpenPGP keys another vault or a processor encrypts a card
//! export to (issue 21). The keyservice keeps only a 32-byte seed per version (purposes
//! `import` and `import-rsa`, rotated like the others); every vault derives the same
//! key from it, so the secret key exists nowhere but in the keyservice's sealed keyring
//! and the vaults' memory, and no keyring format change was needed.
//!
//! Both are v4 keys that Debian 12's GnuPG 2.2 can encrypt to:
//! - [`Algorithm::Curve25519`] (purpose `import`, preferred): an EdDSA (legacy,
//!   algorithm 22) primary key that certifies and an ECDH Curve25519 (algorithm 18)
//!   subkey that encrypts. Derived in about a millisecond.
//! - [`Algorithm::Rsa4096`] (purpose `import-rsa`): an RSA 4096 primary key and an RSA
//!   4096 encryption subkey, for senders whose tools offer nothing else. Deriving it
//!   searches for four 2048-bit primes: seconds of CPU, so it is done when the key is
//!   first needed (its public key asked for, or a file no Curve25519 key opens) and
//!   kept for the life of the process.
//!
//! The creation time is fixed ([`CREATED_AT_UNIX_SECS`]): a v4 fingerprint covers it,
//! and the seed is all a vault is given.
//!
//! When changing this file or upgrading `pgp`, `rsa` or `rand_chacha`: the derivation
//! must give the same key for the same seed, or files already encrypted to a version
//! can no longer be opened. `derivation_is_pinned` below fails if it does not.

use std::sync::{Arc, Mutex, OnceLock, Weak};

use envelope::SecretKey;
use pgp::composed::{
    EncryptionCaps, KeyType, SecretKeyParamsBuilder, SignedPublicKey, SignedSecretKey,
    SubkeyParamsBuilder,
};
use pgp::crypto::ecc_curve::ECCCurve;
use pgp::crypto::hash::HashAlgorithm;
use pgp::crypto::sym::SymmetricKeyAlgorithm;
use pgp::types::{CompressionAlgorithm, KeyDetails as _, Timestamp};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;
use ring::hmac;
use smallvec::smallvec;

/// 2026-01-01T00:00:00Z: the creation time of every import key (see the module doc).
pub const CREATED_AT_UNIX_SECS: u32 = 1_767_225_600;

/// The key types an import key can have; one keyservice purpose each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Curve25519,
    Rsa4096,
}

impl Algorithm {
    /// Separates each use of a seed from any other.
    fn label(self) -> &'static [u8] {
        match self {
            Algorithm::Curve25519 => {
                b"tokenvault import key: OpenPGP v4 EdDSA + ECDH Curve25519, v1"
            }
            Algorithm::Rsa4096 => b"tokenvault import key: OpenPGP v4 RSA 4096 + RSA 4096, v1",
        }
    }

    fn key_types(self) -> (KeyType, KeyType) {
        match self {
            Algorithm::Curve25519 => (
                KeyType::Ed25519Legacy,
                KeyType::ECDH(ECCCurve::Curve25519Legacy),
            ),
            Algorithm::Rsa4096 => (KeyType::Rsa(4096), KeyType::Rsa(4096)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Curve25519 => "curve25519",
            Algorithm::Rsa4096 => "rsa4096",
        }
    }
}

/// One version of an import key. `Debug` shows the version, the algorithm and, once
/// derived, the fingerprint.
pub struct ImportKey {
    version: u32,
    algorithm: Algorithm,
    seed: SecretKey,
    derived: OnceLock<Result<Derived, DeriveError>>,
}

struct Derived {
    secret: SignedSecretKey,
    public: SignedPublicKey,
    fingerprint: String,
}

impl std::fmt::Debug for ImportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fingerprint = match self.derived.get() {
            Some(Ok(derived)) => derived.fingerprint.as_str(),
            Some(Err(_)) => "(not derivable)",
            None => "(not derived yet)",
        };
        f.debug_struct("ImportKey")
            .field("version", &self.version)
            .field("algorithm", &self.algorithm)
            .field("fingerprint", &fingerprint)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the import key could not be derived from its seed")]
pub struct DeriveError;

impl ImportKey {
    /// The Curve25519 key of `version`, derived from its seed now.
    pub fn derive(version: u32, seed: &SecretKey) -> Result<Self, DeriveError> {
        let seed = SecretKey::from_slice(seed.expose_secret()).map_err(|_| DeriveError)?;
        let key = Self::new(version, Algorithm::Curve25519, seed);
        key.derived()?;
        Ok(key)
    }

    /// The key of `version` and `algorithm`. A Curve25519 key is derived now (a
    /// failure shows at once); an RSA one when first used (see the module doc).
    pub fn new(version: u32, algorithm: Algorithm, seed: SecretKey) -> Self {
        let key = Self {
            version,
            algorithm,
            seed,
            derived: OnceLock::new(),
        };
        if algorithm == Algorithm::Curve25519 {
            let _ = key.derived();
        }
        key
    }

    /// The key of `version`, `algorithm` and `seed`: the one this process made already
    /// if it is still in use (a key set fetched again keeps an RSA key's derivation,
    /// which costs seconds), else a new one ([`ImportKey::new`]). Nothing keeps a key
    /// alive once no key set holds it: a destroyed version leaves memory.
    pub fn shared(
        version: u32,
        algorithm: Algorithm,
        seed: SecretKey,
    ) -> Result<Arc<Self>, DeriveError> {
        static MADE: Mutex<Vec<Weak<ImportKey>>> = Mutex::new(Vec::new());
        let mut made = MADE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        made.retain(|key| key.strong_count() > 0);
        let same = made.iter().filter_map(Weak::upgrade).find(|key| {
            key.version == version
                && key.algorithm == algorithm
                && same_bytes(key.seed.expose_secret(), seed.expose_secret())
        });
        if let Some(same) = same {
            return Ok(same);
        }
        let key = Arc::new(Self::new(version, algorithm, seed));
        if algorithm == Algorithm::Curve25519 {
            key.derived()?;
        }
        made.push(Arc::downgrade(&key));
        Ok(key)
    }

    /// The key pair, derived on first use. Seconds of CPU for an RSA key: call it
    /// off the async runtime's threads.
    fn derived(&self) -> Result<&Derived, DeriveError> {
        self.derived
            .get_or_init(|| derive(self.version, self.algorithm, &self.seed))
            .as_ref()
            .map_err(|e| *e)
    }

    /// Whether using the key now costs no derivation.
    pub fn is_derived(&self) -> bool {
        self.derived.get().is_some()
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The primary key's v4 fingerprint, 40 upper-case hex digits (as `gpg` shows it).
    pub fn fingerprint(&self) -> Result<&str, DeriveError> {
        Ok(&self.derived()?.fingerprint)
    }

    /// The public key, ASCII-armored, for the sending party.
    pub fn public_armored(&self) -> Result<String, DeriveError> {
        self.derived()?
            .public
            .to_armored_string(None.into())
            .map_err(|_| DeriveError)
    }

    /// The secret key, for decrypting an import file. Never leaves this process.
    pub(crate) fn expose_secret(&self) -> Result<&SignedSecretKey, DeriveError> {
        Ok(&self.derived()?.secret)
    }
}

/// Equality in time independent of where the bytes differ.
fn same_bytes(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The key pair `seed` gives: a ChaCha20 stream keyed by an HMAC of the seed feeds
/// rPGP's key generation, so the same seed always gives the same key.
fn derive(version: u32, algorithm: Algorithm, seed: &SecretKey) -> Result<Derived, DeriveError> {
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, seed.expose_secret()),
        algorithm.label(),
    );
    let mut rng_seed = zeroize::Zeroizing::new([0u8; 32]);
    rng_seed.copy_from_slice(tag.as_ref());
    let mut rng = ChaCha20Rng::from_seed(*rng_seed);
    let created = Timestamp::from_secs(CREATED_AT_UNIX_SECS);
    let (primary, encryption) = algorithm.key_types();
    let subkey = SubkeyParamsBuilder::default()
        .key_type(encryption)
        .can_encrypt(EncryptionCaps::All)
        .created_at(created)
        .passphrase(None)
        .build()
        .map_err(|_| DeriveError)?;
    let params = SecretKeyParamsBuilder::default()
        .key_type(primary)
        .can_certify(true)
        .created_at(created)
        .primary_user_id(format!("tokenvault import key (version {version})"))
        .passphrase(None)
        .preferred_symmetric_algorithms(smallvec![
            SymmetricKeyAlgorithm::AES256,
            SymmetricKeyAlgorithm::AES128,
        ])
        .preferred_hash_algorithms(smallvec![HashAlgorithm::Sha256, HashAlgorithm::Sha512])
        .preferred_compression_algorithms(smallvec![
            CompressionAlgorithm::ZLIB,
            CompressionAlgorithm::ZIP,
        ])
        .subkey(subkey)
        .build()
        .map_err(|_| DeriveError)?;
    let secret = params.generate(&mut rng).map_err(|_| DeriveError)?;
    let public = secret.to_public_key();
    let fingerprint = hex::encode_upper(public.fingerprint().as_bytes());
    Ok(Derived {
        secret,
        public,
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(byte: u8) -> SecretKey {
        SecretKey::from_slice(&[byte; 32]).unwrap()
    }

    #[test]
    fn derivation_is_pinned() {
        // If this fails after a dependency upgrade, the upgrade changed the key a seed
        // gives: files encrypted to existing versions would no longer open.
        let key = ImportKey::derive(1, &seed(7)).unwrap();
        assert_eq!(key.fingerprint().unwrap(), PINNED_FINGERPRINT);
        let again = ImportKey::derive(1, &seed(7)).unwrap();
        assert_eq!(again.fingerprint().unwrap(), key.fingerprint().unwrap());
        assert_ne!(
            ImportKey::derive(1, &seed(8))
                .unwrap()
                .fingerprint()
                .unwrap(),
            key.fingerprint().unwrap()
        );
    }

    const PINNED_FINGERPRINT: &str = "5E0E1CB7495AE8AE033F5921AFA527FB06F44C49";

    #[test]
    fn public_key_is_v4_eddsa_with_a_cv25519_subkey_and_debug_is_redacted() {
        let key = ImportKey::derive(3, &seed(1)).unwrap();
        let armored = key.public_armored().unwrap();
        assert!(armored.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"));
        assert!(!armored.contains("PRIVATE"));
        assert_eq!(key.derived().unwrap().public.public_subkeys.len(), 1);
        let debug = format!("{key:?}");
        assert!(debug.contains(key.fingerprint().unwrap()) && debug.contains("[REDACTED]"));
        assert_eq!(key.fingerprint().unwrap().len(), 40);
    }

    /// Control: the RSA 4096 import key (issue 21) is derived from its seed alone and
    /// the same in every vault.
    /// Attack: a dependency upgrade silently changes the key a seed gives, so files
    /// already encrypted to an RSA version no longer open; or the RSA and Curve25519
    /// keys of one seed are related.
    #[test]
    fn rsa_key_is_derived_when_first_used_and_pinned() {
        let key = ImportKey::new(2, Algorithm::Rsa4096, seed(7));
        assert!(!key.is_derived(), "derived before it was used");
        let debug = format!("{key:?}");
        assert!(debug.contains("not derived yet") && debug.contains("[REDACTED]"));
        assert_eq!(key.fingerprint().unwrap(), PINNED_RSA_FINGERPRINT);
        assert!(key.is_derived());
        let derived = key.derived().unwrap();
        assert_eq!(derived.public.public_subkeys.len(), 1);
        assert!(format!("{:?}", derived.public.primary_key.algorithm()).contains("RSA"));
        assert!(
            key.public_armored()
                .unwrap()
                .starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----")
        );
        // The same seed as a Curve25519 key gives an unrelated key.
        assert_ne!(
            ImportKey::derive(2, &seed(7))
                .unwrap()
                .fingerprint()
                .unwrap(),
            PINNED_RSA_FINGERPRINT
        );
    }

    const PINNED_RSA_FINGERPRINT: &str = "D842A64836CD5DD7E9620F55844C003A3AE31DAC";

    #[test]
    fn a_key_set_fetched_again_keeps_the_derived_key() {
        let first = ImportKey::shared(4, Algorithm::Rsa4096, seed(9)).unwrap();
        let again = ImportKey::shared(4, Algorithm::Rsa4096, seed(9)).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let other = ImportKey::shared(4, Algorithm::Rsa4096, seed(10)).unwrap();
        assert!(!Arc::ptr_eq(&first, &other), "another seed is another key");
        let curve = ImportKey::shared(4, Algorithm::Curve25519, seed(9)).unwrap();
        assert!(curve.is_derived(), "a Curve25519 key is derived at once");
        drop((first, again));
        let after = ImportKey::shared(4, Algorithm::Rsa4096, seed(9)).unwrap();
        assert!(!after.is_derived(), "a key no key set holds is not kept");
    }
}
