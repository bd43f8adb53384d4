//! The admin ports of the vault and the keyservice: Prometheus metrics with
//! low-cardinality labels (never a token, an identity or key material) and a plain
//! health check that shows a degraded vault.

use std::time::{Duration, Instant};

use integration_tests::{
    ADMIN, OFFICER, READER, Stack, StackDir, VAULT, http_get, identity, raw_channel,
};
use vault_client::{Card, KeyServiceClient};
use vault_proto::keys::v1 as keys_pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_calls_and_records_without_tokens_or_identities() {
    if integration_tests::rocksdb_only("it expects free-space series of a local disk") {
        return;
    }
    let mut stack = Stack::start().await;
    let mut admin = stack.client(ADMIN).await;
    let mut tokens = Vec::new();
    for pan in ["4242424242424242", "5555555555554444"] {
        tokens.push(
            admin
                .tokenize(Card::new(pan, 12, 2030), false)
                .await
                .unwrap()
                .token,
        );
    }
    let mut reader = stack.client(READER).await;
    assert!(reader.delete(&tokens[0]).await.is_err());

    let (status, metrics) = http_get(stack.vault_admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"tokenvault_rpc_calls_total{method="Tokenize",code="ok"} 2"#,
        r#"tokenvault_rpc_calls_total{method="DeleteToken",code="PERMISSION_DENIED"} 1"#,
        r#"tokenvault_records{purpose="card-data",version="1"} 2"#,
        r#"tokenvault_active_key_version{purpose="card-data"} 1"#,
        "tokenvault_keyservice_connected 1",
        "tokenvault_rewrap_remaining 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line}:\n{metrics}"
        );
    }
    assert!(
        metrics.contains(r#"tokenvault_rpc_seconds_count{method="Tokenize"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"tokenvault_events_total{kind="audit"}"#));
    // The storage engine's figures: free space on the data filesystem (which holds the
    // audit log too), the block cache holding what the reads touched, and the
    // memtables holding the two records.
    for series in [
        r#"tokenvault_storage_free_bytes{filesystem="data"}"#,
        "tokenvault_storage_memtable_bytes",
    ] {
        assert!(
            value(&metrics, series).unwrap_or(0.0) > 0.0,
            "{series}:\n{metrics}"
        );
    }
    for series in [
        "tokenvault_storage_table_bytes",
        "tokenvault_storage_pending_compaction_bytes",
        "tokenvault_storage_running_compactions",
        "tokenvault_storage_write_stopped",
        "tokenvault_storage_delayed_write_rate_bytes",
        "tokenvault_storage_block_cache_bytes",
    ] {
        assert!(value(&metrics, series).is_some(), "{series}:\n{metrics}");
    }
    assert_eq!(
        value(&metrics, "tokenvault_storage_write_stopped"),
        Some(0.0)
    );
    for token in &tokens {
        assert!(!metrics.contains(token.as_str()));
    }
    assert!(!metrics.contains(&identity(ADMIN)) && !metrics.contains("127.0.0.1"));
    assert!(!metrics.contains("4242424242424242"));

    let (status, health) = http_get(stack.vault_admin_addr, "/healthz").await;
    assert_eq!((status, health.trim()), (200, "serving"));
    stack.stop_keyservice().await;
    let started = std::time::Instant::now();
    loop {
        let (status, health) = http_get(stack.vault_admin_addr, "/healthz").await;
        if health.starts_with("degraded") {
            assert_eq!(status, 200, "degraded still serves");
            break;
        }
        assert!(started.elapsed().as_secs() < 5, "{health}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, metrics) = http_get(stack.vault_admin_addr, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "tokenvault_keyservice_connected 0")
    );
    assert_eq!(http_get(stack.vault_admin_addr, "/nope").await.0, 404);
    stack.start_keyservice().await;
    stack.stop().await;
}

/// The value of the series written exactly as `series` (name and labels), if present.
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Scrapes the keyservice until `series` has `expected` (the vault reports, leases and
/// learns of rotations in the background), and returns that scrape.
async fn keyservice_until(stack: &Stack, series: &str, expected: f64) -> String {
    let started = Instant::now();
    loop {
        let (status, metrics) = http_get(stack.keyservice_admin_addr, "/metrics").await;
        assert_eq!(status, 200);
        if value(&metrics, series) == Some(expected) {
            return metrics;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{series} never became {expected}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_series(metrics: &str, expected: &[(&str, f64)]) {
    for (series, want) in expected {
        assert_eq!(
            value(metrics, series),
            Some(*want),
            "{series} should be {want}:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyservice_metrics_follow_leases_rotations_and_proposals_without_secrets() {
    let dir = StackDir::new();
    // A small budget: four leases of the CVC key spend version 1 and rotate.
    dir.set_keyservice_lifecycle("max_encryptions_per_version = 2500\nlease_size = 1000");
    let stack = Stack::start_in(dir).await;
    let ks = |m| format!("tokenvault_keyservice_{m}");

    let (status, health) = http_get(stack.keyservice_admin_addr, "/healthz").await;
    assert_eq!((status, health.trim()), (200, "serving"));
    assert_eq!(http_get(stack.keyservice_admin_addr, "/nope").await.0, 404);

    // Before any card: version 1 of everything, nothing leased, the vault reporting and
    // watching (its first usage report can come before its watch is open).
    keyservice_until(&stack, &ks(r#"usage_reporters{freshness="fresh"}"#), 1.0).await;
    let metrics = keyservice_until(
        &stack,
        &ks(r#"rpc_calls_total{method="WatchKeys",code="ok"}"#),
        1.0,
    )
    .await;
    assert_series(
        &metrics,
        &[
            (&ks(r#"active_key_version{purpose="card-data"}"#), 1.0),
            (&ks(r#"active_key_version{purpose="audit"}"#), 1.0),
            (
                &ks(r#"key_versions{purpose="card-data",state="active"}"#),
                1.0,
            ),
            (
                &ks(r#"key_versions{purpose="card-data",state="decrypt-only"}"#),
                0.0,
            ),
            (
                &ks(r#"encryptions_leased{purpose="card-data",version="1",state="active"}"#),
                0.0,
            ),
            (&ks("encryption_limit"), 2500.0),
            (&ks("proposals_pending"), 0.0),
            (&ks(r#"usage_reporters{freshness="stale"}"#), 0.0),
            (&ks("keyring_save_failures_total"), 0.0),
        ],
    );

    // A tokenization makes the vault lease a block of card-data encryptions.
    let mut vault = stack.client(ADMIN).await;
    let token = vault
        .tokenize(Card::new("4242424242424242", 12, 2030), false)
        .await
        .unwrap()
        .token;
    let metrics = keyservice_until(
        &stack,
        &ks(r#"encryptions_leased{purpose="card-data",version="1",state="active"}"#),
        1000.0,
    )
    .await;
    assert_series(
        &metrics,
        &[(
            &ks(r#"rpc_calls_total{method="LeaseBudget",code="ok"}"#),
            1.0,
        )],
    );

    // A manual rotation: the active version goes 1 -> 2.
    let mut admin = KeyServiceClient::connect(&stack.keyservice_config(ADMIN))
        .await
        .unwrap();
    assert_eq!(admin.rotate("card-data").await.unwrap().version, 2);
    let (_, metrics) = http_get(stack.keyservice_admin_addr, "/metrics").await;
    assert_series(
        &metrics,
        &[
            (&ks(r#"active_key_version{purpose="card-data"}"#), 2.0),
            (
                &ks(r#"key_versions{purpose="card-data",state="active"}"#),
                1.0,
            ),
            (
                &ks(r#"key_versions{purpose="card-data",state="decrypt-only"}"#),
                1.0,
            ),
            (
                &ks(r#"rotations_total{purpose="card-data",reason="manual"}"#),
                1.0,
            ),
            (
                &ks(r#"encryptions_leased{purpose="card-data",version="1",state="decrypt-only"}"#),
                1000.0,
            ),
            (
                &ks(r#"encryptions_leased{purpose="card-data",version="2",state="active"}"#),
                0.0,
            ),
            (&ks(r#"rpc_calls_total{method="RotateKey",code="ok"}"#), 1.0),
            (&ks(r#"rpc_seconds_count{method="RotateKey"}"#), 1.0),
        ],
    );

    // Leases straight from the vault's identity: 1000 + 1000 + 500 spend CVC version
    // 1; the fourth rotates to version 2 by itself (reason "budget").
    let channel = raw_channel(&stack.dir, VAULT, stack.keyservice_addr)
        .await
        .unwrap();
    let mut as_vault = keys_pb::key_service_client::KeyServiceClient::new(channel);
    let mut granted = Vec::new();
    for _ in 0..4 {
        let lease = as_vault
            .lease_budget(keys_pb::LeaseBudgetRequest {
                purpose: keys_pb::KeyPurpose::Cvc.into(),
                generation_seen: 0,
            })
            .await
            .unwrap()
            .into_inner();
        granted.push((lease.key.unwrap().version, lease.encryptions));
    }
    assert_eq!(granted, [(1, 1000), (1, 1000), (1, 500), (2, 1000)]);
    let (_, metrics) = http_get(stack.keyservice_admin_addr, "/metrics").await;
    assert_series(
        &metrics,
        &[
            (
                &ks(r#"encryptions_leased{purpose="cvc",version="1",state="decrypt-only"}"#),
                2500.0,
            ),
            (
                &ks(r#"encryptions_leased{purpose="cvc",version="2",state="active"}"#),
                1000.0,
            ),
            (&ks(r#"active_key_version{purpose="cvc"}"#), 2.0),
            (
                &ks(r#"rotations_total{purpose="cvc",reason="budget"}"#),
                1.0,
            ),
            (
                &ks(r#"rpc_calls_total{method="LeaseBudget",code="ok"}"#),
                5.0,
            ),
        ],
    );
    // HMAC purposes have no budget, so no leased series.
    assert!(!metrics.contains(r#"encryptions_leased{purpose="fingerprint""#));

    // Dual control: a pending proposal is counted until a second admin approves it.
    let mut officer = KeyServiceClient::connect(&stack.keyservice_config(OFFICER))
        .await
        .unwrap();
    crate::keys::retire_by_two(&admin, &mut officer, "cvc", 1).await;
    let proposal = admin.propose_unretire("cvc", 1).await.unwrap();
    let (_, metrics) = http_get(stack.keyservice_admin_addr, "/metrics").await;
    assert_series(
        &metrics,
        &[
            (&ks("proposals_pending"), 1.0),
            (&ks(r#"key_versions{purpose="cvc",state="retired"}"#), 1.0),
        ],
    );
    let mut officer = KeyServiceClient::connect(&stack.keyservice_config(OFFICER))
        .await
        .unwrap();
    officer.approve(&proposal.id).await.unwrap();

    // A refused caller is counted by code, not by who it was.
    let mut reader = KeyServiceClient::connect(&stack.keyservice_config(READER))
        .await
        .unwrap();
    assert!(reader.list_versions().await.is_err());

    let (_, metrics) = http_get(stack.keyservice_admin_addr, "/metrics").await;
    assert_series(
        &metrics,
        &[
            (&ks("proposals_pending"), 0.0),
            (&ks(r#"key_versions{purpose="cvc",state="retired"}"#), 0.0),
            (
                &ks(r#"key_versions{purpose="cvc",state="decrypt-only"}"#),
                1.0,
            ),
            (
                // The retirement's approval and the un-retirement's.
                &ks(r#"rpc_calls_total{method="ApproveOperation",code="ok"}"#),
                2.0,
            ),
            (
                &ks(r#"rpc_calls_total{method="ListKeyVersions",code="PERMISSION_DENIED"}"#),
                1.0,
            ),
        ],
    );

    // Nothing secret or identifying: no identity, vault instance, proposal id, token,
    // address, root key or key material (hex or base64) in the scrape.
    let listing = admin.list_versions().await.unwrap();
    assert!(!listing.reporters.is_empty());
    let material = as_vault
        .get_keys(keys_pb::GetKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(!material.is_empty());
    let root_key = std::fs::read_to_string(stack.dir.path().join("root.key")).unwrap();
    let mut secrets: Vec<String> = vec![
        identity(ADMIN),
        identity(OFFICER),
        identity(READER),
        identity(VAULT),
        devstack::IDENTITY_PREFIX.to_owned(),
        proposal.id.clone(),
        token.clone(),
        "127.0.0.1".into(),
        root_key.trim().to_owned(),
    ];
    secrets.extend(listing.reporters.iter().map(|r| r.instance.clone()));
    for key in &material {
        use base64::Engine;
        secrets.push(hex::encode(&key.material));
        secrets.push(base64::engine::general_purpose::STANDARD.encode(&key.material));
        // Any 8-byte window of the material, in case a label carried a slice.
        // (All-digit windows are skipped: they could match a number by chance.)
        for window in key.material.windows(8) {
            let hex = hex::encode(window);
            if !hex.bytes().all(|b| b.is_ascii_digit()) {
                secrets.push(hex);
            }
        }
    }
    for secret in &secrets {
        assert!(!secret.is_empty());
        assert!(
            !metrics.contains(secret.as_str()),
            "the scrape holds {secret}:\n{metrics}"
        );
    }
    stack.stop().await;
}

/// A keyring that cannot be saved refuses the change, counts the failure and turns the
/// keyservice's health to degraded until a save succeeds again.
///
/// Control: PCI-10.7.2 (docs/compliance.md).
/// Attack: the keyring's disk fails, so key changes would silently not persist; the change
/// is refused, counted and health turns degraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyservice_health_is_degraded_while_the_keyring_cannot_be_saved() {
    let stack = Stack::start().await;
    let mut admin = KeyServiceClient::connect(&stack.keyservice_config(ADMIN))
        .await
        .unwrap();
    // A non-empty directory where the keyring file is: the atomic rename onto it fails.
    let keyring = stack.dir.path().join("keyring.sealed");
    let saved = std::fs::read(&keyring).unwrap();
    std::fs::remove_file(&keyring).unwrap();
    std::fs::create_dir(&keyring).unwrap();
    std::fs::write(keyring.join("in-the-way"), b"x").unwrap();

    let err = admin.rotate("card-data").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err:?}");
    let (status, health) = http_get(stack.keyservice_admin_addr, "/healthz").await;
    assert_eq!(status, 200, "degraded still serves");
    assert!(health.starts_with("degraded: "), "{health}");
    let (_, metrics) = http_get(stack.keyservice_admin_addr, "/metrics").await;
    assert_series(
        &metrics,
        &[
            ("tokenvault_keyservice_keyring_save_failures_total", 1.0),
            (
                r#"tokenvault_keyservice_rpc_calls_total{method="RotateKey",code="UNAVAILABLE"}"#,
                1.0,
            ),
            (
                r#"tokenvault_keyservice_active_key_version{purpose="card-data"}"#,
                1.0,
            ),
        ],
    );

    std::fs::remove_dir_all(&keyring).unwrap();
    std::fs::write(&keyring, saved).unwrap();
    assert_eq!(admin.rotate("card-data").await.unwrap().version, 2);
    let (status, health) = http_get(stack.keyservice_admin_addr, "/healthz").await;
    assert_eq!((status, health.trim()), (200, "serving"));
    stack.stop().await;
}
