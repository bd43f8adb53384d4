//! Backup drill: an online backup under load, verified, restored into a fresh data
//! directory; every token from before the backup answers, except those erased after
//! it was taken: the restored vault erases them again before serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use integration_tests::{ADMIN, OTHER_TENANT, Stack, synthetic_pan};
use tonic::Code;
use vault_client::Card;

/// Control: GDPR-17, GDPR-32 (docs/compliance.md).
/// Attack: restore a backup taken before some cards were erased, to bring them back; the
/// restored vault erases them again before it serves, and every other token answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_load_verifies_and_restores() {
    if integration_tests::rocksdb_only("vault backups are RocksDB checkpoints") {
        return;
    }
    let mut stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let mut before = Vec::new();
    for n in 0..300 {
        before.push(
            client
                .tokenize(Card::new(&synthetic_pan("37", n, 15), 4, 2032), false)
                .await
                .unwrap(),
        );
    }

    // Load keeps running while the backup is taken: the backup starts once the load
    // has stored 50 cards, and the load stops after it.
    let stop = Arc::new(AtomicBool::new(false));
    let (progress, mut progressed) = tokio::sync::watch::channel(0u64);
    let load = tokio::spawn({
        let mut client = stack.client(ADMIN).await;
        let stop = Arc::clone(&stop);
        async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                client
                    .tokenize(
                        Card::new(&synthetic_pan("37", 1000 + n, 15), 4, 2032),
                        false,
                    )
                    .await
                    .unwrap();
                n += 1;
                let _ = progress.send(n);
            }
            n
        }
    });
    progressed.wait_for(|n| *n >= 50).await.unwrap();
    let (path, size) = client.create_backup("drill-1").await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let during = load.await.unwrap();
    assert!(size > 0 && path.ends_with("drill-1"), "{path} {size}");
    assert_eq!(
        client.create_backup("drill-1").await.unwrap_err().code(),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        client.create_backup("../escape").await.unwrap_err().code(),
        Some(Code::InvalidArgument)
    );

    let report = client.verify_backup("drill-1").await.unwrap();
    assert!(report.records >= 300, "{report:?}");
    assert_eq!(
        (report.verified, report.failed),
        (report.records, 0),
        "{report:?}"
    );
    println!(
        "backup drill: {} records in the backup, {during} tokenized during it",
        report.records
    );

    // Erased after the backup was taken: the backup still holds them.
    let erased: Vec<String> = before[..5].iter().map(|info| info.token.clone()).collect();
    for token in &erased {
        client.delete(token).await.unwrap();
    }
    // The vault sends its erasures to the keyservice within a second; `backup verify`
    // counts the backup's records among them.
    let report = integration_tests::within(
        std::time::Duration::from_secs(10),
        "the erasures reach the keyservice",
        || {
            let mut client = client.clone();
            async move {
                let report = client.verify_backup("drill-1").await.unwrap();
                (report.erased == 5).then_some(report)
            }
        },
    )
    .await;
    assert_eq!(report.failed, 0, "{report:?}");
    // The keyservice holds keyed ids only: no token's bytes.
    let kept = std::fs::read(stack.dir.path().join("erasures.bin")).unwrap();
    // 64-byte entries: store id, keyed id, time, checksum.
    assert_eq!(kept.len() % 64, 0);
    assert!(kept.len() >= 5 * 64, "{} bytes", kept.len());
    for token in &erased {
        assert!(
            !integration_tests::contains_word(&kept, token.as_bytes()),
            "a token in the keyservice's erasures"
        );
    }

    // Only admins.
    let mut globex = stack.client(OTHER_TENANT).await;
    assert_eq!(
        globex.create_backup("nope").await.unwrap_err().code(),
        Some(Code::PermissionDenied)
    );

    // Restore into a fresh data directory.
    stack.stop_vault().await;
    let data = stack.dir.data_dir();
    std::fs::rename(&data, stack.dir.path().join("vault-data.lost")).unwrap();
    let settings =
        vault_server::Settings::load(&stack.dir.path().join("vault-server.toml")).unwrap();
    assert!(vault_server::restore_backup(&settings, "drill-1").unwrap() > 0);
    // Restore never overwrites.
    assert!(vault_server::restore_backup(&settings, "drill-1").is_err());
    stack.restart_vault().await;
    // The backup's audit log ends where the backup was made: what was recorded after
    // it is a gap, and card data is refused until two admins acknowledge it.
    let mut client = stack.client(ADMIN).await;
    let err = client.token_info(&before[0].token).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("acknowledge the gap"), "{err}");
    let gaps = integration_tests::acknowledge_audit_gaps(&stack).await;
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    let mut client = stack.client(ADMIN).await;
    for info in &before[5..] {
        assert_eq!(&client.token_info(&info.token).await.unwrap(), info);
    }
    // What was erased after the backup stays erased.
    for token in &erased {
        let err = client.token_info(token).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    }
    // The restored vault said so in its log, and the backup still verifies with the
    // same count: a second restore would erase them again.
    let replayed = replay_events(&mut client).await;
    assert_eq!(replayed.len(), 1, "{replayed:?}");
    assert!(
        replayed[0].starts_with("5 records erased again"),
        "{}",
        replayed[0]
    );
    assert_eq!(client.verify_backup("drill-1").await.unwrap().erased, 5);
    // Started again on the restored data, it does not replay a second time.
    stack.restart_vault().await;
    let mut client = stack.client(ADMIN).await;
    assert_eq!(replay_events(&mut client).await.len(), 1);
    stack.stop().await;
}

/// The details of every `ErasuresReplayed` event in the log.
async fn replay_events(client: &mut vault_client::VaultClient) -> Vec<String> {
    let mut found = Vec::new();
    let mut after = 0;
    loop {
        let page = client.read_audit(after, None, None, 0).await.unwrap();
        let Some(last) = page.events.last() else {
            return found;
        };
        after = last.sequence;
        found.extend(
            page.events
                .into_iter()
                .filter(|event| event.action == "ErasuresReplayed")
                .map(|event| event.detail.unwrap_or_default()),
        );
        if after >= page.last_sequence {
            return found;
        }
    }
}
