//! Leak scan: after 1,000 distinct cards went through real processes logging at TRACE,
//! no card number (nor CVC, nor cardholder name, nor the root key) appears in any file under the
//! vault's data directory or in anything either service printed.

use std::collections::HashSet;
use std::path::Path;

use integration_tests::{ADMIN, Process, StackDir, synthetic_pan};
use vault_client::{BatchItem, Card, VaultClient};

const PAN_LEN: usize = 16;
const NAME: &str = "Zyxwvut Cardholder";
/// The CVC every card here carries: four digits with a leading zero, which no PID,
/// byte count or port prints; searched as a word (no letter or digit on either side),
/// so neither a longer number nor a hex string holding it is a chance match.
const CVC: &str = "0372";

/// Every 16-byte window of `haystack` that is one of `pans`.
fn find_pans(haystack: &[u8], pans: &HashSet<Vec<u8>>) -> Vec<String> {
    haystack
        .windows(PAN_LEN)
        .filter(|w| pans.contains(*w))
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect()
}

fn scan_dir(dir: &Path, pans: &HashSet<Vec<u8>>, scanned: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            scan_dir(&path, pans, scanned);
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let found = find_pans(&bytes, pans);
        assert!(
            found.is_empty(),
            "card numbers in {}: {found:?}",
            path.display()
        );
        assert!(
            !bytes.windows(NAME.len()).any(|w| w == NAME.as_bytes()),
            "cardholder name in {}",
            path.display()
        );
        if let Some(line) = integration_tests::word_line(&bytes, CVC.as_bytes()) {
            panic!("a CVC in {}: {line:?}", path.display());
        }
        scanned.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
}

/// Control: PCI-3.3.1, PCI-3.5.1, GDPR-25 (docs/compliance.md).
/// Attack: look for card numbers, CVCs or names in every file the vault and keyservice
/// write and in their TRACE logs; none is found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_card_data_in_files_or_trace_logs() {
    if integration_tests::rocksdb_only(
        "it scans the RocksDB data directory (tests/e2e/postgres.rs scans the database files)",
    ) {
        return;
    }
    let dir = StackDir::new();
    let trace = [("KEYSERVICE_LOG", "trace"), ("VAULT_LOG", "trace")];
    let keyservice =
        Process::start("keyservice", &dir.path().join("keyservice.toml"), &trace).await;
    // The sandbox runs in this process; the vault process forwards to it.
    let sandbox = integration_tests::SandboxServer::start(&dir).await;
    let journal = sandbox.journal.clone();
    let processors = integration_tests::processors_config(dir.path(), sandbox.addr.port(), 9, 3600);
    let vault_config = dir.write_vault_config_with(keyservice.addr.port(), &processors);
    let vault = Process::start("vault-server", &vault_config, &trace).await;

    let pans: Vec<String> = (0..1000)
        .map(|n| synthetic_pan("411111", n * 7919, PAN_LEN))
        .collect();
    // Sealed on the client (sealed intake), opened only inside the vault.
    let sealed_pans: Vec<String> = (0..60)
        .map(|n| synthetic_pan("411111", 7_000_000 + n * 7919, PAN_LEN))
        .collect();
    let pan_set: HashSet<Vec<u8>> = pans
        .iter()
        .chain(&sealed_pans)
        .map(|p| p.as_bytes().to_vec())
        .collect();
    assert_eq!(pan_set.len(), 1060);

    let mut client = VaultClient::connect(&dir.client_config(ADMIN, vault.addr))
        .await
        .unwrap();
    let mut tokens = Vec::new();
    for pan in &pans[..500] {
        let card = Card::new(pan, 12, 2030)
            .with_cardholder_name(NAME)
            .with_cvc(CVC);
        tokens.push(client.tokenize(card, true).await.unwrap().token);
    }
    for chunk in pans[500..].chunks(100) {
        let cards: Vec<Card> = chunk
            .iter()
            .map(|p| Card::new(p, 12, 2030).with_cardholder_name(NAME))
            .collect();
        for item in client.tokenize_batch(&cards, false).await.unwrap() {
            let BatchItem::Stored(info) = item else {
                panic!("{item:?}")
            };
            tokens.push(info.token);
        }
    }
    // Sealed cards (sealed intake) of new numbers, one by one and in a batch, and one
    // refused: opened inside the vault, so they go through its logs too.
    let sealing = client.sealing_key().await.unwrap();
    for pan in &sealed_pans[..40] {
        let card = Card::new(pan, 12, 2030).with_cardholder_name(NAME);
        let blob = sealing.seal(&card).unwrap();
        client.tokenize_sealed(&blob, false).await.unwrap();
    }
    let blobs = sealed_pans[40..]
        .iter()
        .map(|pan| sealing.seal(&Card::new(pan, 12, 2030)).unwrap())
        .collect();
    for item in client
        .tokenize_sealed_batch(blobs, Default::default())
        .await
        .unwrap()
    {
        assert!(matches!(item, BatchItem::Stored(_)), "{item:?}");
    }
    let mut tampered = sealing.seal(&Card::new(&sealed_pans[0], 12, 2030)).unwrap();
    *tampered.last_mut().unwrap() ^= 1;
    client.tokenize_sealed(&tampered, false).await.unwrap_err();
    // Reads, deletes, reuse and refusals go through the logs too.
    for token in &tokens[..50] {
        client.token_info(token).await.unwrap();
    }
    for token in &tokens[50..60] {
        client.delete(token).await.unwrap();
    }
    client
        .tokenize(Card::new(&pans[100], 12, 2030), true)
        .await
        .unwrap();
    // Forwards with the number, name and CVC, one echoed back by the processor.
    for (i, token) in tokens[60..70].iter().enumerate() {
        let mut request = vault_client::ForwardRequest {
            processor: "sandbox".into(),
            method: "POST".into(),
            path: "/v1/charges".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: r#"{"number":"{{card.number}}","exp_month":"{{card.exp_month}}","exp_year":"{{card.exp_year}}","name":"{{card.name}}","cvc":"{{card.cvc}}"}"#.into(),
            token: token.clone(),
            idempotency_key: Some(format!("leak-{i}")),
            reason: None,
            ..Default::default()
        };
        if i == 0 {
            request.headers.push(("x-sandbox-echo".into(), "1".into()));
        }
        assert_eq!(client.forward(request).await.unwrap().status, 200);
    }
    assert_eq!(journal.requests().len(), 10, "the sandbox got the forwards");
    let bad_luhn = format!(
        "{}{}",
        &pans[0][..15],
        (pans[0].as_bytes()[15] - b'0' + 1) % 10
    );
    client
        .tokenize(Card::new(&bad_luhn, 12, 2030), false)
        .await
        .unwrap_err();
    drop(client);

    let vault_log = vault.terminate().await;
    let keyservice_log = keyservice.terminate().await;
    sandbox.stop().await;
    assert!(
        vault_log.contains("tokenized") && vault_log.contains("TRACE"),
        "the vault logged at TRACE"
    );
    assert!(keyservice_log.contains("served key versions"));

    let mut pans_and_bad = pan_set.clone();
    pans_and_bad.insert(bad_luhn.into_bytes());
    for (name, log) in [
        ("vault-server", &vault_log),
        ("keyservice", &keyservice_log),
    ] {
        let found = find_pans(log.as_bytes(), &pans_and_bad);
        assert!(
            found.is_empty(),
            "card numbers in the {name} log: {found:?}"
        );
        assert!(!log.contains(NAME), "cardholder name in the {name} log");
        if let Some(line) = integration_tests::word_line(log.as_bytes(), CVC.as_bytes()) {
            panic!("a CVC in the {name} log: {line}");
        }
        let root_key = std::fs::read_to_string(dir.path().join("root.key")).unwrap();
        assert!(!log.contains(root_key.trim()), "root key in the {name} log");
    }

    // Files as the vault left them (WAL, MANIFEST, LOG, OPTIONS), then flushed to SST
    // files, so both the log and the table formats are scanned.
    let mut scanned = Vec::new();
    scan_dir(&dir.data_dir(), &pans_and_bad, &mut scanned);
    {
        let db = integration_tests::open_vault_db(&dir.data_dir());
        for cf in rocksdb::DB::list_cf(&rocksdb::Options::default(), dir.data_dir()).unwrap() {
            db.flush_cf(db.cf_handle(&cf).unwrap()).unwrap();
        }
    }
    scan_dir(&dir.data_dir(), &pans_and_bad, &mut scanned);
    for kind in ["LOG", "MANIFEST", "OPTIONS", ".sst", ".log"] {
        assert!(
            scanned.iter().any(|f| f.contains(kind)),
            "no {kind} file was scanned: {scanned:?}"
        );
    }
}
