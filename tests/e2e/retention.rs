//! Retention and erasure: an expired token answers NOT_FOUND at once and is purged;
//! deleted and purged records are physically gone from every file of the data
//! directory after the purge job compacts; `EraseSubject` removes every token of one
//! card in the caller's tenant and nothing else.

use std::time::{Duration, Instant};

use integration_tests::{ADMIN, OTHER_TENANT, Stack, synthetic_pan};
use tonic::Code;
use vault_client::Card;

/// Every file under `dir`, as bytes.
fn files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    found
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Control: PCI-3.2.1, NIST-800-88-LIVE, GDPR-17 (docs/compliance.md).
/// Attack: read deleted or expired cards back from the data directory's files (tombstoned
/// but not yet compacted); after the purge no file holds their ciphertext or token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_and_deleted_records_are_physically_gone_after_the_purge() {
    if integration_tests::rocksdb_only("it checks RocksDB files for erased bytes") {
        return;
    }
    let mut stack = Stack::start().await;
    stack.add_vault_config("[retention]\npurge_interval_secs = 1\n");
    stack.restart_vault().await;
    let mut vault = stack.client(ADMIN).await;
    let expiring = vault
        .tokenize_with_ttl(
            Card::new("4242424242424242", 12, 2030),
            false,
            // Long enough to read it from the stopped vault's disk below before the
            // purge (every second) may take it.
            Some(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    let expires_at = expiring.expires_at_unix_ms.unwrap();
    assert!(expires_at > expiring.created_at_unix_ms);
    let deleted = vault
        .tokenize(Card::new("5555555555554444", 12, 2030), false)
        .await
        .unwrap();
    let kept = vault
        .tokenize(Card::new("378282246310005", 12, 2030), false)
        .await
        .unwrap();
    assert_eq!(kept.expires_at_unix_ms, None);
    let err = vault
        .tokenize_with_ttl(
            Card::new("4242424242424242", 12, 2030),
            false,
            Some(Duration::from_secs(200 * 365 * 24 * 3600)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().contains("ttl_secs"), "{err}");

    // The stored bytes of both records and their fingerprint index keys, read from the
    // stopped vault's disk.
    stack.stop_vault().await;
    let (stored, fingerprints): (Vec<Vec<u8>>, Vec<Vec<u8>>) = {
        let db = integration_tests::open_vault_db(&stack.dir.data_dir());
        let records = db.cf_handle("records").unwrap();
        // A card index entry is its index key (tenant, keyed fingerprint, expiry) and
        // token, after a length byte.
        let index = db.cf_handle("card-index").unwrap();
        [&expiring.token, &deleted.token]
            .iter()
            .map(|t| {
                let record = db.get_cf(records, t.as_bytes()).unwrap().unwrap();
                let key = db
                    .iterator_cf(index, rocksdb::IteratorMode::Start)
                    .map(Result::unwrap)
                    .find(|(key, _)| key.ends_with(t.as_bytes()))
                    .map(|(key, _)| key[1..key.len() - t.len()].to_vec())
                    .unwrap();
                (record, key)
            })
            .unzip()
    };
    stack.restart_vault().await;
    let mut vault = stack.client(ADMIN).await;
    vault.delete(&deleted.token).await.unwrap();

    // Expired: NOT_FOUND at once, then purged (the audit log says when).
    let started = Instant::now();
    while vault.token_info(&expiring.token).await.is_ok() {
        assert!(started.elapsed() < Duration::from_secs(10), "never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = vault.token_info(&expiring.token).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    let started = Instant::now();
    loop {
        let page = vault.read_audit(0, None, None, 1000).await.unwrap();
        if page.events.iter().any(|e| e.action == "Purge") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no purge");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One more purge interval: the compaction after the purge has run.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stack.stop_vault().await;

    // No file of the data directory holds either record's bytes (ciphertext and clear
    // metadata) or its keyed fingerprint.
    let data = files(&stack.dir.data_dir());
    assert!(data.len() > 3);
    for (path, bytes) in &data {
        for ((record, fingerprint), token) in stored
            .iter()
            .zip(&fingerprints)
            .zip([&expiring.token, &deleted.token])
        {
            for (what, part) in [
                ("ciphertext", &record[record.len() - 32..]),
                ("record header and metadata", &record[..32]),
                ("fingerprint", &fingerprint[..]),
            ] {
                assert!(
                    !contains(bytes, part),
                    "{what} of {token} still in {}",
                    path.display()
                );
            }
        }
    }
    // The tokens remain only in the audit log, whose events name them on purpose.
    {
        let db = integration_tests::open_vault_db(&stack.dir.data_dir());
        for family in rocksdb::DB::list_cf(&rocksdb::Options::default(), stack.dir.data_dir())
            .unwrap()
            .into_iter()
            .filter(|family| family != "audit")
        {
            let cf = db.cf_handle(&family).unwrap();
            for (key, value) in db
                .iterator_cf(cf, rocksdb::IteratorMode::Start)
                .map(Result::unwrap)
            {
                for token in [&expiring.token, &deleted.token] {
                    assert!(
                        !contains(&key, token.as_bytes()) && !contains(&value, token.as_bytes()),
                        "token {token} still in column family {family}"
                    );
                }
            }
        }
    }
    // The record that was kept is still there, and readable.
    assert!(data.iter().any(|(_, b)| contains(b, kept.token.as_bytes())));
    stack.restart_vault().await;
    let mut vault = stack.client(ADMIN).await;
    assert_eq!(
        vault.token_info(&kept.token).await.unwrap().token,
        kept.token
    );
    stack.stop().await;
}

/// Control: GDPR-15, GDPR-17 (docs/compliance.md).
/// Attack: a data subject's erasure leaves one of their tokens behind, or reaches into
/// another tenant's; every token of the card in the tenant goes, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn erasing_a_subject_removes_every_token_of_the_card_in_the_tenant_and_no_others() {
    let stack = Stack::start().await;
    let mut acme = stack.client(ADMIN).await;
    let mut globex = stack.client(OTHER_TENANT).await;
    let pan = synthetic_pan("411111", 42, 16);
    let other_pan = synthetic_pan("411111", 43, 16);
    let mut of_card = Vec::new();
    for (month, year) in [(1, 2030), (1, 2030), (6, 2031)] {
        of_card.push(
            acme.tokenize(Card::new(&pan, month, year), false)
                .await
                .unwrap()
                .token,
        );
    }
    // A rotated fingerprint key must not hide older tokens of the card.
    let mut keys = vault_client::KeyServiceClient::connect(&stack.keyservice_config(ADMIN))
        .await
        .unwrap();
    keys.rotate("fingerprint").await.unwrap();
    let started = Instant::now();
    loop {
        let token = acme
            .tokenize(Card::new(&pan, 2, 2032), false)
            .await
            .unwrap();
        let fingerprint_moved =
            token.fingerprint != acme.token_info(&of_card[0]).await.unwrap().fingerprint;
        of_card.push(token.token);
        if fingerprint_moved {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "rotation not seen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let other_card = acme
        .tokenize(Card::new(&other_pan, 1, 2030), false)
        .await
        .unwrap()
        .token;
    let other_tenant = globex
        .tokenize(Card::new(&pan, 1, 2030), false)
        .await
        .unwrap()
        .token;

    let mut found = acme.find_subject(&pan).await.unwrap();
    found.sort();
    let mut expected = of_card.clone();
    expected.sort();
    assert_eq!(found, expected);
    let mut erased = acme.erase_subject(&pan).await.unwrap();
    erased.sort();
    assert_eq!(erased, expected);
    for token in &of_card {
        assert_eq!(
            acme.token_info(token).await.unwrap_err().code(),
            Some(Code::NotFound)
        );
    }
    assert!(acme.find_subject(&pan).await.unwrap().is_empty());
    acme.token_info(&other_card).await.unwrap();
    globex.token_info(&other_tenant).await.unwrap();
    assert_eq!(globex.find_subject(&pan).await.unwrap(), vec![other_tenant]);

    // Audited with counts, never the card number.
    let page = acme.read_audit(0, None, None, 1000).await.unwrap();
    let erase = page
        .events
        .iter()
        .find(|e| e.action == "EraseSubject")
        .unwrap();
    assert_eq!(erase.count, Some(of_card.len() as u32));
    let text = format!("{:?}", page.events);
    assert!(!text.contains(&pan));
    stack.stop().await;
}

/// Control: PCI-3.2.1 (docs/compliance.md).
/// Attack: keep using a token past its retention; it answers NOT_FOUND at once, is purged,
/// and its lookups lock nobody out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_token_neither_locks_out_its_caller_nor_blocks_reuse() {
    let mut stack = Stack::start().await;
    // A long purge interval: the expired token stays on disk during the test.
    stack
        .add_vault_config("[retention]\npurge_interval_secs = 3600\n[lockout]\nmax_failures = 3\n");
    stack.restart_vault().await;
    let mut vault = stack.client(ADMIN).await;
    let card = || Card::new("4242424242424242", 12, 2030);
    let expiring = vault
        .tokenize_with_ttl(card(), false, Some(Duration::from_secs(1)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..5 {
        let err = vault.token_info(&expiring.token).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::NotFound));
    }
    // Not blocked: looking up one's own expired token is not guessing.
    vault
        .tokenize(Card::new("5555555555554444", 1, 2031), false)
        .await
        .unwrap();
    // reuse_existing finds the expired token, purges it and stores the card anew.
    let fresh = vault.tokenize(card(), true).await.unwrap();
    assert!(!fresh.reused);
    assert_ne!(fresh.token, expiring.token);
    assert_eq!(
        vault.tokenize(card(), true).await.unwrap().token,
        fresh.token
    );
    stack.stop().await;
}
