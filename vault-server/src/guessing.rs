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

/// Most (identity, bucket) pairs counted. Beyond it the least recently used buckets
/// holding at most [`LIGHT`] cards are forgotten (nearly all real traffic); buckets
/// holding more are never forgotten while their cards count, so that nobody can wipe
/// a guess count by flooding the detector with other buckets.
const MAX_BUCKETS: usize = 200_000;
/// Most cards a bucket may hold and still be forgotten for room.
const LIGHT: usize = 2;
/// Most buckets holding more than [`LIGHT`] cards. Beyond it (after forgetting the
/// cards past the window) a card that would make one more is refused: the detector
/// fails closed rather than forget.
const MAX_HEAVY: usize = 100_000;
/// Bucket flags one identity may have; the next flags the identity in every bucket.
pub const MAX_FLAGS_PER_IDENTITY: usize = 16;
/// Most identities whose FindSubject calls are counted.
const MAX_FINDERS: usize = 10_000;

/// A bucket's keyed id.
pub type BucketId = [u8; 16];

/// The "bucket" of a flag that holds every bucket of the identity.
pub const ALL_BUCKETS: BucketId = [0xff; 16];

/// The `meta` key under which the bucket key is kept.
pub const BUCKET_KEY: &str = "guessing-bucket-key";
/// The `meta` key prefix of flags: `guessing-flag/<bucket hex>/<identity>`, holding
/// `R` and when it was raised, or `L` and when it was lifted (8 bytes, big-endian
/// milliseconds each).
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

/// The different cards one identity may bring into one bucket, for a card of
/// `digits` digits: `max`, but no more than a thirty-second of the candidates that
/// share a first six and last four (10^(digits - 11): a 13-digit card has 100), and
/// at least 2.
pub fn limit_for(max: u32, digits: usize) -> usize {
    let candidates = 10u64.saturating_pow(digits.saturating_sub(11) as u32);
    (max as usize).min(((candidates / 32) as usize).max(2))
}

fn bucket_text(bucket: &BucketId) -> String {
    match *bucket == ALL_BUCKETS {
        true => "all".to_owned(),
        false => hex::encode(bucket),
    }
}

fn parse_bucket(text: &str) -> Option<BucketId> {
    match text {
        "all" => Some(ALL_BUCKETS),
        _ => hex::decode(text).ok()?.try_into().ok(),
    }
}

/// A flag, as `vaultctl blocks list` shows it: `<identity> bucket <hex>`, or
/// `<identity> bucket all`.
pub fn flag_subject(identity: &str, bucket: &BucketId) -> String {
    format!("{identity} bucket {}", bucket_text(bucket))
}

/// The identity and bucket a flag subject names.
pub fn parse_flag_subject(subject: &str) -> Option<(String, BucketId)> {
    let (identity, bucket) = subject.rsplit_once(" bucket ")?;
    Some((identity.to_owned(), parse_bucket(bucket)?))
}

/// The `meta` key of a flag.
pub fn flag_key(identity: &str, bucket: &BucketId) -> String {
    format!("{FLAGS}{}/{identity}", bucket_text(bucket))
}

/// The identity and bucket a flag's `meta` key (without [`FLAGS`]) names.
pub fn parse_flag_key(key: &str) -> Option<(String, BucketId)> {
    let (bucket, identity) = key.split_once('/')?;
    Some((identity.to_owned(), parse_bucket(bucket)?))
}

/// A flag as the store holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagRow {
    Raised(i64),
    Lifted(i64),
}

impl FlagRow {
    pub fn encode(self) -> Vec<u8> {
        let (tag, at) = match self {
            FlagRow::Raised(at) => (b'R', at),
            FlagRow::Lifted(at) => (b'L', at),
        };
        let mut out = vec![tag];
        out.extend_from_slice(&at.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let at = |b: &[u8]| b.try_into().ok().map(i64::from_be_bytes);
        match bytes {
            [b'R', rest @ ..] => Some(FlagRow::Raised(at(rest)?)),
            [b'L', rest @ ..] => Some(FlagRow::Lifted(at(rest)?)),
            _ => None,
        }
    }
}

/// What the detector says of one card number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Refused. `flagged`: the buckets this call flagged (the card's, and
    /// [`ALL_BUCKETS`] when the identity has too many flags), to be made durable.
    Refused {
        flagged: [Option<BucketId>; 2],
    },
}

impl Verdict {
    const REFUSED: Verdict = Verdict::Refused {
        flagged: [None, None],
    };
}

#[derive(Debug)]
struct Bucket {
    /// Distinct cards (a fingerprint's first 8 bytes) and when each was last seen,
    /// oldest first.
    seen: VecDeque<(u64, Instant)>,
    /// The tick of its last use (for the least-recently-used order).
    tick: u64,
    /// Holds more than [`LIGHT`] cards (counted in `Inner::heavy`).
    heavy: bool,
}

type Key = (Arc<str>, BucketId);

#[derive(Debug, Default)]
struct Inner {
    buckets: HashMap<Key, Bucket>,
    /// Uses in order: (key, tick); an entry whose tick is not the bucket's is stale.
    order: VecDeque<(Key, u64)>,
    tick: u64,
    heavy: usize,
    identities: HashMap<String, Arc<str>>,
    /// Flags in force, with when each was raised (milliseconds).
    flags: HashMap<(String, BucketId), i64>,
    finds: HashMap<String, VecDeque<Instant>>,
}

impl Inner {
    fn flagged(&self, identity: &str, bucket: &BucketId) -> bool {
        // Nearly always: no flag at all, and nothing to allocate for the look-ups.
        if self.flags.is_empty() {
            return false;
        }
        let key = |b: &BucketId| (identity.to_owned(), *b);
        self.flags.contains_key(&key(&ALL_BUCKETS)) || self.flags.contains_key(&key(bucket))
    }

    /// Forgets a bucket's count.
    fn forget(&mut self, identity: &str, bucket: &BucketId) {
        if let Some(name) = self.identities.get(identity).cloned()
            && let Some(state) = self.buckets.remove(&(name, *bucket))
            && state.heavy
        {
            self.heavy -= 1;
        }
    }

    /// Forgets the cards past the window in every heavy bucket.
    fn sweep_heavy(&mut self, now: Instant, window: Duration) {
        let mut heavy = 0;
        self.buckets.retain(|_, state| {
            if state.heavy {
                state
                    .seen
                    .retain(|(_, at)| now.duration_since(*at) < window);
                state.heavy = state.seen.len() > LIGHT;
                heavy += usize::from(state.heavy);
            }
            !state.seen.is_empty()
        });
        self.heavy = heavy;
    }
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

    /// Counts the card `fingerprint` that `identity` brought into `bucket` at `now`;
    /// `limit` is what [`limit_for`] gives for the card's length.
    pub fn observe(
        &self,
        identity: &str,
        bucket: BucketId,
        fingerprint: &[u8; 32],
        limit: usize,
        now: Instant,
    ) -> Verdict {
        let mut inner = self.inner();
        if inner.flagged(identity, &bucket) {
            return Verdict::REFUSED;
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
        let state = inner.buckets.entry(key.clone()).or_insert_with(|| Bucket {
            seen: VecDeque::new(),
            tick,
            heavy: false,
        });
        state.tick = tick;
        state
            .seen
            .retain(|(_, at)| now.duration_since(*at) < window);
        let known = state.seen.iter().position(|(c, _)| *c == card);
        match known {
            // A card seen again (a retry, a returning customer) counts once.
            Some(position) => {
                state.seen.remove(position);
                state.seen.push_back((card, now));
            }
            None => {
                state.seen.push_back((card, now));
                while state.seen.len() > limit + 1 {
                    state.seen.pop_front();
                }
            }
        }
        let over = known.is_none() && state.seen.len() > limit;
        let (was_heavy, heavy) = (state.heavy, state.seen.len() > LIGHT);
        state.heavy = heavy;
        match (was_heavy, heavy) {
            (false, true) => inner.heavy += 1,
            (true, false) => inner.heavy -= 1,
            _ => {}
        }
        if inner.heavy > MAX_HEAVY {
            inner.sweep_heavy(now, window);
            if inner.heavy > MAX_HEAVY {
                // Full of buckets that still count: refuse this card rather than
                // forget any of them.
                if let Some(state) = inner.buckets.get_mut(&key) {
                    state.seen.retain(|(c, _)| *c != card);
                    if state.heavy && state.seen.len() <= LIGHT {
                        state.heavy = false;
                        inner.heavy -= 1;
                    }
                }
                tracing::error!(
                    "the guessing detector holds {MAX_HEAVY} buckets with several cards: new \
                     cards that would add one are refused until the window frees some"
                );
                return Verdict::REFUSED;
            }
        }
        let verdict = match over {
            false => Verdict::Allowed,
            true => {
                let raised = runtime::now_unix_ms();
                inner.flags.insert((identity.to_owned(), bucket), raised);
                let held = inner.flags.keys().filter(|(i, _)| i == identity).count();
                let all = (held > MAX_FLAGS_PER_IDENTITY).then(|| {
                    inner
                        .flags
                        .insert((identity.to_owned(), ALL_BUCKETS), raised);
                    ALL_BUCKETS
                });
                Verdict::Refused {
                    flagged: [Some(bucket), all],
                }
            }
        };
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
        let mut flags: Vec<_> = self.inner().flags.keys().cloned().collect();
        flags.sort();
        flags
    }

    /// When the flag was raised, if it is in force.
    pub fn raised_at(&self, identity: &str, bucket: &BucketId) -> Option<i64> {
        self.inner()
            .flags
            .get(&(identity.to_owned(), *bucket))
            .copied()
    }

    /// Takes in the flags the store holds (at start-up, and as the vaults of a shared
    /// database raise and lift them): a flag raised there is held here; one lifted
    /// there after it was raised here is lifted here too, with its bucket's count. Returns
    /// the flags held here that the store does not show raised (their write failed, or
    /// has not landed yet): to be written again.
    pub fn merge_flags(
        &self,
        rows: &[((String, BucketId), FlagRow)],
    ) -> Vec<((String, BucketId), i64)> {
        let mut inner = self.inner();
        let mut raised_in_store = HashSet::new();
        for ((identity, bucket), row) in rows {
            let key = (identity.clone(), *bucket);
            match *row {
                FlagRow::Raised(at) => {
                    raised_in_store.insert(key.clone());
                    let held = inner.flags.entry(key).or_insert(at);
                    *held = (*held).max(at);
                }
                FlagRow::Lifted(at) => {
                    if inner.flags.get(&key).is_some_and(|raised| *raised <= at) {
                        inner.flags.remove(&key);
                        inner.forget(identity, bucket);
                    }
                }
            }
        }
        inner
            .flags
            .iter()
            .filter(|(key, _)| !raised_in_store.contains(*key))
            .map(|(key, at)| (key.clone(), *at))
            .collect()
    }

    /// Lifts a flag and forgets the bucket's count. Returns false when there was none.
    pub fn lift(&self, identity: &str, bucket: &BucketId) -> bool {
        let mut inner = self.inner();
        let lifted = inner
            .flags
            .remove(&(identity.to_owned(), *bucket))
            .is_some();
        inner.forget(identity, bucket);
        lifted
    }
}

/// Drops the least recently used light buckets beyond [`MAX_BUCKETS`] (a heavy one
/// leaves the order; its next use puts it back), and compacts the use order when stale
/// entries pile up.
fn evict(inner: &mut Inner) {
    while inner.buckets.len() > MAX_BUCKETS {
        let Some((key, tick)) = inner.order.pop_front() else {
            break;
        };
        if inner
            .buckets
            .get(&key)
            .is_some_and(|b| b.tick == tick && !b.heavy)
        {
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
        let flagged: HashSet<String> = inner.flags.keys().map(|(i, _)| i.clone()).collect();
        inner
            .identities
            .retain(|identity, name| live.contains(name) || flagged.contains(identity));
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
                detector.observe("x", a, &fingerprint(n), 5, now),
                Verdict::Allowed
            );
            // The same card again counts once.
            assert_eq!(
                detector.observe("x", a, &fingerprint(n), 5, now),
                Verdict::Allowed
            );
        }
        assert_eq!(
            detector.observe("x", a, &fingerprint(5), 5, now),
            Verdict::Refused {
                flagged: [Some(a), None]
            }
        );
        // Flagged: even a card it brought before is refused in that bucket, and the
        // flag does not end with the window.
        let later = now + Duration::from_secs(7200);
        assert_eq!(
            detector.observe("x", a, &fingerprint(0), 5, later),
            Verdict::REFUSED
        );
        // Another bucket, another identity: unaffected.
        assert_eq!(
            detector.observe("x", b, &fingerprint(9), 5, now),
            Verdict::Allowed
        );
        assert_eq!(
            detector.observe("y", a, &fingerprint(9), 5, now),
            Verdict::Allowed
        );
        assert_eq!(detector.flags(), vec![("x".to_owned(), a)]);
        assert!(detector.lift("x", &a));
        assert!(!detector.lift("x", &a));
        assert_eq!(
            detector.observe("x", a, &fingerprint(0), 5, later),
            Verdict::Allowed
        );
    }

    #[test]
    fn cards_older_than_the_window_no_longer_count() {
        let detector = detector(3);
        let now = Instant::now();
        for n in 0..3 {
            detector.observe("x", [1; 16], &fingerprint(n), 3, now);
        }
        let later = now + Duration::from_secs(3600);
        assert_eq!(
            detector.observe("x", [1; 16], &fingerprint(3), 3, later),
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
            let limit = limit_for(32, pan.expose_digits().len());
            assert_eq!(
                detector.observe(
                    "uri:spiffe://x.test/loader",
                    bucket,
                    &fingerprint,
                    limit,
                    now
                ),
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
    fn flooding_other_buckets_does_not_wipe_a_guess_count() {
        let detector = detector(32);
        let now = Instant::now();
        let target = [7; 16];
        for n in 0..32 {
            assert_eq!(
                detector.observe("x", target, &fingerprint(n), 32, now),
                Verdict::Allowed
            );
        }
        for n in 0..(MAX_BUCKETS as u64 + 10_000) {
            let mut bucket = [0; 16];
            bucket[..8].copy_from_slice(&n.to_be_bytes());
            detector.observe("x", bucket, &fingerprint(1_000_000 + n), 32, now);
        }
        assert_eq!(
            detector.observe("x", target, &fingerprint(32), 32, now),
            Verdict::Refused {
                flagged: [Some(target), None]
            }
        );
    }

    #[test]
    fn too_many_flags_flag_every_bucket_of_the_identity() {
        let detector = detector(2);
        let now = Instant::now();
        let mut last = Verdict::Allowed;
        for b in 0..=MAX_FLAGS_PER_IDENTITY as u8 {
            for n in 0..3 {
                last = detector.observe("x", [b; 16], &fingerprint(n), 2, now);
            }
        }
        let bucket = [MAX_FLAGS_PER_IDENTITY as u8; 16];
        assert_eq!(
            last,
            Verdict::Refused {
                flagged: [Some(bucket), Some(ALL_BUCKETS)]
            }
        );
        assert_eq!(
            detector.observe("x", [200; 16], &fingerprint(9), 2, now),
            Verdict::REFUSED
        );
        assert_eq!(
            detector.observe("y", [200; 16], &fingerprint(9), 2, now),
            Verdict::Allowed
        );
    }

    #[test]
    fn a_lift_on_another_vault_lifts_here_and_a_newer_flag_stays() {
        let detector = detector(2);
        let now = Instant::now();
        for n in 0..3 {
            detector.observe("x", [1; 16], &fingerprint(n), 2, now);
        }
        let raised = detector.raised_at("x", &[1; 16]).unwrap();
        let key = ("x".to_owned(), [1u8; 16]);
        // Not in the store yet: to be written.
        assert_eq!(detector.merge_flags(&[]), vec![(key.clone(), raised)]);
        // Lifted there before it was raised here: it stays, and is written again.
        let older = [(key.clone(), FlagRow::Lifted(raised - 1))];
        assert_eq!(detector.merge_flags(&older), vec![(key.clone(), raised)]);
        // Lifted there after: lifted here, with its count.
        assert!(
            detector
                .merge_flags(&[(key.clone(), FlagRow::Lifted(raised))])
                .is_empty()
        );
        assert!(detector.flags().is_empty());
        assert_eq!(
            detector.observe("x", [1; 16], &fingerprint(7), 2, now),
            Verdict::Allowed
        );
        // Raised by another vault: held here.
        assert!(
            detector
                .merge_flags(&[(("z".into(), [2; 16]), FlagRow::Raised(5))])
                .is_empty()
        );
        assert_eq!(
            detector.observe("z", [2; 16], &fingerprint(1), 2, now),
            Verdict::REFUSED
        );
    }

    #[test]
    fn short_cards_get_a_lower_limit() {
        assert_eq!(limit_for(32, 12), 2);
        assert_eq!(limit_for(32, 13), 3);
        assert_eq!(limit_for(32, 14), 31);
        assert_eq!(limit_for(32, 16), 32);
        assert_eq!(limit_for(32, 19), 32);
        assert_eq!(
            FlagRow::decode(&FlagRow::Lifted(42).encode()),
            Some(FlagRow::Lifted(42))
        );
    }

    #[test]
    fn memory_stays_bounded() {
        let detector = detector(2);
        let now = Instant::now();
        for n in 0..(MAX_BUCKETS as u64 + 5000) {
            let mut bucket = [0; 16];
            bucket[..8].copy_from_slice(&n.to_be_bytes());
            detector.observe("x", bucket, &fingerprint(n), 2, now);
        }
        let inner = detector.inner();
        assert_eq!(inner.buckets.len(), MAX_BUCKETS);
        assert!(inner.order.len() <= 4 * MAX_BUCKETS + 1);
    }
}
