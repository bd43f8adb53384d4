//! Crash test: concurrent tokenizations against the real vault-server binary, key
//! rotations and rewraps running meanwhile, `kill -9` at random moments (the keyservice
//! too, now and then), restart, and every token a client got an OK for must still
//! answer with its metadata, on the latest key version once the rewrap is through, and
//! still forward.
//!
//! `make test` runs a short version; `make crash-test` runs `CRASH_CYCLES` (default 50).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::{ADMIN, Process, StackDir};
use vault_client::{BatchItem, Card, ForwardRequest, KeyServiceClient, TokenInfo, VaultClient};

const CLIENTS: usize = 8;

/// A small deterministic generator: the run prints its seed so a failure can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

fn pin_port(config: &std::path::Path, port: u16) {
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(
        config,
        // The listener only (the first address); the admin port stays on port 0.
        text.replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1),
    )
    .unwrap();
}

async fn crash_cycles(cycles: usize) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("crash test: {cycles} cycles, seed {seed}");
    let mut rng = Lcg(seed);
    let started = Instant::now();
    let dir = StackDir::new();
    let keyservice_config = dir.path().join("keyservice.toml");
    let mut keyservice = Process::start("keyservice", &keyservice_config, &[]).await;
    let keyservice_port = keyservice.addr.port();
    // The keyservice comes back on the same port after a kill.
    pin_port(&keyservice_config, keyservice_port);

    let sandbox = integration_tests::SandboxServer::start(&dir).await;
    let processors = integration_tests::processors_config(dir.path(), sandbox.addr.port(), 9, 3600);
    let vault_config = dir.write_vault_config_with(keyservice_port, &processors);

    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut keyservice_kills = 0;
    let mut rotations = 0;
    for cycle in 0..cycles {
        let vault = Process::start("vault-server", &vault_config, &[]).await;
        let driving = tokio::spawn(drive(
            dir.client_config(ADMIN, vault.addr),
            cycle as u64 * 100_000_000,
            Arc::clone(&acknowledged),
        ));
        if cycle % 3 == 1 {
            // A rotation and a rewrap under load, killed wherever they are.
            let purpose = if cycle % 2 == 0 {
                "fingerprint"
            } else {
                "card-data"
            };
            let mut keys = KeyServiceClient::connect(&dir.client_config(ADMIN, keyservice.addr))
                .await
                .unwrap();
            keys.rotate(purpose).await.unwrap();
            rotations += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Ok(mut client) =
                VaultClient::connect(&dir.client_config(ADMIN, vault.addr)).await
            {
                let _ = client.start_rewrap().await;
            }
        }
        tokio::time::sleep(Duration::from_millis(50 + rng.next(400))).await;
        vault.kill9().await;
        driving.await.unwrap();
        if rng.next(5) == 0 {
            // Kill the keyservice too; the vault's next start must wait for it.
            keyservice.kill9().await;
            keyservice = Process::start("keyservice", &keyservice_config, &[]).await;
            keyservice_kills += 1;
        }
    }

    // Restart once more and check every acknowledged token.
    let vault = Process::start("vault-server", &vault_config, &[]).await;
    let mut client = VaultClient::connect(&dir.client_config(ADMIN, vault.addr))
        .await
        .unwrap();
    // Finish the rewrap: every record ends on the latest card-data version.
    let mut status = client.start_rewrap().await.unwrap();
    let rewrap_started = Instant::now();
    while status.running {
        assert!(
            rewrap_started.elapsed() < Duration::from_secs(300),
            "{status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = client.rewrap_status().await.unwrap();
    }
    assert_eq!((status.remaining, status.failed), (0, 0), "{status:?}");
    // The audit log went through every kill with its chain whole.
    let audit = client.verify_audit().await.unwrap();
    assert!(audit.intact, "{audit:?}");
    assert!(audit.entries as usize > cycles, "{audit:?}");
    let audited = cards_audited_as_stored(&mut client).await;
    let acknowledged = acknowledged.lock().unwrap().clone();
    let mut lost = Vec::new();
    for info in &acknowledged {
        match client.token_info(&info.token).await {
            // The record as acknowledged, moved onto the latest versions by the rewrap.
            Ok(found)
                if found.key_version == status.card_data_version
                    && TokenInfo {
                        key_version: info.key_version,
                        fingerprint: info.fingerprint.clone(),
                        ..found.clone()
                    } == *info => {}
            other => lost.push((info.token.clone(), format!("{other:?}"))),
        }
    }
    // A sample still forwards.
    for info in acknowledged
        .iter()
        .step_by((acknowledged.len() / 20).max(1))
    {
        let answer = client
            .forward(ForwardRequest {
                processor: "sandbox".into(),
                method: "POST".into(),
                path: "/v1/charges".into(),
                headers: vec![("content-type".into(), "application/json".into())],
                body: r#"{"number":"{{card.number}}","exp_month":"{{card.exp_month}}","exp_year":"{{card.exp_year}}"}"#.into(),
                token: info.token.clone(),
                idempotency_key: None,
                reason: None,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    drop(client);
    vault.terminate().await;
    keyservice.terminate().await;
    sandbox.stop().await;
    // The record counts per key version, stored with every write and read back at
    // start (they decide whether a key version may be destroyed), match the records
    // actually on disk after all the kills.
    let (stored, on_disk) = match &dir.postgres {
        Some(cluster) => counts_in_postgres(cluster),
        None => counts_in_rocksdb(&dir),
    };
    assert_eq!(stored, on_disk, "stored record counts against a scan");
    // A call's data and its "ok" event commit together, whenever the kill came: every
    // record has its event, and every such event its record.
    assert_eq!(
        on_disk.values().sum::<u64>(),
        audited,
        "records on disk against the cards the audit log says were stored"
    );
    println!(
        "crash test summary: {cycles} vault kill cycles, {keyservice_kills} keyservice kills, {rotations} rotations with rewrap, {} tokens acknowledged, {} lost, audit log intact ({} entries), {:.1?}",
        acknowledged.len(),
        lost.len(),
        audit.entries,
        started.elapsed()
    );
    assert!(
        acknowledged.len() > cycles,
        "the clients got tokens acknowledged"
    );
    assert!(lost.is_empty(), "acknowledged tokens lost: {lost:?}");
}

/// The cards the audit log records as stored: one per successful Tokenize, and the
/// count in each successful TokenizeBatch's detail ("N stored").
async fn cards_audited_as_stored(client: &mut VaultClient) -> u64 {
    let mut cards = 0;
    let mut after = 0;
    loop {
        let page = client.read_audit(after, None, None, 1000).await.unwrap();
        let Some(last) = page.events.last() else {
            return cards;
        };
        after = last.sequence;
        for event in page.events.iter().filter(|e| e.outcome == "ok") {
            cards += match event.action.as_str() {
                "Tokenize" => 1,
                "TokenizeBatch" => {
                    let detail = event.detail.as_deref().unwrap_or_default();
                    let stored = detail.strip_suffix(" stored").unwrap_or_default();
                    stored.parse::<u64>().unwrap()
                }
                _ => 0,
            };
        }
        // Each read is audited too: the log always has one entry more.
        if after >= page.last_sequence {
            return cards;
        }
    }
}

/// Drives tokenizations from several clients until the vault dies, recording every
/// token a client got an OK for.
async fn drive(
    config: vault_client::ClientConfig,
    first: u64,
    acknowledged: Arc<Mutex<Vec<TokenInfo>>>,
) {
    let tasks: Vec<_> = (0..CLIENTS as u64)
        .map(|client_no| {
            let config = config.clone();
            let acknowledged = Arc::clone(&acknowledged);
            tokio::spawn(async move {
                let Ok(mut client) = VaultClient::connect(&config).await else {
                    return;
                };
                for n in 0.. {
                    let seq = first + client_no * 1_000_000 + n * 10;
                    let result = if n % 5 == 4 {
                        let cards: Vec<Card> = (0..5)
                            .map(|k| Card::new(&testcards::card_number(seq + k), 9, 2031))
                            .collect();
                        client.tokenize_batch(&cards, false).await.map(|items| {
                            items
                                .into_iter()
                                .filter_map(|i| match i {
                                    BatchItem::Stored(info) => Some(info),
                                    BatchItem::Invalid { .. } => None,
                                })
                                .collect::<Vec<_>>()
                        })
                    } else {
                        client
                            .tokenize(Card::new(&testcards::card_number(seq), 9, 2031), false)
                            .await
                            .map(|info| vec![info])
                    };
                    match result {
                        Ok(infos) => acknowledged.lock().unwrap().extend(infos),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// Control: GDPR-32 (docs/compliance.md).
/// Attack: kill -9 the vault (and the keyservice) under concurrent load; every token
/// acknowledged before the kill must still forward after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_tokens_survive_kill_9_short() {
    crash_cycles(5).await;
}

/// `make crash-test`: CRASH_CYCLES kill cycles (default 50).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long; run with make crash-test"]
async fn acknowledged_tokens_survive_kill_9_long() {
    let cycles = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(50);
    crash_cycles(cycles).await;
}

/// Records per card-data key version: as counted with the writes, and as scanned.
fn counts_in_rocksdb(
    dir: &integration_tests::StackDir,
) -> (
    std::collections::BTreeMap<u32, u64>,
    std::collections::BTreeMap<u32, u64>,
) {
    let mut on_disk = std::collections::BTreeMap::new();
    vault_server::store::rocks::scan_records(&dir.data_dir(), &mut |_, value| {
        if let Some((versions, _, _)) = vault_server::record::indexes_of(value) {
            *on_disk.entry(versions.card_data).or_insert(0u64) += 1;
        }
    })
    .unwrap();
    let store = vault_server::store::rocks::RocksStore::open(
        &dir.data_dir(),
        &dir.data_dir().with_file_name("crash-audit-check"),
        vault_server::record::indexes_of,
        &vault_server::store::rocks::Tuning::default(),
    )
    .unwrap();
    let stored: std::collections::BTreeMap<u32, u64> =
        vault_server::store::Store::version_counts(&store)
            .into_iter()
            .filter(|((key_use, _), _)| *key_use == vault_server::store::KeyUse::CardData)
            .map(|((_, version), count)| (version, count))
            .collect();
    drop(store);
    (stored, on_disk)
}

/// The same on PostgreSQL: the count slots summed against a count of the rows.
fn counts_in_postgres(
    cluster: &pgcluster::Cluster,
) -> (
    std::collections::BTreeMap<u32, u64>,
    std::collections::BTreeMap<u32, u64>,
) {
    let query = |sql: &str| -> std::collections::BTreeMap<u32, u64> {
        cluster
            .psql(pgcluster::APP_DATABASE, sql)
            .unwrap()
            .lines()
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (version, count) = line.split_once('|').unwrap();
                (version.parse().unwrap(), count.parse().unwrap())
            })
            .filter(|(_, count)| *count > 0)
            .collect()
    };
    (
        query(
            "SELECT version, sum(records) FROM version_counts WHERE key_use = 1 GROUP BY 1 ORDER BY 1",
        ),
        query("SELECT card_data_version, count(*) FROM records GROUP BY 1 ORDER BY 1"),
    )
}
