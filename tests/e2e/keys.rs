//! Key lifecycle end to end: rotation reaching a running vault, rewrap (also across a
//! `kill -9`), retire, destroy under dual control, the GCM budget, root key change, and
//! keyservice outages.

use std::time::{Duration, Instant};

use integration_tests::{
    ADMIN, OFFICER, Process, Stack, StackDir, raw_channel, synthetic_pan, within,
};
use tonic::Code;
use vault_client::{Card, KeyServiceClient, TokenInfo, VaultClient};

async fn key_admin(stack: &Stack, name: &str) -> KeyServiceClient {
    KeyServiceClient::connect(&stack.keyservice_config(name))
        .await
        .unwrap()
}

/// Retires a version the way the keyservice allows: one admin proposes, another
/// approves (once the vaults' usage reports say no record needs it).
pub(crate) async fn retire_by_two(
    proposer: &KeyServiceClient,
    approver: &mut KeyServiceClient,
    purpose: &str,
    version: u32,
) {
    let proposal = within(Duration::from_secs(20), "fresh usage report", || {
        let mut proposer = proposer.clone();
        let purpose = purpose.to_owned();
        async move { proposer.propose_retire(&purpose, version, false).await.ok() }
    })
    .await;
    approver.approve(&proposal.id).await.unwrap();
}

fn card(n: u64) -> Card {
    Card::new(&synthetic_pan("400000", n, 16), 12, 2031)
}

async fn version_state(keys: &mut KeyServiceClient, purpose: &str, version: u32) -> String {
    keys.list_versions()
        .await
        .unwrap()
        .versions
        .into_iter()
        .find(|v| v.purpose == purpose && v.version == version)
        .map(|v| v.state)
        .unwrap_or_default()
}

async fn rewrap_to_the_end(vault: &mut VaultClient) -> vault_client::RewrapStatus {
    within(Duration::from_secs(60), "rewrap finished", || {
        let mut vault = vault.clone();
        async move {
            let status = vault.rewrap_status().await.unwrap();
            (!status.running).then_some(status)
        }
    })
    .await
}

/// Control: PCI-3.7.4, NIST-800-57 (docs/compliance.md).
/// Attack: keep encrypting under a key past its cryptoperiod because a running vault never
/// learns of the rotation; the vault picks up the new version without a restart, and old
/// tokens still forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotation_reaches_the_running_vault_and_old_tokens_still_forward() {
    let stack = Stack::start().await;
    let mut vault = stack.client(ADMIN).await;
    let old = vault.tokenize(card(1), false).await.unwrap();
    assert_eq!(old.key_version, 1);

    let mut keys = key_admin(&stack, ADMIN).await;
    let created = keys.rotate("card-data").await.unwrap();
    assert_eq!((created.version, created.state.as_str()), (2, "active"));
    assert_eq!(
        version_state(&mut keys, "card-data", 1).await,
        "decrypt-only"
    );

    // The running vault uses the new version within 5 seconds, without a restart.
    let fresh: TokenInfo = within(Duration::from_secs(20), "rotation picked up", || {
        let mut vault = vault.clone();
        async move {
            let info = vault.tokenize(card(2), false).await.unwrap();
            (info.key_version == 2).then_some(info)
        }
    })
    .await;
    // Old and new records both read and forward with the right card.
    assert_eq!(vault.token_info(&old.token).await.unwrap().key_version, 1);
    assert_eq!(
        stack.forward_number(&mut vault, &old.token).await,
        synthetic_pan("400000", 1, 16)
    );
    assert_eq!(
        stack.forward_number(&mut vault, &fresh.token).await,
        synthetic_pan("400000", 2, 16)
    );

    // A fingerprint rotation does not break reuse_existing for cards stored before.
    let before = vault.tokenize(card(3), false).await.unwrap().fingerprint;
    keys.rotate("fingerprint").await.unwrap();
    within(
        Duration::from_secs(20),
        "fingerprint rotation picked up",
        || {
            let mut vault = vault.clone();
            let before = before.clone();
            async move {
                let info = vault.tokenize(card(3), false).await.unwrap();
                (info.fingerprint != before).then_some(())
            }
        },
    )
    .await;
    let again = vault.tokenize(card(1), true).await.unwrap();
    assert_eq!(
        again.token, old.token,
        "found under the older fingerprint version"
    );
    stack.stop().await;
}

/// Control: PCI-3.7.4 (docs/compliance.md).
/// Attack: kill the vault mid-rewrap, and delete tokens while it runs, hoping records stay
/// on the old key or erased cards come back; the rewrap finishes and no delete is undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rewrap_finishes_across_a_kill_and_never_resurrects_a_delete() {
    const RECORDS: u64 = 300;
    let mut stack = Stack::start().await;
    // Slow enough to kill it midway: 100 records a second in batches of 10.
    stack.add_vault_config("[rewrap]\nrate_per_sec = 100\nbatch_size = 10\n");
    stack.restart_vault().await;
    let mut vault = stack.client(ADMIN).await;
    let cards: Vec<Card> = (0..RECORDS).map(card).collect();
    let tokens: Vec<String> = vault
        .tokenize_batch(&cards, false)
        .await
        .unwrap()
        .into_iter()
        .map(|item| match item {
            vault_client::BatchItem::Stored(info) => info.token,
            other => panic!("not stored: {other:?}"),
        })
        .collect();
    let mut keys = key_admin(&stack, ADMIN).await;
    keys.rotate("card-data").await.unwrap();
    keys.rotate("fingerprint").await.unwrap();

    // The real binary, so that it can be killed with -9.
    stack.stop_vault().await;
    let config = stack.write_vault_config();
    let process = Process::start("vault-server", &config, &[]).await;
    let mut vault = VaultClient::connect(&stack.dir.client_config(ADMIN, process.addr))
        .await
        .unwrap();
    within(Duration::from_secs(20), "rotation picked up", || {
        let mut vault = vault.clone();
        async move {
            let status = vault.rewrap_status().await.unwrap();
            (status.card_data_version == 2 && status.fingerprint_version == 2).then_some(())
        }
    })
    .await;
    let started = vault.start_rewrap().await.unwrap();
    assert!(started.running);
    // Deleted while the job runs: must stay deleted.
    let deleted = &tokens[(RECORDS - 5) as usize..];
    for token in deleted {
        vault.delete(token).await.unwrap();
    }
    within(Duration::from_secs(20), "rewrap under way", || {
        let mut vault = vault.clone();
        async move { (vault.rewrap_status().await.unwrap().done >= 50).then_some(()) }
    })
    .await;
    process.kill9().await;

    // Restarted, the job resumes by itself and finishes.
    let process = Process::start("vault-server", &config, &[]).await;
    let mut vault = VaultClient::connect(&stack.dir.client_config(ADMIN, process.addr))
        .await
        .unwrap();
    let finished = rewrap_to_the_end(&mut vault).await;
    assert_eq!(
        (finished.remaining, finished.failed),
        (0, 0),
        "{finished:?}"
    );
    assert!(finished.done >= RECORDS - 5 - 50, "{finished:?}");
    for (i, token) in tokens.iter().enumerate() {
        if deleted.contains(token) {
            let err = vault.token_info(token).await.unwrap_err();
            assert_eq!(err.code(), Some(Code::NotFound), "deleted token came back");
            continue;
        }
        let info = vault.token_info(token).await.unwrap();
        assert_eq!(info.key_version, 2, "token {i} not rewrapped");
    }
    // Rewrapped records still carry the right card, and reuse finds them under the new
    // fingerprint version.
    assert_eq!(
        stack.forward_number(&mut vault, &tokens[7]).await,
        synthetic_pan("400000", 7, 16)
    );
    let again = vault.tokenize(card(7), true).await.unwrap();
    assert_eq!(again.token, tokens[7]);

    // The keyservice learns that no record uses version 1 any more.
    within(Duration::from_secs(20), "usage reported", || {
        let mut keys = keys.clone();
        async move {
            let listing = keys.list_versions().await.unwrap();
            let v1 = listing
                .versions
                .iter()
                .find(|v| v.purpose == "card-data" && v.version == 1)?;
            let v2 = listing
                .versions
                .iter()
                .find(|v| v.purpose == "card-data" && v.version == 2)?;
            (v1.records == 0 && v2.records == RECORDS - 5).then_some(())
        }
    })
    .await;
    process.terminate().await;
    stack.stop().await;
}

/// Control: PCI-3.7.5, NIST-800-88-LIVE (docs/compliance.md).
/// Attack: one admin destroys a key alone, or destroys one still protecting records; and
/// someone keeps an old copy of the data hoping to read it after the destruction; refused,
/// refused, and unreadable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn destroy_needs_no_records_and_a_second_admin_and_leaves_old_copies_useless() {
    if integration_tests::rocksdb_only("it restores a RocksDB backup") {
        return;
    }
    let mut stack = Stack::start().await;
    let mut vault = stack.client(ADMIN).await;
    let old = vault.tokenize(card(11), false).await.unwrap();
    let mut admin = key_admin(&stack, ADMIN).await;
    let mut officer = key_admin(&stack, OFFICER).await;
    admin.rotate("card-data").await.unwrap();

    // Refused while a record uses the version.
    let err = within(Duration::from_secs(20), "usage reported", || {
        let mut admin = admin.clone();
        async move {
            let err = admin.propose_destroy("card-data", 1).await.unwrap_err();
            err.to_string()
                .contains("still used by 1 records")
                .then_some(err)
        }
    })
    .await;
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    // The active version can never be destroyed.
    let err = admin.propose_destroy("card-data", 2).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");

    // An old copy of the data, from before the rewrap.
    vault.create_backup("before-rewrap").await.unwrap();
    within(Duration::from_secs(20), "rotation picked up", || {
        let mut vault = vault.clone();
        async move { (vault.rewrap_status().await.unwrap().card_data_version == 2).then_some(()) }
    })
    .await;
    vault.start_rewrap().await.unwrap();
    let finished = rewrap_to_the_end(&mut vault).await;
    assert_eq!((finished.done, finished.remaining), (1, 0));

    // Dual control: the proposer cannot approve; another admin can, once.
    let proposal = within(Duration::from_secs(20), "fresh usage report", || {
        let mut admin = admin.clone();
        async move { admin.propose_destroy("card-data", 1).await.ok() }
    })
    .await;
    assert_eq!(proposal.state, "pending");
    let err = admin.approve(&proposal.id).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert_eq!(
        version_state(&mut admin, "card-data", 1).await,
        "decrypt-only"
    );
    let approved = officer.approve(&proposal.id).await.unwrap();
    assert_eq!(approved.state, "approved");
    assert_eq!(
        approved.approved_by.as_deref(),
        Some(integration_tests::identity(OFFICER).as_str())
    );
    let err = officer.approve(&proposal.id).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "replay: {err}");
    assert_eq!(version_state(&mut admin, "card-data", 1).await, "destroyed");
    let err = officer.approve("p-000000000000").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");

    // The current data reads; the old copy, restored, does not decrypt any more.
    assert_eq!(vault.token_info(&old.token).await.unwrap().key_version, 2);
    stack.stop_vault().await;
    let data = stack.dir.data_dir();
    std::fs::rename(&data, stack.dir.path().join("vault-data.moved")).unwrap();
    let settings = vault_server::Settings::load(&stack.write_vault_config()).unwrap();
    vault_server::restore_backup(&settings, "before-rewrap").unwrap();
    stack.restart_vault().await;
    // The restore's gap in the audit log, acknowledged as the runbook says; the backup's
    // cards stay unreadable, their key destroyed.
    integration_tests::acknowledge_audit_gaps(&stack).await;
    let mut vault = stack.client(ADMIN).await;
    let err = vault.token_info(&old.token).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(
        err.to_string().contains("key version 1 is not available"),
        "{err}"
    );

    // Every step is in the keyservice history, with who did it.
    let history = admin.history(0).await.unwrap();
    let admin_id = integration_tests::identity(ADMIN);
    let officer_id = integration_tests::identity(OFFICER);
    let find = |action: &str, actor: &str, outcome: &str| {
        history
            .iter()
            .any(|e| e.action == action && e.actor == actor && e.outcome.starts_with(outcome))
    };
    assert!(find("rotate", &admin_id, "ok"));
    assert!(find(
        "propose",
        &admin_id,
        "refused: card-data version 1 is still used"
    ));
    assert!(find("propose", &admin_id, "ok"));
    assert!(find("approve", &admin_id, "refused: dual control"));
    assert!(find("approve", &officer_id, "ok"));
    assert!(find("approve", &officer_id, "refused: proposal"));
    assert!(find(
        "lease",
        &integration_tests::identity(integration_tests::VAULT),
        "ok"
    ));
    stack.stop().await;
}

/// One admin cannot retire: the RetireKey RPC is refused outright, and a proposal needs
/// a second admin. A version records still use is refused unless forced (the count
/// shown to both); the audit key never. A retired version is unusable until two admins
/// bring it back.
///
/// Control: PCI-3.7.5 (docs/compliance.md).
/// Attack: one admin retires a key alone, or retires one that still protects records, or
/// brings a retired key back alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retiring_needs_two_admins_and_no_record_on_the_version_unless_forced() {
    let stack = Stack::start().await;
    let mut vault = stack.client(ADMIN).await;
    let old = vault.tokenize(card(21), false).await.unwrap();
    let mut admin = key_admin(&stack, ADMIN).await;
    let mut officer = key_admin(&stack, OFFICER).await;

    let mut alone = vault_proto::keys::v1::key_service_client::KeyServiceClient::new(
        raw_channel(&stack.dir, ADMIN, stack.keyservice_addr)
            .await
            .unwrap(),
    );
    admin.rotate("card-data").await.unwrap();
    let status = alone
        .retire_key(vault_proto::keys::v1::RetireKeyRequest {
            purpose: vault_proto::keys::v1::KeyPurpose::CardData.into(),
            version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("two admins"), "{status:?}");
    let err = admin
        .propose_retire("card-data", 2, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "active: {err}");
    let err = within(Duration::from_secs(20), "usage reported", || {
        let mut admin = admin.clone();
        async move {
            let err = admin
                .propose_retire("card-data", 1, false)
                .await
                .unwrap_err();
            err.to_string()
                .contains("still used by 1 records")
                .then_some(err)
        }
    })
    .await;
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    admin.rotate("audit").await.unwrap();
    let err = admin.propose_retire("audit", 1, true).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("never retired"), "{err}");

    let proposal = within(Duration::from_secs(20), "fresh usage report", || {
        let mut admin = admin.clone();
        async move { admin.propose_retire("card-data", 1, true).await.ok() }
    })
    .await;
    assert!(proposal.force);
    assert_eq!(proposal.records, 1, "both admins see what breaks");
    let err = admin.approve(&proposal.id).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert_eq!(
        version_state(&mut admin, "card-data", 1).await,
        "decrypt-only"
    );
    officer.approve(&proposal.id).await.unwrap();
    assert_eq!(version_state(&mut admin, "card-data", 1).await, "retired");
    let history = admin.history(0).await.unwrap();
    assert!(
        history.iter().any(|e| e.action == "approve"
            && e.outcome == "ok"
            && e.detail.contains("forced: 1 records")),
        "{history:?}"
    );
    let err = within(Duration::from_secs(20), "retirement picked up", || {
        let mut vault = vault.clone();
        let token = old.token.clone();
        async move { vault.token_info(&token).await.err() }
    })
    .await;
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");

    let proposal = officer.propose_unretire("card-data", 1).await.unwrap();
    let err = officer.approve(&proposal.id).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    admin.approve(&proposal.id).await.unwrap();
    assert_eq!(
        version_state(&mut admin, "card-data", 1).await,
        "decrypt-only"
    );
    within(Duration::from_secs(20), "un-retirement picked up", || {
        let mut vault = vault.clone();
        let token = old.token.clone();
        async move { vault.token_info(&token).await.ok() }
    })
    .await;
    stack.stop().await;
}

/// Control: PCI-3.7.4, NIST-800-38D-8.3 (docs/compliance.md).
/// Attack: exceed a key's GCM invocation limit through restarts or several vaults; budgets
/// are leased once and the key rotates when its budget is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_encryption_budget_rotates_at_its_limit_and_is_never_handed_out_twice() {
    let dir = StackDir::new();
    dir.set_keyservice_lifecycle("max_encryptions_per_version = 100\nlease_size = 10");
    let mut stack = Stack::start_in(dir).await;
    let mut keys = key_admin(&stack, ADMIN).await;
    let leased = |keys: &KeyServiceClient| {
        let mut keys = keys.clone();
        async move {
            keys.list_versions()
                .await
                .unwrap()
                .versions
                .into_iter()
                .filter(|v| v.purpose == "card-data")
                .map(|v| (v.version, v.encryptions_leased, v.encryption_limit))
                .collect::<Vec<_>>()
        }
    };

    // 35 encryptions in a vault that is then killed: 4 leases of 10 handed out.
    stack.stop_vault().await;
    let config = stack.write_vault_config();
    let process = Process::start("vault-server", &config, &[]).await;
    let mut vault = VaultClient::connect(&stack.dir.client_config(ADMIN, process.addr))
        .await
        .unwrap();
    for n in 0..35 {
        assert_eq!(vault.tokenize(card(n), false).await.unwrap().key_version, 1);
    }
    assert_eq!(leased(&keys).await, vec![(1, 40, 100)]);
    process.kill9().await;

    // The 5 encryptions the dead vault had left are never handed out again: 60 more
    // under version 1, and the next one is on a new version.
    let process = Process::start("vault-server", &config, &[]).await;
    let mut vault = VaultClient::connect(&stack.dir.client_config(ADMIN, process.addr))
        .await
        .unwrap();
    for n in 0..60 {
        let info = vault.tokenize(card(100 + n), false).await.unwrap();
        assert_eq!(info.key_version, 1, "encryption {n} after the restart");
    }
    let next = vault.tokenize(card(200), false).await.unwrap();
    assert_eq!(next.key_version, 2, "the 101st lease-counted encryption");
    assert_eq!(leased(&keys).await, vec![(1, 100, 100), (2, 10, 100)]);
    let history = keys.history(0).await.unwrap();
    assert!(
        history.iter().any(|e| e.action == "rotate"
            && e.actor == "keyservice"
            && e.detail.contains("budget"))
    );
    process.terminate().await;
    stack.stop_keyservice().await;
    stack.stop().await;
}

/// Control: PCI-10.7.2 (docs/compliance.md).
/// Attack: take the keyservice down to stop the vault, or to make it fall back to something
/// weaker; it reports degraded, serves from its leases, and catches up after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_vault_serves_through_a_keyservice_outage_and_catches_up_after() {
    let mut stack = Stack::start().await;
    let mut vault = stack.client(ADMIN).await;
    vault.tokenize(card(31), false).await.unwrap();
    /// The link's health status; none before the vault first sets it.
    async fn link(stack: &Stack) -> Option<i32> {
        let channel = integration_tests::raw_channel(&stack.dir, ADMIN, stack.vault_addr)
            .await
            .unwrap();
        let answer = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: vault_server::KEYSERVICE_LINK_HEALTH.into(),
            })
            .await;
        answer.ok().map(|a| a.into_inner().status)
    }
    // Health follows the link from a task of its own: poll for it.
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    within(Duration::from_secs(20), "serving health", || async {
        (link(&stack).await == Some(serving)).then_some(())
    })
    .await;

    stack.stop_keyservice().await;
    // Degraded, but tokenizing and reading go on with the keys held.
    within(Duration::from_secs(20), "degraded health", || async {
        (link(&stack).await.is_some_and(|status| status != serving)).then_some(())
    })
    .await;
    assert!(
        vault.health().await.unwrap(),
        "the vault itself still serves"
    );
    for n in 0..20 {
        let info = vault.tokenize(card(40 + n), false).await.unwrap();
        assert_eq!(vault.token_info(&info.token).await.unwrap().key_version, 1);
    }

    // Back, with a rotation made while the vault was cut off: picked up on reconnect.
    stack.start_keyservice().await;
    key_admin(&stack, ADMIN)
        .await
        .rotate("card-data")
        .await
        .unwrap();
    within(Duration::from_secs(20), "rotation after reconnect", || {
        let mut vault = vault.clone();
        async move { (vault.tokenize(card(99), false).await.unwrap().key_version == 2).then_some(()) }
    })
    .await;
    within(
        Duration::from_secs(20),
        "serving health after reconnect",
        || async { (link(&stack).await == Some(serving)).then_some(()) },
    )
    .await;
    stack.stop().await;
}

/// Control: PCI-3.7.6 (docs/compliance.md).
/// Attack: one admin changes the root key alone (to one only they know); a second admin
/// must approve, and the vaults keep serving through the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_root_key_changes_under_dual_control_without_vault_downtime() {
    let mut stack = Stack::start().await;
    let mut vault = stack.client(ADMIN).await;
    let before = vault.tokenize(card(51), false).await.unwrap();
    let new_root = stack.dir.path().join("root-2.key");
    keyservice::keyring::RootKey::generate_file(&new_root).unwrap();
    let mut admin = key_admin(&stack, ADMIN).await;
    let mut officer = key_admin(&stack, OFFICER).await;

    // A missing file is refused before anyone is asked to approve.
    let err = admin
        .propose_root_key_change(&stack.dir.path().join("nope.key").display().to_string())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    let proposal = admin
        .propose_root_key_change(&new_root.display().to_string())
        .await
        .unwrap();
    officer.approve(&proposal.id).await.unwrap();
    // The vault never noticed.
    vault.token_info(&before.token).await.unwrap();
    vault.tokenize(card(52), false).await.unwrap();

    // The keyring now opens only under the new key, which took the old one's place.
    let root_file = stack.dir.path().join("root.key");
    assert_eq!(
        std::fs::read(&root_file).unwrap(),
        std::fs::read(&new_root).unwrap()
    );
    let keyring = std::fs::read(stack.dir.path().join("keyring.sealed")).unwrap();
    let new_key = keyservice::keyring::RootKey::from_file(&root_file).unwrap();
    keyservice::keyring::Keyring::open(&keyring, &new_key).unwrap();
    stack.stop_keyservice().await;
    stack.start_keyservice().await;
    assert_eq!(
        version_state(&mut key_admin(&stack, ADMIN).await, "card-data", 1).await,
        "active"
    );
    stack.stop().await;
}

/// `make rewrap-bench`: the rewrap rate on REWRAP_RECORDS records (default 100,000),
/// unthrottled, after rotating card-data and fingerprint keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark: run with `make rewrap-bench`"]
async fn rewrap_rate() {
    let records: u64 = std::env::var("REWRAP_RECORDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let mut stack = Stack::start().await;
    stack.add_vault_config("[rewrap]\nrate_per_sec = 1000000\nbatch_size = 1000\n");
    stack.restart_vault().await;
    let mut vault = stack.client(ADMIN).await;
    let loading = Instant::now();
    for chunk in 0..records.div_ceil(1000) {
        let cards: Vec<Card> = (chunk * 1000..((chunk + 1) * 1000).min(records))
            .map(card)
            .collect();
        vault.tokenize_batch(&cards, false).await.unwrap();
    }
    println!(
        "loaded {records} records in {:.1} s",
        loading.elapsed().as_secs_f64()
    );
    let mut keys = key_admin(&stack, ADMIN).await;
    keys.rotate("card-data").await.unwrap();
    keys.rotate("fingerprint").await.unwrap();
    within(Duration::from_secs(20), "rotation picked up", || {
        let mut vault = vault.clone();
        async move {
            let status = vault.rewrap_status().await.unwrap();
            (status.card_data_version == 2 && status.fingerprint_version == 2).then_some(())
        }
    })
    .await;
    let started = Instant::now();
    vault.start_rewrap().await.unwrap();
    let finished = within(Duration::from_secs(3600), "rewrap finished", || {
        let mut vault = vault.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let status = vault.rewrap_status().await.unwrap();
            (!status.running).then_some(status)
        }
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(
        (finished.done, finished.remaining, finished.failed),
        (records, 0, 0)
    );
    println!(
        "rewrap: {records} records in {seconds:.1} s = {:.0} records/s (card-data and fingerprint \
         both rotated; each batch of 1000 rewritten concurrently, so group commit syncs them together)",
        records as f64 / seconds
    );
    stack.stop().await;
}

/// Key material, raw, hex or base64, is in no file but the sealed keyring: not in the
/// key history, the vault's data directory, or a backup.
///
/// Control: PCI-3.6.1, PCI-3.7.3 (docs/compliance.md).
/// Attack: search every file of both hosts (key history, data directory, backups) for any
/// key's bytes, raw, hex or base64.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_material_is_in_no_file_but_the_sealed_keyring() {
    if integration_tests::rocksdb_only("it scans the RocksDB data directory") {
        return;
    }
    use base64::Engine as _;
    let mut stack = Stack::start().await;
    let mut vault = stack.client(ADMIN).await;
    for n in 0..20 {
        vault
            .tokenize(card(60 + n).with_cvc("123"), false)
            .await
            .unwrap();
    }
    let mut admin = key_admin(&stack, ADMIN).await;
    for purpose in vault_client::KEY_PURPOSES {
        admin.rotate(purpose).await.unwrap();
    }
    vault.create_backup("scan").await.unwrap();
    let channel =
        integration_tests::raw_channel(&stack.dir, integration_tests::VAULT, stack.keyservice_addr)
            .await
            .unwrap();
    let keys = vault_proto::keys::v1::key_service_client::KeyServiceClient::new(channel)
        .get_keys(vault_proto::keys::v1::GetKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.keys.len(), 2 * vault_client::KEY_PURPOSES.len());
    stack.stop_vault().await;

    let mut scanned = 0;
    let mut pending = vec![stack.dir.path().to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.file_name().is_some_and(|n| n == "keyring.sealed") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            scanned += 1;
            for key in &keys.keys {
                let forms = [
                    key.material.clone(),
                    hex::encode(&key.material).into_bytes(),
                    base64::engine::general_purpose::STANDARD
                        .encode(&key.material)
                        .into_bytes(),
                ];
                for form in forms {
                    assert!(
                        !bytes.windows(form.len()).any(|w| w == form.as_slice()),
                        "key material of {} v{} found in {}",
                        key.purpose,
                        key.version,
                        path.display()
                    );
                }
            }
        }
    }
    assert!(scanned > 10, "scanned {scanned} files");
    assert!(stack.dir.path().join("key-history.jsonl").exists());
    stack.stop().await;
}

/// Control: PCI-3.7.6 (docs/compliance.md).
/// Attack: an admin's old proposal is approved long after, when its context has changed (or
/// by someone who found it later); approval after the window is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_proposal_cannot_be_approved() {
    let dir = StackDir::new();
    dir.set_keyservice_lifecycle("approval_window_secs = 1\n");
    let stack = Stack::start_in(dir).await;
    let mut admin = key_admin(&stack, ADMIN).await;
    let mut officer = key_admin(&stack, OFFICER).await;
    admin.rotate("card-data").await.unwrap();
    retire_by_two(&admin, &mut officer, "card-data", 1).await;
    let proposal = admin.propose_unretire("card-data", 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = officer.approve(&proposal.id).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");
    let listed = admin.proposals().await.unwrap();
    let expired = listed.iter().find(|p| p.id == proposal.id).unwrap();
    assert_eq!(expired.state, "expired");
    assert_eq!(version_state(&mut admin, "card-data", 1).await, "retired");
    stack.stop().await;
}

/// The keyservice restored from an older keyring copy (normal disaster recovery, or a
/// rollback): its GCM budgets may be spent already and destroyed keys may be back. The
/// vault has used a later generation and says so with every request, so the keyservice
/// refuses keys and leases until two admins accept the restore; then every purpose is
/// rotated above any version a vault uses, and the vault is served again.
///
/// Control: PCI-3.7.6, PCI-3.7.7 (docs/compliance.md).
/// Attack: roll the keyservice back to an older keyring (spent GCM budgets reset, destroyed
/// keys back); vaults notice the older generation and get nothing until two admins accept
/// the restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyservice_restored_from_an_older_keyring_is_caught_and_accepted_by_two() {
    let mut stack = Stack::start().await;
    let mut vault = stack.client(ADMIN).await;
    vault.tokenize(card(31), false).await.unwrap();
    let keyring = stack.dir.path().join("keyring.sealed");
    let old_copy = std::fs::read(&keyring).unwrap();
    let mut admin = key_admin(&stack, ADMIN).await;
    admin.rotate("card-data").await.unwrap();
    let on_v2 = within(Duration::from_secs(20), "rotation picked up", || {
        let mut vault = vault.clone();
        async move {
            let info = vault.tokenize(card(32), false).await.unwrap();
            (info.key_version == 2).then_some(info)
        }
    })
    .await;

    // Restore the older copy.
    stack.stop_keyservice().await;
    std::fs::write(&keyring, &old_copy).unwrap();
    stack.start_keyservice().await;
    let mut as_vault = vault_proto::keys::v1::key_service_client::KeyServiceClient::new(
        raw_channel(&stack.dir, integration_tests::VAULT, stack.keyservice_addr)
            .await
            .unwrap(),
    );
    // The vault's watch reconnects with the generation it has used: refused from then on.
    let status = within(Duration::from_secs(20), "the restore noticed", || {
        let mut as_vault = as_vault.clone();
        async move {
            as_vault
                .get_keys(vault_proto::keys::v1::GetKeysRequest { generation_seen: 0 })
                .await
                .err()
        }
    })
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("restored from an older copy"),
        "{status:?}"
    );
    let err = as_vault
        .lease_budget(vault_proto::keys::v1::LeaseBudgetRequest {
            purpose: vault_proto::keys::v1::KeyPurpose::CardData.into(),
            generation_seen: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "no budget leased: {err:?}"
    );

    // Two admins accept it.
    let mut admin = key_admin(&stack, ADMIN).await;
    let officer = key_admin(&stack, OFFICER).await;
    let proposal = admin.propose_accept_restore().await.unwrap();
    let err = admin.approve(&proposal.id).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    within(
        Duration::from_secs(20),
        "usage reported and approved",
        || {
            let mut officer = officer.clone();
            let id = proposal.id.clone();
            async move { officer.approve(&id).await.ok() }
        },
    )
    .await;
    // Version 2 is lost with the restore (its records cannot be read); its number is
    // never given to a new key.
    assert_eq!(version_state(&mut admin, "card-data", 3).await, "active");
    let fresh = within(Duration::from_secs(20), "the vault served again", || {
        let mut vault = vault.clone();
        async move {
            let info = vault.tokenize(card(33), false).await.ok()?;
            (info.key_version == 3).then_some(info)
        }
    })
    .await;
    assert_eq!(vault.token_info(&fresh.token).await.unwrap().key_version, 3);
    assert!(
        vault.token_info(&on_v2.token).await.is_err(),
        "v2 went with the restore"
    );
    assert!(
        as_vault
            .get_keys(vault_proto::keys::v1::GetKeysRequest { generation_seen: 0 })
            .await
            .is_ok()
    );
    stack.stop().await;
}

/// The key history is chained under a key sealed in the keyring: an operation whose
/// line is edited on the keyservice's disk is found.
///
/// Control: PCI-3.7.7, PCI-10.2.1.2 (docs/compliance.md).
/// Attack: someone with the keyservice's disk edits a line of the key history to hide or
/// change an operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_key_history_line_is_found() {
    let stack = Stack::start().await;
    let mut admin = key_admin(&stack, ADMIN).await;
    admin.rotate("card-data").await.unwrap();
    admin.rotate("fingerprint").await.unwrap();
    let chain = admin.verify_history().await.unwrap();
    assert_eq!((chain.broken_at, chain.unchained), (None, 0), "{chain:?}");
    assert!(chain.events >= 2);

    // Someone with the disk turns the first rotation into a refusal.
    let path = stack.dir.path().join("key-history.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let (line_no, line) = text
        .lines()
        .enumerate()
        .find(|(_, line)| line.contains("\"action\":\"rotate\""))
        .unwrap();
    let sequence: u64 = serde_json::from_str::<serde_json::Value>(line).unwrap()["sequence"]
        .as_u64()
        .unwrap();
    let edited: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(n, l)| match n == line_no {
            true => l.replace("\"outcome\":\"ok\"", "\"outcome\":\"refused: nothing\""),
            false => l.to_owned(),
        })
        .collect();
    std::fs::write(&path, edited.join("\n") + "\n").unwrap();
    let chain = admin.verify_history().await.unwrap();
    assert_eq!(chain.broken_at, Some(sequence), "{chain:?}");
    stack.stop().await;
}
