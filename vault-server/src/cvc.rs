//! CVCs live here and nowhere else: in memory, sealed under the `cvc` key purpose,
//! for a limited time, erased after their first use in a forward. Never written to
//! RocksDB, a WAL, a log or any file; a restart forgets them (PCI DSS 3.3.1.2 forbids
//! storing the security code after authorization).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use envelope::NONCE_LEN;
use zeroize::Zeroizing;

use crate::card::Cvc;
use crate::keys::KeySet;
use crate::token::Token;

const AAD_LABEL: &[u8] = b"tokenvault.cvc";

/// A CVC claimed for one forward, still sealed: it is opened only once the forward is
/// on record, just before it is sent.
pub struct Claimed {
    entry: Entry,
}

impl std::fmt::Debug for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Claimed([REDACTED])")
    }
}

impl Claimed {
    /// The CVC in clear, or `None` if its key is no longer held.
    pub fn open(&self, keys: &KeySet, token: &Token) -> Option<Zeroizing<String>> {
        let key = keys.cvc.get(self.entry.key_version)?;
        let plain =
            envelope::open(key, &self.entry.nonce, &aad(token), &self.entry.ciphertext).ok()?;
        Some(Zeroizing::new(String::from_utf8(plain.to_vec()).ok()?))
    }
}

struct Entry {
    key_version: u32,
    nonce: [u8; NONCE_LEN],
    ciphertext: Vec<u8>,
    expires_at: Instant,
}

#[derive(Default)]
struct Entries {
    by_token: HashMap<Token, Entry>,
    last_sweep: Option<Instant>,
}

pub struct CvcStore {
    ttl: Duration,
    entries: Mutex<Entries>,
}

impl std::fmt::Debug for CvcStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CvcStore")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn aad(token: &Token) -> Vec<u8> {
    [AAD_LABEL, token.as_str().as_bytes()].concat()
}

impl CvcStore {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(Entries::default()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A poisoned lock only means another thread panicked mid-operation; the map is
        // still a valid map.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps the CVC of `token` until the TTL ends or it is used.
    /// `key_version` and `key` come from the cvc purpose's encryption budget.
    pub fn put(
        &self,
        key_version: u32,
        key: &envelope::SecretKey,
        token: &Token,
        cvc: &Cvc,
    ) -> Result<(), envelope::Error> {
        let sealed = envelope::seal(key, &aad(token), cvc.expose().as_bytes())?;
        let now = Instant::now();
        let mut entries = self.entries();
        // Expired entries are swept at most once a minute, on the way.
        if entries
            .last_sweep
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(60))
        {
            entries.by_token.retain(|_, e| e.expires_at > now);
            entries.last_sweep = Some(now);
        }
        entries.by_token.insert(
            token.clone(),
            Entry {
                key_version,
                nonce: sealed.nonce,
                ciphertext: sealed.ciphertext,
                expires_at: now + self.ttl,
            },
        );
        Ok(())
    }

    /// Removes the CVC of `token`, still sealed, if it is held and not expired: two
    /// concurrent forwards cannot both claim it. [`CvcStore::restore`] puts it back
    /// when the forward ends before anything could reach the processor.
    pub fn claim(&self, token: &Token) -> Option<Claimed> {
        let entry = self.entries().by_token.remove(token)?;
        (entry.expires_at > Instant::now()).then_some(Claimed { entry })
    }

    /// Puts back a CVC that never reached a processor, with its original expiry.
    pub fn restore(&self, token: &Token, claimed: Claimed) {
        if claimed.entry.expires_at > Instant::now() {
            self.entries().by_token.insert(token.clone(), claimed.entry);
        }
    }

    /// CVCs held (not expired) per cvc key version.
    pub fn version_counts(&self) -> std::collections::BTreeMap<u32, u64> {
        let now = Instant::now();
        let mut counts = std::collections::BTreeMap::new();
        for entry in self.entries().by_token.values() {
            if entry.expires_at > now {
                *counts.entry(entry.key_version).or_insert(0) += 1;
            }
        }
        counts
    }

    pub fn erase(&self, token: &Token) {
        self.entries().by_token.remove(token);
    }
}
