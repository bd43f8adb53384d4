//! Velocity flags: forwards per caller and per card (by keyed fingerprint, within the
//! tenant) over a sliding window. Above a threshold the forward is flagged in the
//! audit log and, if configured, refused. Counters live in memory and are bounded.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// `[velocity]` settings. A limit of 0 turns its rule off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VelocitySettings {
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Forwards one identity may make within the window before they are flagged.
    #[serde(default)]
    pub max_forwards_per_caller: u32,
    /// Forwards of one card (in one tenant) within the window before they are flagged.
    #[serde(default)]
    pub max_forwards_per_card: u32,
    /// Refuse a flagged forward (RESOURCE_EXHAUSTED) instead of only flagging it.
    #[serde(default)]
    pub refuse: bool,
}

impl Default for VelocitySettings {
    fn default() -> Self {
        Self {
            window_secs: default_window_secs(),
            max_forwards_per_caller: 0,
            max_forwards_per_card: 0,
            refuse: false,
        }
    }
}

fn default_window_secs() -> u64 {
    3600
}

/// Most callers and cards tracked; beyond it the ones idle longest are forgotten.
const MAX_TRACKED: usize = 200_000;

#[derive(Debug)]
pub struct Velocity {
    settings: VelocitySettings,
    callers: Mutex<HashMap<String, VecDeque<Instant>>>,
    cards: Mutex<HashMap<Vec<u8>, VecDeque<Instant>>>,
}

/// Counts one event for `key` and returns how many fell in the window.
fn count<K: std::hash::Hash + Eq>(
    map: &Mutex<HashMap<K, VecDeque<Instant>>>,
    key: K,
    window: Duration,
    now: Instant,
) -> usize {
    let mut map = map
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if map.len() >= MAX_TRACKED {
        map.retain(|_, times| crate::window::live(times, now, window));
    }
    crate::window::record(map.entry(key).or_default(), now, window)
}

impl Velocity {
    pub fn new(settings: VelocitySettings) -> Self {
        Self {
            settings,
            callers: Mutex::new(HashMap::new()),
            cards: Mutex::new(HashMap::new()),
        }
    }

    pub fn refuses(&self) -> bool {
        self.settings.refuse
    }

    /// Counts a forward by `caller` of the card `card_key`; returns the rules it broke.
    pub fn forward(&self, caller: &str, card_key: &[u8], now: Instant) -> Vec<String> {
        let window = Duration::from_secs(self.settings.window_secs);
        let mut broken = Vec::new();
        let by_caller = count(&self.callers, caller.to_owned(), window, now);
        let by_card = count(&self.cards, card_key.to_vec(), window, now);
        let (caller_limit, card_limit) = (
            self.settings.max_forwards_per_caller,
            self.settings.max_forwards_per_card,
        );
        if caller_limit > 0 && by_caller > caller_limit as usize {
            broken.push(format!(
                "caller made {by_caller} forwards in {} s (limit {caller_limit})",
                self.settings.window_secs
            ));
        }
        if card_limit > 0 && by_card > card_limit as usize {
            broken.push(format!(
                "card forwarded {by_card} times in {} s (limit {card_limit})",
                self.settings.window_secs
            ));
        }
        broken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_above_a_limit_within_the_window_are_flagged() {
        let velocity = Velocity::new(VelocitySettings {
            window_secs: 10,
            max_forwards_per_caller: 3,
            max_forwards_per_card: 2,
            refuse: false,
        });
        let t0 = Instant::now();
        assert!(velocity.forward("job", b"card-1", t0).is_empty());
        assert!(velocity.forward("job", b"card-1", t0).is_empty());
        let third = velocity.forward("job", b"card-1", t0);
        assert_eq!(third.len(), 1);
        assert!(third[0].contains("card forwarded 3 times"));
        // Another card: only the caller rule, at its fourth forward.
        let fourth = velocity.forward("job", b"card-2", t0);
        assert_eq!(fourth.len(), 1);
        assert!(fourth[0].contains("caller made 4 forwards"));
        // After the window, counting starts over.
        let later = t0 + Duration::from_secs(11);
        assert!(velocity.forward("job", b"card-1", later).is_empty());
    }

    #[test]
    fn a_limit_of_zero_never_flags() {
        let velocity = Velocity::new(VelocitySettings::default());
        let t0 = Instant::now();
        for _ in 0..100 {
            assert!(velocity.forward("job", b"card", t0).is_empty());
        }
    }
}
