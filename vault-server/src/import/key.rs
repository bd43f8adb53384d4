//! The import key: the OpenPGP key another vault or a processor encrypts a card export
//! to (issue 21). The keyservice keeps only a 32-byte seed per version (purpose
//! `import`, rotated like the others); every vault derives the same key from it, so
//! the secret key exists nowhere but in the keyservice's sealed keyring and the vaults'
//! memory, and no keyring format change was needed.
//!
//! The key is a v4 key that Debian 12's GnuPG 2.2 can encrypt to: an EdDSA (legacy,
//! algorithm 22) primary key that certifies, and an ECDH Curve25519 (algorithm 18)
//! subkey that encrypts. Its creation time is fixed ([`CREATED_AT_UNIX_SECS`]): a v4
//! fingerprint covers it, and the seed is all a vault is given.
//!
//! When changing this file or upgrading `pgp` or `rand_chacha`: the derivation must give
//! the same key for the same seed, or files already encrypted to a version can no longer
//! be opened. `derivation_is_pinned` below fails if it does not.

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

/// Separates this use of the seed from any other.
const LABEL: &[u8] = b"tokenvault import key: OpenPGP v4 EdDSA + ECDH Curve25519, v1";

/// One version of the import key. `Debug` shows the version and fingerprint only.
pub struct ImportKey {
    version: u32,
    secret: SignedSecretKey,
    public: SignedPublicKey,
    fingerprint: String,
}

impl std::fmt::Debug for ImportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportKey")
            .field("version", &self.version)
            .field("fingerprint", &self.fingerprint)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the import key could not be derived from its seed")]
pub struct DeriveError;

impl ImportKey {
    /// The key of `version`, derived from its seed.
    pub fn derive(version: u32, seed: &SecretKey) -> Result<Self, DeriveError> {
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, seed.expose_secret()),
            LABEL,
        );
        let mut rng_seed = zeroize::Zeroizing::new([0u8; 32]);
        rng_seed.copy_from_slice(tag.as_ref());
        let mut rng = ChaCha20Rng::from_seed(*rng_seed);
        let created = Timestamp::from_secs(CREATED_AT_UNIX_SECS);
        let subkey = SubkeyParamsBuilder::default()
            .key_type(KeyType::ECDH(ECCCurve::Curve25519Legacy))
            .can_encrypt(EncryptionCaps::All)
            .created_at(created)
            .passphrase(None)
            .build()
            .map_err(|_| DeriveError)?;
        let params = SecretKeyParamsBuilder::default()
            .key_type(KeyType::Ed25519Legacy)
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
        Ok(Self {
            version,
            secret,
            public,
            fingerprint,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The primary key's v4 fingerprint, 40 upper-case hex digits (as `gpg` shows it).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The public key, ASCII-armored, for the sending party.
    pub fn public_armored(&self) -> Result<String, DeriveError> {
        self.public
            .to_armored_string(None.into())
            .map_err(|_| DeriveError)
    }

    /// The secret key, for decrypting an import file. Never leaves this process.
    pub(crate) fn expose_secret(&self) -> &SignedSecretKey {
        &self.secret
    }
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
        assert_eq!(key.fingerprint(), PINNED_FINGERPRINT);
        let again = ImportKey::derive(1, &seed(7)).unwrap();
        assert_eq!(again.fingerprint(), key.fingerprint());
        assert_ne!(
            ImportKey::derive(1, &seed(8)).unwrap().fingerprint(),
            key.fingerprint()
        );
    }

    const PINNED_FINGERPRINT: &str = "5E0E1CB7495AE8AE033F5921AFA527FB06F44C49";

    #[test]
    fn public_key_is_v4_eddsa_with_a_cv25519_subkey_and_debug_is_redacted() {
        let key = ImportKey::derive(3, &seed(1)).unwrap();
        let armored = key.public_armored().unwrap();
        assert!(armored.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"));
        assert!(!armored.contains("PRIVATE"));
        assert_eq!(key.public.public_subkeys.len(), 1);
        let debug = format!("{key:?}");
        assert!(debug.contains(key.fingerprint()) && debug.contains("[REDACTED]"));
        assert_eq!(key.fingerprint().len(), 40);
    }
}
