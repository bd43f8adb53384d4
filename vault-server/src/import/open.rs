//! Opening a spooled import file: OpenPGP decryption with one of the import keys,
//! decompression, and, when the job names a sender key, the sender's signature.
//!
//! SEIPD is read in rPGP's streaming mode, so plaintext comes out before the integrity
//! tag (MDC) at the end is checked. That is why a file is opened twice: the first pass
//! reads everything to the end, checks the tag (and signature) and the rows' shape and
//! keeps no plaintext; only a file that passed is opened again for its rows. A file
//! that changed on disk in between fails its tag again at the end of the second pass.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use pgp::composed::{DecryptionOptions, Deserializable as _, Message, SignedPublicKey, TheRing};
use pgp::types::{Password, Seipdv1ReadMode};

use super::key::ImportKey;

/// Why a file cannot be opened or did not check out. Never the plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("the file is not an OpenPGP message")]
    NotOpenPgp,
    #[error(
        "the file is not encrypted to an import key this vault holds (export the current \
         one with `vaultctl import key export`)"
    )]
    WrongKey,
    #[error("the file is not integrity-protected (OpenPGP SEIPD with MDC or AEAD is required)")]
    Unprotected,
    #[error("the file's integrity check failed: it was altered or cut short")]
    Integrity,
    #[error("the file is not signed by the sender key named for the job")]
    Signature,
    #[error("the sender key is not an OpenPGP public key")]
    SenderKey,
    #[error("the spooled file could not be read")]
    Io,
    #[error(
        "the file's plaintext is larger than its approved rows can fill ({0} bytes; OpenPGP \
         compresses, and a file of nothing is how a decompression bomb looks)"
    )]
    TooLarge(u64),
}

/// Plaintext bytes a file may decrypt to per approved row, on average (a Stripe JSON
/// line is about 500 bytes): the bound on what one pass inflates.
pub const MAX_PLAINTEXT_PER_ROW: u64 = 8 * 1024;

/// The most plaintext a file of `rows` rows may decrypt to (and a header's worth).
pub fn plaintext_limit(rows: u64) -> u64 {
    rows.saturating_add(1).saturating_mul(MAX_PLAINTEXT_PER_ROW) + (1 << 20)
}

/// The sender's public key, parsed from its armored form.
pub fn sender_key(armored: &str) -> Result<SignedPublicKey, OpenError> {
    SignedPublicKey::from_string(armored)
        .map(|(key, _)| key)
        .map_err(|_| OpenError::SenderKey)
}

/// Opens `path`, hands the plaintext to `read`, then checks the integrity tag (reading
/// whatever `read` left) and the signature. `read` returning an error stops early, and
/// that error is returned as `Err(Ok(e))`. More than `max_plaintext` bytes of
/// plaintext stop the pass there: `TooLarge`.
pub fn with_plaintext<T, E>(
    path: &Path,
    keys: &[Arc<ImportKey>],
    sender: Option<&SignedPublicKey>,
    max_plaintext: u64,
    read: impl FnOnce(&mut dyn BufRead) -> Result<T, E>,
) -> Result<T, Result<E, OpenError>> {
    // An RSA key is derived only for a file no other key opens (it costs seconds).
    let ready: Vec<&ImportKey> = keys
        .iter()
        .map(Arc::as_ref)
        .filter(|k| k.is_derived())
        .collect();
    let message = match decrypt(path, &ready) {
        Err(OpenError::WrongKey) if ready.len() < keys.len() => {
            let all: Vec<&ImportKey> = keys.iter().map(Arc::as_ref).collect();
            decrypt(path, &all)
        }
        opened => opened,
    }
    .map_err(Err)?;
    let mut message = if message.is_compressed() {
        message
            .decompress()
            .map_err(|_| Err(OpenError::Integrity))?
    } else {
        message
    };
    if sender.is_some() && !message.is_signed() {
        return Err(Err(OpenError::Signature));
    }
    let failed = std::cell::Cell::new(false);
    let value = {
        let mut reader = BufReader::with_capacity(
            64 * 1024,
            ReadGuard {
                message: &mut message,
                failed: &failed,
                left: max_plaintext,
            },
        );
        let value = read(&mut reader);
        if reader.get_ref().left == 0
            && reader.get_mut().message.read(&mut [0u8; 1]).ok() != Some(0)
        {
            return Err(Err(OpenError::TooLarge(max_plaintext)));
        }
        // Whatever the rows' reader made of it, a failed read of the decrypted stream
        // (a bad tag, a broken compressed stream) is the file's integrity failing.
        if failed.get() {
            return Err(Err(OpenError::Integrity));
        }
        // The rest, to the integrity tag at the end, also when the rows' reader stopped
        // at an error: what it says of a row (its number, what is wrong) is told only
        // of a file whose tag and signature check out. Told of a tampered file, it
        // would describe plaintext no one has authenticated, an oracle on it.
        std::io::copy(&mut reader, &mut std::io::sink()).map_err(|_| Err(OpenError::Integrity))?;
        if reader.get_ref().left == 0
            && reader.get_mut().message.read(&mut [0u8; 1]).ok() != Some(0)
        {
            return Err(Err(OpenError::TooLarge(max_plaintext)));
        }
        value
    };
    if let Some(sender) = sender {
        verify(&message, sender).map_err(Err)?;
    }
    value.map_err(Ok)
}

/// The file at `path` decrypted (as a stream) with one of `keys`.
fn decrypt(path: &Path, keys: &[&ImportKey]) -> Result<Message<'static>, OpenError> {
    let file = std::fs::File::open(path).map_err(|_| OpenError::Io)?;
    let (message, _) = Message::from_reader(BufReader::with_capacity(64 * 1024, file))
        .map_err(|_| OpenError::NotOpenPgp)?;
    if !message.is_encrypted() {
        return Err(OpenError::NotOpenPgp);
    }
    let secrets: Vec<_> = keys.iter().filter_map(|k| k.expose_secret().ok()).collect();
    let empty = Password::empty();
    let ring = TheRing {
        secret_keys: secrets,
        key_passwords: vec![&empty],
        decrypt_options: DecryptionOptions::new().set_seipdv1_read_mode(Seipdv1ReadMode::Streaming),
        ..Default::default()
    };
    match message.decrypt_the_ring(ring, true) {
        Ok((message, _)) => Ok(message),
        Err(pgp::errors::Error::MissingKey) => Err(OpenError::WrongKey),
        Err(e) if format!("{e}").contains("SymEncryptedData") => Err(OpenError::Unprotected),
        // A small message is read whole while it is opened: its tag fails here.
        Err(pgp::errors::Error::IO { .. }) => Err(OpenError::Integrity),
        Err(_) => Err(OpenError::WrongKey),
    }
}

fn verify(message: &Message<'_>, sender: &SignedPublicKey) -> Result<(), OpenError> {
    if message.verify(&sender.primary_key).is_ok() {
        return Ok(());
    }
    for sub in &sender.public_subkeys {
        if message.verify(&sub.key).is_ok() {
            return Ok(());
        }
    }
    Err(OpenError::Signature)
}

/// Read errors of the decrypting reader (a failed tag among them) carry rPGP's text;
/// they are mapped to one kind so that nothing of it reaches a caller.
/// It also ends the plaintext after `left` more bytes (the caller tells a file that
/// goes on from one that ended exactly there).
struct ReadGuard<'m, 'a> {
    message: &'m mut Message<'a>,
    failed: &'m std::cell::Cell<bool>,
    left: u64,
}

impl Read for ReadGuard<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let room = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if room == 0 {
            return Ok(0);
        }
        let n = self.message.read(&mut buf[..room]).map_err(|_| {
            self.failed.set(true);
            std::io::Error::other("the file's integrity check failed")
        })?;
        self.left -= n as u64;
        Ok(n)
    }
}
