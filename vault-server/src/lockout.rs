//! Lockout: an identity or a peer address with too many failed calls within a window
//! is blocked for a while. Permission denials and lookups of unknown tokens are counted
//! apart, each against its own threshold; a token that was deleted (its tombstone) or
//! expired is not unknown, so nobody can lock a service out by deleting the tokens it
//! holds. Identities listed `alert_only` are flagged instead of blocked (this lockout
//! only; card-guessing detection never has such a mode). Blocked callers get
//! PERMISSION_DENIED with no detail. State is in memory: a restart lifts every block,
//! which the audit log shows.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// `[lockout]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockoutSettings {
    /// Permission denials (and calls without a usable identity) within `window_secs`
    /// that block the identity or address.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// Lookups of unknown tokens within `window_secs` that block (token probing).
    #[serde(default = "default_max_failures")]
    pub max_unknown_tokens: u32,
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// How long a block lasts (an admin can lift it sooner).
    #[serde(default = "default_block_secs")]
    pub block_secs: u64,
    /// Also count failures (and block) by peer address. Off by default: callers prove
    /// who they are with certificates, and behind a proxy or NAT one address is many
    /// callers. Admins are never held by an address block (they must be able to lift
    /// it).
    #[serde(default)]
    pub by_address: bool,
    /// Identities (typed, as in the policy: `uri:…` or `cn:…`) that are never
    /// blocked: reaching a threshold flags them (metric, audit event) instead. For
    /// services whose outage costs more than a prober's extra tries.
    #[serde(default)]
    pub alert_only: Vec<String>,
    /// Calls refused because the caller is unlisted or blocked cost a counter, not an
    /// audit event each: one event per caller and reason sums them up every
    /// `summary_secs`.
    #[serde(default = "default_summary_secs")]
    pub summary_secs: u64,
}

impl Default for LockoutSettings {
    fn default() -> Self {
        Self {
            max_failures: default_max_failures(),
            max_unknown_tokens: default_max_failures(),
            window_secs: default_window_secs(),
            block_secs: default_block_secs(),
            by_address: false,
            alert_only: Vec::new(),
            summary_secs: default_summary_secs(),
        }
    }
}

fn default_max_failures() -> u32 {
    20
}
fn default_window_secs() -> u64 {
    60
}
fn default_block_secs() -> u64 {
    300
}
fn default_summary_secs() -> u64 {
    60
}

impl LockoutSettings {
    /// The `alert_only` entries as identities, or the first that is not one.
    pub fn alert_only_identities(&self) -> Result<HashSet<String>, String> {
        self.alert_only
            .iter()
            .map(|entry| {
                runtime::tls::configured_identity(entry)
                    .map_err(|e| format!("lockout.alert_only: {e}"))
            })
            .collect()
    }
}

/// What a failed call was, each counted against its own threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Permission denied, or no usable identity.
    Denied,
    /// A token that does not exist (and was not deleted or expired) was looked up.
    UnknownToken,
}

/// Most subjects tracked; beyond it the oldest unblocked ones are forgotten, so that
/// memory stays bounded whatever callers do.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Identity,
    Address,
    /// A flag of the guessing detector (`crate::guessing`), listed and lifted with the
    /// blocks; never a subject of this lockout.
    Guessing,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Identity => "identity",
            Kind::Address => "address",
            Kind::Guessing => "guessing",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "identity" => Some(Kind::Identity),
            "address" => Some(Kind::Address),
            "guessing" => Some(Kind::Guessing),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct Subject {
    denied: VecDeque<Instant>,
    unknown_tokens: VecDeque<Instant>,
    blocked_until: Option<Instant>,
}

impl Subject {
    fn failures(&self) -> u32 {
        (self.denied.len() + self.unknown_tokens.len()) as u32
    }
}

/// A subject that reached a threshold: blocked now, or (alert-only) flagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tripped {
    pub kind: Kind,
    pub subject: String,
    pub failure: Failure,
    pub blocked: bool,
}

/// A current block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub kind: Kind,
    pub subject: String,
    pub remaining: Duration,
    pub failures: u32,
}

#[derive(Debug)]
pub struct Lockout {
    settings: LockoutSettings,
    alert_only: HashSet<String>,
    subjects: Mutex<HashMap<(Kind, String), Subject>>,
}

impl Lockout {
    /// `settings` were checked (`alert_only_identities`) with the rest of the config.
    pub fn new(settings: LockoutSettings) -> Self {
        Self {
            alert_only: settings.alert_only_identities().unwrap_or_default(),
            settings,
            subjects: Mutex::new(HashMap::new()),
        }
    }

    fn subjects(&self) -> std::sync::MutexGuard<'_, HashMap<(Kind, String), Subject>> {
        self.subjects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn keys(&self, identity: Option<&str>, address: &str) -> Vec<(Kind, String)> {
        let mut keys = Vec::with_capacity(2);
        if self.settings.by_address {
            keys.push((Kind::Address, address.to_owned()));
        }
        if let Some(identity) = identity {
            keys.push((Kind::Identity, identity.to_owned()));
        }
        keys
    }

    /// Whether the identity, or the address unless the caller is an admin, is blocked
    /// now. `admin` is asked only when the address is blocked.
    pub fn is_blocked(
        &self,
        identity: Option<&str>,
        address: &str,
        admin: impl FnOnce() -> bool,
        now: Instant,
    ) -> bool {
        let subjects = self.subjects();
        let blocked = |key: &(Kind, String)| {
            subjects
                .get(key)
                .and_then(|s| s.blocked_until)
                .is_some_and(|until| until > now)
        };
        let keys = self.keys(identity, address);
        if keys.iter().any(|k| k.0 == Kind::Identity && blocked(k)) {
            return true;
        }
        keys.iter().any(|k| k.0 == Kind::Address && blocked(k)) && !admin()
    }

    /// Counts a failure; returns the subjects it newly blocked (or flagged).
    pub fn failure(
        &self,
        identity: Option<&str>,
        address: &str,
        failure: Failure,
        now: Instant,
    ) -> Vec<Tripped> {
        let window = Duration::from_secs(self.settings.window_secs);
        let threshold = match failure {
            Failure::Denied => self.settings.max_failures,
            Failure::UnknownToken => self.settings.max_unknown_tokens,
        } as usize;
        let mut subjects = self.subjects();
        if subjects.len() >= MAX_TRACKED {
            subjects.retain(|_, s| s.blocked_until.is_some_and(|until| until > now));
        }
        let mut blocked = Vec::new();
        for key in self.keys(identity, address) {
            let subject = subjects.entry(key.clone()).or_default();
            match subject.blocked_until {
                Some(until) if until > now => continue,
                // A block that ended starts a clean slate.
                Some(_) => {
                    subject.blocked_until = None;
                    subject.denied.clear();
                    subject.unknown_tokens.clear();
                }
                None => {}
            }
            let failures = match failure {
                Failure::Denied => &mut subject.denied,
                Failure::UnknownToken => &mut subject.unknown_tokens,
            };
            if crate::window::record(failures, now, window) < threshold {
                continue;
            }
            let alert_only = key.0 == Kind::Identity && self.alert_only.contains(&key.1);
            if alert_only {
                // Flagged once per threshold's worth of failures, and served on.
                failures.clear();
            } else {
                subject.blocked_until = Some(now + Duration::from_secs(self.settings.block_secs));
            }
            blocked.push(Tripped {
                kind: key.0,
                subject: key.1,
                failure,
                blocked: !alert_only,
            });
        }
        blocked
    }

    pub fn list(&self, now: Instant) -> Vec<Block> {
        let mut blocks: Vec<Block> = self
            .subjects()
            .iter()
            .filter_map(|((kind, subject), state)| {
                let until = state.blocked_until.filter(|until| *until > now)?;
                Some(Block {
                    kind: *kind,
                    subject: subject.clone(),
                    remaining: until - now,
                    failures: state.failures(),
                })
            })
            .collect();
        blocks.sort_by(|a, b| (a.kind, &a.subject).cmp(&(b.kind, &b.subject)));
        blocks
    }

    /// Lifts a block (and forgets the failures). Returns false when there was none.
    pub fn lift(&self, kind: Kind, subject: &str, now: Instant) -> bool {
        let mut subjects = self.subjects();
        let was_blocked = subjects
            .get(&(kind, subject.to_owned()))
            .and_then(|s| s.blocked_until)
            .is_some_and(|until| until > now);
        if was_blocked {
            subjects.remove(&(kind, subject.to_owned()));
        }
        was_blocked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lockout() -> Lockout {
        Lockout::new(LockoutSettings {
            max_failures: 3,
            max_unknown_tokens: 5,
            window_secs: 10,
            block_secs: 60,
            by_address: true,
            alert_only: vec!["uri:spiffe://shop/billing".into()],
            summary_secs: 60,
        })
    }

    /// Control: PCI-8.3.4 (docs/compliance.md).
    /// Attack: keep failing from one identity or address within the window; blocked at the
    /// threshold.
    #[test]
    fn failures_within_the_window_block_identity_and_address() {
        let lockout = lockout();
        let t0 = Instant::now();
        assert!(
            lockout
                .failure(Some("mallory"), "10.0.0.9", Failure::Denied, t0)
                .is_empty()
        );
        assert!(
            lockout
                .failure(Some("mallory"), "10.0.0.9", Failure::Denied, t0)
                .is_empty()
        );
        let blocked = lockout.failure(Some("mallory"), "10.0.0.9", Failure::Denied, t0);
        assert_eq!(blocked.len(), 2);
        assert!(lockout.is_blocked(Some("mallory"), "10.0.0.1", || false, t0));
        assert!(lockout.is_blocked(Some("alice"), "10.0.0.9", || false, t0));
        assert!(!lockout.is_blocked(Some("alice"), "10.0.0.1", || false, t0));
        // An admin is not held by an address block.
        assert!(!lockout.is_blocked(Some("root"), "10.0.0.9", || true, t0));
        assert_eq!(lockout.list(t0).len(), 2);
        assert!(lockout.lift(Kind::Identity, "mallory", t0));
        assert!(!lockout.lift(Kind::Identity, "mallory", t0));
        assert!(!lockout.is_blocked(Some("mallory"), "10.0.0.1", || false, t0));
    }

    #[test]
    fn a_block_ends_by_itself_and_one_more_failure_does_not_renew_it() {
        let lockout = lockout();
        let t0 = Instant::now();
        for _ in 0..3 {
            lockout.failure(Some("mallory"), "10.0.0.9", Failure::Denied, t0);
        }
        assert!(lockout.is_blocked(Some("mallory"), "10.0.0.1", || false, t0));
        let later = t0 + Duration::from_secs(61);
        assert!(!lockout.is_blocked(Some("mallory"), "10.0.0.1", || false, later));
        assert!(
            lockout
                .failure(Some("mallory"), "10.0.0.9", Failure::Denied, later)
                .is_empty()
        );
        assert!(!lockout.is_blocked(Some("mallory"), "10.0.0.1", || false, later));
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let lockout = lockout();
        let t0 = Instant::now();
        lockout.failure(Some("bob"), "a", Failure::Denied, t0);
        lockout.failure(
            Some("bob"),
            "b",
            Failure::Denied,
            t0 + Duration::from_secs(6),
        );
        assert!(
            lockout
                .failure(
                    Some("bob"),
                    "c",
                    Failure::Denied,
                    t0 + Duration::from_secs(12)
                )
                .is_empty()
        );
        assert!(!lockout.is_blocked(Some("bob"), "d", || false, t0 + Duration::from_secs(12)));
    }

    #[test]
    fn unknown_tokens_and_denials_count_against_their_own_thresholds() {
        let lockout = lockout();
        let t0 = Instant::now();
        for _ in 0..2 {
            lockout.failure(Some("bob"), "a", Failure::Denied, t0);
        }
        for _ in 0..4 {
            assert!(
                lockout
                    .failure(Some("bob"), "a", Failure::UnknownToken, t0)
                    .is_empty()
            );
        }
        assert!(!lockout.is_blocked(Some("bob"), "b", || false, t0));
        let tripped = lockout.failure(Some("bob"), "a", Failure::UnknownToken, t0);
        assert_eq!(tripped.len(), 2, "identity and address");
        assert!(
            tripped
                .iter()
                .all(|t| t.blocked && t.failure == Failure::UnknownToken)
        );
        assert!(lockout.is_blocked(Some("bob"), "b", || false, t0));
        assert_eq!(lockout.list(t0)[1].failures, 7);
    }

    #[test]
    fn an_alert_only_identity_is_flagged_and_served() {
        let lockout = lockout();
        let billing = "spiffe://shop/billing";
        let t0 = Instant::now();
        let mut flagged = 0;
        for _ in 0..6 {
            for tripped in lockout.failure(Some(billing), "10.0.0.7", Failure::Denied, t0) {
                if tripped.kind == Kind::Identity {
                    assert!(!tripped.blocked);
                    flagged += 1;
                }
            }
        }
        assert_eq!(flagged, 2, "flagged at each threshold's worth of failures");
        assert!(!lockout.is_blocked(Some(billing), "10.0.0.1", || false, t0));
        // Its address is not alert-only: with blocks by address on, it is blocked.
        assert!(lockout.is_blocked(Some("other"), "10.0.0.7", || false, t0));
    }
}
