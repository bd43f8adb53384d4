//! How many cards of one file share a first six and last four: the shape of a file
//! made to guess a card (every candidate number between a known first six and last
//! four), which an import must refuse since its rows skip the guessing detector.
//!
//! Counted in fixed memory, whatever the file's size: one 16-bit counter per slot of
//! a table of [`SLOTS`], the slot chosen by a keyed hash of the bucket (a key drawn
//! per count, so a file cannot be made to collide on purpose). Buckets that share a
//! slot add up, so a count is never below the truth: a file is never let through
//! because of a collision, and a real export (a few cards per bucket) stays far below
//! any sensible limit even with the table's collisions counted.

use std::hash::{BuildHasher, RandomState};

use crate::card::Pan;

/// 2^21 slots of 2 bytes: 4 MiB.
const SLOTS: usize = 1 << 21;

pub struct BucketCounts {
    counts: Vec<u16>,
    hasher: RandomState,
    limit: u16,
}

impl std::fmt::Debug for BucketCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketCounts")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// A file holds more cards sharing a first six and last four than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooMany {
    pub limit: u16,
}

impl BucketCounts {
    pub fn new(limit: u16) -> Self {
        Self {
            counts: vec![0; SLOTS],
            hasher: RandomState::new(),
            limit,
        }
    }

    /// Counts `pan`; refused once its bucket holds more than the limit.
    pub fn add(&mut self, pan: &Pan) -> Result<(), TooMany> {
        let digits = pan.expose_digits().as_bytes();
        let slot = self
            .hasher
            .hash_one((&digits[..6], &digits[digits.len() - 4..])) as usize
            % SLOTS;
        let count = &mut self.counts[slot];
        *count = count.saturating_add(1);
        match *count > self.limit {
            true => Err(TooMany { limit: self.limit }),
            false => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `n`th number of the form 424242 ...... 4242.
    fn pan(n: usize) -> Pan {
        let number = (0..1_000_000u64)
            .map(|middle| {
                let body = format!("424242{middle:06}424");
                let digit = (0..10)
                    .find(|d| crate::card::luhn_valid(format!("{body}{d}").as_bytes()))
                    .unwrap();
                format!("{body}{digit}")
            })
            .filter(|number| number.ends_with("4242"))
            .nth(n)
            .unwrap();
        Pan::parse(&number).unwrap()
    }

    #[test]
    fn one_bucket_past_the_limit_is_refused_and_spread_cards_are_not() {
        let mut counts = BucketCounts::new(50);
        for middle in 0..50 {
            counts.add(&pan(middle)).unwrap();
        }
        // The 51st candidate between the same first six and last four.
        assert_eq!(counts.add(&pan(50)), Err(TooMany { limit: 50 }));

        // 100,000 cards over many buckets: none refused.
        let mut counts = BucketCounts::new(50);
        for n in 0..100_000u64 {
            let body = format!("4{:05}{:05}{:04}", n % 97, n, n % 9_973);
            let digit = (0..10)
                .find(|d| crate::card::luhn_valid(format!("{body}{d}").as_bytes()))
                .unwrap();
            counts
                .add(&Pan::parse(&format!("{body}{digit}")).unwrap())
                .unwrap();
        }
    }
}
