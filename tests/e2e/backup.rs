//! Backup drill: an online backup under load, verified, restored into a fresh data
//! directory; every token from before the backup answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use integration_tests::{ADMIN, OTHER_TENANT, Stack, synthetic_pan};
use tonic::Code;
use vault_client::Card;

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
    for info in &before {
        assert_eq!(&client.token_info(&info.token).await.unwrap(), info);
    }
    stack.stop().await;
}
