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
}

/// The sender's public key, parsed from its armored form.
pub fn sender_key(armored: &str) -> Result<SignedPublicKey, OpenError> {
    SignedPublicKey::from_string(armored)
        .map(|(key, _)| key)
        .map_err(|_| OpenError::SenderKey)
}

/// Opens `path`, hands the plaintext to `read`, then checks the integrity tag (reading
/// whatever `read` left) and the signature. `read` returning an error stops early, and
/// that error is returned as `Err(Ok(e))`.
pub fn with_plaintext<T, E>(
    path: &Path,
    keys: &[Arc<ImportKey>],
    sender: Option<&SignedPublicKey>,
    read: impl FnOnce(&mut dyn BufRead) -> Result<T, E>,
) -> Result<T, Result<E, OpenError>> {
    let file = std::fs::File::open(path).map_err(|_| Err(OpenError::Io))?;
    let (message, _) = Message::from_reader(BufReader::with_capacity(64 * 1024, file))
        .map_err(|_| Err(OpenError::NotOpenPgp))?;
    if !message.is_encrypted() {
        return Err(Err(OpenError::NotOpenPgp));
    }
    let secrets: Vec<_> = keys.iter().map(|k| k.expose_secret()).collect();
    let empty = Password::empty();
    let ring = TheRing {
        secret_keys: secrets,
        key_passwords: vec![&empty],
        decrypt_options: DecryptionOptions::new().set_seipdv1_read_mode(Seipdv1ReadMode::Streaming),
        ..Default::default()
    };
    let message = match message.decrypt_the_ring(ring, true) {
        Ok((message, _)) => message,
        Err(pgp::errors::Error::MissingKey) => return Err(Err(OpenError::WrongKey)),
        Err(e) if format!("{e}").contains("SymEncryptedData") => {
            return Err(Err(OpenError::Unprotected));
        }
        // A small message is read whole while it is opened: its tag fails here.
        Err(pgp::errors::Error::IO { .. }) => return Err(Err(OpenError::Integrity)),
        Err(_) => return Err(Err(OpenError::WrongKey)),
    };
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
            },
        );
        let value = read(&mut reader);
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
        value
    };
    if let Some(sender) = sender {
        verify(&message, sender).map_err(Err)?;
    }
    value.map_err(Ok)
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
struct ReadGuard<'m, 'a> {
    message: &'m mut Message<'a>,
    failed: &'m std::cell::Cell<bool>,
}

impl Read for ReadGuard<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.message.read(buf).map_err(|_| {
            self.failed.set(true);
            std::io::Error::other("the file's integrity check failed")
        })
    }
}
