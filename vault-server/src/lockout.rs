//! Lockout: an identity or a peer address with too many failed calls (permission
//! denied, no identity, unknown token) within a window is blocked for a while. Blocked
//! callers get PERMISSION_DENIED with no detail. State is in memory: a restart lifts
//! every block, which the audit log shows.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// `[lockout]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockoutSettings {
    /// Failures within `window_secs` that block the identity or address.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
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
}

impl Default for LockoutSettings {
    fn default() -> Self {
        Self {
            max_failures: default_max_failures(),
            window_secs: default_window_secs(),
            block_secs: default_block_secs(),
            by_address: false,
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

/// Most subjects tracked; beyond it the oldest unblocked ones are forgotten, so that
/// memory stays bounded whatever callers do.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Identity,
    Address,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Identity => "identity",
            Kind::Address => "address",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "identity" => Some(Kind::Identity),
            "address" => Some(Kind::Address),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct Subject {
    failures: VecDeque<Instant>,
    blocked_until: Option<Instant>,
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
    subjects: Mutex<HashMap<(Kind, String), Subject>>,
}

impl Lockout {
    pub fn new(settings: LockoutSettings) -> Self {
        Self {
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

    /// Counts a failure; returns the subjects it newly blocked.
    pub fn failure(
        &self,
        identity: Option<&str>,
        address: &str,
        now: Instant,
    ) -> Vec<(Kind, String)> {
        let window = Duration::from_secs(self.settings.window_secs);
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
                    subject.failures.clear();
                }
                None => {}
            }
            let failures = crate::window::record(&mut subject.failures, now, window);
            if failures >= self.settings.max_failures as usize {
                subject.blocked_until = Some(now + Duration::from_secs(self.settings.block_secs));
                blocked.push(key);
            }
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
                    failures: state.failures.len() as u32,
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
            window_secs: 10,
            block_secs: 60,
            by_address: true,
        })
    }

    #[test]
    fn failures_within_the_window_block_identity_and_address() {
        let lockout = lockout();
        let t0 = Instant::now();
        assert!(lockout.failure(Some("mallory"), "10.0.0.9", t0).is_empty());
        assert!(lockout.failure(Some("mallory"), "10.0.0.9", t0).is_empty());
        let blocked = lockout.failure(Some("mallory"), "10.0.0.9", t0);
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
            lockout.failure(Some("mallory"), "10.0.0.9", t0);
        }
        assert!(lockout.is_blocked(Some("mallory"), "10.0.0.1", || false, t0));
        let later = t0 + Duration::from_secs(61);
        assert!(!lockout.is_blocked(Some("mallory"), "10.0.0.1", || false, later));
        assert!(
            lockout
                .failure(Some("mallory"), "10.0.0.9", later)
                .is_empty()
        );
        assert!(!lockout.is_blocked(Some("mallory"), "10.0.0.1", || false, later));
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let lockout = lockout();
        let t0 = Instant::now();
        lockout.failure(Some("bob"), "a", t0);
        lockout.failure(Some("bob"), "b", t0 + Duration::from_secs(6));
        assert!(
            lockout
                .failure(Some("bob"), "c", t0 + Duration::from_secs(12))
                .is_empty()
        );
        assert!(!lockout.is_blocked(Some("bob"), "d", || false, t0 + Duration::from_secs(12)));
    }
}
