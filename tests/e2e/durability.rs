use integration_tests::{ADMIN, Stack, synthetic_pan};
use tonic::Code;
use vault_client::{BatchItem, Card};

/// Control: GDPR-32 (docs/compliance.md).
/// Attack: a restart loses acknowledged tokens (a write not durable when answered); every
/// token answers after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_survives_a_restart() {
    let mut stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let mut stored = Vec::new();
    for n in 0..100 {
        let pan = synthetic_pan("510000", n, 16);
        stored.push(
            client
                .tokenize(Card::new(&pan, 6, 2031), false)
                .await
                .unwrap(),
        );
    }
    let cards: Vec<Card> = (100..400)
        .map(|n| Card::new(&synthetic_pan("510000", n, 16), 6, 2031))
        .collect();
    for item in client.tokenize_batch(&cards, false).await.unwrap() {
        match item {
            BatchItem::Stored(info) => stored.push(info),
            other => panic!("{other:?}"),
        }
    }

    stack.restart_vault().await;
    let mut client = stack.client(ADMIN).await;
    for info in &stored {
        assert_eq!(&client.token_info(&info.token).await.unwrap(), info);
    }
    // Reuse still finds a card stored before the restart.
    let again = client
        .tokenize(Card::new(&synthetic_pan("510000", 7, 16), 6, 2031), true)
        .await
        .unwrap();
    assert_eq!(again.token, stored[7].token);
    stack.stop().await;
}

/// Attack: with write access to the disk, swap two records, or copy one under another
/// token: reads fail with an integrity error and never return the other card.
///
/// Control: PCI-3.5.1, GDPR-32 (docs/compliance.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_records_fail_their_integrity_check() {
    if integration_tests::rocksdb_only("it edits RocksDB records") {
        return;
    }
    let mut stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let visa = client
        .tokenize(Card::new("4242424242424242", 12, 2030), false)
        .await
        .unwrap();
    let mastercard = client
        .tokenize(Card::new("5555555555554444", 11, 2031), false)
        .await
        .unwrap();
    let untouched = client
        .tokenize(Card::new("378282246310005", 10, 2032), false)
        .await
        .unwrap();
    stack.stop_vault().await;

    let moved = "tok_AAAAAAAAAAAAAAAAAAAAAA";
    {
        let db = integration_tests::open_vault_db(&stack.dir.data_dir());
        let records = db.cf_handle("records").unwrap();
        let a = db.get_cf(records, &visa.token).unwrap().unwrap();
        let b = db.get_cf(records, &mastercard.token).unwrap().unwrap();
        db.put_cf(records, &visa.token, &b).unwrap();
        db.put_cf(records, &mastercard.token, &a).unwrap();
        db.put_cf(records, moved, &a).unwrap();
    }

    stack.restart_vault().await;
    let mut client = stack.client(ADMIN).await;
    for token in [visa.token.as_str(), mastercard.token.as_str(), moved] {
        let err = client.token_info(token).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::DataLoss), "{token}: {err}");
        let message = err.to_string();
        assert!(message.contains("integrity"), "{message}");
        assert!(
            !message.contains("4242") && !message.contains("4444"),
            "{message}"
        );
    }
    assert_eq!(
        client.token_info(&untouched.token).await.unwrap(),
        untouched
    );
    stack.stop().await;
}
