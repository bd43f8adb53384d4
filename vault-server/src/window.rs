//! The one sliding-window rule, for the lockout's failures and the velocity rules'
//! forwards: an event counts while it is younger than the window.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Adds the event at `now` to `times` (oldest first), forgets those `window` old or
/// older, and returns how many are left.
pub fn record(times: &mut VecDeque<Instant>, now: Instant, window: Duration) -> usize {
    times.push_back(now);
    while times
        .front()
        .is_some_and(|t| now.duration_since(*t) >= window)
    {
        times.pop_front();
    }
    times.len()
}

/// Whether the latest of `times` still counts at `now`.
pub fn live(times: &VecDeque<Instant>, now: Instant, window: Duration) -> bool {
    times
        .back()
        .is_some_and(|t| now.duration_since(*t) < window)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_counts_while_younger_than_the_window() {
        let window = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut times = VecDeque::new();
        assert_eq!(record(&mut times, t0, window), 1);
        assert_eq!(record(&mut times, t0 + Duration::from_secs(9), window), 2);
        assert!(live(&times, t0 + Duration::from_secs(18), window));
        // Exactly one window after the first event, that event no longer counts.
        assert_eq!(record(&mut times, t0 + window, window), 2);
        assert!(!live(&times, t0 + Duration::from_secs(20), window));
    }
}
