//! CVCs live here and nowhere else: in memory, sealed under the `cvc` key purpose,
//! for a limited time, erased after their first use in a forward. Never written to
//! RocksDB, a WAL, a log or any file; a restart forgets them (PCI DSS 3.3.1.2 forbids
//! storing the security code after authorization).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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
    tenant: Arc<str>,
    /// The identity that sent it: only it may replace it (see [`CvcStore::offer`]).
    supplier: Arc<str>,
}

/// How many CVCs may be held, in all and per tenant: a caller sending cards with CVCs
/// in a loop must not exhaust the vault's memory, nor one tenant the others' room.
#[derive(Debug, Clone, Copy)]
pub struct CvcLimits {
    pub max_total: usize,
    pub max_per_tenant: usize,
}

#[derive(Default)]
struct Entries {
    by_token: HashMap<Token, Entry>,
    /// Held and reserved CVCs per tenant.
    per_tenant: HashMap<Arc<str>, usize>,
    /// Slots reserved for CVCs whose record is being stored.
    reserved: usize,
    /// The open claim of each token claimed and neither restored nor settled.
    claims: HashMap<Token, u64>,
    next_claim: u64,
    last_sweep: Option<Instant>,
}

impl Entries {
    fn count(&mut self, tenant: &Arc<str>, delta: isize) {
        let count = self.per_tenant.entry(Arc::clone(tenant)).or_default();
        *count = count.saturating_add_signed(delta);
        if *count == 0 {
            self.per_tenant.remove(tenant);
        }
    }

    fn insert(&mut self, token: Token, entry: Entry) {
        let tenant = Arc::clone(&entry.tenant);
        if let Some(old) = self.by_token.insert(token, entry) {
            self.count(&old.tenant, -1);
        }
        self.count(&tenant, 1);
    }

    fn remove(&mut self, token: &Token) -> Option<Entry> {
        let entry = self.by_token.remove(token)?;
        self.count(&entry.tenant, -1);
        Some(entry)
    }

    fn sweep(&mut self, now: Instant) {
        let expired: Vec<Token> = self
            .by_token
            .iter()
            .filter(|(_, e)| e.expires_at <= now)
            .map(|(t, _)| t.clone())
            .collect();
        for token in expired {
            self.remove(&token);
        }
        self.last_sweep = Some(now);
    }
}

/// The CVC store is full (in all, or for the tenant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Room for one CVC, reserved before its record is stored: a record is never stored
/// whose CVC would then be refused. Freed when dropped unless filled.
pub struct Slot<'a> {
    store: &'a CvcStore,
    tenant: Arc<str>,
    filled: bool,
}

impl std::fmt::Debug for Slot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.filled {
            let mut entries = self.store.entries();
            entries.reserved = entries.reserved.saturating_sub(1);
            entries.count(&self.tenant, -1);
        }
    }
}

/// A CVC sealed for one token, ready to be held.
pub struct Sealed {
    key_version: u32,
    nonce: [u8; NONCE_LEN],
    ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealed([REDACTED])")
    }
}

/// Seals `cvc` for `token` under the cvc purpose's `key` (version `key_version`).
pub fn seal(
    key_version: u32,
    key: &envelope::SecretKey,
    token: &Token,
    cvc: &Cvc,
) -> Result<Sealed, envelope::Error> {
    let sealed = envelope::seal(key, &aad(token), cvc.expose().as_bytes())?;
    Ok(Sealed {
        key_version,
        nonce: sealed.nonce,
        ciphertext: sealed.ciphertext,
    })
}

pub struct CvcStore {
    ttl: Duration,
    limits: CvcLimits,
    entries: Mutex<Entries>,
}

impl std::fmt::Debug for CvcStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CvcStore")
            .field("ttl", &self.ttl)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn aad(token: &Token) -> Vec<u8> {
    [AAD_LABEL, token.as_str().as_bytes()].concat()
}

impl CvcStore {
    pub fn new(ttl: Duration, limits: CvcLimits) -> Self {
        Self {
            ttl,
            limits,
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

    /// CVCs held and reserved now.
    pub fn len(&self) -> usize {
        let entries = self.entries();
        entries.by_token.len() + entries.reserved
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reserves room for one CVC of `tenant`, or says the store is full (after
    /// forgetting the expired ones).
    pub fn reserve(&self, tenant: &str) -> Result<Slot<'_>, Full> {
        let mut entries = self.entries();
        let now = Instant::now();
        if entries
            .last_sweep
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(60))
        {
            entries.sweep(now);
        }
        let tenant: Arc<str> = Arc::from(tenant);
        let full = |entries: &Entries| {
            entries.by_token.len() + entries.reserved >= self.limits.max_total
                || entries.per_tenant.get(&tenant).copied().unwrap_or(0)
                    >= self.limits.max_per_tenant
        };
        if full(&entries) {
            entries.sweep(now);
            if full(&entries) {
                return Err(Full);
            }
        }
        entries.reserved += 1;
        entries.count(&tenant, 1);
        Ok(Slot {
            store: self,
            tenant,
            filled: false,
        })
    }

    /// Holds the CVC of a record just stored, in the slot reserved for it, until the
    /// TTL ends or it is used.
    pub fn put(&self, mut slot: Slot<'_>, token: &Token, sealed: Sealed, supplier: &str) {
        let mut entries = self.entries();
        slot.filled = true;
        entries.reserved = entries.reserved.saturating_sub(1);
        // The reservation's count moves to the entry.
        entries.count(&slot.tenant, -1);
        entries.claims.remove(token);
        let entry = Entry {
            key_version: sealed.key_version,
            nonce: sealed.nonce,
            ciphertext: sealed.ciphertext,
            expires_at: Instant::now() + self.ttl,
            tenant: Arc::clone(&slot.tenant),
            supplier: Arc::from(supplier),
        };
        entries.insert(token.clone(), entry);
    }

    /// Offers the CVC of an existing token (Tokenize with `reuse_existing`): it
    /// replaces the one held only if none is held or the same identity sent it; a
    /// CVC another identity sent stays, and this one is dropped (false).
    pub fn offer(&self, slot: Slot<'_>, token: &Token, sealed: Sealed, supplier: &str) -> bool {
        {
            let entries = self.entries();
            if let Some(held) = entries.by_token.get(token)
                && held.expires_at > Instant::now()
                && &*held.supplier != supplier
            {
                return false;
            }
        }
        self.put(slot, token, sealed, supplier);
        true
    }

    /// Removes the CVC of `token`, still sealed, if it is held and not expired: two
    /// concurrent forwards cannot both claim it. [`CvcStore::restore`] puts it back
    /// when the forward ends before anything could reach the processor.
    /// Every claim ends in [`CvcStore::restore`] or [`CvcStore::settle`].
    pub fn claim(&self, token: &Token) -> Option<Claimed> {
        let mut entries = self.entries();
        let entry = entries.remove(token)?;
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
        if claimed.entry.expires_at > Instant::now() && !entries.by_token.contains_key(token) {
            entries.insert(token.clone(), claimed.entry);
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
        entries.remove(token);
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

    const LIMITS: CvcLimits = CvcLimits {
        max_total: 3,
        max_per_tenant: 2,
    };

    fn sealed(version: u32, token: &Token, code: &str) -> Sealed {
        let key = envelope::SecretKey::generate().unwrap();
        seal(version, &key, token, &Cvc::parse(code).unwrap().unwrap()).unwrap()
    }

    fn hold(cvcs: &CvcStore, tenant: &str, token: &Token, supplier: &str) {
        let slot = cvcs.reserve(tenant).unwrap();
        cvcs.put(slot, token, sealed(1, token, "123"), supplier);
    }

    fn store_with_cvc(_code: &str) -> (CvcStore, Token) {
        let cvcs = CvcStore::new(Duration::from_secs(60), LIMITS);
        let token = Token::generate().unwrap();
        hold(&cvcs, "acme", &token, "a");
        (cvcs, token)
    }

    /// PCI DSS 3.3.2: a CVC held before authorization (between Tokenize and the
    /// forward) is encrypted with strong cryptography (AES-256-GCM under the `cvc` key)
    /// and bound to its token.
    /// Attack: read the code from the vault's memory (a core dump, swap, a debugger),
    /// or move a held CVC under another token. What the store
    /// holds has none of the code's digits, opens only for its own token, and is exactly
    /// the sealed form `seal` made.
    ///
    /// Control: PCI-3.3.2 (docs/compliance.md).
    #[test]
    fn a_held_cvc_is_ciphertext_bound_to_its_token() {
        let key = envelope::SecretKey::generate().unwrap();
        let token = Token::generate().unwrap();
        let code = Cvc::parse("7373").unwrap().unwrap();
        let sealed = seal(1, &key, &token, &code).unwrap();
        let ciphertext = sealed.ciphertext.clone();
        assert!(
            !ciphertext.windows(4).any(|w| w == b"7373"),
            "the code in clear"
        );
        let opened = envelope::open(&key, &sealed.nonce, &aad(&token), &ciphertext).unwrap();
        assert_eq!(opened.as_slice(), b"7373");
        let other = Token::generate().unwrap();
        assert!(envelope::open(&key, &sealed.nonce, &aad(&other), &ciphertext).is_err());

        let cvcs = CvcStore::new(Duration::from_secs(60), LIMITS);
        let slot = cvcs.reserve("acme").unwrap();
        cvcs.put(slot, &token, sealed, "checkout");
        let entries = cvcs.entries();
        assert_eq!(entries.by_token.get(&token).unwrap().ciphertext, ciphertext);
    }

    #[test]
    fn the_store_is_bounded_per_tenant_and_in_all_and_slots_are_freed() {
        let cvcs = CvcStore::new(Duration::from_secs(60), LIMITS);
        let tokens: Vec<Token> = (0..4).map(|_| Token::generate().unwrap()).collect();
        hold(&cvcs, "acme", &tokens[0], "a");
        let slot = cvcs.reserve("acme").unwrap();
        assert_eq!(cvcs.reserve("acme").unwrap_err(), Full, "acme's share");
        drop(slot);
        hold(&cvcs, "acme", &tokens[1], "a");
        hold(&cvcs, "globex", &tokens[2], "g");
        assert_eq!(cvcs.reserve("initech").unwrap_err(), Full, "all of it");
        assert_eq!(cvcs.len(), 3);
        // A used (claimed and settled) CVC frees its room.
        let claimed = cvcs.claim(&tokens[2]).unwrap();
        cvcs.settle(&tokens[2], claimed);
        hold(&cvcs, "initech", &tokens[3], "i");
        assert_eq!(cvcs.len(), 3);
        assert_eq!(cvcs.entries().per_tenant.get("acme"), Some(&2));
        assert_eq!(cvcs.entries().per_tenant.get("globex"), None);
    }

    #[test]
    fn only_the_identity_that_sent_a_cvc_replaces_it() {
        let cvcs = CvcStore::new(Duration::from_secs(60), LIMITS);
        let token = Token::generate().unwrap();
        hold(&cvcs, "acme", &token, "checkout");
        let slot = cvcs.reserve("acme").unwrap();
        assert!(!cvcs.offer(slot, &token, sealed(2, &token, "456"), "intruder"));
        assert_eq!(
            cvcs.version_counts().into_iter().collect::<Vec<_>>(),
            vec![(1, 1)]
        );
        assert_eq!(cvcs.len(), 1, "the refused offer's slot is freed");
        let slot = cvcs.reserve("acme").unwrap();
        assert!(cvcs.offer(slot, &token, sealed(3, &token, "789"), "checkout"));
        assert_eq!(
            cvcs.version_counts().into_iter().collect::<Vec<_>>(),
            vec![(3, 1)]
        );
    }

    /// Control: PCI-3.3.1.2 (docs/compliance.md).
    /// Attack: use a CVC twice, or bring a used one back; once settled it is gone for good.
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
        let slot = cvcs.reserve("acme").unwrap();
        cvcs.put(slot, &token, sealed(2, &token, "456"), "a");
        cvcs.restore(&token, claimed);
        assert_eq!(
            cvcs.version_counts().into_iter().collect::<Vec<_>>(),
            vec![(2, 1)],
            "the newer CVC was replaced by the claimed one"
        );
    }
}
