//! Card-shaped tokens against the RocksDB store's put-if-absent, drawn the way
//! TokenizeBatch draws them: a batch of fresh tokens offered in one write, each taken one
//! drawn again, at most `CARD_ATTEMPTS` rounds. (The tokenize use case's own loop is
//! exercised end to end, RESOURCE_EXHAUSTED included, in tests/e2e/card_tokens.rs.)

use std::collections::{HashMap, HashSet};

use super::*;
use crate::card::{Pan, luhn_valid};
use crate::ops::CARD_ATTEMPTS;
use crate::token::Shape;

const V1: KeyVersions = KeyVersions {
    card_data: 1,
    fingerprint: 1,
};

fn open(dir: &Path) -> RocksStore {
    let no_versions = |_: &[u8]| None;
    RocksStore::open(
        &dir.join("data"),
        &dir.join("audit"),
        no_versions,
        &Tuning::default(),
    )
    .unwrap()
}

/// A record of one card (one card key), as tokenize writes it.
fn record(token: Token) -> NewRecord {
    NewRecord {
        token,
        value: b"sealed".to_vec(),
        index_key: b"card/exp".to_vec(),
        reuse_existing: false,
        older_index_keys: Vec::new(),
        versions: V1,
        indexes: RecordIndexes {
            expires_at_unix_ms: 0,
            created_at_unix_ms: 1,
            card_key: b"card".to_vec(),
        },
        outcome: None,
        claim: None,
    }
}

/// Stores `n` tokens of `shape` for `pan`, `per_write` to a write, each taken token
/// drawn again. Returns the stored tokens and how many draws collided; `None` when some
/// token found no free slot within `CARD_ATTEMPTS` rounds (the vault's TokenSpace).
async fn store_tokens(
    store: &RocksStore,
    shape: Shape,
    pan: &Pan,
    n: usize,
    per_write: usize,
) -> Option<(Vec<Token>, usize)> {
    let mut stored = Vec::with_capacity(n);
    let mut collisions = 0;
    while stored.len() < n {
        let mut wanted = per_write.min(n - stored.len());
        for _ in 0..CARD_ATTEMPTS {
            let tokens: Vec<Token> = (0..wanted).map(|_| shape.draw(pan).unwrap()).collect();
            let outcomes = store
                .insert(tokens.iter().cloned().map(record).collect())
                .await
                .unwrap();
            wanted = 0;
            for (token, outcome) in tokens.into_iter().zip(outcomes) {
                match outcome {
                    InsertOutcome::Stored => stored.push(token),
                    InsertOutcome::TokenTaken => {
                        collisions += 1;
                        wanted += 1;
                    }
                    InsertOutcome::Existing(_) => panic!("reuse was not asked for"),
                    InsertOutcome::OutcomeTaken(_) => panic!("no outcome was claimed"),
                }
            }
            if wanted == 0 {
                break;
            }
        }
        if wanted > 0 {
            return None;
        }
    }
    Some((stored, collisions))
}

/// The done-when: a million card-shaped tokens for one card (16 digits, last
/// four kept) through the store's put-if-absent are all distinct, all fail the Luhn
/// check, all keep the last four and none is the card.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_card_tokens_for_one_last_four_are_distinct_and_fail_luhn() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let pan = Pan::parse("4242424242424242").unwrap();
    let shape = Shape::Card {
        keep_first_six: false,
    };
    let (tokens, collisions) = store_tokens(&store, shape, &pan, 1_000_000, 10_000)
        .await
        .expect("8.1 x 10^11 candidates leave room for a million");
    assert_eq!(tokens.len(), 1_000_000);
    // About 0.6 collisions are expected (a birthday bound over 8.1 x 10^11); many
    // would mean the draws are not uniform.
    assert!(collisions < 20, "{collisions} collisions");
    let distinct: HashSet<&str> = tokens.iter().map(Token::as_str).collect();
    assert_eq!(
        distinct.len(),
        tokens.len(),
        "every stored token is distinct"
    );
    for token in &tokens {
        let digits = token.as_str().as_bytes();
        assert_eq!(digits.len(), 16);
        assert!(digits.iter().all(u8::is_ascii_digit));
        assert!(!luhn_valid(digits), "a token passes the Luhn check");
        assert!(digits.ends_with(b"4242"), "the last four are kept");
        assert_ne!(digits[0], b'0', "the first digit is never 0");
        // Compared without printing either (the card never reaches a panic message).
        assert!(
            digits != pan.expose_digits().as_bytes(),
            "a token equals the card"
        );
        assert_eq!(token.format(), crate::token::Format::Card);
    }
    // The store holds exactly them, each readable by its token.
    assert_eq!(
        store
            .version_counts()
            .get(&(crate::store::KeyUse::CardData, 1)),
        Some(&1_000_000)
    );
    for token in tokens.iter().step_by(10_007) {
        assert_eq!(
            store.get(token).await.unwrap().as_deref(),
            Some(&b"sealed"[..])
        );
    }
}

/// Every Luhn-failing 12-digit number with `first_six` and `last_four`: the whole
/// space of card-shaped tokens of such a card when its first six are kept (90).
fn whole_space(first_six: &str, last_four: &str) -> Vec<Token> {
    (0..100)
        .map(|middle| format!("{first_six}{middle:02}{last_four}"))
        .filter(|candidate| !luhn_valid(candidate.as_bytes()))
        .map(|candidate| Token::parse(&candidate).unwrap())
        .collect()
}

/// A 12-digit card whose first six and last four are kept leaves 90 tokens; when the
/// store holds them all, the draws give up after `CARD_ATTEMPTS` collisions, and until
/// then they land only in that space, all of it, about evenly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_space_gives_up_after_a_bounded_number_of_draws() {
    // A synthetic 12-digit card under a made-up prefix.
    let card = format!("50000012345{}", testcards::luhn_digit("50000012345"));
    let pan = Pan::parse(&card).unwrap();
    let shape = Shape::Card {
        keep_first_six: true,
    };
    let space = whole_space(&card[..6], &card[8..]);
    assert_eq!(space.len(), 90);

    // The draws cover the whole space, evenly (1000 expected each; σ about 31).
    let mut seen: HashMap<Token, u32> = HashMap::new();
    for _ in 0..90_000 {
        *seen.entry(shape.draw(&pan).unwrap()).or_default() += 1;
    }
    let mut drawn: Vec<&Token> = seen.keys().collect();
    drawn.sort();
    let mut expected: Vec<&Token> = space.iter().collect();
    expected.sort();
    assert_eq!(
        drawn, expected,
        "every draw is in the space, and all of it is drawn"
    );
    assert!(
        seen.values().all(|&n| (700..=1300).contains(&n)),
        "uneven draws: {seen:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let all: Vec<InsertOutcome> = store
        .insert(space.iter().cloned().map(record).collect())
        .await
        .unwrap();
    assert!(all.iter().all(|o| *o == InsertOutcome::Stored));
    assert!(
        store_tokens(&store, shape, &pan, 1, 1).await.is_none(),
        "a draw found room in a full space"
    );
}
