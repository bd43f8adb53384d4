//! The behaviour every storage engine must have. Each engine's tests call
//! [`run_all`] with a factory for fresh, empty stores.

use std::sync::Arc;

use super::{InsertOutcome, NewRecord, Store};
use crate::token::Token;

fn record(token: &Token, value: &[u8], index_key: &[u8], reuse_existing: bool) -> NewRecord {
    NewRecord {
        token: token.clone(),
        value: value.to_vec(),
        index_key: index_key.to_vec(),
        reuse_existing,
    }
}

pub async fn run_all<S: Store>(mut fresh: impl FnMut() -> S) {
    insert_then_get(fresh()).await;
    never_overwrites(fresh()).await;
    index_reuse(fresh()).await;
    index_reuse_within_one_call(fresh()).await;
    delete_removes_record_and_index(fresh()).await;
    concurrent_inserts_all_land(Arc::new(fresh())).await;
    outcomes_are_stored_and_replaced(fresh()).await;
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
    store
        .insert(vec![record(&a, b"A", b"card", false)])
        .await
        .unwrap();
    // Without reuse a second token for the same card is stored.
    let outcomes = store
        .insert(vec![record(&b, b"B", b"card", false)])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![InsertOutcome::Stored]);
    // With reuse the first token is returned and nothing is stored.
    let outcomes = store
        .insert(vec![record(&c, b"C", b"card", true)])
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
    assert!(store.delete(a.clone(), b"card".to_vec()).await.unwrap());
    assert!(!store.delete(a.clone(), b"card".to_vec()).await.unwrap());
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
