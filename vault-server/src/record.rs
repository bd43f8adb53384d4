//! The stored record: clear metadata that PCI DSS allows, and the card fields sealed
//! with AES-256-GCM. The associated data binds the ciphertext to its token, tenant,
//! key version and metadata, so a ciphertext moved to another record, or edited
//! metadata, fails authentication instead of decrypting as another card.
//!
//! Format v2 (big-endian integers):
//!
//! ```text
//! format: u8 = 2 | key_version: u32 | nonce: 12 | brand: u8 | last_four: 4 ASCII digits |
//! exp_month: u8 | exp_year: u16 | created_at_unix_ms: i64 | fingerprint_version: u32 |
//! fingerprint: 32 | tenant_len: u8 | tenant | expires_at_unix_ms: i64 (0: never) |
//! ciphertext+tag (the rest)
//!
//! aad       = "tokenvault.record" | token_len: u8 | token | every byte before the ciphertext
//! plaintext = pan_len: u8 | pan digits | exp_month: u8 | exp_year: u16 | name_len: u16 | name
//! ```
//!
//! Format v1 is v2 without `expires_at_unix_ms` (a record that never expires); it is
//! still read, and rewritten as v2 only when rewrapped.
//!
//! When changing this: add a new format byte and a decoder for it, keep decoding every
//! older format (stored records are never rewritten just to change format), and add the
//! old format's bytes as a fixture test.

use envelope::{NONCE_LEN, SecretKey, TAG_LEN};
use zeroize::Zeroizing;

use crate::card::{Brand, CardData, CardholderName, Expiry, Pan};
use crate::policy::Tenant;
use crate::token::Token;

pub const FORMAT_V1: u8 = 1;
pub const FORMAT_V2: u8 = 2;
const AAD_LABEL: &[u8] = b"tokenvault.record";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// The bytes are not a record this build can parse.
    #[error("stored record is malformed")]
    Malformed,
    #[error("stored record has unknown format version {0}")]
    UnknownFormat(u8),
    /// Authentication failed: the record was edited or moved.
    #[error("stored record failed its integrity check")]
    Integrity,
}

/// A keyed fingerprint of a card number, and the fingerprint key version it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub version: u32,
    pub value: [u8; 32],
}

/// The clear part of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub key_version: u32,
    pub brand: Brand,
    pub last_four: [u8; 4],
    pub expiry: Expiry,
    pub created_at_unix_ms: i64,
    pub fingerprint: Fingerprint,
    pub tenant: Tenant,
    /// When the token stops answering and is purged; 0 for never.
    pub expires_at_unix_ms: i64,
}

/// The keyed fingerprint of a card number within a tenant.
pub fn fingerprint(key: &SecretKey, tenant: &Tenant, pan: &Pan) -> [u8; 32] {
    envelope::hmac_sha256(
        key,
        &[
            b"tokenvault.fingerprint.v1",
            tenant.as_str().as_bytes(),
            pan.expose_digits().as_bytes(),
        ],
    )
}

/// The stored id of a deleted token: the fingerprint key version, then an HMAC of the
/// tenant and token under that version's key. Nothing of the token can be read from
/// it, and only a vault holding the key can tell whether a token is in the tombstones.
pub fn tombstone(version: u32, key: &SecretKey, tenant: &Tenant, token: &Token) -> Vec<u8> {
    let mac = envelope::hmac_sha256(
        key,
        &[
            b"tokenvault.tombstone.v1",
            tenant.as_str().as_bytes(),
            token.as_str().as_bytes(),
        ],
    );
    let mut id = Vec::with_capacity(4 + mac.len());
    id.extend_from_slice(&version.to_be_bytes());
    id.extend_from_slice(&mac);
    id
}

/// A card within a tenant: tenant, fingerprint version and keyed fingerprint.
pub fn card_key(tenant: &Tenant, fingerprint: &Fingerprint) -> Vec<u8> {
    let tenant = tenant.as_str().as_bytes();
    let mut key = Vec::with_capacity(1 + tenant.len() + 4 + 32 + 3);
    key.push(tenant.len() as u8); // Tenant guarantees at most 64 bytes
    key.extend_from_slice(tenant);
    key.extend_from_slice(&fingerprint.version.to_be_bytes());
    key.extend_from_slice(&fingerprint.value);
    key
}

/// The key versions, indexes and index key of stored record bytes, read from the clear
/// header without authenticating it (for indexing only; reads always authenticate).
pub fn indexes_of(
    bytes: &[u8],
) -> Option<(
    crate::store::KeyVersions,
    crate::store::RecordIndexes,
    Vec<u8>,
)> {
    let metadata = decode(bytes).ok()?.metadata;
    Some((
        metadata.versions(),
        metadata.indexes(),
        metadata.index_key(),
    ))
}

impl Metadata {
    /// The record's card in the tenant: tenant and keyed fingerprint (with its
    /// version), without the expiry. Every token of one card shares it.
    pub fn card_key(&self) -> Vec<u8> {
        card_key(&self.tenant, &self.fingerprint)
    }

    pub fn indexes(&self) -> crate::store::RecordIndexes {
        crate::store::RecordIndexes {
            expires_at_unix_ms: self.expires_at_unix_ms,
            created_at_unix_ms: self.created_at_unix_ms,
            card_key: self.card_key(),
        }
    }

    /// Whether the token has expired at `now_unix_ms`.
    pub fn expired(&self, now_unix_ms: i64) -> bool {
        self.expires_at_unix_ms != 0 && self.expires_at_unix_ms <= now_unix_ms
    }

    pub fn versions(&self) -> crate::store::KeyVersions {
        crate::store::KeyVersions {
            card_data: self.key_version,
            fingerprint: self.fingerprint.version,
        }
    }

    /// The record's key in the fingerprint index: tenant, fingerprint version and value,
    /// expiry. A keyed hash and clear metadata only, never the PAN. Computable from the
    /// clear metadata, so deleting a record needs no decryption.
    pub fn index_key(&self) -> Vec<u8> {
        let mut key = self.card_key();
        key.extend_from_slice(&self.expiry.year.to_be_bytes());
        key.push(self.expiry.month);
        key
    }
}

/// A decoded (not yet authenticated) record.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub metadata: Metadata,
    nonce: [u8; NONCE_LEN],
    /// Every byte before the ciphertext, authenticated as associated data.
    header: Vec<u8>,
    ciphertext: Vec<u8>,
}

fn aad(token: &Token, header: &[u8]) -> Vec<u8> {
    let token = token.as_str().as_bytes();
    let mut aad = Vec::with_capacity(AAD_LABEL.len() + 1 + token.len() + header.len());
    aad.extend_from_slice(AAD_LABEL);
    aad.push(token.len() as u8); // tokens are 26 bytes
    aad.extend_from_slice(token);
    aad.extend_from_slice(header);
    aad
}

fn encode_header(metadata: &Metadata, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let tenant = metadata.tenant.as_str().as_bytes();
    let mut out = Vec::with_capacity(80 + tenant.len());
    out.push(FORMAT_V2);
    out.extend_from_slice(&metadata.key_version.to_be_bytes());
    out.extend_from_slice(nonce);
    out.push(metadata.brand.code());
    out.extend_from_slice(&metadata.last_four);
    out.push(metadata.expiry.month);
    out.extend_from_slice(&metadata.expiry.year.to_be_bytes());
    out.extend_from_slice(&metadata.created_at_unix_ms.to_be_bytes());
    out.extend_from_slice(&metadata.fingerprint.version.to_be_bytes());
    out.extend_from_slice(&metadata.fingerprint.value);
    out.push(tenant.len() as u8); // Tenant guarantees at most 64 bytes
    out.extend_from_slice(tenant);
    out.extend_from_slice(&metadata.expires_at_unix_ms.to_be_bytes());
    out
}

fn encode_plaintext(card: &CardData) -> Zeroizing<Vec<u8>> {
    let pan = card.pan.expose_digits().as_bytes();
    let name = card.name.as_ref().map_or("", |n| n.expose()).as_bytes();
    let mut out = Zeroizing::new(Vec::with_capacity(6 + pan.len() + name.len()));
    out.push(pan.len() as u8); // at most 19
    out.extend_from_slice(pan);
    out.push(card.expiry.month);
    out.extend_from_slice(&card.expiry.year.to_be_bytes());
    out.extend_from_slice(&(name.len() as u16).to_be_bytes()); // at most 128 chars × 4 bytes
    out.extend_from_slice(name);
    out
}

/// Seals `card` for `token` and returns the record bytes to store.
pub fn seal(
    token: &Token,
    metadata: &Metadata,
    card: &CardData,
    key: &SecretKey,
) -> Result<Vec<u8>, envelope::Error> {
    let plaintext = encode_plaintext(card);
    // The nonce is part of the header, which is authenticated as associated data, so
    // it is drawn before sealing.
    let mut nonce = [0u8; NONCE_LEN];
    envelope::fill_unique(&mut nonce)?;
    let header = encode_header(metadata, &nonce);
    let ciphertext = envelope::seal_with_nonce(key, &nonce, &aad(token, &header), &plaintext)?;
    let mut out = header;
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let (head, tail) = self.0.split_at_checked(n).ok_or(RecordError::Malformed)?;
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        self.take(N)?.try_into().map_err(|_| RecordError::Malformed)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.array::<1>()?[0])
    }
}

/// Parses record bytes. Never panics on any input.
pub fn decode(bytes: &[u8]) -> Result<StoredRecord, RecordError> {
    let mut r = Reader(bytes);
    let format = r.u8()?;
    if format != FORMAT_V1 && format != FORMAT_V2 {
        return Err(RecordError::UnknownFormat(format));
    }
    let key_version = u32::from_be_bytes(r.array()?);
    let nonce: [u8; NONCE_LEN] = r.array()?;
    let brand = Brand::from_code(r.u8()?).ok_or(RecordError::Malformed)?;
    let last_four: [u8; 4] = r.array()?;
    if !last_four.iter().all(u8::is_ascii_digit) {
        return Err(RecordError::Malformed);
    }
    let month = r.u8()?;
    let year = u16::from_be_bytes(r.array()?);
    let created_at_unix_ms = i64::from_be_bytes(r.array()?);
    let fingerprint = Fingerprint {
        version: u32::from_be_bytes(r.array()?),
        value: r.array()?,
    };
    let tenant_len = usize::from(r.u8()?);
    let tenant = std::str::from_utf8(r.take(tenant_len)?)
        .ok()
        .and_then(|t| Tenant::parse(t).ok())
        .ok_or(RecordError::Malformed)?;
    let expires_at_unix_ms = if format == FORMAT_V2 {
        i64::from_be_bytes(r.array()?)
    } else {
        0
    };
    let header_len = bytes.len() - r.0.len();
    if r.0.len() < TAG_LEN {
        return Err(RecordError::Malformed);
    }
    Ok(StoredRecord {
        metadata: Metadata {
            key_version,
            brand,
            last_four,
            expiry: Expiry { year, month },
            created_at_unix_ms,
            fingerprint,
            tenant,
            expires_at_unix_ms,
        },
        nonce,
        header: bytes[..header_len].to_vec(),
        ciphertext: r.0.to_vec(),
    })
}

impl StoredRecord {
    /// Authenticates and decrypts the card fields. `key` must be the card-data key of
    /// `self.metadata.key_version`.
    pub fn open(&self, token: &Token, key: &SecretKey) -> Result<CardData, RecordError> {
        let plaintext = envelope::open(
            key,
            &self.nonce,
            &aad(token, &self.header),
            &self.ciphertext,
        )
        .map_err(|_| RecordError::Integrity)?;
        // Authenticated plaintext that does not parse means a bug or a key misuse, not
        // tampering; still an error, never a panic.
        decode_plaintext(&plaintext).ok_or(RecordError::Malformed)
    }
}

fn decode_plaintext(plaintext: &[u8]) -> Option<CardData> {
    let mut r = Reader(plaintext);
    let pan_len = usize::from(r.u8().ok()?);
    let pan = std::str::from_utf8(r.take(pan_len).ok()?).ok()?;
    let pan = Pan::parse(pan).ok()?;
    let month = r.u8().ok()?;
    let year = u16::from_be_bytes(r.array().ok()?);
    let name_len = usize::from(u16::from_be_bytes(r.array().ok()?));
    let name = std::str::from_utf8(r.take(name_len).ok()?).ok()?;
    let name = CardholderName::parse(name).ok()?;
    Some(CardData {
        pan,
        expiry: Expiry { year, month },
        name,
        cvc: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::Today;

    fn card() -> CardData {
        CardData {
            pan: Pan::parse("4242424242424242").unwrap(),
            expiry: Expiry::parse(
                12,
                2030,
                Today {
                    year: 2026,
                    month: 1,
                },
            )
            .unwrap(),
            name: CardholderName::parse("Ada Lovelace").unwrap(),
            cvc: crate::card::Cvc::parse("737").unwrap(),
        }
    }

    fn metadata(tenant: &str) -> Metadata {
        Metadata {
            key_version: 7,
            brand: Brand::Visa,
            last_four: *b"4242",
            expiry: Expiry {
                year: 2030,
                month: 12,
            },
            created_at_unix_ms: 1_700_000_000_000,
            fingerprint: Fingerprint {
                version: 1,
                value: [9; 32],
            },
            tenant: Tenant::parse(tenant).unwrap(),
            expires_at_unix_ms: 1_900_000_000_000,
        }
    }

    /// A record as format 1 wrote it (no expiry): the v2 header without its last 8
    /// bytes, format byte 1, sealed with that header as associated data.
    fn seal_v1(token: &Token, metadata: &Metadata, card: &CardData, key: &SecretKey) -> Vec<u8> {
        let nonce = [7u8; NONCE_LEN];
        let mut header = encode_header(metadata, &nonce);
        header.truncate(header.len() - 8);
        header[0] = FORMAT_V1;
        let ciphertext =
            envelope::seal_with_nonce(key, &nonce, &aad(token, &header), &encode_plaintext(card))
                .unwrap();
        [header, ciphertext].concat()
    }

    #[test]
    fn format_1_records_still_open_and_never_expire() {
        let key = SecretKey::generate().unwrap();
        let token = Token::generate().unwrap();
        let bytes = seal_v1(&token, &metadata("acme"), &card(), &key);
        assert_eq!(bytes[0], 1);
        let record = decode(&bytes).unwrap();
        assert_eq!(record.metadata.expires_at_unix_ms, 0);
        assert_eq!(
            record.open(&token, &key).unwrap().pan.expose_digits(),
            "4242424242424242"
        );
    }

    #[test]
    fn the_expiry_is_authenticated() {
        let key = SecretKey::generate().unwrap();
        let token = Token::generate().unwrap();
        let mut bytes = seal(&token, &metadata("acme"), &card(), &key).unwrap();
        assert_eq!(
            decode(&bytes).unwrap().metadata.expires_at_unix_ms,
            1_900_000_000_000
        );
        // expires_at sits right before the ciphertext, after the 4-byte tenant "acme".
        let at = 1 + 4 + 12 + 1 + 4 + 1 + 2 + 8 + 4 + 32 + 1 + 4;
        bytes[at + 7] ^= 1;
        assert_eq!(
            decode(&bytes).unwrap().open(&token, &key).unwrap_err(),
            RecordError::Integrity
        );
    }

    #[test]
    fn round_trip() {
        let key = SecretKey::generate().unwrap();
        let token = Token::generate().unwrap();
        let bytes = seal(&token, &metadata("acme"), &card(), &key).unwrap();
        assert!(!bytes.windows(16).any(|w| w == b"4242424242424242"));
        assert!(!bytes.windows(3).any(|w| w == b"Ada"));
        assert!(
            !bytes.windows(3).any(|w| w == b"737"),
            "the CVC is never part of a record"
        );
        let record = decode(&bytes).unwrap();
        assert_eq!(record.metadata, metadata("acme"));
        let opened = record.open(&token, &key).unwrap();
        assert_eq!(opened.pan.expose_digits(), "4242424242424242");
        assert_eq!(opened.name.unwrap().expose(), "Ada Lovelace");
        assert_eq!(
            opened.expiry,
            Expiry {
                year: 2030,
                month: 12
            }
        );
    }

    /// Control: PCI-3.5.1 (docs/compliance.md).
    /// Attack: move a record's ciphertext under another token to read it as that card; it
    /// fails to open.
    #[test]
    fn record_under_another_token_fails() {
        let key = SecretKey::generate().unwrap();
        let token = Token::generate().unwrap();
        let bytes = seal(&token, &metadata("acme"), &card(), &key).unwrap();
        let other = Token::generate().unwrap();
        assert_eq!(
            decode(&bytes).unwrap().open(&other, &key).unwrap_err(),
            RecordError::Integrity
        );
    }

    /// PCI DSS 3.5.1.1: the only hash of a card number the vault keeps is keyed
    /// (HMAC-SHA256 under the `fingerprint` key) and separated per tenant.
    /// Attack: with the database alone, hash every candidate number (10^5 for a known first six and last
    /// four) and compare, or match one tenant's cards against another's. A plain SHA-256
    /// of the number, or the same value in two tenants or under another key, fails.
    ///
    /// Control: PCI-3.5.1.1 (docs/compliance.md).
    #[test]
    fn fingerprints_are_keyed_and_per_tenant_never_a_plain_hash() {
        let pan = Pan::parse("4242424242424242").unwrap();
        let (key, other_key) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let acme = Tenant::parse("acme").unwrap();
        let value = fingerprint(&key, &acme, &pan);
        assert_eq!(
            value,
            fingerprint(&key, &acme, &pan),
            "stable for duplicate detection"
        );
        for plain in [&b"4242424242424242"[..], b"acme4242424242424242"] {
            let digest = ring::digest::digest(&ring::digest::SHA256, plain);
            assert_ne!(&value[..], digest.as_ref(), "a plain hash of the number");
        }
        assert_ne!(value, fingerprint(&other_key, &acme, &pan), "not keyed");
        let globex = Tenant::parse("globex").unwrap();
        assert_ne!(value, fingerprint(&key, &globex, &pan), "not per tenant");
    }

    /// Control: PCI-3.5.1 (docs/compliance.md).
    /// Attack: edit a record's clear metadata on disk (its last four, to pass one card
    /// off as another); the record fails its integrity check instead of opening.
    #[test]
    fn edited_metadata_fails() {
        let key = SecretKey::generate().unwrap();
        let token = Token::generate().unwrap();
        let mut bytes = seal(&token, &metadata("acme"), &card(), &key).unwrap();
        // last_four sits after format(1) + key_version(4) + nonce(12) + brand(1).
        bytes[18] = b'1';
        assert_eq!(
            decode(&bytes).unwrap().open(&token, &key).unwrap_err(),
            RecordError::Integrity
        );
    }

    #[test]
    fn truncations_are_errors_not_panics() {
        let key = SecretKey::generate().unwrap();
        let token = Token::generate().unwrap();
        let bytes = seal(&token, &metadata("acme"), &card(), &key).unwrap();
        for len in 0..bytes.len() {
            if let Ok(record) = decode(&bytes[..len]) {
                assert!(record.open(&token, &key).is_err());
            }
        }
        assert_eq!(decode(&[9]).unwrap_err(), RecordError::UnknownFormat(9));
    }
}
