//! The behaviour every storage engine must have. Each engine's tests call
//! [`run_all`] with a factory for fresh, empty stores.

use std::sync::Arc;

use super::{
    AuditSeal, Claim, ClaimRule, Delete, DeleteOutcome, InsertOutcome, KeyUse, KeyVersions, LogEnd,
    NewRecord, RecordIndexes, Replaceable, Rewrite, RewriteOutcome, Riding, Sealed, Store,
    Tombstone,
};
use crate::token::Token;

const V1: KeyVersions = KeyVersions {
    card_data: 1,
    fingerprint: 1,
};

fn record(token: &Token, value: &[u8], index_key: &[u8], reuse_existing: bool) -> NewRecord {
    NewRecord {
        token: token.clone(),
        value: value.to_vec(),
        index_key: index_key.to_vec(),
        reuse_existing,
        older_index_keys: Vec::new(),
        versions: V1,
        indexes: RecordIndexes::default(),
        outcome: None,
        claim: None,
    }
}

fn delete(token: &Token, expected: &[u8], index_key: &[u8], versions: KeyVersions) -> Delete {
    Delete {
        token: token.clone(),
        expected: expected.to_vec(),
        index_key: index_key.to_vec(),
        versions,
        indexes: RecordIndexes::default(),
        tombstone: Tombstone {
            key: [b"tombstone of ", token.as_str().as_bytes()].concat(),
            deleted_at_unix_ms: 1_000,
        },
    }
}

/// Runs `suite` to its end on a runtime of two workers, polled from a thread with a
/// 64 MiB stack: in an unoptimized build the suite's future keeps every case's state
/// side by side, which outgrows a test thread's 2 MiB (it overflowed in CI).
pub fn on_large_stack<F, Fut>(suite: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::Builder::new()
        .name("conformance".into())
        .stack_size(64 << 20)
        .spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(suite())
        })
        .unwrap()
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
}

pub async fn run_all<S: Store, F: std::future::Future<Output = S>>(mut fresh: impl FnMut() -> F) {
    insert_then_get(fresh().await).await;
    never_overwrites(fresh().await).await;
    index_reuse(fresh().await).await;
    index_reuse_within_one_call(fresh().await).await;
    delete_removes_record_and_index(fresh().await).await;
    concurrent_inserts_all_land(Arc::new(fresh().await)).await;
    outcomes_are_stored_and_replaced(fresh().await).await;
    an_outcome_rides_its_record_only_when_stored(fresh().await).await;
    an_event_rides_its_insert_when_it_finishes_the_call(Arc::new(fresh().await)).await;
    concurrent_claims_of_one_key_have_one_winner(Arc::new(fresh().await)).await;
    concurrent_inserts_claiming_one_outcome_store_one_record(Arc::new(fresh().await)).await;
    a_delete_leaves_a_tombstone_until_pruned(fresh().await).await;
    a_delete_leaves_an_unsent_erasure_until_sent(fresh().await).await;
    every_record_is_listed_in_token_order(fresh().await).await;
    records_are_counted_and_listed_by_key_version(fresh().await).await;
    rewrite_replaces_only_an_unchanged_record(fresh().await).await;
    reuse_finds_a_card_under_an_older_fingerprint_version(fresh().await).await;
    meta_is_stored_and_replaced(fresh().await).await;
    audit_entries_are_appended_and_read_in_order(fresh().await).await;
    expired_records_and_every_token_of_a_card_are_found(fresh().await).await;
    card_shaped_tokens_are_stored_and_indexed_like_opaque_ones(fresh().await).await;
}

/// Card-shaped tokens (12 to 19 digits) beside opaque ones: every index finds them
/// exactly, whatever bytes precede them in an index entry (a creation time whose bytes
/// are ASCII digits too).
async fn card_shaped_tokens_are_stored_and_indexed_like_opaque_ones(store: impl Store) {
    let card = |n: &str| crate::card::Pan::parse(n).unwrap();
    let tokens = [
        Token::generate_card(&card("4242424242424242"), false).unwrap(),
        Token::generate().unwrap(),
        Token::generate_card(&card("378282246310005"), true).unwrap(),
        Token::parse("100000000000").unwrap(),
        Token::parse("1000000000000000000").unwrap(),
    ];
    // "12345678": a time whose bytes are digits, just before every token.
    let digits_time = i64::from_be_bytes(*b"12345678");
    let mut records = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let mut r = record(token, b"v", format!("card-x/i{i}").as_bytes(), false);
        r.indexes = RecordIndexes {
            expires_at_unix_ms: if i % 2 == 0 { 100 + i as i64 } else { 0 },
            created_at_unix_ms: digits_time + i as i64,
            card_key: b"card-x".to_vec(),
        };
        records.push(r);
    }
    assert_eq!(
        store.insert(records).await.unwrap(),
        vec![InsertOutcome::Stored; 5]
    );
    for token in &tokens {
        assert_eq!(store.get(token).await.unwrap().as_deref(), Some(&b"v"[..]));
    }
    // Put-if-absent holds for card-shaped tokens too.
    assert_eq!(
        store
            .insert(vec![record(&tokens[0], b"other", b"card-y/i0", false)])
            .await
            .unwrap(),
        vec![InsertOutcome::TokenTaken]
    );
    let mut all = store.tokens_of_card(b"card-x").await.unwrap();
    all.sort();
    let mut expected = tokens.to_vec();
    expected.sort();
    assert_eq!(all, expected);
    assert_eq!(
        store.expired(1_000, 10).await.unwrap(),
        vec![tokens[0].clone(), tokens[2].clone(), tokens[4].clone()],
        "in expiry order"
    );
    // Reuse finds a live card-shaped token under its index key (one that never
    // expires: the others' times are long past).
    let mut again = record(&Token::generate().unwrap(), b"w", b"card-x/i3", true);
    again.indexes.card_key = b"card-x".to_vec();
    assert_eq!(
        store.insert(vec![again]).await.unwrap(),
        vec![InsertOutcome::Existing(tokens[3].clone())]
    );
    // Rewrap lists them from the card index.
    let active = KeyVersions {
        card_data: 2,
        fingerprint: 2,
    };
    let mut listed: Vec<Token> = store
        .records_off_versions(active, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    listed.sort();
    assert_eq!(listed, expected);
    // A delete takes a card-shaped token out of every index.
    let mut gone = delete(&tokens[4], b"v", b"card-x/i4", V1);
    gone.indexes = RecordIndexes {
        expires_at_unix_ms: 104,
        created_at_unix_ms: digits_time + 4,
        card_key: b"card-x".to_vec(),
    };
    assert_eq!(store.delete(gone).await.unwrap(), DeleteOutcome::Deleted);
    assert_eq!(store.get(&tokens[4]).await.unwrap(), None);
    assert_eq!(store.tokens_of_card(b"card-x").await.unwrap().len(), 4);
    assert_eq!(store.expired(1_000, 10).await.unwrap().len(), 2);
}

/// Audit entries `first..=last`, each holding its number, chained after whatever the
/// store says is last (which must be `first - 1`).
pub fn numbered(first: u64, last: u64) -> AuditSeal {
    Box::new(move |end: LogEnd| {
        assert_eq!(end.last.map_or(0, |(sequence, _)| sequence), first - 1);
        let anchor = (first > 1).then(|| (first - 1).to_be_bytes().to_vec());
        assert_eq!(
            end.anchor, anchor,
            "the anchor written with the last append"
        );
        Sealed {
            entries: (first..=last)
                .map(|n| (n, n.to_string().into_bytes()))
                .collect(),
            anchor: last.to_be_bytes().to_vec(),
        }
    })
}

async fn expired_records_and_every_token_of_a_card_are_found(store: impl Store) {
    let tokens: Vec<Token> = (0..4).map(|_| Token::generate().unwrap()).collect();
    let indexes = |expires_at_unix_ms: i64, card: &[u8]| RecordIndexes {
        expires_at_unix_ms,
        created_at_unix_ms: 0,
        card_key: card.to_vec(),
    };
    let mut records = Vec::new();
    for (i, (expires, card)) in [
        (100, "card-a"),
        (200, "card-a"),
        (0, "card-b"),
        (300, "card-a"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = record(&tokens[i], b"v", format!("{card}/i{i}").as_bytes(), false);
        r.indexes = indexes(expires, card.as_bytes());
        records.push(r);
    }
    store.insert(records).await.unwrap();
    assert_eq!(store.expired(99, 10).await.unwrap(), vec![]);
    assert_eq!(
        store.expired(200, 10).await.unwrap(),
        vec![tokens[0].clone(), tokens[1].clone()],
        "in expiry order; a record that never expires is never listed"
    );
    assert_eq!(store.expired(1_000, 1).await.unwrap().len(), 1);
    let mut card_a = store.tokens_of_card(b"card-a").await.unwrap();
    card_a.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let mut expected = vec![tokens[0].clone(), tokens[1].clone(), tokens[3].clone()];
    expected.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(card_a, expected);
    assert_eq!(store.tokens_of_card(b"card-").await.unwrap(), vec![]);
    // Cards known: each key with a record, duplicates counted; a prefix is no card.
    let keys = |keys: &[&[u8]]| keys.iter().map(|k| k.to_vec()).collect::<Vec<_>>();
    assert_eq!(
        store
            .count_known_cards(keys(&[
                b"card-a", b"card-b", b"card-c", b"card-", b"card-a"
            ]))
            .await
            .unwrap(),
        3
    );
    assert_eq!(store.count_known_cards(Vec::new()).await.unwrap(), 0);
    // A delete removes the record from both indexes.
    let mut gone = delete(&tokens[0], b"v", b"card-a/i0", V1);
    gone.indexes = indexes(100, b"card-a");
    assert_eq!(store.delete(gone).await.unwrap(), DeleteOutcome::Deleted);
    assert_eq!(
        store.expired(200, 10).await.unwrap(),
        vec![tokens[1].clone()]
    );
    assert_eq!(store.tokens_of_card(b"card-a").await.unwrap().len(), 2);
    store.compact().await.unwrap();
    assert_eq!(
        store.get(&tokens[1]).await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

async fn audit_entries_are_appended_and_read_in_order(store: impl Store) {
    assert_eq!(store.last_audit().await.unwrap(), None);
    assert_eq!(
        store.append_audit(numbered(1, 2)).await.unwrap(),
        vec![1, 2]
    );
    assert_eq!(
        store.append_audit(numbered(3, 300)).await.unwrap(),
        (3..=300).collect::<Vec<_>>()
    );
    assert_eq!(
        store.last_audit().await.unwrap(),
        Some((300, b"300".to_vec()))
    );
    let page = store.read_audit(0, 2).await.unwrap();
    assert_eq!(page, vec![(1, b"1".to_vec()), (2, b"2".to_vec())]);
    let page = store.read_audit(255, 1000).await.unwrap();
    assert_eq!(page.len(), 45);
    assert_eq!(
        page[0].0, 256,
        "big-endian keys keep numeric order past 255"
    );
}

async fn records_are_counted_and_listed_by_key_version(store: impl Store) {
    let tokens: Vec<Token> = (0..5).map(|_| Token::generate().unwrap()).collect();
    let mut records = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let mut r = record(token, b"v", format!("i{i}").as_bytes(), false);
        if i >= 2 {
            r.versions = KeyVersions {
                card_data: 2,
                fingerprint: 1,
            };
        }
        records.push(r);
    }
    store.insert(records).await.unwrap();
    let counts = store.version_counts();
    assert_eq!(counts.get(&(KeyUse::CardData, 1)), Some(&2));
    assert_eq!(counts.get(&(KeyUse::CardData, 2)), Some(&3));
    assert_eq!(counts.get(&(KeyUse::Fingerprint, 1)), Some(&5));

    let active = KeyVersions {
        card_data: 2,
        fingerprint: 1,
    };
    // Listed in pages through the cursor: exactly the two records on card-data v1.
    let first = store.records_off_versions(active, None, 1).await.unwrap();
    assert_eq!(first.len(), 1);
    let rest = store
        .records_off_versions(active, Some(&first[0].0), 10)
        .await
        .unwrap();
    let mut listed: Vec<Token> = first.into_iter().chain(rest).map(|(_, t)| t).collect();
    listed.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let mut expected = tokens[..2].to_vec();
    expected.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(listed, expected);

    assert_eq!(
        store
            .delete(delete(&tokens[0], b"v", b"i0", V1))
            .await
            .unwrap(),
        DeleteOutcome::Deleted
    );
    assert_eq!(
        store.version_counts().get(&(KeyUse::CardData, 1)),
        Some(&1),
        "a delete uncounts its record"
    );
    let left = store.records_off_versions(active, None, 10).await.unwrap();
    assert_eq!(
        left.into_iter().map(|(_, t)| t).collect::<Vec<_>>(),
        vec![tokens[1].clone()]
    );
}

async fn rewrite_replaces_only_an_unchanged_record(store: impl Store) {
    let (a, b) = (Token::generate().unwrap(), Token::generate().unwrap());
    store
        .insert(vec![
            record(&a, b"old-a", b"fp1-a", false),
            record(&b, b"old-b", b"fp1-b", false),
        ])
        .await
        .unwrap();
    let v2 = KeyVersions {
        card_data: 2,
        fingerprint: 2,
    };
    let rewrite = |token: &Token, expected: &[u8], index: &str| Rewrite {
        token: token.clone(),
        expected: expected.to_vec(),
        value: b"new".to_vec(),
        old_versions: V1,
        new_versions: v2,
        old_index_key: format!("fp1-{index}").into_bytes(),
        new_index_key: format!("fp2-{index}").into_bytes(),
        old_indexes: RecordIndexes::default(),
        new_indexes: RecordIndexes::default(),
    };
    assert_eq!(
        store.rewrite(rewrite(&a, b"old-a", "a")).await.unwrap(),
        RewriteOutcome::Rewritten
    );
    assert_eq!(store.get(&a).await.unwrap().as_deref(), Some(&b"new"[..]));
    // A stale copy (the record changed since it was read) writes nothing.
    assert_eq!(
        store.rewrite(rewrite(&a, b"old-a", "a")).await.unwrap(),
        RewriteOutcome::Changed
    );
    // A record deleted after it was read is not resurrected.
    assert_eq!(
        store
            .delete(delete(&b, b"old-b", b"fp1-b", V1))
            .await
            .unwrap(),
        DeleteOutcome::Deleted
    );
    assert_eq!(
        store.rewrite(rewrite(&b, b"old-b", "b")).await.unwrap(),
        RewriteOutcome::Changed
    );
    assert_eq!(store.get(&b).await.unwrap(), None);
    let counts = store.version_counts();
    assert_eq!(counts.get(&(KeyUse::CardData, 1)), None);
    assert_eq!(counts.get(&(KeyUse::CardData, 2)), Some(&1));
    assert!(
        store
            .records_off_versions(v2, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // The fingerprint index moved with the record: reuse finds it under fp2.
    let again = Token::generate().unwrap();
    let mut dup = record(&again, b"x", b"fp2-a", true);
    dup.versions = v2;
    assert_eq!(
        store.insert(vec![dup]).await.unwrap(),
        vec![InsertOutcome::Existing(a.clone())]
    );
    // A delete that read the record before the rewrite must read it again...
    assert_eq!(
        store
            .delete(delete(&a, b"old-a", b"fp1-a", V1))
            .await
            .unwrap(),
        DeleteOutcome::Changed
    );
    assert_eq!(store.get(&a).await.unwrap().as_deref(), Some(&b"new"[..]));
    // ...and with the new bytes, versions and index key it removes everything.
    assert_eq!(
        store
            .delete(delete(&a, b"new", b"fp2-a", v2))
            .await
            .unwrap(),
        DeleteOutcome::Deleted
    );
    assert!(store.version_counts().is_empty());
}

async fn reuse_finds_a_card_under_an_older_fingerprint_version(store: impl Store) {
    let a = Token::generate().unwrap();
    store
        .insert(vec![record(&a, b"A", b"fp1-card", false)])
        .await
        .unwrap();
    let b = Token::generate().unwrap();
    let mut newer = record(&b, b"B", b"fp2-card", true);
    newer.older_index_keys = vec![b"fp1-card".to_vec()];
    assert_eq!(
        store.insert(vec![newer]).await.unwrap(),
        vec![InsertOutcome::Existing(a)]
    );
}

async fn meta_is_stored_and_replaced(store: impl Store) {
    assert_eq!(store.get_meta("job").await.unwrap(), None);
    store.put_meta("job", b"one".to_vec()).await.unwrap();
    store.put_meta("job", b"two".to_vec()).await.unwrap();
    assert_eq!(
        store.get_meta("job").await.unwrap().as_deref(),
        Some(&b"two"[..])
    );
    for key in ["writer/b", "writer/a", "writers", "writer"] {
        store.put_meta(key, Vec::new()).await.unwrap();
    }
    assert_eq!(store.list_meta("writer/").await.unwrap(), ["a", "b"]);
    assert!(store.list_meta("none/").await.unwrap().is_empty());
}

/// A record's outcome is written in the record's own write, and only when the record
/// is stored: not for a taken token, not when an existing token is returned.
async fn an_outcome_rides_its_record_only_when_stored(store: impl Store) {
    let token = Token::generate().unwrap();
    let mut first = record(&token, b"v1", b"acme/card-1", false);
    first.outcome = Some((b"\0sealed/1".to_vec(), b"answer one".to_vec()));
    assert_eq!(
        store.insert(vec![first]).await.unwrap(),
        [InsertOutcome::Stored]
    );
    assert_eq!(
        store.get_outcome(b"\0sealed/1").await.unwrap().as_deref(),
        Some(&b"answer one"[..])
    );
    // The same token again: taken, and its outcome is not written.
    let mut taken = record(&token, b"v2", b"acme/card-2", false);
    taken.outcome = Some((b"\0sealed/2".to_vec(), b"answer two".to_vec()));
    assert_eq!(
        store.insert(vec![taken]).await.unwrap(),
        [InsertOutcome::TokenTaken]
    );
    assert_eq!(store.get_outcome(b"\0sealed/2").await.unwrap(), None);
    // The same card with reuse: the existing token, and no outcome.
    let mut reuse = record(&Token::generate().unwrap(), b"v3", b"acme/card-1", true);
    reuse.outcome = Some((b"\0sealed/3".to_vec(), b"answer three".to_vec()));
    assert_eq!(
        store.insert(vec![reuse]).await.unwrap(),
        [InsertOutcome::Existing(token)]
    );
    assert_eq!(store.get_outcome(b"\0sealed/3").await.unwrap(), None);
}

/// An event for the call an insert finishes: chained onto the log's end in the
/// insert's own write, given the outcomes the write had, and only when the riding says
/// they finish the call.
fn event_if_stored(label: &'static str) -> Riding<[InsertOutcome]> {
    Box::new(move |outcomes: &[InsertOutcome]| {
        let stored = outcomes.iter().all(|o| *o == InsertOutcome::Stored);
        let label = format!("{label}:{}", outcomes.len());
        stored.then(|| -> AuditSeal {
            Box::new(move |end: LogEnd| {
                let next = end.last.map_or(0, |(sequence, _)| sequence) + 1;
                Sealed {
                    entries: vec![(next, label.into_bytes())],
                    anchor: next.to_be_bytes().to_vec(),
                }
            })
        })
    })
}

async fn an_event_rides_its_insert_when_it_finishes_the_call<S: Store>(store: Arc<S>) {
    store.append_audit(numbered(1, 1)).await.unwrap();
    let token = Token::generate().unwrap();
    let stored = store
        .insert_audited(
            vec![
                record(&token, b"v1", b"acme/card-1", false),
                record(&Token::generate().unwrap(), b"v2", b"acme/card-2", false),
            ],
            Some(event_if_stored("two stored")),
        )
        .await
        .unwrap();
    assert_eq!(stored, [InsertOutcome::Stored, InsertOutcome::Stored]);
    assert_eq!(
        store.last_audit().await.unwrap(),
        Some((2, b"two stored:2".to_vec()))
    );
    // A taken token does not finish the call: no event rides.
    let taken = store
        .insert_audited(
            vec![record(&token, b"v3", b"acme/card-3", false)],
            Some(event_if_stored("taken")),
        )
        .await
        .unwrap();
    assert_eq!(taken, [InsertOutcome::TokenTaken]);
    assert_eq!(store.last_audit().await.unwrap().unwrap().0, 2);
    // Riding inserts and plain appends at once: one chain, every entry once, each
    // record beside its event.
    let tokens: Vec<Token> = (0..16).map(|_| Token::generate().unwrap()).collect();
    let inserts = tokens.iter().enumerate().map(|(i, token)| {
        let store = Arc::clone(&store);
        let record = record(token, b"v", format!("acme/many-{i}").as_bytes(), false);
        async move {
            store
                .insert_audited(vec![record], Some(event_if_stored("one")))
                .await
        }
    });
    let appends = (0..8).map(|_| {
        let store = Arc::clone(&store);
        async move {
            store
                .append_audit(Box::new(|end: LogEnd| {
                    let next = end.last.map_or(0, |(sequence, _)| sequence) + 1;
                    Sealed {
                        entries: vec![(next, b"plain".to_vec())],
                        anchor: next.to_be_bytes().to_vec(),
                    }
                }))
                .await
        }
    });
    let (inserted, appended) = tokio::join!(
        futures::future::join_all(inserts),
        futures::future::join_all(appends)
    );
    assert!(
        inserted
            .into_iter()
            .all(|r| r.unwrap() == [InsertOutcome::Stored])
    );
    assert!(appended.into_iter().all(|r| r.unwrap().len() == 1));
    let log = store.read_audit(0, 100).await.unwrap();
    let sequences: Vec<u64> = log.iter().map(|(s, _)| *s).collect();
    assert_eq!(sequences, (1..=2 + 16 + 8).collect::<Vec<u64>>());
    let riding = log.iter().filter(|(_, e)| e == b"one:1").count();
    assert_eq!(riding, 16);
    for token in &tokens {
        assert!(store.get(token).await.unwrap().is_some());
    }
    // A delete's event rides it when the record is deleted, and only then.
    let event_if_deleted = || -> Riding<DeleteOutcome> {
        Box::new(|outcome: &DeleteOutcome| {
            (*outcome == DeleteOutcome::Deleted).then(|| -> AuditSeal {
                Box::new(|end: LogEnd| {
                    let next = end.last.map_or(0, |(sequence, _)| sequence) + 1;
                    Sealed {
                        entries: vec![(next, b"deleted".to_vec())],
                        anchor: next.to_be_bytes().to_vec(),
                    }
                })
            })
        })
    };
    let before = store.last_audit().await.unwrap().unwrap().0;
    let gone = delete(&tokens[0], b"v", b"acme/many-0", V1);
    let outcome = store.delete_audited(gone, Some(event_if_deleted())).await;
    assert_eq!(outcome.unwrap(), DeleteOutcome::Deleted);
    assert_eq!(
        store.last_audit().await.unwrap(),
        Some((before + 1, b"deleted".to_vec()))
    );
    let again = delete(&tokens[0], b"v", b"acme/many-0", V1);
    let outcome = store.delete_audited(again, Some(event_if_deleted())).await;
    assert_eq!(outcome.unwrap(), DeleteOutcome::NotFound);
    assert_eq!(store.last_audit().await.unwrap().unwrap().0, before + 1);
}

async fn outcomes_are_stored_and_replaced(store: impl Store) {
    assert_eq!(store.get_outcome(b"acme/key-1").await.unwrap(), None);
    store
        .put_outcome(b"acme/key-1".to_vec(), b"first".to_vec())
        .await
        .unwrap();
    store
        .put_outcome(b"acme/key-2".to_vec(), b"other".to_vec())
        .await
        .unwrap();
    assert_eq!(
        store.get_outcome(b"acme/key-1").await.unwrap().as_deref(),
        Some(&b"first"[..])
    );
    store
        .put_outcome(b"acme/key-1".to_vec(), b"second".to_vec())
        .await
        .unwrap();
    assert_eq!(
        store.get_outcome(b"acme/key-1").await.unwrap().as_deref(),
        Some(&b"second"[..])
    );
    assert_eq!(
        store.get_outcome(b"acme/key-2").await.unwrap().as_deref(),
        Some(&b"other"[..])
    );
    assert_eq!(
        store
            .prune_outcomes(&|value| value == b"other")
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.get_outcome(b"acme/key-2").await.unwrap(), None);
    assert!(store.get_outcome(b"acme/key-1").await.unwrap().is_some());
}

async fn a_delete_leaves_a_tombstone_until_pruned(store: impl Store) {
    let (a, b) = (Token::generate().unwrap(), Token::generate().unwrap());
    store
        .insert(vec![
            record(&a, b"A", b"ia", false),
            record(&b, b"B", b"ib", false),
        ])
        .await
        .unwrap();
    let of = |token: &Token| [b"tombstone of ", token.as_str().as_bytes()].concat();
    assert!(!store.tombstoned(vec![of(&a), of(&b)]).await.unwrap());
    let outcome = store.delete(delete(&a, b"A", b"ia", V1)).await.unwrap();
    assert_eq!(outcome, DeleteOutcome::Deleted);
    assert!(
        store
            .tombstoned(vec![b"other".to_vec(), of(&a)])
            .await
            .unwrap()
    );
    assert!(!store.tombstoned(vec![of(&b)]).await.unwrap());
    // A refused delete (changed record) leaves none.
    let outcome = store
        .delete(delete(&b, b"changed", b"ib", V1))
        .await
        .unwrap();
    assert_eq!(outcome, DeleteOutcome::Changed);
    assert!(!store.tombstoned(vec![of(&b)]).await.unwrap());
    // Deleted at 1,000 ms: kept by a prune of what is older, gone after one of newer.
    assert_eq!(store.prune_tombstones(1_000).await.unwrap(), 0);
    assert!(store.tombstoned(vec![of(&a)]).await.unwrap());
    assert_eq!(store.prune_tombstones(1_001).await.unwrap(), 1);
    assert!(!store.tombstoned(vec![of(&a)]).await.unwrap());
}

async fn a_delete_leaves_an_unsent_erasure_until_sent(store: impl Store) {
    let tokens: Vec<Token> = (0..3).map(|_| Token::generate().unwrap()).collect();
    store
        .insert(
            tokens
                .iter()
                .map(|token| {
                    record(
                        token,
                        token.as_str().as_bytes(),
                        token.as_str().as_bytes(),
                        false,
                    )
                })
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(store.unsent_erasures(10).await.unwrap(), vec![]);
    for token in &tokens {
        let bytes = token.as_str().as_bytes();
        let outcome = store.delete(delete(token, bytes, bytes, V1)).await.unwrap();
        assert_eq!(outcome, DeleteOutcome::Deleted);
    }
    let tombstone = |token: &Token| Tombstone {
        key: [b"tombstone of ", token.as_str().as_bytes()].concat(),
        deleted_at_unix_ms: 1_000,
    };
    let mut all: Vec<Tombstone> = tokens.iter().map(tombstone).collect();
    all.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(store.unsent_erasures(10).await.unwrap(), all);
    let first_two = store.unsent_erasures(2).await.unwrap();
    assert_eq!(first_two, all[..2]);
    store
        .erasures_sent(first_two.into_iter().map(|t| t.key).collect())
        .await
        .unwrap();
    assert_eq!(store.unsent_erasures(10).await.unwrap(), all[2..]);
    // Sending does not forget the tombstone.
    assert!(store.tombstoned(vec![all[0].key.clone()]).await.unwrap());
    assert_eq!(
        store
            .missing_tombstones(vec![b"none".to_vec(), all[1].key.clone(), b"nor".to_vec()])
            .await
            .unwrap(),
        vec![b"none".to_vec(), b"nor".to_vec()]
    );
}

async fn every_record_is_listed_in_token_order(store: impl Store) {
    let mut tokens: Vec<Token> = (0..5).map(|_| Token::generate().unwrap()).collect();
    store
        .insert(
            tokens
                .iter()
                .map(|token| {
                    record(
                        token,
                        token.as_str().as_bytes(),
                        token.as_str().as_bytes(),
                        false,
                    )
                })
                .collect(),
        )
        .await
        .unwrap();
    tokens.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let mut listed = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.records_after(cursor.take(), 2).await.unwrap();
        let Some((last, _)) = page.last() else { break };
        assert!(page.len() <= 2);
        cursor = Some(last.clone());
        listed.extend(page);
    }
    let expected: Vec<(Vec<u8>, Vec<u8>)> = tokens
        .iter()
        .map(|token| {
            (
                token.as_str().as_bytes().to_vec(),
                token.as_str().as_bytes().to_vec(),
            )
        })
        .collect();
    assert_eq!(listed, expected);
}

/// Claims of one idempotency key: exactly one of many concurrent ones wins; a held
/// claim is kept; a replaceable one is taken over.
async fn concurrent_claims_of_one_key_have_one_winner<S: Store>(store: Arc<S>) {
    let never: Replaceable = Arc::new(|_| false);
    let claims = (0..16u8).map(|n| {
        let (store, never) = (Arc::clone(&store), Arc::clone(&never));
        tokio::spawn(async move {
            store
                .claim_outcome(b"acme/order-1".to_vec(), vec![n], never)
                .await
                .unwrap()
        })
    });
    let mut winners = Vec::new();
    for (n, claim) in claims.enumerate() {
        if claim.await.unwrap() == Claim::Claimed {
            winners.push(n as u8);
        }
    }
    assert_eq!(winners.len(), 1, "one claim wins: {winners:?}");
    let stored = store.get_outcome(b"acme/order-1").await.unwrap().unwrap();
    assert_eq!(stored, winners);
    assert_eq!(
        store
            .claim_outcome(b"acme/order-1".to_vec(), b"late".to_vec(), never)
            .await
            .unwrap(),
        Claim::Taken(stored.clone())
    );
    // Replaceable only when it still holds what the winner wrote.
    let only = |value: Vec<u8>| -> Replaceable { Arc::new(move |stored| stored == value) };
    assert_eq!(
        store
            .claim_outcome(
                b"acme/order-1".to_vec(),
                b"x".to_vec(),
                only(b"other".to_vec())
            )
            .await
            .unwrap(),
        Claim::Taken(stored.clone())
    );
    assert_eq!(
        store
            .claim_outcome(b"acme/order-1".to_vec(), b"released".to_vec(), only(stored))
            .await
            .unwrap(),
        Claim::Claimed
    );
    assert_eq!(
        store.get_outcome(b"acme/order-1").await.unwrap().as_deref(),
        Some(&b"released"[..])
    );
}

/// Records whose outcome is claimed with them (`NewRecord::claim`, a sealed card's
/// nonce): of many inserts claiming one key at once exactly one record is stored, with
/// its outcome; every other is told the stored outcome and leaves nothing behind. A
/// replaceable outcome is replaced, and a record refused for its token leaves no claim.
async fn concurrent_inserts_claiming_one_outcome_store_one_record<S: Store>(store: Arc<S>) {
    const KEY: &[u8] = b"\0sealed/nonce-1";
    let claiming = |value: &[u8], rule: Replaceable| {
        let mut new = record(&Token::generate().unwrap(), value, b"acme/card-9", false);
        new.outcome = Some((KEY.to_vec(), value.to_vec()));
        new.claim = Some(ClaimRule(rule));
        new
    };
    let never: Replaceable = Arc::new(|_| false);
    let inserts = (0..16u8).map(|n| {
        let (store, new) = (Arc::clone(&store), claiming(&[n], Arc::clone(&never)));
        let token = new.token.clone();
        tokio::spawn(async move { (token, store.insert(vec![new]).await.unwrap()) })
    });
    let mut stored = Vec::new();
    let mut told = Vec::new();
    for insert in inserts {
        let (token, outcomes) = insert.await.unwrap();
        match outcomes.as_slice() {
            [InsertOutcome::Stored] => stored.push(token),
            [InsertOutcome::OutcomeTaken(value)] => {
                told.push(value.clone());
                assert_eq!(store.get(&token).await.unwrap(), None, "a loser's record");
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(stored.len(), 1, "one claiming insert wins");
    let winner = store.get(&stored[0]).await.unwrap().unwrap();
    assert_eq!(store.get_outcome(KEY).await.unwrap(), Some(winner.clone()));
    assert!(told.iter().all(|value| *value == winner), "{told:?}");
    // A rule that may replace what is stored: the record and its outcome are stored.
    let replace = claiming(b"again", Arc::new(move |stored| stored == winner));
    assert_eq!(
        store.insert(vec![replace]).await.unwrap(),
        [InsertOutcome::Stored]
    );
    assert_eq!(
        store.get_outcome(KEY).await.unwrap().as_deref(),
        Some(&b"again"[..])
    );
    // A claiming record refused for its token leaves its claim unwritten.
    let mut taken = claiming(b"taken", Arc::new(|_| true));
    taken.token = stored[0].clone();
    taken.outcome = Some((b"\0sealed/nonce-2".to_vec(), b"taken".to_vec()));
    assert_eq!(
        store.insert(vec![taken]).await.unwrap(),
        [InsertOutcome::TokenTaken]
    );
    assert_eq!(store.get_outcome(b"\0sealed/nonce-2").await.unwrap(), None);
    // Two records of one card in one write, the first's claim taken: the second is
    // stored, and indexed (reuse finds it), though the plan first indexed the first.
    let mut first = record(&Token::generate().unwrap(), b"w1", b"acme/card-7", false);
    first.outcome = Some((KEY.to_vec(), b"w1".to_vec()));
    first.claim = Some(ClaimRule(Arc::clone(&never)));
    let mut second = record(&Token::generate().unwrap(), b"w2", b"acme/card-7", false);
    second.outcome = Some((b"\0sealed/nonce-3".to_vec(), b"w2".to_vec()));
    second.claim = Some(ClaimRule(Arc::clone(&never)));
    let second_token = second.token.clone();
    let outcomes = store.insert(vec![first, second]).await.unwrap();
    assert!(
        matches!(outcomes[0], InsertOutcome::OutcomeTaken(_)),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], InsertOutcome::Stored);
    let reuse = record(&Token::generate().unwrap(), b"w3", b"acme/card-7", true);
    assert_eq!(
        store.insert(vec![reuse]).await.unwrap(),
        [InsertOutcome::Existing(second_token)]
    );
}

async fn insert_then_get(store: impl Store) {
    let (a, b) = (Token::generate().unwrap(), Token::generate().unwrap());
    let outcomes = store
        .insert(vec![
            record(&a, b"A", b"ia", false),
            record(&b, b"B", b"ib", false),
        ])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![InsertOutcome::Stored, InsertOutcome::Stored]);
    assert_eq!(store.get(&a).await.unwrap().as_deref(), Some(&b"A"[..]));
    assert_eq!(store.get(&b).await.unwrap().as_deref(), Some(&b"B"[..]));
    assert_eq!(store.get(&Token::generate().unwrap()).await.unwrap(), None);
}

async fn never_overwrites(store: impl Store) {
    let a = Token::generate().unwrap();
    store
        .insert(vec![record(&a, b"first", b"i1", false)])
        .await
        .unwrap();
    let outcomes = store
        .insert(vec![record(&a, b"second", b"i2", false)])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![InsertOutcome::TokenTaken]);
    // Within one call too.
    let b = Token::generate().unwrap();
    let outcomes = store
        .insert(vec![
            record(&b, b"one", b"i3", false),
            record(&b, b"two", b"i4", false),
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![InsertOutcome::Stored, InsertOutcome::TokenTaken]
    );
    assert_eq!(store.get(&a).await.unwrap().as_deref(), Some(&b"first"[..]));
    assert_eq!(store.get(&b).await.unwrap().as_deref(), Some(&b"one"[..]));
}

async fn index_reuse(store: impl Store) {
    let (a, b, c) = (
        Token::generate().unwrap(),
        Token::generate().unwrap(),
        Token::generate().unwrap(),
    );
    let made_at = |token: &Token, value: &[u8], at: i64, reuse: bool| {
        let mut r = record(token, value, b"card", reuse);
        r.indexes.created_at_unix_ms = at;
        r
    };
    store
        .insert(vec![made_at(&a, b"A", 1, false)])
        .await
        .unwrap();
    // Without reuse a second token for the same card is stored.
    let outcomes = store
        .insert(vec![made_at(&b, b"B", 2, false)])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![InsertOutcome::Stored]);
    // With reuse the first token is returned and nothing is stored.
    let outcomes = store
        .insert(vec![made_at(&c, b"C", 3, true)])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![InsertOutcome::Existing(a)]);
    assert_eq!(store.get(&c).await.unwrap(), None);
}

async fn index_reuse_within_one_call(store: impl Store) {
    let (a, b) = (Token::generate().unwrap(), Token::generate().unwrap());
    let outcomes = store
        .insert(vec![
            record(&a, b"A", b"card", true),
            record(&b, b"B", b"card", true),
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![InsertOutcome::Stored, InsertOutcome::Existing(a)]
    );
}

async fn delete_removes_record_and_index(store: impl Store) {
    let (a, b) = (Token::generate().unwrap(), Token::generate().unwrap());
    store
        .insert(vec![record(&a, b"A", b"card", true)])
        .await
        .unwrap();
    assert_eq!(
        store.delete(delete(&a, b"A", b"card", V1)).await.unwrap(),
        DeleteOutcome::Deleted
    );
    assert_eq!(
        store.delete(delete(&a, b"A", b"card", V1)).await.unwrap(),
        DeleteOutcome::NotFound
    );
    assert_eq!(store.get(&a).await.unwrap(), None);
    // The card is no longer indexed: reuse stores a new record.
    let outcomes = store
        .insert(vec![record(&b, b"B", b"card", true)])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![InsertOutcome::Stored]);
}

async fn concurrent_inserts_all_land<S: Store>(store: Arc<S>) {
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let token = Token::generate().unwrap();
                let value = format!("value-{i}").into_bytes();
                let index = format!("index-{i}").into_bytes();
                let outcome = store
                    .insert(vec![record(&token, &value, &index, false)])
                    .await
                    .unwrap();
                assert_eq!(outcome, vec![InsertOutcome::Stored]);
                (token, value)
            })
        })
        .collect();
    for task in tasks {
        let (token, value) = task.await.unwrap();
        assert_eq!(store.get(&token).await.unwrap(), Some(value));
    }
}
