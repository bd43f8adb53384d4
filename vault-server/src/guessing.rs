//! The guessing detector. With a card's first six and last four digits known (both
//! printed on receipts, and allowed on screens), a 16-digit card has about 10^5
//! Luhn-valid candidates, a 15-digit one 10^4 and a 14-digit one 10^3. Every call that
//! carries a card number can test one: FindSubject and EraseSubject answer with the
//! card's tokens, and Tokenize with `reuse_existing` answers with the existing token.
//!
//! So each identity's card numbers are grouped in **buckets** (tenant, first six, last
//! four; expiry ignored, as fingerprints ignore it), and the distinct cards (keyed
//! fingerprints) in each bucket within `window_secs` are counted. Real traffic brings
//! few different cards into one bucket (a million cards spread over the issuers put
//! about 15 in the fullest); a guesser brings many. Above `max_cards_per_bucket` the
//! call is refused and the identity **flagged in that bucket**: every later call of
//! that identity in that bucket is refused until an admin lifts the flag, which never
//! ends by itself (a slow guesser must not win by waiting). Flags are kept in the
//! store, so they survive restarts and are shared by the vaults of one database.
//!
//! Buckets are named by a keyed id (HMAC under a random key kept in the store), never
//! by digits. Memory is bounded: at most `max_cards_per_bucket + 1` fingerprints (8
//! bytes each) per bucket, and the least recently used buckets are dropped beyond
//! `MAX_BUCKETS`. There is no alert-only mode here.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envelope::SecretKey;
use serde::Deserialize;

use crate::card::Pan;
use crate::policy::Tenant;

/// `[guessing]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuessingSettings {
    /// Different cards one identity may bring into one bucket within the window; the
    /// next is refused and flags the identity in that bucket.
    #[serde(default = "default_max_cards_per_bucket")]
    pub max_cards_per_bucket: u32,
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// FindSubject calls one identity may make per minute (RESOURCE_EXHAUSTED above).
    #[serde(default = "default_find_subject_per_minute")]
    pub find_subject_per_minute: u32,
}

impl Default for GuessingSettings {
    fn default() -> Self {
        Self {
            max_cards_per_bucket: default_max_cards_per_bucket(),
            window_secs: default_window_secs(),
            find_subject_per_minute: default_find_subject_per_minute(),
        }
    }
}

fn default_max_cards_per_bucket() -> u32 {
    32
}
fn default_window_secs() -> u64 {
    86_400
}
fn default_find_subject_per_minute() -> u32 {
    30
}

/// Most (identity, bucket) pairs counted; beyond it the least recently used go.
const MAX_BUCKETS: usize = 200_000;
/// Most identities whose FindSubject calls are counted.
const MAX_FINDERS: usize = 10_000;

/// A bucket's keyed id.
pub type BucketId = [u8; 16];

/// The `meta` key under which the bucket key is kept.
pub const BUCKET_KEY: &str = "guessing-bucket-key";
/// The `meta` key prefix of flags: `guessing-flag/<bucket hex>/<identity>`, holding
/// when it was raised (8 bytes, big-endian milliseconds), or nothing once lifted.
pub const FLAGS: &str = "guessing-flag/";

/// The keyed id of the bucket of `pan` in `tenant`.
pub fn bucket_id(key: &SecretKey, tenant: &Tenant, pan: &Pan) -> BucketId {
    let digits = pan.expose_digits().as_bytes();
    let mac = envelope::hmac_sha256(
        key,
        &[
            b"tokenvault.guessing-bucket.v1",
            tenant.as_str().as_bytes(),
            &digits[..6],
            &digits[digits.len() - 4..],
        ],
    );
    let mut id = [0; 16];
    id.copy_from_slice(&mac[..16]);
    id
}

/// A flag, as `vaultctl blocks list` shows it: `<identity> bucket <hex>`.
pub fn flag_subject(identity: &str, bucket: &BucketId) -> String {
    format!("{identity} bucket {}", hex::encode(bucket))
}

/// The identity and bucket a flag subject names.
pub fn parse_flag_subject(subject: &str) -> Option<(String, BucketId)> {
    let (identity, bucket) = subject.rsplit_once(" bucket ")?;
    let bucket = hex::decode(bucket).ok()?.try_into().ok()?;
    Some((identity.to_owned(), bucket))
}

/// The `meta` key of a flag.
pub fn flag_key(identity: &str, bucket: &BucketId) -> String {
    format!("{FLAGS}{}/{identity}", hex::encode(bucket))
}

/// The identity and bucket a flag's `meta` key (without [`FLAGS`]) names.
pub fn parse_flag_key(key: &str) -> Option<(String, BucketId)> {
    let (bucket, identity) = key.split_once('/')?;
    let bucket = hex::decode(bucket).ok()?.try_into().ok()?;
    Some((identity.to_owned(), bucket))
}

/// What the detector says of one card number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Refused; `newly_flagged` on the call that crossed the threshold.
    Refused {
        newly_flagged: bool,
    },
}

#[derive(Debug)]
struct Bucket {
    /// Distinct cards (a fingerprint's first 8 bytes) and when each was last seen,
    /// oldest first.
    seen: VecDeque<(u64, Instant)>,
    /// The tick of its last use (for the least-recently-used order).
    tick: u64,
}

type Key = (Arc<str>, BucketId);

#[derive(Debug, Default)]
struct Inner {
    buckets: HashMap<Key, Bucket>,
    /// Uses in order: (key, tick); an entry whose tick is not the bucket's is stale.
    order: VecDeque<(Key, u64)>,
    tick: u64,
    identities: HashMap<String, Arc<str>>,
    flags: HashSet<(String, BucketId)>,
    finds: HashMap<String, VecDeque<Instant>>,
}

#[derive(Debug)]
pub struct Detector {
    settings: GuessingSettings,
    bucket_key: SecretKey,
    inner: Mutex<Inner>,
}

impl Detector {
    pub fn new(settings: GuessingSettings, bucket_key: SecretKey) -> Self {
        Self {
            settings,
            bucket_key,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn settings(&self) -> &GuessingSettings {
        &self.settings
    }

    pub fn bucket(&self, tenant: &Tenant, pan: &Pan) -> BucketId {
        bucket_id(&self.bucket_key, tenant, pan)
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts the card `fingerprint` that `identity` brought into `bucket` at `now`.
    pub fn observe(
        &self,
        identity: &str,
        bucket: BucketId,
        fingerprint: &[u8; 32],
        now: Instant,
    ) -> Verdict {
        let mut inner = self.inner();
        if inner.flags.contains(&(identity.to_owned(), bucket)) {
            return Verdict::Refused {
                newly_flagged: false,
            };
        }
        let card = u64::from_be_bytes(fingerprint[..8].try_into().unwrap_or_default());
        let name = match inner.identities.get(identity) {
            Some(name) => Arc::clone(name),
            None => {
                let name: Arc<str> = Arc::from(identity);
                inner
                    .identities
                    .insert(identity.to_owned(), Arc::clone(&name));
                name
            }
        };
        inner.tick += 1;
        let tick = inner.tick;
        let key = (name, bucket);
        inner.order.push_back((key.clone(), tick));
        let window = Duration::from_secs(self.settings.window_secs);
        let limit = self.settings.max_cards_per_bucket as usize;
        let bucket_state = inner.buckets.entry(key).or_insert_with(|| Bucket {
            seen: VecDeque::new(),
            tick,
        });
        bucket_state.tick = tick;
        let seen = &mut bucket_state.seen;
        seen.retain(|(_, at)| now.duration_since(*at) < window);
        let verdict = match seen.iter().position(|(c, _)| *c == card) {
            Some(position) => {
                // A card seen again (a retry, a returning customer) counts once.
                seen.remove(position);
                seen.push_back((card, now));
                Verdict::Allowed
            }
            None => {
                seen.push_back((card, now));
                while seen.len() > limit + 1 {
                    seen.pop_front();
                }
                match seen.len() > limit {
                    true => Verdict::Refused {
                        newly_flagged: true,
                    },
                    false => Verdict::Allowed,
                }
            }
        };
        if verdict != Verdict::Allowed {
            inner.flags.insert((identity.to_owned(), bucket));
        }
        evict(&mut inner);
        verdict
    }

    /// Whether `identity` may make another FindSubject call at `now` (and counts it).
    pub fn allow_find(&self, identity: &str, now: Instant) -> bool {
        let limit = self.settings.find_subject_per_minute as usize;
        let mut inner = self.inner();
        if inner.finds.len() >= MAX_FINDERS && !inner.finds.contains_key(identity) {
            let minute = Duration::from_secs(60);
            inner
                .finds
                .retain(|_, times| crate::window::live(times, now, minute));
        }
        let times = inner.finds.entry(identity.to_owned()).or_default();
        crate::window::record(times, now, Duration::from_secs(60)) <= limit
    }

    /// Every flag in force: (identity, bucket).
    pub fn flags(&self) -> Vec<(String, BucketId)> {
        let mut flags: Vec<_> = self.inner().flags.iter().cloned().collect();
        flags.sort();
        flags
    }

    /// Takes in the flags the store holds (at start-up, and from the other vaults of
    /// a shared database), replacing those known.
    pub fn replace_flags(&self, flags: HashSet<(String, BucketId)>) {
        self.inner().flags = flags;
    }

    /// Lifts a flag and forgets the bucket's count. Returns false when there was none.
    pub fn lift(&self, identity: &str, bucket: &BucketId) -> bool {
        let mut inner = self.inner();
        let lifted = inner.flags.remove(&(identity.to_owned(), *bucket));
        if let Some(name) = inner.identities.get(identity).cloned() {
            inner.buckets.remove(&(name, *bucket));
        }
        lifted
    }
}

/// Drops the least recently used buckets beyond [`MAX_BUCKETS`], and compacts the use
/// order when stale entries pile up.
fn evict(inner: &mut Inner) {
    while inner.buckets.len() > MAX_BUCKETS {
        let Some((key, tick)) = inner.order.pop_front() else {
            break;
        };
        if inner.buckets.get(&key).is_some_and(|b| b.tick == tick) {
            inner.buckets.remove(&key);
        }
    }
    if inner.order.len() > 4 * MAX_BUCKETS.max(inner.buckets.len()) {
        let buckets = &inner.buckets;
        inner
            .order
            .retain(|(key, tick)| buckets.get(key).is_some_and(|b| b.tick == *tick));
    }
    if inner.identities.len() > MAX_BUCKETS {
        let live: HashSet<Arc<str>> = inner.buckets.keys().map(|(n, _)| Arc::clone(n)).collect();
        inner.identities.retain(|_, name| live.contains(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector(limit: u32) -> Detector {
        Detector::new(
            GuessingSettings {
                max_cards_per_bucket: limit,
                window_secs: 3600,
                find_subject_per_minute: 3,
            },
            SecretKey::from_slice(&[7; 32]).unwrap(),
        )
    }

    fn fingerprint(n: u64) -> [u8; 32] {
        let mut out = [0; 32];
        out[..8].copy_from_slice(&n.to_be_bytes());
        out
    }

    #[test]
    fn the_card_past_the_threshold_flags_the_identity_in_that_bucket_only() {
        let detector = detector(5);
        let now = Instant::now();
        let (a, b) = ([1; 16], [2; 16]);
        for n in 0..5 {
            assert_eq!(
                detector.observe("x", a, &fingerprint(n), now),
                Verdict::Allowed
            );
            // The same card again counts once.
            assert_eq!(
                detector.observe("x", a, &fingerprint(n), now),
                Verdict::Allowed
            );
        }
        assert_eq!(
            detector.observe("x", a, &fingerprint(5), now),
            Verdict::Refused {
                newly_flagged: true
            }
        );
        // Flagged: even a card it brought before is refused in that bucket, and the
        // flag does not end with the window.
        let later = now + Duration::from_secs(7200);
        assert_eq!(
            detector.observe("x", a, &fingerprint(0), later),
            Verdict::Refused {
                newly_flagged: false
            }
        );
        // Another bucket, another identity: unaffected.
        assert_eq!(
            detector.observe("x", b, &fingerprint(9), now),
            Verdict::Allowed
        );
        assert_eq!(
            detector.observe("y", a, &fingerprint(9), now),
            Verdict::Allowed
        );
        assert_eq!(detector.flags(), vec![("x".to_owned(), a)]);
        assert!(detector.lift("x", &a));
        assert!(!detector.lift("x", &a));
        assert_eq!(
            detector.observe("x", a, &fingerprint(0), later),
            Verdict::Allowed
        );
    }

    #[test]
    fn cards_older_than_the_window_no_longer_count() {
        let detector = detector(3);
        let now = Instant::now();
        for n in 0..3 {
            detector.observe("x", [1; 16], &fingerprint(n), now);
        }
        let later = now + Duration::from_secs(3600);
        assert_eq!(
            detector.observe("x", [1; 16], &fingerprint(3), later),
            Verdict::Allowed
        );
    }

    #[test]
    fn find_subject_is_rate_limited_per_identity() {
        let detector = detector(5);
        let now = Instant::now();
        assert!((0..3).all(|_| detector.allow_find("x", now)));
        assert!(!detector.allow_find("x", now));
        assert!(detector.allow_find("y", now));
        assert!(detector.allow_find("x", now + Duration::from_secs(60)));
    }

    #[test]
    fn flag_names_round_trip() {
        let bucket = [0xab; 16];
        let identity = "uri:spiffe://x.test/a bucket b";
        let subject = flag_subject(identity, &bucket);
        assert_eq!(
            parse_flag_subject(&subject),
            Some((identity.to_owned(), bucket))
        );
        let key = flag_key(identity, &bucket);
        assert_eq!(
            parse_flag_key(key.strip_prefix(FLAGS).unwrap()),
            Some((identity.to_owned(), bucket))
        );
    }

    /// The default threshold against real traffic: a million cards whose first six
    /// spread over issuers as a merchant's do (`testcards`), loaded by one identity,
    /// all pass, with the real bucket and fingerprint functions.
    #[test]
    fn a_million_card_load_with_a_real_spread_of_issuers_passes() {
        let detector = Detector::new(
            GuessingSettings::default(),
            SecretKey::from_slice(&[7; 32]).unwrap(),
        );
        let fingerprint_key = SecretKey::from_slice(&[9; 32]).unwrap();
        let tenant = Tenant::parse("acme").unwrap();
        let now = Instant::now();
        let mut fullest: HashMap<BucketId, u32> = HashMap::new();
        for n in 0..1_000_000 {
            let pan = Pan::parse(&testcards::card_number(n)).unwrap();
            let bucket = detector.bucket(&tenant, &pan);
            let fingerprint = crate::record::fingerprint(&fingerprint_key, &tenant, &pan);
            assert_eq!(
                detector.observe("uri:spiffe://x.test/loader", bucket, &fingerprint, now),
                Verdict::Allowed,
                "card {n}"
            );
            *fullest.entry(bucket).or_default() += 1;
        }
        let most = fullest.values().max().copied().unwrap_or(0);
        println!(
            "the fullest of {} buckets holds {most} cards",
            fullest.len()
        );
        assert!(most < 32, "{most}");
        assert!(detector.flags().is_empty());
    }

    #[test]
    fn memory_stays_bounded() {
        let detector = detector(2);
        let now = Instant::now();
        for n in 0..(MAX_BUCKETS as u64 + 5000) {
            let mut bucket = [0; 16];
            bucket[..8].copy_from_slice(&n.to_be_bytes());
            detector.observe("x", bucket, &fingerprint(n), now);
        }
        let inner = detector.inner();
        assert_eq!(inner.buckets.len(), MAX_BUCKETS);
        assert!(inner.order.len() <= 4 * MAX_BUCKETS + 1);
    }
}
