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
    /// Which claim this is: an erase or a newer CVC since the claim ends it, so that
    /// [`CvcStore::restore`] never brings back a CVC deleted or replaced meanwhile.
    id: u64,
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
    /// The open claim of each token claimed and neither restored nor settled.
    claims: HashMap<Token, u64>,
    next_claim: u64,
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
        entries.claims.remove(token);
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
    /// Every claim ends in [`CvcStore::restore`] or [`CvcStore::settle`].
    pub fn claim(&self, token: &Token) -> Option<Claimed> {
        let mut entries = self.entries();
        let entry = entries.by_token.remove(token)?;
        if entry.expires_at <= Instant::now() {
            return None;
        }
        entries.next_claim += 1;
        let id = entries.next_claim;
        entries.claims.insert(token.clone(), id);
        Some(Claimed { entry, id })
    }

    /// Puts back a CVC that never reached a processor, with its original expiry,
    /// unless the token was deleted or given a newer CVC since it was claimed.
    pub fn restore(&self, token: &Token, claimed: Claimed) {
        let mut entries = self.entries();
        if entries.claims.get(token) != Some(&claimed.id) {
            return;
        }
        entries.claims.remove(token);
        if claimed.entry.expires_at > Instant::now() {
            entries
                .by_token
                .entry(token.clone())
                .or_insert(claimed.entry);
        }
    }

    /// Ends a claim whose CVC was spent (it may have reached the processor).
    pub fn settle(&self, token: &Token, claimed: Claimed) {
        let mut entries = self.entries();
        if entries.claims.get(token) == Some(&claimed.id) {
            entries.claims.remove(token);
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

    /// Forgets the CVC of `token`, and any claim on it: a forward under way that
    /// fails cannot put it back.
    pub fn erase(&self, token: &Token) {
        let mut entries = self.entries();
        entries.by_token.remove(token);
        entries.claims.remove(token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(cvcs: &CvcStore, token: &Token) -> bool {
        cvcs.version_counts().values().sum::<u64>() > 0
            && cvcs.entries().by_token.contains_key(token)
    }

    fn store_with_cvc(code: &str) -> (CvcStore, Token) {
        let cvcs = CvcStore::new(Duration::from_secs(60));
        let token = Token::generate().unwrap();
        let key = envelope::SecretKey::generate().unwrap();
        let cvc = Cvc::parse(code).unwrap().unwrap();
        cvcs.put(1, &key, &token, &cvc).unwrap();
        (cvcs, token)
    }

    #[test]
    fn a_claimed_cvc_is_gone_until_restored_and_a_settled_one_for_good() {
        let (cvcs, token) = store_with_cvc("123");
        let claimed = cvcs.claim(&token).unwrap();
        assert!(
            cvcs.claim(&token).is_none(),
            "two forwards cannot claim one CVC"
        );
        cvcs.restore(&token, claimed);
        assert!(held(&cvcs, &token));
        let claimed = cvcs.claim(&token).unwrap();
        cvcs.settle(&token, claimed);
        assert!(!held(&cvcs, &token));
        assert!(cvcs.entries().claims.is_empty());
    }

    #[test]
    fn a_cvc_erased_or_replaced_while_claimed_is_not_brought_back() {
        let (cvcs, token) = store_with_cvc("123");
        let claimed = cvcs.claim(&token).unwrap();
        cvcs.erase(&token);
        cvcs.restore(&token, claimed);
        assert!(!held(&cvcs, &token), "a deleted token's CVC came back");

        let (cvcs, token) = store_with_cvc("123");
        let claimed = cvcs.claim(&token).unwrap();
        let key = envelope::SecretKey::generate().unwrap();
        cvcs.put(2, &key, &token, &Cvc::parse("456").unwrap().unwrap())
            .unwrap();
        cvcs.restore(&token, claimed);
        assert_eq!(
            cvcs.version_counts().into_iter().collect::<Vec<_>>(),
            vec![(2, 1)],
            "the newer CVC was replaced by the claimed one"
        );
    }
}
