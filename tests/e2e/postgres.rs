//! Vaults on PostgreSQL, end to end: two vaults sharing one database, a failover to a
//! synchronous standby under load, no card number in the database's files, a vault
//! restarted on its database, and a Forward that meets an audit log outage. Each test
//! runs its own throwaway cluster (`pgcluster`).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use integration_tests::{
    ADMIN, CHARGE, Stack, StackDir, charge, http_get, postgres_storage, synthetic_pan, within,
};
use pgcluster::{APP_DATABASE, APP_USER, Cluster};
use tonic::Code;
use vault_client::{
    AuditEvent, BatchItem, Card, ForwardRequest, KeyServiceClient, TokenInfo, VaultClient,
};

async fn start_cluster() -> Cluster {
    tokio::task::spawn_blocking(Cluster::start)
        .await
        .unwrap()
        .unwrap()
}

/// The `[storage]` lines of a vault named `node` on `cluster`'s app database.
fn storage(cluster: &Cluster, node: &str) -> String {
    postgres_storage(
        &cluster.conninfo(),
        cluster.password_file(),
        cluster.ca_file(),
        node,
    )
}

/// Two vaults, "a" (the stack's) and "b", on `cluster`'s app database, and an admin
/// client of each.
async fn two_vaults(
    cluster: &Cluster,
) -> (
    Stack,
    integration_tests::OtherVault,
    VaultClient,
    VaultClient,
) {
    let dir = StackDir::new();
    dir.set_storage(&storage(cluster, "a"));
    let stack = Stack::start_in(dir).await;
    stack.dir.set_storage(&storage(cluster, "b"));
    let other = stack.start_another_vault().await;
    let a = stack.client(ADMIN).await;
    let b = VaultClient::connect(&stack.other_vault_config(ADMIN, &other))
        .await
        .unwrap();
    (stack, other, a, b)
}

/// A count (or any one value) from `sql` on the app database, as the superuser.
fn count(cluster: &Cluster, sql: &str) -> u64 {
    let out = cluster.psql(APP_DATABASE, sql).unwrap();
    out.parse()
        .unwrap_or_else(|_| panic!("{sql}: not a count: {out}"))
}

/// How many of `tokens` the `records` table holds.
fn stored_tokens(cluster: &Cluster, tokens: &[String]) -> u64 {
    // Tokens are `tok_` and base62: nothing to quote in an array literal.
    assert!(
        tokens
            .iter()
            .all(|t| t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    );
    count(
        cluster,
        &format!(
            "SELECT count(*) FROM records WHERE token = ANY('{{{}}}'::text[])",
            tokens.join(",")
        ),
    )
}

fn pan(prefix: &str, n: u64) -> String {
    synthetic_pan(prefix, n, 16)
}

fn card(prefix: &str, n: u64) -> Card {
    Card::new(&pan(prefix, n), 12, 2031)
}

const CHARGE_WITH_CVC: &str = r#"{"number":"{{card.number}}","exp_month":"{{card.exp_month}}","exp_year":"{{card.exp_year}}","cvc":"{{card.cvc}}"}"#;

fn stored(items: Vec<BatchItem>) -> Vec<TokenInfo> {
    items
        .into_iter()
        .map(|item| match item {
            BatchItem::Stored(info) => info,
            other => panic!("not stored: {other:?}"),
        })
        .collect()
}

/// `tokenvault_rewrap_records_rewritten_total` on a vault's admin port.
async fn rewritten_here(admin: std::net::SocketAddr) -> u64 {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let value = body
        .lines()
        .find_map(|line| line.strip_prefix("tokenvault_rewrap_records_rewritten_total "))
        .unwrap_or_else(|| panic!("no rewrap counter in /metrics:\n{body}"));
    value.trim().parse::<f64>().unwrap() as u64
}

/// Every audit event written before the call, read through `vault`. (Each read is
/// audited itself: paging "until nothing new" would never end.)
async fn whole_audit_log(vault: &mut VaultClient) -> Vec<AuditEvent> {
    let mut events = Vec::new();
    let mut end = None;
    let mut after = 0;
    loop {
        let page = vault.read_audit(after, None, None, 0).await.unwrap();
        let end = *end.get_or_insert(page.last_sequence);
        events.extend(page.events.into_iter().take_while(|e| e.sequence <= end));
        match events.last() {
            Some(last) if last.sequence < end => after = last.sequence,
            _ => return events,
        }
    }
}

/// Whether the log holds an `action` event with outcome ok on `token`.
fn has_event(log: &[AuditEvent], action: &str, token: &str) -> bool {
    log.iter()
        .any(|e| e.action == action && e.outcome == "ok" && e.token.as_deref() == Some(token))
}

/// Tokens made on `maker` read, forward and delete through `other`; a delete there is
/// a delete everywhere. Returns the tokens made (the deleted one last).
async fn served_by_the_other(
    stack: &Stack,
    maker: &mut VaultClient,
    other: &mut VaultClient,
    prefix: &str,
) -> Vec<String> {
    let mut tokens = Vec::new();
    for n in 0..3 {
        let info = maker.tokenize(card(prefix, n), false).await.unwrap();
        assert_eq!(other.token_info(&info.token).await.unwrap(), info);
        assert_eq!(
            stack.forward_number(other, &info.token).await,
            pan(prefix, n)
        );
        tokens.push(info.token);
    }
    let deleted = tokens.last().unwrap();
    other.delete(deleted).await.unwrap();
    for vault in [&mut *maker, &mut *other] {
        let err = vault.token_info(deleted).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    }
    // The others are untouched, on both.
    for token in &tokens[..2] {
        maker.token_info(token).await.unwrap();
        other.token_info(token).await.unwrap();
    }
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_vaults_on_one_database_serve_every_token() {
    const BULK: u64 = 150;
    let cluster = Arc::new(start_cluster().await);
    let dir = StackDir::new();
    dir.set_storage(&storage(&cluster, "a"));
    let mut stack = Stack::start_in(dir).await;
    // A rewrap slow enough (about 2 s here) that both vaults are asked while it runs.
    stack.add_vault_config("[rewrap]\nrate_per_sec = 200\nbatch_size = 20\n");
    stack.restart_vault().await;
    stack.dir.set_storage(&storage(&cluster, "b"));
    let other = stack.start_another_vault().await;
    let mut a = stack.client(ADMIN).await;
    let mut b = VaultClient::connect(&stack.other_vault_config(ADMIN, &other))
        .await
        .unwrap();

    let made_on_a = served_by_the_other(&stack, &mut a, &mut b, "424000").await;
    let made_on_b = served_by_the_other(&stack, &mut b, &mut a, "510000").await;

    // One card, one token, whichever vault is asked (both ways round).
    for (mut first, mut second, n) in [(a.clone(), b.clone(), 100), (b.clone(), a.clone(), 101)] {
        let original = first.tokenize(card("420000", n), true).await.unwrap();
        assert!(!original.reused);
        let again = second.tokenize(card("420000", n), true).await.unwrap();
        assert_eq!(again.token, original.token);
        assert!(again.reused);
    }

    // Records on version 1 from both vaults, then a card-data rotation.
    let mut on_v1 = stored(
        a.tokenize_batch(
            &(0..BULK).map(|n| card("430000", n)).collect::<Vec<_>>(),
            false,
        )
        .await
        .unwrap(),
    );
    on_v1.extend(stored(
        b.tokenize_batch(
            &(0..BULK).map(|n| card("440000", n)).collect::<Vec<_>>(),
            false,
        )
        .await
        .unwrap(),
    ));
    assert!(on_v1.iter().all(|info| info.key_version == 1));
    let mut keys = KeyServiceClient::connect(&stack.keyservice_config(ADMIN))
        .await
        .unwrap();
    assert_eq!(keys.rotate("card-data").await.unwrap().version, 2);
    // Tokens sealed before a vault learns of the rotation are on version 1 too.
    let mut sealed_early = 0;
    for (name, vault) in [("a", &mut a), ("b", &mut b)] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while vault
            .tokenize(card("450000", sealed_early), false)
            .await
            .unwrap()
            .key_version
            != 2
        {
            sealed_early += 1;
            assert!(
                Instant::now() < deadline,
                "vault {name} does not seal with version 2"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Every live record made before: 2 + 2 cross-checked, 2 deduplicated, the bulk.
    let old = count(
        &cluster,
        "SELECT count(*) FROM records WHERE card_data_version = 1",
    );
    assert_eq!(old, 2 + 2 + 2 + 2 * BULK + sealed_early);

    // Both asked at once; the job must run on one of them only.
    let (started_a, started_b) = tokio::join!(a.start_rewrap(), b.start_rewrap());
    let (started_a, started_b) = (started_a.unwrap(), started_b.unwrap());
    assert_eq!(
        (started_a.card_data_version, started_b.card_data_version),
        (2, 2)
    );
    for (name, vault) in [("a", &a), ("b", &b)] {
        let status = within(
            Duration::from_secs(20),
            &format!("rewrap finished as vault {name} sees it"),
            || {
                let mut vault = vault.clone();
                async move {
                    let status = vault.rewrap_status().await.unwrap();
                    (!status.running && status.remaining == 0).then_some(status)
                }
            },
        )
        .await;
        assert_eq!(status.failed, 0, "{status:?}");
    }
    assert_eq!(
        count(
            &cluster,
            "SELECT count(*) FROM records WHERE card_data_version <> 2"
        ),
        0
    );
    let done_by_a = rewritten_here(stack.vault_admin_addr).await;
    let done_by_b = rewritten_here(other.admin_addr).await;
    println!(
        "rewrap: {old} records on version 1; vault a rewrote {done_by_a}, vault b {done_by_b}"
    );
    assert_eq!(done_by_a + done_by_b, old, "every record rewrapped once");
    assert!(
        done_by_a == 0 || done_by_b == 0,
        "the rewrap ran on both vaults at once: a {done_by_a}, b {done_by_b}"
    );
    // Rewrapped records read on either vault, on version 2, and still carry their card.
    for (i, info) in on_v1.iter().enumerate() {
        let vault = if i % 2 == 0 { &mut a } else { &mut b };
        let now = vault.token_info(&info.token).await.unwrap();
        assert_eq!((now.key_version, &now.last_four), (2, &info.last_four));
    }
    assert_eq!(
        stack
            .forward_number(&mut a, &on_v1[BULK as usize + 7].token)
            .await,
        pan("440000", 7)
    );

    // A start that comes just as the job ends on the vault holding it (the state saved
    // as done, the lock not let go yet) is not lost: it waits for the lock and starts
    // a new pass. The test holds the finished job's lock for two seconds.
    assert_eq!(keys.rotate("card-data").await.unwrap().version, 3);
    for (name, vault) in [("a", &a), ("b", &b)] {
        within(
            Duration::from_secs(20),
            &format!("vault {name} seals with version 3"),
            || {
                let mut vault = vault.clone();
                async move {
                    let info = vault.tokenize(card("460000", 0), false).await.unwrap();
                    (info.key_version == 3).then_some(())
                }
            },
        )
        .await;
    }
    // `index_lock("job/rewrap")`: the first 8 bytes of its SHA-256, as a bigint.
    const JOB_LOCK: &str =
        "('x' || left(encode(sha256('job/rewrap'), 'hex'), 16))::bit(64)::bigint";
    let holder = tokio::task::spawn_blocking({
        let cluster = Arc::clone(&cluster);
        move || {
            cluster.psql(
                APP_DATABASE,
                &format!("SELECT pg_advisory_lock({JOB_LOCK});\nSELECT pg_sleep(2);"),
            )
        }
    });
    within(
        Duration::from_secs(10),
        "the test holds the job's lock",
        || {
            let held = count(
                &cluster,
                &format!("SELECT CASE WHEN pg_try_advisory_lock({JOB_LOCK}) THEN 0 ELSE 1 END"),
            );
            async move { (held == 1).then_some(()) }
        },
    )
    .await;
    assert_eq!(b.start_rewrap().await.unwrap().card_data_version, 3);
    holder.await.unwrap().unwrap();
    within(
        Duration::from_secs(20),
        "the late start's pass finished",
        || {
            let mut b = b.clone();
            async move {
                let status = b.rewrap_status().await.unwrap();
                (!status.running && status.remaining == 0).then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        count(
            &cluster,
            "SELECT count(*) FROM records WHERE card_data_version <> 3"
        ),
        0
    );

    // One chain for both vaults: intact through either, with both vaults' events.
    let last = a.read_audit(0, None, None, 1).await.unwrap().last_sequence;
    for vault in [&mut a, &mut b] {
        let verification = vault.verify_audit().await.unwrap();
        assert!(verification.intact, "{verification:?}");
        assert!(verification.entries >= last, "{verification:?} < {last}");
    }
    let log = whole_audit_log(&mut b).await;
    for token in made_on_a.iter().chain(&made_on_b) {
        assert!(has_event(&log, "Tokenize", token), "no Tokenize of {token}");
    }
    for token in [made_on_a.last().unwrap(), made_on_b.last().unwrap()] {
        assert!(
            has_event(&log, "DeleteToken", token),
            "no delete of {token}"
        );
    }

    other.stop().await;
    stack.stop().await;
}

/// What one load task saw.
#[derive(Debug, Default)]
struct Seen {
    /// (phase when answered, card number, what the vault answered)
    acked: Vec<(u8, String, TokenInfo)>,
    /// (phase when answered, code, message)
    errors: Vec<(u8, Option<Code>, String)>,
}

const BEFORE: u8 = 0;
const FAILING_OVER: u8 = 1;
const PROMOTED: u8 = 2;

/// Control: GDPR-32 (docs/compliance.md).
/// Attack: kill the PostgreSQL primary under load; every token acknowledged must be on the
/// promoted standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_to_a_synchronous_standby_loses_no_acknowledged_token() {
    const TASKS: u64 = 4;
    let (primary, standby) = tokio::task::spawn_blocking(|| {
        let primary = Cluster::start().unwrap();
        let standby = primary.start_standby(true).unwrap();
        (primary, standby)
    })
    .await
    .unwrap();
    // Both hosts; the vault uses whichever accepts writes.
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user={APP_USER} dbname={APP_DATABASE} \
         target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let dir = StackDir::new();
    dir.set_storage(&postgres_storage(
        &url,
        primary.password_file(),
        primary.ca_file(),
        "a",
    ));
    let stack = Stack::start_in(dir).await;
    let client = stack.client(ADMIN).await;

    let stop = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let acked_after = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (mut client, stop, phase, acked_after) = (
            client.clone(),
            Arc::clone(&stop),
            Arc::clone(&phase),
            Arc::clone(&acked_after),
        );
        tasks.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let number = pan("460000", task * 1_000_000 + n);
                n += 1;
                let result = client.tokenize(Card::new(&number, 12, 2031), false).await;
                let now = phase.load(Ordering::Relaxed);
                match result {
                    Ok(info) => {
                        if now == PROMOTED {
                            acked_after.fetch_add(1, Ordering::Relaxed);
                        }
                        seen.acked.push((now, number, info));
                    }
                    Err(e) => {
                        seen.errors.push((now, e.code(), e.to_string()));
                        // No hot loop while the database is away.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            seen
        }));
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    phase.store(FAILING_OVER, Ordering::Relaxed);
    let failover = Instant::now();
    let (primary, standby) = tokio::task::spawn_blocking(move || {
        let mut primary = primary;
        primary.stop_immediate().unwrap();
        standby.promote().unwrap();
        (primary, standby)
    })
    .await
    .unwrap();
    phase.store(PROMOTED, Ordering::Relaxed);
    let promoted_after = failover.elapsed();
    // The same vault serves again, on the new primary, by itself.
    within(
        Duration::from_secs(20),
        "tokenizations acknowledged after the promotion",
        || {
            let acked = acked_after.load(Ordering::Relaxed);
            async move { (acked >= 50).then_some(()) }
        },
    )
    .await;
    let serving_after = failover.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut errors = Vec::new();
    for task in tasks {
        let seen = task.await.unwrap();
        acked.extend(seen.acked);
        errors.extend(seen.errors);
    }

    let in_phase = |p: u8| acked.iter().filter(|(at, _, _)| *at == p).count();
    println!(
        "failover: acknowledged {} before, {} while failing over, {} after the promotion; \
         {} errors; promoted after {promoted_after:?}, serving again after {serving_after:?}",
        in_phase(BEFORE),
        in_phase(FAILING_OVER),
        in_phase(PROMOTED),
        errors.len()
    );
    assert!(in_phase(BEFORE) > 0, "no load before the failover");
    let wrong: Vec<_> = errors
        .iter()
        .filter(|(_, code, _)| *code != Some(Code::Unavailable))
        .collect();
    assert!(wrong.is_empty(), "errors other than UNAVAILABLE: {wrong:?}");
    if let Some((_, _, message)) = errors.first() {
        println!("failover: the first error: {message}");
    }
    assert!(
        errors.iter().all(|(at, _, _)| *at != BEFORE),
        "errors before the failover: {errors:?}"
    );

    // No wrong answer: one token per call, each naming its own card.
    let tokens: Vec<String> = acked
        .iter()
        .map(|(_, _, info)| info.token.clone())
        .collect();
    assert_eq!(
        tokens.iter().collect::<HashSet<_>>().len(),
        tokens.len(),
        "a token was handed out twice"
    );
    // Every acknowledged token is on the new primary and reads through the vault.
    assert_eq!(stored_tokens(&standby, &tokens), tokens.len() as u64);
    // A call refused after its record committed (its audit event failed, or the
    // answer was lost) leaves a record no caller holds a token for.
    println!(
        "failover: {} records on the new primary for {} acknowledged tokens",
        count(&standby, "SELECT count(*) FROM records"),
        tokens.len()
    );
    let mut client = client;
    for (_, number, info) in &acked {
        assert_eq!(info.last_four, number[12..]);
        assert_eq!(&client.token_info(&info.token).await.unwrap(), info);
    }
    stack.stop().await;
    drop((primary, standby));
}

/// Everything under `dir`, recursively (files that vanish while we look are skipped).
fn files_under(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => files_under(&path, files),
            Ok(kind) if kind.is_file() => files.push(path),
            _ => {}
        }
    }
}

/// The maximal runs of ASCII digits in `bytes` at least `min` long.
fn digit_runs(bytes: &[u8], min: usize) -> Vec<&[u8]> {
    bytes
        .split(|b| !b.is_ascii_digit())
        .filter(|run| run.len() >= min)
        .collect()
}

/// The CVC sent with a card and forwarded: four digits with a leading zero, which no
/// PID, LSN or byte count prints; searched as a word (no letter or digit on either
/// side) so that a longer number or a hex string holding it is no chance match.
const SCANNED_CVC: &str = "0372";
/// A CVC the vault never saw, planted in a table: the CVC search must find it.
const CANARY_CVC: &str = "0419";

/// Control: PCI-3.5.1, PCI-3.3.1, PCI-3.3.1.2 (docs/compliance.md).
/// Attack: read the database's files (heap, indexes, WAL, server log) for card numbers
/// and for the CVC sent with one of them and forwarded; none is there, while a planted
/// number, a planted CVC and a token are found, proving the scan works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_card_number_reaches_the_database_files() {
    let cluster = start_cluster().await;
    let dir = StackDir::new();
    dir.set_storage(&storage(&cluster, "a"));
    let stack = Stack::start_in(dir).await;
    let mut vault = stack.client(ADMIN).await;

    let mut pans: Vec<String> = (0..5).map(|n| pan("470000", n * 7919)).collect();
    pans.push("378282246310005".to_owned());
    let mut tokens = Vec::new();
    for number in &pans[..5] {
        tokens.push(
            vault
                .tokenize(Card::new(number, 9, 2030), false)
                .await
                .unwrap()
                .token,
        );
    }
    let amex = Card::new(&pans[5], 9, 2030)
        .with_cardholder_name("Pat Example")
        .with_cvc(SCANNED_CVC);
    let with_cvc = vault.tokenize(amex, false).await.unwrap().token;
    let sent = stack
        .forward_to_sandbox(&mut vault, &with_cvc, CHARGE_WITH_CVC)
        .await;
    assert_eq!(
        (sent["number"].as_str(), sent["cvc"].as_str()),
        (Some(&*pans[5]), Some(SCANNED_CVC))
    );
    tokens.push(with_cvc);
    // Reuse looks a card up: its fingerprint, not its number, goes to the database.
    let again = vault
        .tokenize(Card::new(&pans[0], 9, 2030), true)
        .await
        .unwrap();
    assert_eq!(again.token, tokens[0]);
    stack.stop().await;

    // A number the vault never saw, put in the clear straight into a table: the scan
    // must find it (it reads every file, and its digit search works).
    let canary = pan("479999", 4242);
    cluster
        .psql(
            APP_DATABASE,
            &format!(
                "CREATE TABLE canary (number text); \
                 INSERT INTO canary VALUES ('{canary}'), ('{CANARY_CVC}')"
            ),
        )
        .unwrap();
    // Everything in the heap and index files too, not only in the WAL.
    cluster.psql("postgres", "CHECKPOINT").unwrap();
    let mut files = Vec::new();
    files_under(cluster.data_dir(), &mut files);
    files.push(cluster.log_file().to_owned());
    let mut scanned_bytes = 0;
    let mut token_in = Vec::new();
    let mut canary_in = Vec::new();
    let mut canary_cvc_in = Vec::new();
    for file in &files {
        let Ok(bytes) = std::fs::read(file) else {
            continue;
        };
        scanned_bytes += bytes.len();
        let relative = file.strip_prefix(cluster.data_dir()).unwrap_or(file);
        // A card number stands in a run of digits: look in those only (the cluster is
        // tens of MB, scanned at -O0). Inside a longer run counts too (stricter than
        // `contains_word`).
        let runs = digit_runs(&bytes, 15);
        let holds = |number: &str| {
            runs.iter()
                .any(|run| run.windows(number.len()).any(|w| w == number.as_bytes()))
        };
        for number in &pans {
            assert!(!holds(number), "a card number in {}", file.display());
        }
        if holds(&canary) {
            canary_in.push(relative.to_owned());
        }
        // The CVC: a run of exactly its four digits, not part of a word.
        let word = |code: &str| {
            digit_runs(&bytes, code.len()).contains(&code.as_bytes())
                && integration_tests::word_line(&bytes, code.as_bytes()).is_some()
        };
        if word(SCANNED_CVC) {
            let line = integration_tests::word_line(&bytes, SCANNED_CVC.as_bytes());
            panic!("the CVC in {}: {line:?}", file.display());
        }
        if word(CANARY_CVC) {
            canary_cvc_in.push(relative.to_owned());
        }
        let token = tokens[1].as_bytes();
        if bytes.windows(token.len()).any(|w| w == token) {
            token_in.push(relative.to_owned());
        }
    }
    println!(
        "scanned {} files, {} MB; a token found in {token_in:?}, the canary in {canary_in:?}",
        files.len(),
        scanned_bytes / 1_000_000
    );
    // The scan reads the files: the token (stored in the clear) is found, in the
    // table files and in the WAL.
    assert!(
        token_in.iter().any(|f| f.starts_with("base")),
        "{token_in:?}"
    );
    assert!(
        token_in.iter().any(|f| f.starts_with("pg_wal")),
        "{token_in:?}"
    );
    assert!(
        canary_in.iter().any(|f| f.starts_with("base"))
            && canary_in.iter().any(|f| f.starts_with("pg_wal")),
        "the planted number was not found: {canary_in:?}"
    );
    assert!(
        canary_cvc_in.iter().any(|f| f.starts_with("base")),
        "the planted CVC was not found: {canary_cvc_in:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vault_restarted_on_postgres_keeps_its_tokens() {
    let cluster = start_cluster().await;
    let dir = StackDir::new();
    dir.set_storage(&storage(&cluster, "a"));
    let mut stack = Stack::start_in(dir).await;
    let mut vault = stack.client(ADMIN).await;
    let mut before = Vec::new();
    for n in 0..20 {
        before.push(vault.tokenize(card("480000", n), false).await.unwrap());
    }
    let tokens: Vec<String> = before.iter().map(|i| i.token.clone()).collect();
    assert_eq!(stored_tokens(&cluster, &tokens), 20, "in the database");
    assert!(
        !stack.dir.data_dir().exists(),
        "a vault on PostgreSQL writes no local data directory"
    );
    let chain_before = vault.verify_audit().await.unwrap();
    assert!(chain_before.intact, "{chain_before:?}");

    stack.restart_vault().await;
    let mut vault = stack.client(ADMIN).await;
    for info in &before {
        assert_eq!(&vault.token_info(&info.token).await.unwrap(), info);
    }
    let again = vault.tokenize(card("480000", 3), true).await.unwrap();
    assert_eq!(again.token, before[3].token);
    let fresh = vault.tokenize(card("480000", 99), false).await.unwrap();

    // One chain across the restart: it verifies, and holds what came before and after.
    let chain = vault.verify_audit().await.unwrap();
    assert!(chain.intact, "{chain:?}");
    assert!(chain.entries > chain_before.entries, "{chain:?}");
    let log = whole_audit_log(&mut vault).await;
    assert!(has_event(&log, "Tokenize", &before[0].token));
    assert!(has_event(&log, "Tokenize", &fresh.token));
    stack.stop().await;
}

/// The `application_name` of the session that holds the audit table locked.
const AUDIT_LOCKER: &str = "test-audit-outage";

/// A Forward that cannot write its audit event sends nothing and uses nothing up: the
/// CVC stays in the vault and the idempotency key stays free, so the caller's retry
/// after the outage charges once, with the CVC. The outage: another session holds
/// the audit table locked (ACCESS EXCLUSIVE) longer than the vault waits for a lock.
///
/// Control: PCI-10.2.1, PCI-10.7.2 (docs/compliance.md).
/// Attack: lock the audit table so that a forward's event cannot be written, hoping the
/// card goes out unaudited; nothing is sent until the event can be written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_audit_outage_during_forward_keeps_the_cvc_and_the_idempotency_key() {
    let cluster = Arc::new(start_cluster().await);
    let dir = StackDir::new();
    // A lock wait ends after half the commit timeout: one second here.
    dir.set_storage(&format!(
        "{}commit_timeout_ms = 2000\n",
        storage(&cluster, "a")
    ));
    let stack = Stack::start_in(dir).await;
    let mut vault = stack.client(ADMIN).await;
    let token = vault
        .tokenize(
            Card::new("4242424242424242", 12, 2030).with_cvc("737"),
            false,
        )
        .await
        .unwrap()
        .token;
    let request = ForwardRequest {
        idempotency_key: Some("order-audit-outage".into()),
        ..charge("sandbox", &token, CHARGE_WITH_CVC)
    };

    // The lock is held until the test ends that session (at most 60 s).
    let holder = tokio::task::spawn_blocking({
        let cluster = Arc::clone(&cluster);
        move || {
            cluster.psql(
                APP_DATABASE,
                &format!(
                    "SET application_name = '{AUDIT_LOCKER}';\nBEGIN;\n\
                     LOCK TABLE audit IN ACCESS EXCLUSIVE MODE;\nSELECT pg_sleep(60);"
                ),
            )
        }
    });
    within(
        Duration::from_secs(20),
        "the test holds the audit table's lock",
        || {
            let held = count(
                &cluster,
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                 WHERE c.relname = 'audit' AND l.mode = 'AccessExclusiveLock' AND l.granted",
            );
            async move { (held == 1).then_some(()) }
        },
    )
    .await;

    let err = vault.forward(request.clone()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(err.to_string().contains("audit log"), "{err}");
    assert!(
        stack.sandbox.requests().is_empty(),
        "nothing may be sent without its audit event"
    );

    // The outage ends; the vault writes its audit log again.
    let ended = count(
        &cluster,
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = '{AUDIT_LOCKER}'"
        ),
    );
    assert_eq!(ended, 1, "the session holding the lock");
    assert!(
        holder.await.unwrap().is_err(),
        "the locking session was ended"
    );
    within(
        Duration::from_secs(20),
        "the vault writes its audit log again",
        || {
            let mut vault = vault.clone();
            let token = token.clone();
            async move { vault.token_info(&token).await.ok() }
        },
    )
    .await;

    // The same request under the same key: sent now, once, with the CVC.
    let answer = vault.forward(request.clone()).await.unwrap();
    assert_eq!(answer.status, 200);
    assert!(!answer.replayed, "nothing was sent before: not a replay");
    let received = stack.sandbox.requests();
    assert_eq!(received.len(), 1, "the processor got the charge once");
    let sent: serde_json::Value = serde_json::from_slice(&received[0].body).unwrap();
    assert!(sent["cvc"] == "737", "the processor did not get the CVC");
    // And from now on the key replays that outcome.
    assert!(vault.forward(request).await.unwrap().replayed);
    assert_eq!(stack.sandbox.requests().len(), 1);
    stack.stop().await;
}

/// The real binaries on PostgreSQL: with `migrate = false` the vault refuses an empty
/// database and says what to run; `vault-server migrate` applies the schema once; the
/// vault then serves, and its TRACE log holds no card number and none of the
/// PostgreSQL client's statement parameters (it logs them at DEBUG).
///
/// Control: GDPR-25 (docs/compliance.md).
/// Attack: read card data from the vault's TRACE log through the PostgreSQL client's
/// statement parameters; none is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_binaries_migrate_on_request_and_log_no_statement_parameters() {
    let cluster = start_cluster().await;
    let dir = StackDir::new();
    dir.set_storage(&format!("{}migrate = false\n", storage(&cluster, "a")));
    // Everything at TRACE, the PostgreSQL client's statement logging asked for by name
    // and inside every call's span too: none of it may get through.
    let vault_log = "trace,tokio_postgres::query=trace,[rpc]=trace";
    let trace = [("KEYSERVICE_LOG", "trace"), ("VAULT_LOG", vault_log)];
    let keyservice = integration_tests::Process::start(
        "keyservice",
        &dir.path().join("keyservice.toml"),
        &trace,
    )
    .await;
    let config = dir.write_vault_config(keyservice.addr.port());
    let vault_server = |args: &[&str]| {
        let output = std::process::Command::new(integration_tests::binary("vault-server"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("VAULT_LOG", "trace")
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };

    let (started, output) = vault_server(&[]);
    assert!(!started, "a vault started on a database without its schema");
    assert!(output.contains("vault-server migrate"), "{output}");
    let (ok, output) = vault_server(&["migrate"]);
    assert!(
        ok && output.contains("applied migrations [1, 2, 3]"),
        "{output}"
    );
    let (ok, output) = vault_server(&["migrate"]);
    assert!(ok && output.contains("up to date"), "{output}");
    assert_eq!(count(&cluster, "SELECT count(*) FROM schema_migrations"), 3);

    let vault = integration_tests::Process::start("vault-server", &config, &trace).await;
    let mut client = VaultClient::connect(&dir.client_config(ADMIN, vault.addr))
        .await
        .unwrap();
    let pans: Vec<String> = (0..20).map(|n| pan("455555", n * 31)).collect();
    let mut tokens = Vec::new();
    for pan in &pans {
        let info = client
            .tokenize(Card::new(pan, 11, 2031), true)
            .await
            .unwrap();
        client.token_info(&info.token).await.unwrap();
        tokens.push(info.token);
    }
    drop(client);
    assert_eq!(stored_tokens(&cluster, &tokens), 20);
    let log = vault.terminate().await;
    keyservice.terminate().await;
    assert!(log.contains("TRACE"), "the vault logged at TRACE");
    for pan in &pans {
        assert!(
            !log.contains(pan.as_str()),
            "a card number in the vault's log"
        );
    }
    for marker in ["executing statement", "with parameters"] {
        assert!(
            !log.contains(marker),
            "the PostgreSQL client logged statement parameters: {marker:?}"
        );
    }
}

/// Attack: on a shared database, online, with the database password, delete the
/// audit log's last entries and put back an older head row, so that the log and its
/// anchor agree. The running vault remembers the head it wrote, and its checkpoint at
/// the keyservice does too: every verify after reports the entries removed, before and
/// after a restart, and new entries never fill the gap.
///
/// Control: PCI-10.3.2 (docs/compliance.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_entries_deleted_online_with_an_older_head_put_back_are_reported() {
    let cluster = start_cluster().await;
    let dir = StackDir::new();
    dir.set_storage(&storage(&cluster, "a"));
    let mut stack = Stack::start_in(dir).await;
    let mut vault = stack.client(ADMIN).await;
    for n in 0..5 {
        vault.tokenize(card("481000", n), false).await.unwrap();
    }
    let kept = vault
        .read_audit(0, None, None, 1)
        .await
        .unwrap()
        .last_sequence;
    let older_head = cluster
        .psql(
            APP_DATABASE,
            "SELECT encode(value, 'hex') FROM meta WHERE key = 'audit-head'",
        )
        .unwrap();
    for n in 5..15 {
        vault.tokenize(card("481000", n), false).await.unwrap();
    }
    let written = vault
        .read_audit(0, None, None, 1)
        .await
        .unwrap()
        .last_sequence;
    assert!(written > kept + 5);
    // The read's own event is the last entry written before the stop.
    integration_tests::wait_for_audit_checkpoint(&stack.dir, written + 1).await;

    cluster
        .psql(
            APP_DATABASE,
            &format!(
                "BEGIN; DELETE FROM audit WHERE sequence > {kept}; \
                 UPDATE meta SET value = decode('{older_head}', 'hex') WHERE key = 'audit-head'; \
                 COMMIT"
            ),
        )
        .unwrap();
    let removed_at = |report: &vault_client::AuditVerification| {
        (
            report.intact,
            report.first_bad_sequence,
            report.problem.clone(),
        )
    };
    let expected = (false, Some(kept + 1), Some("removed".to_owned()));
    let report = vault.verify_audit().await.unwrap();
    assert_eq!(removed_at(&report), expected, "{report:?}");
    // The gap was found on that verify's own append: no card data until acknowledged.
    let refused = vault.tokenize(card("481000", 99), false).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::FailedPrecondition), "{refused}");
    let report = vault.verify_audit().await.unwrap();
    assert_eq!(removed_at(&report), expected, "{report:?}");

    stack.restart_vault().await;
    let mut vault = stack.client(ADMIN).await;
    let report = vault.verify_audit().await.unwrap();
    assert_eq!(removed_at(&report), expected, "{report:?}");
    let refused = vault.tokenize(card("481000", 98), false).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::FailedPrecondition), "{refused}");
    stack.stop().await;
}

/// Two vaults on one chain. Vault b writes the last entries; they are deleted online,
/// the head row left as it was. Vault a never saw them, but it reads the head row with
/// the log's end at its next append: its event goes after the head, leaving the gap,
/// and from then on it refuses card data. Its verify reports the entries removed.
///
/// Control: PCI-10.3.4 (docs/compliance.md).
/// Attack: with the database password, delete the last audit entries another vault wrote,
/// online.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_refilled_by_another_vault_is_reported_by_either() {
    let cluster = start_cluster().await;
    let (stack, _other, mut a, mut b) = two_vaults(&cluster).await;
    a.tokenize(card("482000", 0), false).await.unwrap();
    let kept = a.read_audit(0, None, None, 1).await.unwrap().last_sequence + 1;
    for n in 1..6 {
        b.tokenize(card("482000", n), false).await.unwrap();
    }
    let written = b.read_audit(0, None, None, 1).await.unwrap().last_sequence;
    integration_tests::wait_for_audit_checkpoint(&stack.dir, written + 1).await;

    cluster
        .psql(
            APP_DATABASE,
            &format!("DELETE FROM audit WHERE sequence > {kept}"),
        )
        .unwrap();
    // The call whose event finds the gap was done before it; the next is refused.
    a.tokenize(card("482000", 6), false).await.unwrap();
    let refused = a.tokenize(card("482000", 7), false).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::FailedPrecondition), "{refused}");
    assert!(
        refused.to_string().contains("acknowledge the gap"),
        "{refused}"
    );
    let report = a.verify_audit().await.unwrap();
    assert!(!report.intact, "{report:?}");
    assert!(
        report
            .first_bad_sequence
            .is_some_and(|bad| bad > kept && bad <= written + 1),
        "{report:?}"
    );
    stack.stop().await;
}

/// The same cut with the head row put back to match the shorter log, against a vault
/// that never saw the last entries (another vault wrote them). It learns the other
/// vaults' heads from the keyservice every second, so it does not write over the cut:
/// its next event goes after b's head and card data is refused from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_with_its_head_row_put_back_is_not_refilled_by_a_vault_that_never_saw_it() {
    let cluster = start_cluster().await;
    let (stack, _other, mut a, mut b) = two_vaults(&cluster).await;
    a.tokenize(card("483000", 0), false).await.unwrap();
    let kept = a.read_audit(0, None, None, 1).await.unwrap().last_sequence + 1;
    let head_at = |sequence: u64| {
        cluster
            .psql(
                APP_DATABASE,
                &format!("SELECT count(*) FROM audit WHERE sequence = {sequence}"),
            )
            .unwrap()
    };
    let older_head = cluster
        .psql(
            APP_DATABASE,
            "SELECT encode(value, 'hex') FROM meta WHERE key = 'audit-head'",
        )
        .unwrap();
    assert_eq!(
        head_at(kept).trim(),
        "1",
        "the read's event is the last entry"
    );
    for n in 1..6 {
        b.tokenize(card("483000", n), false).await.unwrap();
    }
    let written = b.read_audit(0, None, None, 1).await.unwrap().last_sequence;
    integration_tests::wait_for_audit_checkpoint(&stack.dir, written + 1).await;
    // Vault a asks the keyservice every second.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    cluster
        .psql(
            APP_DATABASE,
            &format!(
                "BEGIN; DELETE FROM audit WHERE sequence > {kept}; \
                 UPDATE meta SET value = decode('{older_head}', 'hex') WHERE key = 'audit-head'; \
                 COMMIT"
            ),
        )
        .unwrap();
    a.tokenize(card("483000", 6), false).await.unwrap();
    let refused = a.tokenize(card("483000", 7), false).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::FailedPrecondition), "{refused}");
    assert!(
        refused.to_string().contains("acknowledge the gap"),
        "{refused}"
    );
    let report = a.verify_audit().await.unwrap();
    assert!(!report.intact, "{report:?}");
    assert_eq!(report.first_bad_sequence, Some(kept + 1), "{report:?}");
    stack.stop().await;
}

/// A vault of the same identity on another database (another region, say) reports a
/// longer log. It is not a writer of this database's log: its head raises no floor
/// here, so the vaults on this database keep serving and their log verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_longer_log_of_the_same_identity_elsewhere_refuses_nothing_here() {
    use vault_proto::keys::v1 as keys;
    let cluster = start_cluster().await;
    let dir = StackDir::new();
    dir.set_storage(&storage(&cluster, "a"));
    let stack = Stack::start_in(dir).await;
    let mut a = stack.client(ADMIN).await;
    a.tokenize(card("484000", 0), false).await.unwrap();
    // The other database's vault, as the keyservice sees it: this identity, another node.
    let channel =
        integration_tests::raw_channel(&stack.dir, integration_tests::VAULT, stack.keyservice_addr)
            .await
            .unwrap();
    keys::key_service_client::KeyServiceClient::new(channel)
        .report_audit_head(keys::AuditCheckpoint {
            node: "other-region".into(),
            sequence: 1_000_000,
            chain: vec![7; 32],
            ..keys::AuditCheckpoint::default()
        })
        .await
        .unwrap();
    // Vault a asks the keyservice every second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for n in 1..4 {
        a.tokenize(card("484000", n), false).await.unwrap();
    }
    let report = a.verify_audit().await.unwrap();
    assert!(report.intact, "{report:?}");
    stack.stop().await;
}

/// Double clicks, parallel queue consumers and hedged retries land on different
/// vaults: eight forwards under one idempotency key, sent at once to two vaults on one
/// database, reach the processor once. The others replay its answer or are told it is
/// in progress; none sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_vaults_on_one_database_send_one_idempotency_key_once() {
    let cluster = Arc::new(start_cluster().await);
    let dir = StackDir::new();
    dir.set_storage(&storage(&cluster, "a"));
    let stack = Stack::start_in(dir).await;
    stack.dir.set_storage(&storage(&cluster, "b"));
    let other = stack.start_another_vault().await;
    let a = stack.client(ADMIN).await;
    let b = VaultClient::connect(&stack.other_vault_config(ADMIN, &other))
        .await
        .unwrap();
    let token = a
        .clone()
        .tokenize(Card::new("4242424242424242", 12, 2030), false)
        .await
        .unwrap()
        .token;
    let mut request = ForwardRequest {
        idempotency_key: Some("order-double-click".into()),
        ..charge("sandbox", &token, CHARGE)
    };
    // Long enough that every call arrives while the first is still with the processor.
    request
        .headers
        .push(("x-sandbox-delay-ms".into(), "500".into()));

    let calls: Vec<_> = (0..8)
        .map(|i| {
            let mut vault = if i % 2 == 0 { a.clone() } else { b.clone() };
            let request = request.clone();
            tokio::spawn(async move { vault.forward(request).await })
        })
        .collect();
    let (mut sent, mut replayed, mut in_progress) = (Vec::new(), 0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(answer) if answer.replayed => replayed += 1,
            Ok(answer) => sent.push(answer),
            Err(err) => {
                assert_eq!(err.code(), Some(Code::Aborted), "{err}");
                in_progress += 1;
            }
        }
    }
    assert_eq!(
        stack.sandbox.requests().len(),
        1,
        "the processor was called once"
    );
    assert_eq!(
        sent.len(),
        1,
        "{replayed} replayed, {in_progress} in progress"
    );
    assert_eq!(replayed + in_progress, 7);
    // Once it is done, either vault replays the one answer.
    for vault in [a.clone(), b.clone()].iter_mut() {
        let again = vault.forward(request.clone()).await.unwrap();
        assert!(again.replayed);
        assert_eq!((again.status, &again.body), (sent[0].status, &sent[0].body));
    }
    assert_eq!(stack.sandbox.requests().len(), 1);
    other.stop().await;
    stack.stop().await;
}

/// Runs `sql` on the maintenance database (statements that cannot run in a
/// transaction, one per call), once no session is left on the app database.
fn on_maintenance_db(cluster: &Cluster, sql: &str) {
    cluster
        .psql(
            "postgres",
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = '{APP_DATABASE}' AND pid <> pg_backend_pid()"
            ),
        )
        .unwrap();
    cluster.psql("postgres", sql).unwrap();
}

/// The database restored from an older copy brings back records erased since; the
/// first vault to start on it finds its audit log rewound and erases them again (from
/// the keyed ids the keyservice keeps) before it serves.
///
/// Control: GDPR-17 (docs/compliance.md).
/// Attack: restore the database from before an erasure to bring erased cards back; the
/// first vault to start erases them again before serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_from_an_older_copy_erases_again_what_was_erased_since() {
    let cluster = start_cluster().await;
    let dir = StackDir::new();
    dir.set_storage(&storage(&cluster, "a"));
    let mut stack = Stack::start_in(dir).await;
    let mut vault = stack.client(ADMIN).await;
    let mut before = Vec::new();
    for n in 0..20 {
        before.push(vault.tokenize(card("480001", n), false).await.unwrap());
    }
    // The copy: the whole database while the vault is stopped.
    stack.stop_vault().await;
    on_maintenance_db(
        &cluster,
        &format!("CREATE DATABASE older TEMPLATE {APP_DATABASE} OWNER {APP_USER}"),
    );
    stack.restart_vault().await;
    let mut vault = stack.client(ADMIN).await;
    let erased: Vec<String> = before[..4].iter().map(|i| i.token.clone()).collect();
    for token in &erased {
        vault.delete(token).await.unwrap();
    }
    within(
        Duration::from_secs(10),
        "the erasures reach the keyservice",
        || async {
            let kept = std::fs::metadata(stack.dir.path().join("erasures.bin")).ok()?;
            (kept.len() >= 4 * 64).then_some(())
        },
    )
    .await;
    assert_eq!(count(&cluster, "SELECT count(*) FROM unsent_erasures"), 0);
    stack.stop_vault().await;

    // The restore: the older copy replaces the database.
    on_maintenance_db(
        &cluster,
        &format!("DROP DATABASE {APP_DATABASE} WITH (FORCE)"),
    );
    on_maintenance_db(
        &cluster,
        &format!("ALTER DATABASE older RENAME TO {APP_DATABASE}"),
    );
    assert_eq!(stored_tokens(&cluster, &erased), 4, "back with the copy");
    stack.restart_vault().await;
    assert_eq!(stored_tokens(&cluster, &erased), 0, "erased again");
    let rest: Vec<String> = before[4..].iter().map(|i| i.token.clone()).collect();
    assert_eq!(stored_tokens(&cluster, &rest), 16);
    integration_tests::acknowledge_audit_gaps(&stack).await;
    let mut vault = stack.client(ADMIN).await;
    for info in &before[4..] {
        assert_eq!(&vault.token_info(&info.token).await.unwrap(), info);
    }
    for token in &erased {
        let err = vault.token_info(token).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    }
    let log = whole_audit_log(&mut vault).await;
    let replayed: Vec<&AuditEvent> = log
        .iter()
        .filter(|event| event.action == "ErasuresReplayed")
        .collect();
    assert_eq!(replayed.len(), 1, "{replayed:?}");
    assert!(
        replayed[0]
            .detail
            .as_deref()
            .is_some_and(|detail| detail.starts_with("4 records erased again of 20 examined")),
        "{replayed:?}"
    );
    stack.stop().await;
}

/// The same, with the vault running through it: a database rewound under a running
/// vault (here by hand: the erased rows put back, the tombstones and the store's
/// erasure position removed) has the erased records deleted again within seconds.
///
/// Control: GDPR-17 (docs/compliance.md).
/// Attack: rewind the database under a running vault (erased rows, tombstones and erasure
/// position put back); the records are erased again within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_rewound_under_a_running_vault_erases_again_within_seconds() {
    let cluster = start_cluster().await;
    let dir = StackDir::new();
    dir.set_storage(&storage(&cluster, "a"));
    let stack = Stack::start_in(dir).await;
    let mut vault = stack.client(ADMIN).await;
    let mut tokens = Vec::new();
    for n in 0..10 {
        tokens.push(
            vault
                .tokenize(card("480002", n), false)
                .await
                .unwrap()
                .token,
        );
    }
    let erased = &tokens[..3];
    let list = format!("'{{{}}}'::text[]", erased.join(","));
    cluster
        .psql(
            APP_DATABASE,
            &format!(
                "CREATE TABLE saved_records AS SELECT * FROM records WHERE token = ANY({list}); \
                 CREATE TABLE saved_fingerprints AS SELECT * FROM fingerprints WHERE token = ANY({list})"
            ),
        )
        .unwrap();
    for token in erased {
        vault.delete(token).await.unwrap();
    }
    within(
        Duration::from_secs(10),
        "the erasures reach the keyservice",
        || async {
            let kept = std::fs::metadata(stack.dir.path().join("erasures.bin")).ok()?;
            (kept.len() >= 3 * 64).then_some(())
        },
    )
    .await;
    assert_eq!(stored_tokens(&cluster, erased), 0);
    cluster
        .psql(
            APP_DATABASE,
            "INSERT INTO records SELECT * FROM saved_records; \
             INSERT INTO fingerprints SELECT * FROM saved_fingerprints; \
             DELETE FROM tombstones; \
             DELETE FROM meta WHERE key = 'erasures-applied'",
        )
        .unwrap();
    assert_eq!(stored_tokens(&cluster, erased), 3, "back");
    within(
        Duration::from_secs(10),
        "the running vault erases them again",
        || async { (stored_tokens(&cluster, erased) == 0).then_some(()) },
    )
    .await;
    let rest = &tokens[3..];
    assert_eq!(stored_tokens(&cluster, rest), 7);
    let log = whole_audit_log(&mut vault).await;
    assert!(
        log.iter().any(|event| event.action == "ErasuresReplayed"
            && event
                .detail
                .as_deref()
                .is_some_and(|d| d.starts_with("3 records erased again"))),
        "no ErasuresReplayed event"
    );
    stack.stop().await;
}

/// Sealed intake on two vaults sharing one database: a sealed card tokenized at one
/// vault is answered with the same token at the other (a backend retrying through
/// another node), and another sealed card with its nonce is a replay there too. The
/// database holds no nonce, only its HMAC.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sealed_card_is_claimed_once_across_vaults_on_one_database() {
    let cluster = start_cluster().await;
    let (stack, other, mut a, mut b) = two_vaults(&cluster).await;
    let key = a.sealing_key().await.unwrap();
    assert_eq!(b.sealing_key().await.unwrap().key_id, key.key_id);
    let blob = key.seal(&Card::new("4242424242424242", 12, 2031)).unwrap();
    let first = a.tokenize_sealed(&blob, false).await.unwrap();
    assert_eq!(
        b.tokenize_sealed(&blob, false).await.unwrap().token,
        first.token
    );

    let nonce: [u8; 16] = blob[17..33].try_into().unwrap();
    let json = br#"{"number":"5555555555554444","exp_month":12,"exp_year":2031}"#;
    let replay = envelope::sealed::seal_deterministic(
        &key.public_key,
        &key.tenant,
        key.server_time_unix_ms as u64,
        &nonce,
        &[9; 32],
        json,
    )
    .unwrap();
    let refused = b.tokenize_sealed(&replay, false).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::AlreadyExists), "{refused}");
    assert_eq!(refused.reason(), Some("SEALED_CARD_REPLAYED"));
    let nonce_hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        count(
            &cluster,
            &format!(
                "SELECT count(*) FROM outcomes WHERE position('\\x{nonce_hex}'::bytea in key) > 0 \
                 OR position('\\x{nonce_hex}'::bytea in value) > 0"
            )
        ),
        0,
        "the nonce is not stored"
    );
    assert!(
        count(&cluster, "SELECT count(*) FROM outcomes") >= 1,
        "the claim is stored"
    );
    drop((a, b));
    other.stop().await;
    stack.stop().await;
}
