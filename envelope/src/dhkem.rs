//! DHKEM(X25519, HKDF-SHA256) (RFC 9180, 4.1) for the side that opens, with the
//! recipient's public key kept beside its private key, and X25519 from AWS-LC.
//!
//! Why: the `hpke` crate's own X25519 KEM recomputes the recipient's public key (a
//! scalar multiplication by the base point) in every `decap`, because it keeps only the
//! private key; that was a fifth of a sealed card's CPU in the vault. And its X25519
//! (curve25519-dalek's serial Montgomery ladder) was, after that, 30-40% of a sealed
//! card's CPU: 55-60 µs per open on our 2-core VMs, where AWS-LC's (s2n-bignum's
//! verified x86-64 and AArch64 code, through `aws-lc-rs`) takes 25-26 µs in the same
//! sitting (docs/performance.md, "Sealed intake"). [`Receiver`] is the same KEM (same
//! id, same bytes on the wire, the crate's own key types and key schedule), with
//! decapsulation written out from RFC 9180's definition:
//!
//! ```text
//! dh = DH(skR, pkE)                                  (X25519; all zero is refused)
//! kem_context = enc || pkRm
//! eae_prk = LabeledExtract("", "eae_prk", dh)
//! shared_secret = LabeledExpand(eae_prk, "shared_secret", kem_context, 32)
//! ```
//! with `suite_id = "KEM" || I2OSP(0x0020, 2)`. RFC 9180's published vectors check it
//! (sealed.rs, `the_hpke_crate_matches_rfc_9180_appendix_a_1_1`), so does the crate's
//! own Decap over many keys (below), and encapsulation is the crate's own.

use std::sync::Arc;

use aws_lc_rs::agreement;
use hpke::kem::{SharedSecret, X25519HkdfSha256};
use hpke::rand_core::CryptoRng;
use hpke::{Deserializable, HpkeError, Kem, Serializable};
use ring::hkdf;
use zeroize::Zeroizing;

type X25519Private = <X25519HkdfSha256 as Kem>::PrivateKey;
type X25519Public = <X25519HkdfSha256 as Kem>::PublicKey;

/// DHKEM(X25519, HKDF-SHA256), base mode, with [`ReceiverKey`] as its private key.
pub(crate) struct Receiver;

/// A private key and its public key, computed once, and the private key as AWS-LC
/// takes it (`None` only if AWS-LC refused 32 bytes as an X25519 key, which it does
/// not: every open then fails, closed).
#[derive(Clone)]
pub(crate) struct ReceiverKey {
    private: X25519Private,
    public: X25519Public,
    /// Freed (and its memory cleansed, as AWS-LC frees every key) with its last clone.
    agreement: Option<Arc<agreement::PrivateKey>>,
}

impl ReceiverKey {
    fn new(private: X25519Private, public: X25519Public) -> Self {
        let agreement = <[u8; 32]>::try_from(private.to_bytes().as_slice())
            .ok()
            .map(Zeroizing::new)
            .and_then(|bytes| {
                agreement::PrivateKey::from_private_key(&agreement::X25519, bytes.as_slice()).ok()
            })
            .map(Arc::new);
        Self {
            private,
            public,
            agreement,
        }
    }
}

impl subtle::ConstantTimeEq for ReceiverKey {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.private.ct_eq(&other.private)
    }
}

impl Serializable for ReceiverKey {
    type OutputSize = <X25519Private as Serializable>::OutputSize;

    fn write_exact(&self, buf: &mut [u8]) {
        self.private.write_exact(buf);
    }
}

impl Deserializable for ReceiverKey {
    fn from_bytes(encoded: &[u8]) -> Result<Self, HpkeError> {
        let private = X25519Private::from_bytes(encoded)?;
        let public = X25519HkdfSha256::sk_to_pk(&private);
        Ok(Self::new(private, public))
    }
}

/// `"KEM" || I2OSP(kem_id, 2)`.
const SUITE_ID: [u8; 5] = [b'K', b'E', b'M', 0x00, 0x20];
const VERSION_LABEL: &[u8] = b"HPKE-v1";
const SECRET_LEN: usize = 32;

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        SECRET_LEN
    }
}

impl Kem for Receiver {
    type PublicKey = X25519Public;
    type PrivateKey = ReceiverKey;
    type EncappedKey = <X25519HkdfSha256 as Kem>::EncappedKey;
    type NSecret = <X25519HkdfSha256 as Kem>::NSecret;
    const KEM_ID: u16 = X25519HkdfSha256::KEM_ID;

    fn sk_to_pk(sk: &ReceiverKey) -> X25519Public {
        sk.public.clone()
    }

    fn derive_keypair(ikm: &[u8]) -> (ReceiverKey, X25519Public) {
        let (private, public) = X25519HkdfSha256::derive_keypair(ikm);
        (ReceiverKey::new(private, public.clone()), public)
    }

    fn decap(
        sk_recip: &ReceiverKey,
        pk_sender_id: Option<&X25519Public>,
        encapped_key: &Self::EncappedKey,
    ) -> Result<SharedSecret<Self>, HpkeError> {
        // Base mode only: an authenticated sender is not part of the sealed format.
        if pk_sender_id.is_some() {
            return Err(HpkeError::DecapError);
        }
        let enc = encapped_key.to_bytes();
        let enc: [u8; 32] = enc
            .as_slice()
            .try_into()
            .map_err(|_| HpkeError::DecapError)?;
        let private = sk_recip.agreement.as_deref().ok_or(HpkeError::DecapError)?;
        // X25519 (RFC 7748, 5): AWS-LC clamps the scalar and refuses an all-zero
        // result; so do we, below, as RFC 9180 asks.
        let mut dh = Zeroizing::new([0u8; 32]);
        agreement::agree(
            private,
            agreement::UnparsedPublicKey::new(&agreement::X25519, &enc),
            HpkeError::DecapError,
            |secret| {
                let secret: &[u8; 32] = secret.try_into().map_err(|_| HpkeError::DecapError)?;
                dh.copy_from_slice(secret);
                Ok(())
            },
        )?;
        // "Senders and recipients MUST check whether the shared secret is the all-zero
        // value and abort if so" (RFC 9180, 7.1.4).
        if dh.iter().fold(0u8, |acc, b| acc | b) == 0 {
            return Err(HpkeError::DecapError);
        }
        let pk_rm = sk_recip.public.to_bytes();
        // LabeledExtract("", "eae_prk", dh): the salt is empty (HMAC pads it with
        // zeros, as RFC 5869's default salt is).
        let mut labeled_ikm = Zeroizing::new(Vec::with_capacity(7 + 5 + 7 + 32));
        labeled_ikm.extend_from_slice(VERSION_LABEL);
        labeled_ikm.extend_from_slice(&SUITE_ID);
        labeled_ikm.extend_from_slice(b"eae_prk");
        labeled_ikm.extend_from_slice(dh.as_slice());
        let eae_prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(&labeled_ikm);
        // LabeledExpand(eae_prk, "shared_secret", enc || pkRm, 32).
        let length = (SECRET_LEN as u16).to_be_bytes();
        let info: [&[u8]; 6] = [
            &length,
            VERSION_LABEL,
            &SUITE_ID,
            b"shared_secret",
            &enc,
            &pk_rm,
        ];
        let mut shared = SharedSecret::<Self>::default();
        eae_prk
            .expand(&info, Len32)
            .and_then(|okm| okm.fill(&mut shared.0))
            .map_err(|_| HpkeError::DecapError)?;
        Ok(shared)
    }

    fn encap_with_rng(
        pk_recip: &X25519Public,
        sender_id_keypair: Option<(&ReceiverKey, &X25519Public)>,
        csprng: &mut impl CryptoRng,
    ) -> Result<(SharedSecret<Self>, Self::EncappedKey), HpkeError> {
        let sender = sender_id_keypair.map(|(sk, pk)| (&sk.private, pk));
        let (shared, enc) = X25519HkdfSha256::encap_with_rng(pk_recip, sender, csprng)?;
        Ok((SharedSecret(shared.0), enc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hpke::aead::AesGcm128;
    use hpke::kdf::HkdfSha256;
    use hpke::{OpModeR, OpModeS};

    /// The crate's own KEM and [`Receiver`] agree: what one seals the other opens, and
    /// both decapsulate to the same secret, over many keys; a tampered `enc` fails.
    #[test]
    fn receiver_agrees_with_the_crates_kem() {
        struct Counter(u64);
        impl hpke::rand_core::TryRng for Counter {
            type Error = std::convert::Infallible;
            fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
                Ok(self.try_next_u64()? as u32)
            }
            fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                Ok(self.0)
            }
            fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
                for chunk in dst.chunks_mut(8) {
                    let word = self.try_next_u64()?.to_le_bytes();
                    chunk.copy_from_slice(&word[..chunk.len()]);
                }
                Ok(())
            }
        }
        impl hpke::rand_core::TryCryptoRng for Counter {}
        let mut rng = Counter(7);
        for i in 0..64u8 {
            let (sk_x, pk) = X25519HkdfSha256::derive_keypair(&[i; 32]);
            let (sk_r, pk_r) = Receiver::derive_keypair(&[i; 32]);
            assert_eq!(pk.to_bytes(), pk_r.to_bytes());
            let (enc, ct) = hpke::single_shot_seal_with_rng::<
                AesGcm128,
                HkdfSha256,
                X25519HkdfSha256,
            >(&OpModeS::Base, &pk, b"info", b"card", b"aad", &mut rng)
            .unwrap();
            let ours = Receiver::decap(&sk_r, None, &enc).unwrap();
            let theirs = X25519HkdfSha256::decap(&sk_x, None, &enc).unwrap();
            assert_eq!(ours.0.to_vec(), theirs.0.to_vec());
            let opened = hpke::single_shot_open::<AesGcm128, HkdfSha256, Receiver>(
                &OpModeR::Base,
                &sk_r,
                &enc,
                b"info",
                &ct,
                b"aad",
            )
            .unwrap();
            assert_eq!(opened, b"card");
            let mut bad = enc.to_bytes();
            bad[usize::from(i % 31)] ^= 1;
            let bad = <Receiver as Kem>::EncappedKey::from_bytes(&bad).unwrap();
            assert!(
                hpke::single_shot_open::<AesGcm128, HkdfSha256, Receiver>(
                    &OpModeR::Base,
                    &sk_r,
                    &bad,
                    b"info",
                    &ct,
                    b"aad",
                )
                .is_err()
            );
        }
        // A small-order point gives an all-zero secret: refused.
        let zero = <Receiver as Kem>::EncappedKey::from_bytes(&[0u8; 32]).unwrap();
        let (sk_r, _) = Receiver::derive_keypair(&[1; 32]);
        assert!(Receiver::decap(&sk_r, None, &zero).is_err());
    }
}
