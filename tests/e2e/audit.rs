//! The audit log: every call leaves an event with its fields and never card data, and
//! `VerifyAudit` finds an edited, removed, inserted or reordered entry at its place.

use integration_tests::{ADMIN, OFFICER, OTHER_TENANT, READER, Stack, identity, synthetic_pan};
use tonic::Code;
use vault_client::{Card, ForwardRequest};
use vault_proto::vault::v1 as pb;

async fn audit_client(stack: &Stack) -> pb::vault_client::VaultClient<tonic::transport::Channel> {
    let channel = integration_tests::raw_channel(&stack.dir, ADMIN, stack.vault_addr)
        .await
        .unwrap();
    pb::vault_client::VaultClient::new(channel)
}

async fn all_events(stack: &Stack) -> Vec<pb::AuditEvent> {
    audit_client(stack)
        .await
        .read_audit(pb::ReadAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events
}

async fn verify(stack: &Stack) -> pb::VerifyAuditResponse {
    audit_client(stack)
        .await
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Control: PCI-8.2.1, PCI-10.2.1, PCI-10.2.1.1, PCI-10.2.1.3, PCI-10.2.1.4, PCI-10.2.2 (docs/compliance.md).
/// Attack: a session of reads, forwards, a refused delete and another tenant's lookup,
/// including a card number sent where a token belongs; every call must appear with actor,
/// peer, time, outcome and request id, the log must read the card nowhere, and reading the
/// log is itself an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scripted_scenario_leaves_the_expected_events_and_no_card_data() {
    let stack = Stack::start().await;
    let mut admin = stack.client(ADMIN).await;
    let pan = "4242424242424242";
    let stored = admin
        .tokenize(Card::new(pan, 12, 2030).with_cvc("737"), false)
        .await
        .unwrap();
    let batch: Vec<Card> = (0..3)
        .map(|n| Card::new(&synthetic_pan("5555", n, 16), 1, 2031))
        .collect();
    admin.tokenize_batch(&batch, false).await.unwrap();
    admin.token_info(&stored.token).await.unwrap();
    admin
        .forward(ForwardRequest {
            processor: "sandbox".into(),
            method: "POST".into(),
            path: "/v1/charges".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: r#"{"number":"{{card.number}}","exp_month":"{{card.exp_month}}","exp_year":"{{card.exp_year}}","cvc":"{{card.cvc}}"}"#.into(),
            token: stored.token.clone(),
            idempotency_key: None,
            reason: None,
            ..Default::default()
        })
        .await
        .unwrap();
    // A refused delete, and a lookup of someone else's token.
    let mut reader = stack.client(READER).await;
    assert_eq!(
        reader.delete(&stored.token).await.unwrap_err().code(),
        Some(Code::PermissionDenied)
    );
    let mut other = stack.client(OTHER_TENANT).await;
    assert_eq!(
        other.token_info(&stored.token).await.unwrap_err().code(),
        Some(Code::NotFound)
    );
    // A card number where a token belongs never reaches the log.
    assert!(admin.token_info(pan).await.is_err());
    admin.delete(&stored.token).await.unwrap();

    let events = all_events(&stack).await;
    let calls: Vec<&pb::AuditEvent> = events
        .iter()
        .filter(|e| e.action != "KeySetChanged")
        .collect();
    let summary: Vec<(&str, &str, &str)> = calls
        .iter()
        .map(|e| (e.action.as_str(), e.actor.as_str(), e.outcome.as_str()))
        .collect();
    let (admin_id, reader_id, other_id) =
        (identity(ADMIN), identity(READER), identity(OTHER_TENANT));
    assert_eq!(
        summary,
        vec![
            ("Tokenize", admin_id.as_str(), "ok"),
            ("TokenizeBatch", admin_id.as_str(), "ok"),
            ("GetTokenInfo", admin_id.as_str(), "ok"),
            // Irreversible steps are on record before they happen.
            ("ForwardStarted", admin_id.as_str(), "started"),
            ("Forward", admin_id.as_str(), "ok"),
            ("DeleteToken", reader_id.as_str(), "PERMISSION_DENIED"),
            ("GetTokenInfo", other_id.as_str(), "NOT_FOUND"),
            ("GetTokenInfo", admin_id.as_str(), "INVALID_ARGUMENT"),
            // A delete's event commits in the delete's own write: no intent first.
            ("DeleteToken", admin_id.as_str(), "ok"),
        ]
    );
    // Every field that applies is there.
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.sequence, i as u64 + 1);
        assert!(event.at_unix_ms > 1_700_000_000_000);
        assert!(event.audit_key_version >= 1);
    }
    for event in &calls {
        if !event.action.ends_with("Started") {
            assert_eq!(event.peer, "127.0.0.1");
        }
        assert_eq!(event.request_id.len(), 16, "{event:?}");
    }
    assert_eq!(calls[3].request_id, calls[4].request_id);
    let tokenize = calls[0];
    assert_eq!(
        (
            tokenize.tenant.as_str(),
            tokenize.token.as_str(),
            tokenize.key_version
        ),
        ("acme", stored.token.as_str(), 1)
    );
    assert_eq!(calls[1].count, 3);
    assert_eq!(
        (calls[4].token.as_str(), calls[4].processor.as_str()),
        (stored.token.as_str(), "sandbox")
    );
    assert!(calls[4].detail.contains("processor answered 200"));
    assert_eq!(calls[5].token, "", "nothing a refused call named is logged");
    assert_eq!(calls[6].tenant, "globex");
    assert_eq!(calls[8].token, stored.token);

    // No card data in any event: not the PAN, not the batch's, not the CVC.
    let text = format!("{events:?}");
    assert!(!text.contains(pan));
    for n in 0..3 {
        assert!(!text.contains(&synthetic_pan("5555", n, 16)));
    }
    assert!(!integration_tests::contains_word(text.as_bytes(), b"737"));
    let verification = verify(&stack).await;
    assert!(verification.intact, "{verification:?}");
    assert_eq!(
        verification.entries,
        events.len() as u64 + 1,
        "+ the ReadAudit call"
    );
    stack.stop().await;
}

/// The stopped vault's database, which holds the audit log (its `audit` column family).
fn open_audit_db(stack: &Stack) -> rocksdb::DB {
    integration_tests::open_vault_db(&stack.dir.data_dir())
}

/// Opens the stopped vault's audit database, lets `tamper` change its entries, and
/// returns what `VerifyAudit` says after a restart.
async fn tamper_and_verify(
    stack: &mut Stack,
    tamper: impl FnOnce(&rocksdb::DB, &rocksdb::ColumnFamily),
) -> pb::VerifyAuditResponse {
    tamper_and_verify_with(stack, true, tamper).await
}

/// Like [`tamper_and_verify`]; with `move_anchor`, the vault's record of the last
/// entry it wrote (in the data directory) follows the tampered log's end, so that
/// only the tampering inside the log is seen.
async fn tamper_and_verify_with(
    stack: &mut Stack,
    move_anchor: bool,
    tamper: impl FnOnce(&rocksdb::DB, &rocksdb::ColumnFamily),
) -> pb::VerifyAuditResponse {
    stack.stop_vault().await;
    {
        let db = open_audit_db(stack);
        let audit = db.cf_handle("audit").unwrap();
        tamper(&db, audit);
        let mut iter = db.raw_iterator_cf(audit);
        iter.seek_to_last();
        let last = u64::from_be_bytes(iter.key().unwrap().try_into().unwrap());
        if move_anchor {
            let meta = db.cf_handle("meta").unwrap();
            db.put_cf(meta, "audit-head", last.to_be_bytes()).unwrap();
        }
    }
    stack.restart_vault().await;
    verify(stack).await
}

fn key(sequence: u64) -> [u8; 8] {
    sequence.to_be_bytes()
}

/// Control: PCI-10.3.2 (docs/compliance.md).
/// Attack: someone with the disk edits, removes, inserts or reorders audit entries (with
/// the anchor moved to match); `audit verify` names the first bad entry each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_finds_an_edited_removed_inserted_or_reordered_entry() {
    if integration_tests::rocksdb_only("it edits the RocksDB audit log") {
        return;
    }
    let mut stack = Stack::start().await;
    let mut admin = stack.client(ADMIN).await;
    for n in 0..30 {
        admin
            .tokenize(Card::new(&synthetic_pan("4000", n, 16), 1, 2031), false)
            .await
            .unwrap();
    }
    let intact = verify(&stack).await;
    assert!(intact.intact, "{intact:?}");
    // The entries as written, to put back after each tampering.
    stack.stop_vault().await;
    let original: Vec<(Vec<u8>, Vec<u8>)> = {
        let db = open_audit_db(&stack);
        let audit = db.cf_handle("audit").unwrap();
        db.iterator_cf(audit, rocksdb::IteratorMode::Start)
            .map(|entry| {
                let (k, v) = entry.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    };
    stack.restart_vault().await;
    let restore = |db: &rocksdb::DB, audit: &rocksdb::ColumnFamily| {
        let mut iter = db.raw_iterator_cf(audit);
        iter.seek_to_first();
        let mut keys = Vec::new();
        while let Some(k) = iter.key() {
            keys.push(k.to_vec());
            iter.next();
        }
        for k in keys {
            db.delete_cf(audit, k).unwrap();
        }
        for (k, v) in &original {
            db.put_cf(audit, k, v).unwrap();
        }
    };
    let value = |sequence: u64| original[sequence as usize - 1].1.clone();

    // One byte of entry 5 edited (inside its JSON).
    let report = tamper_and_verify(&mut stack, |db, audit| {
        restore(db, audit);
        let mut edited = value(5);
        let last = edited.len() - 3;
        edited[last] ^= 0x01;
        db.put_cf(audit, key(5), edited).unwrap();
    })
    .await;
    assert_eq!(
        (
            report.intact,
            report.first_bad_sequence,
            report.problem.as_str()
        ),
        (false, 5, "edited")
    );

    // Entry 7 removed.
    let report = tamper_and_verify(&mut stack, |db, audit| {
        restore(db, audit);
        db.delete_cf(audit, key(7)).unwrap();
    })
    .await;
    assert_eq!(
        (
            report.intact,
            report.first_bad_sequence,
            report.problem.as_str()
        ),
        (false, 7, "removed")
    );

    // An entry slipped in before entry 9: the rest moved one place down.
    let report = tamper_and_verify(&mut stack, |db, audit| {
        restore(db, audit);
        for sequence in (9..=original.len() as u64).rev() {
            db.put_cf(audit, key(sequence + 1), value(sequence))
                .unwrap();
        }
        let mut forged = value(9);
        let text = String::from_utf8_lossy(&forged[36..]).replace("\"ok\"", "\"OK\"");
        forged.truncate(36);
        forged.extend_from_slice(text.as_bytes());
        db.put_cf(audit, key(9), forged).unwrap();
    })
    .await;
    assert_eq!(
        (
            report.intact,
            report.first_bad_sequence,
            report.problem.as_str()
        ),
        (false, 9, "inserted")
    );

    // Entries 11 and 12 swapped.
    let report = tamper_and_verify(&mut stack, |db, audit| {
        restore(db, audit);
        db.put_cf(audit, key(11), value(12)).unwrap();
        db.put_cf(audit, key(12), value(11)).unwrap();
    })
    .await;
    assert_eq!(
        (
            report.intact,
            report.first_bad_sequence,
            report.problem.as_str()
        ),
        (false, 11, "reordered")
    );

    // Entries cut off the end: the vault's own record of its last entry shows it.
    let report = tamper_and_verify_with(&mut stack, false, |db, audit| {
        restore(db, audit);
        for sequence in 28..=original.len() as u64 {
            db.delete_cf(audit, key(sequence)).unwrap();
        }
    })
    .await;
    assert_eq!(
        (
            report.intact,
            report.first_bad_sequence,
            report.problem.as_str()
        ),
        (false, 28, "removed")
    );

    // Put back, the entries as first written verify again; but the ones written after
    // them (each round's own calls) are gone, and the vault's checkpoint at the
    // keyservice says they were written: a log cut short cannot be healed unseen.
    let report = tamper_and_verify(&mut stack, restore).await;
    let written = original.len() as u64;
    assert_eq!(
        (
            report.intact,
            report.first_bad_sequence,
            report.problem.as_str()
        ),
        (false, written + 1, "removed"),
        "{report:?}"
    );
    assert_eq!(report.gaps[0].first_sequence, written + 1, "{report:?}");
    stack.stop().await;
}

/// Control: PCI-10.3.4 (docs/compliance.md).
/// Attack: rotate the audit key hoping older entries become unverifiable (and so quietly
/// editable); they still verify under their own version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_entries_stay_verifiable_after_the_audit_key_rotates() {
    let stack = Stack::start().await;
    let mut admin = stack.client(ADMIN).await;
    admin
        .tokenize(Card::new("4242424242424242", 12, 2030), false)
        .await
        .unwrap();
    let mut keys = vault_client::KeyServiceClient::connect(&stack.keyservice_config(ADMIN))
        .await
        .unwrap();
    keys.rotate("audit").await.unwrap();
    let started = std::time::Instant::now();
    loop {
        admin
            .tokenize(Card::new("5555555555554444", 12, 2030), false)
            .await
            .unwrap();
        let events = all_events(&stack).await;
        if events.last().is_some_and(|e| e.audit_key_version == 2) {
            assert_eq!(events[0].audit_key_version, 1);
            break;
        }
        assert!(
            started.elapsed().as_secs() < 5,
            "audit key rotation not picked up"
        );
    }
    let report = verify(&stack).await;
    assert!(report.intact, "{report:?}");
    stack.stop().await;
}

/// Tokenizations per second from `concurrency` clients, `total` in all.
async fn tokenize_rate(stack: &Stack, concurrency: u64, total: u64) -> f64 {
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|client_no| {
            let config = stack.vault_config(ADMIN);
            tokio::spawn(async move {
                let mut client = vault_client::VaultClient::connect(&config).await.unwrap();
                for n in 0..total / concurrency {
                    let pan = synthetic_pan("4100", client_no * 1_000_000 + n, 16);
                    client
                        .tokenize(Card::new(&pan, 1, 2031), false)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// `make audit-bench`: tokenize throughput with and without the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark: run with `make audit-bench`"]
async fn audit_cost() {
    let total: u64 = std::env::var("AUDIT_BENCH_TOKENS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(40_000);
    for concurrency in [1, 64] {
        let mut stack = Stack::start().await;
        let total = if concurrency == 1 { total / 10 } else { total };
        tokenize_rate(&stack, concurrency, 500).await; // warm-up
        let audited = tokenize_rate(&stack, concurrency, total).await;
        stack.add_vault_config("[audit]\nenabled = false\n");
        stack.restart_vault().await;
        tokenize_rate(&stack, concurrency, 500).await;
        let unaudited = tokenize_rate(&stack, concurrency, total).await;
        println!(
            "{concurrency:>3} in flight: {audited:>8.0} tokenizations/s audited, \
             {unaudited:>8.0}/s without the audit log ({:.0}% of it)",
            audited / unaudited * 100.0
        );
        stack.stop().await;
    }
}

/// A caller that gives up mid-forward (its deadline passes while the processor is
/// slow): the card left the vault, and the log says so.
///
/// Control: PCI-10.2.1.1 (docs/compliance.md).
/// Attack: a caller cancels its forward while the processor is slow, hoping the card leaves
/// unrecorded; the log has the intent and the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forward_the_caller_abandons_is_still_audited() {
    let stack = Stack::start().await;
    let mut admin = stack.client(ADMIN).await;
    let token = admin
        .tokenize(Card::new("4242424242424242", 12, 2030), false)
        .await
        .unwrap()
        .token;
    let mut impatient = stack.vault_config(ADMIN);
    impatient.timeout = std::time::Duration::from_millis(400);
    let mut impatient = vault_client::VaultClient::connect(&impatient)
        .await
        .unwrap();
    let err = impatient
        .forward(ForwardRequest {
            processor: "sandbox".into(),
            method: "POST".into(),
            path: "/v1/charges".into(),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("x-sandbox-delay-ms".into(), "1500".into()),
            ],
            body: r#"{"number":"{{card.number}}","exp_month":"{{card.exp_month}}","exp_year":"{{card.exp_year}}"}"#.into(),
            token: token.clone(),
            idempotency_key: None,
            reason: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("DeadlineExceeded")
            || err.to_string().contains("Cancelled")
            || err.to_string().contains("deadline"),
        "{err}"
    );
    let started = std::time::Instant::now();
    loop {
        let events = all_events(&stack).await;
        let started_event = events
            .iter()
            .find(|e| e.action == "ForwardStarted" && e.token == token);
        let ended = events
            .iter()
            .find(|e| e.action == "Forward" && e.outcome != "ok");
        if let (Some(intent), Some(end)) = (started_event, ended) {
            assert_eq!(intent.processor, "sandbox");
            assert_eq!(intent.request_id, end.request_id);
            break;
        }
        assert!(started.elapsed().as_secs() < 5, "{events:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stack.stop().await;
}

/// The last sequence number the vault's audit log holds.
async fn last_sequence(stack: &Stack) -> u64 {
    audit_client(stack)
        .await
        .read_audit(pb::ReadAuditRequest {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .last_sequence
}

async fn tokenize_some(stack: &Stack, prefix: &str, count: u64) {
    let mut admin = stack.client(ADMIN).await;
    for n in 0..count {
        admin
            .tokenize(Card::new(&synthetic_pan(prefix, n, 16), 1, 2031), false)
            .await
            .unwrap();
    }
}

/// Card data is refused (FAILED_PRECONDITION, naming the gap) while the audit log has a
/// gap nobody acknowledged.
async fn assert_refused_for_the_gap(stack: &Stack) {
    let mut admin = stack.client(ADMIN).await;
    let err = admin
        .tokenize(Card::new(&synthetic_pan("4003", 0, 16), 1, 2031), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("acknowledge the gap"), "{err}");
}

/// Waits until the vault serves card data again (it asks the keyservice every second).
async fn serves_card_data_again(stack: &Stack) {
    integration_tests::within(
        std::time::Duration::from_secs(20),
        "card data served after the acknowledgement",
        || async {
            let mut admin = stack.client(ADMIN).await;
            admin
                .tokenize(Card::new(&synthetic_pan("4004", 0, 16), 1, 2031), false)
                .await
                .ok()
        },
    )
    .await;
}

fn fault(report: &pb::VerifyAuditResponse) -> (bool, u64, &str) {
    (
        report.intact,
        report.first_bad_sequence,
        report.problem.as_str(),
    )
}

/// Attack: stop the vault, delete its audit log whole (the column family dropped,
/// the anchor deleted), start it. Before, the vault began a new chain at 1 and `audit
/// verify` said "intact". Now the checkpoint at the keyservice says entries were
/// written: every verify after reports them removed, and new events never fill the
/// gap.
///
/// Control: PCI-10.2.1.6 (docs/compliance.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_audit_log_deleted_whole_is_reported_on_every_verify_after() {
    if integration_tests::rocksdb_only("it deletes the RocksDB audit log") {
        return;
    }
    let mut stack = Stack::start().await;
    tokenize_some(&stack, "4000", 10).await;
    assert!(verify(&stack).await.intact);
    let written = last_sequence(&stack).await;
    // The read's own event is the last entry written before the stop.
    integration_tests::wait_for_audit_checkpoint(&stack.dir, written + 1).await;

    stack.stop_vault().await;
    {
        let mut db = open_audit_db(&stack);
        db.drop_cf("audit").unwrap();
        db.delete_cf(db.cf_handle("meta").unwrap(), "audit-head")
            .unwrap();
    }
    stack.restart_vault().await;
    assert_eq!(fault(&verify(&stack).await), (false, 1, "removed"));
    // No card data until the gap is acknowledged; the audit log stays readable.
    assert_refused_for_the_gap(&stack).await;
    let again = verify(&stack).await;
    assert_eq!(fault(&again), (false, 1, "removed"), "{again:?}");
    assert!(
        last_sequence(&stack).await > written,
        "new entries follow the old head, leaving the gap"
    );

    // Two admins acknowledge the gap: verify lists it and passes.
    let gaps = again.gaps.clone();
    assert_eq!(gaps.len(), 1, "{again:?}");
    assert_eq!((gaps[0].first_sequence, gaps[0].acknowledged), (1, false));
    let mut admin = vault_client::KeyServiceClient::connect(&stack.keyservice_config(ADMIN))
        .await
        .unwrap();
    let mut officer = vault_client::KeyServiceClient::connect(&stack.keyservice_config(OFFICER))
        .await
        .unwrap();
    // Verify names the vault as an acknowledgement must: its node and identity.
    let vault_identity = again.vault_identity.clone();
    assert_eq!(vault_identity, identity(integration_tests::VAULT));
    let proposal = admin
        .propose_audit_gap(&vault_identity, &again.node, 1, gaps[0].last_sequence)
        .await
        .unwrap();
    assert!(
        !verify(&stack).await.gaps[0].acknowledged,
        "not before approval"
    );
    let err = admin.approve(&proposal.id).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert_refused_for_the_gap(&stack).await;
    officer.approve(&proposal.id).await.unwrap();
    let acknowledged = verify(&stack).await;
    assert!(acknowledged.intact, "{acknowledged:?}");
    assert_eq!(
        acknowledged.gaps[0].acknowledged_by,
        format!("{}, {}", identity(ADMIN), identity(OFFICER))
    );
    // The vault learns of the acknowledgement within seconds and serves again, also
    // after a restart.
    serves_card_data_again(&stack).await;
    stack.restart_vault().await;
    tokenize_some(&stack, "4002", 1).await;
    assert!(verify(&stack).await.intact);
    stack.stop().await;
}

/// Attack: copy the vault's data directory (data and audit log in one database) aside, make more
/// calls, stop the vault, put the older copy back, start it. Everything on the host is
/// consistent; only the checkpoint at the keyservice shows what was cut.
///
/// Control: PCI-10.3.4 (docs/compliance.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_directory_restored_from_an_older_copy_is_reported() {
    if integration_tests::rocksdb_only("it copies the RocksDB directories") {
        return;
    }
    let mut stack = Stack::start().await;
    tokenize_some(&stack, "4000", 5).await;
    stack.stop_vault().await;
    let copy = tempfile::tempdir().unwrap();
    let dirs = ["vault-data"];
    for dir in dirs {
        copy_dir(&stack.dir.path().join(dir), &copy.path().join(dir));
    }
    stack.restart_vault().await;
    let copied = last_sequence(&stack).await;
    tokenize_some(&stack, "4001", 20).await;
    let written = last_sequence(&stack).await;
    // The read's own event is the last entry written before the stop.
    integration_tests::wait_for_audit_checkpoint(&stack.dir, written + 1).await;

    stack.stop_vault().await;
    for dir in dirs {
        let live = stack.dir.path().join(dir);
        std::fs::remove_dir_all(&live).unwrap();
        copy_dir(&copy.path().join(dir), &live);
    }
    stack.restart_vault().await;
    for _ in 0..2 {
        let report = verify(&stack).await;
        assert_eq!(fault(&report), (false, copied + 1, "removed"), "{report:?}");
        assert_refused_for_the_gap(&stack).await;
    }
    // Restarted again, on a data directory that now shows the gap only inside the
    // log: the keyservice still says it was found.
    stack.restart_vault().await;
    assert_refused_for_the_gap(&stack).await;
    stack.stop().await;
}

/// The head in the data directory rewritten by hand: a forged anchor is reported.
///
/// Control: PCI-10.3.4 (docs/compliance.md).
/// Attack: someone with the disk rewrites the log's anchor (its last sequence and chain
/// value) to hide a cut; the forged anchor fails its MAC and is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rewritten_head_is_reported() {
    if integration_tests::rocksdb_only("it edits the RocksDB data directory") {
        return;
    }
    let mut stack = Stack::start().await;
    tokenize_some(&stack, "4000", 5).await;
    stack.stop_vault().await;
    {
        let db = integration_tests::open_vault_db(&stack.dir.data_dir());
        let meta = db.cf_handle("meta").unwrap();
        let mut anchor = db.get_cf(meta, "audit-head").unwrap().unwrap();
        assert_eq!(anchor.len(), 76, "a MACed head");
        // Its sequence number lowered to 2, as if the log ended there.
        anchor[4..12].copy_from_slice(&2u64.to_be_bytes());
        db.put_cf(meta, "audit-head", anchor).unwrap();
    }
    stack.restart_vault().await;
    let report = verify(&stack).await;
    assert_eq!(fault(&report), (false, 2, "head altered"), "{report:?}");
    stack.stop().await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A vault that stops sends its last head as it goes, so the entries of its last second
/// cannot be cut unseen while it is down (its periodic reports come once a second).
///
/// Control: PCI-10.2.1.6 (docs/compliance.md).
/// Attack: cut the entries of a vault's last second while it is stopped, before its
/// periodic report; the head it sends as it stops still exposes the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_vault_leaves_its_last_head_at_the_keyservice() {
    let mut stack = Stack::start().await;
    for round in 0..3 {
        tokenize_some(&stack, "4005", 3).await;
        // The read's own event is the last entry: stopped at once, with no time for a
        // periodic report.
        let last = last_sequence(&stack).await + 1;
        stack.stop_vault().await;
        let kept = std::fs::read(stack.dir.path().join("audit-checkpoints.json")).unwrap();
        let kept: serde_json::Value = serde_json::from_slice(&kept).unwrap();
        let sequence = kept["checkpoints"][0]["sequence"].as_u64().unwrap();
        assert_eq!(sequence, last, "round {round}: {kept}");
        stack.restart_vault().await;
        // The log hands out each entry's chain value: the checkpoint's entry has it.
        let entry = all_events(&stack)
            .await
            .into_iter()
            .find(|event| event.sequence == sequence)
            .unwrap();
        assert_eq!(
            hex::encode(&entry.chain),
            kept["checkpoints"][0]["chain"].as_str().unwrap()
        );
    }
    stack.stop().await;
}

/// Attack: wipe the data directory and start the vault under another node name
/// (another port or host, or `[audit] node_name`), so that no checkpoint names its
/// node. Its identity still has one: the empty log goes on after it, and card data is
/// refused until two admins acknowledge the gap (as for a new vault added under an
/// identity that already has one).
///
/// Control: PCI-10.2.1.6 (docs/compliance.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_vault_under_a_new_node_name_is_refused_until_acknowledged() {
    if integration_tests::rocksdb_only("it wipes the RocksDB data directory") {
        return;
    }
    let mut stack = Stack::start().await;
    tokenize_some(&stack, "4006", 5).await;
    let written = last_sequence(&stack).await;
    integration_tests::wait_for_audit_checkpoint(&stack.dir, written + 1).await;

    stack.stop_vault().await;
    std::fs::remove_dir_all(stack.dir.data_dir()).unwrap();
    stack.add_vault_config("[audit]\nnode_name = \"renamed\"\n");
    stack.restart_vault().await;
    assert_refused_for_the_gap(&stack).await;
    let report = verify(&stack).await;
    assert_eq!(report.node, "renamed");
    assert_eq!(fault(&report), (false, 1, "removed"), "{report:?}");
    assert_eq!(report.gaps.len(), 1, "{report:?}");
    assert_eq!(report.gaps[0].first_sequence, 1);
    assert!(report.gaps[0].last_sequence > written, "{report:?}");
    let acknowledged = integration_tests::acknowledge_audit_gaps(&stack).await;
    assert_eq!(acknowledged.len(), 1);
    assert!(verify(&stack).await.intact);
    stack.stop().await;
}
