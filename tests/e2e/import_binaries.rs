//! Import jobs on the real vault-server and keyservice binaries: the vault killed
//! with SIGKILL mid-import (then an export of what came in, its TRACE logs scanned),
//! and by hand, the import rate and the vault's peak memory (`make import-bench`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use integration_tests::{ADMIN, Process, within};
use vault_client::KeyServiceClient;

use crate::import::{Gpg, IMPORTER, assert_no_pans, check_mapping, import_dir, make_file, row};
use crate::vaultctl::vaultctl;

/// A vaultctl config for `name` against servers at these addresses.
fn config_at(
    dir: &Path,
    name: &str,
    vault: std::net::SocketAddr,
    keys: std::net::SocketAddr,
) -> PathBuf {
    let config = dir.join(format!("vaultctl-{name}-{}.toml", vault.port()));
    std::fs::write(
        &config,
        format!(
            "vault_endpoint = \"https://localhost:{}\"\nkeyservice_endpoint = \"https://localhost:{}\"\n\
             ca_file = \"ca.pem\"\ncert_file = \"{name}.pem\"\nkey_file = \"{name}.key\"\n",
            vault.port(),
            keys.port()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    config
}

/// The vault-server binary killed with SIGKILL in the middle of an import, twice, and
/// started again: the import ends with every row tokenized once. Then the cards are
/// exported to a processor key. Nothing the vault printed (at TRACE), nothing in its
/// spool, and nothing vaultctl printed holds a card number of the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_killed_mid_import_resumes_exactly_once_and_logs_no_card() {
    const ROWS: u64 = 20_000;
    let dir = import_dir();
    let trace = [("KEYSERVICE_LOG", "trace"), ("VAULT_LOG", "trace")];
    let keyservice =
        Process::start("keyservice", &dir.path().join("keyservice.toml"), &trace).await;
    let vault_config = dir.write_vault_config(keyservice.addr.port());
    let mut logs = String::new();
    let mut vault = Process::start("vault-server", &vault_config, &trace).await;
    let admin = |vault: &Process| config_at(dir.path(), ADMIN, vault.addr, keyservice.addr);

    let gpg = Gpg::new();
    let out = vaultctl(&admin(&vault), &["import", "key", "export"], "").await;
    assert!(out.ok, "{}", out.stderr);
    gpg.import(&out.stdout);
    let fingerprint = out
        .stderr
        .split("fingerprint ")
        .nth(1)
        .unwrap()
        .trim()
        .to_owned();
    let file = make_file(dir.path(), "killed", ROWS, &gpg, &fingerprint, None);
    let mapping = dir.path().join("killed.mapping.csv");
    let out = vaultctl(
        &admin(&vault),
        &[
            "import",
            "propose",
            file.to_str().unwrap(),
            "--rows",
            &ROWS.to_string(),
        ],
        "",
    )
    .await;
    let job = out.stdout.trim().to_owned();
    let importer = config_at(dir.path(), IMPORTER, vault.addr, keyservice.addr);
    assert!(
        vaultctl(&importer, &["import", "approve", &job], "")
            .await
            .ok
    );
    let args = |config: &Path| -> Vec<String> {
        [
            "--config",
            config.to_str().unwrap(),
            "import",
            file.to_str().unwrap(),
            "--job",
            &job,
            "--preset",
            "stripe",
            "--batch",
            "400",
            "--mapping",
            mapping.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let mut printed = String::new();
    for kill_after in [3_000, 11_000] {
        let child = tokio::process::Command::new(integration_tests::binary("vaultctl"))
            .args(args(&admin(&vault)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines =
            || std::fs::read(&mapping).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count());
        within(Duration::from_secs(120), "rows in the mapping", || {
            let n = lines();
            async move { (n > kill_after).then_some(()) }
        })
        .await;
        logs.push_str(&vault.kill9().await);
        let output = child.wait_with_output().await.unwrap();
        assert!(
            !output.status.success(),
            "vaultctl fails when the vault dies"
        );
        printed.push_str(&String::from_utf8_lossy(&output.stderr));
        println!("killed the vault after {} mapping lines", lines());
        vault = Process::start("vault-server", &vault_config, &trace).await;
    }
    let out = vaultctl(
        &admin(&vault),
        &args(&admin(&vault))[2..]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        "",
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    printed.push_str(&out.stderr);
    printed.push_str(&out.stdout);
    let tokens = check_mapping(&mapping, ROWS);
    let keys_config = dir.client_config(ADMIN, keyservice.addr);
    let expected = tokens.len() as u64;
    let seen = std::sync::atomic::AtomicU64::new(0);
    within(
        Duration::from_secs(30),
        &format!("the vault's record count ({expected} rows tokenized)"),
        || async {
            let mut keys = KeyServiceClient::connect(&keys_config).await.unwrap();
            let listing = keys.list_versions().await.unwrap();
            let records: u64 = listing
                .versions
                .iter()
                .filter(|v| v.purpose == "card-data")
                .map(|v| v.records)
                .sum();
            if seen.swap(records, std::sync::atomic::Ordering::Relaxed) != records {
                println!("records counted: {records} (expected {expected})");
            }
            (records == expected).then_some(())
        },
    )
    .await;
    // The imported cards exported again, to a processor key: nothing in the logs
    // either, and the processor reads back every valid row.
    logs.push_str(&vault.kill9().await);
    let key_file = dir.path().join("processor.asc");
    let processor_fingerprint = crate::export::processor_key(&gpg, &key_file);
    let vault_config = dir.write_vault_config_with(
        keyservice.addr.port(),
        &crate::export::processor_entry(&key_file, &processor_fingerprint),
    );
    let vault = Process::start("vault-server", &vault_config, &trace).await;
    let out = vaultctl(
        &admin(&vault),
        &["export", "propose", "--processor", crate::export::PROCESSOR],
        "",
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let export_job = out.stdout.trim().to_owned();
    let importer = config_at(dir.path(), IMPORTER, vault.addr, keyservice.addr);
    assert!(
        vaultctl(&importer, &["export", "approve", &export_job], "")
            .await
            .ok
    );
    let out = vaultctl(&admin(&vault), &["export", "run", &export_job], "").await;
    assert!(out.ok, "{}", out.stderr);
    printed.push_str(&out.stdout);
    printed.push_str(&out.stderr);
    let path = out.stdout.trim().rsplit(": ").next().unwrap().to_owned();
    let exported = crate::export::decrypt(&gpg, &path);
    assert_eq!(exported.len(), tokens.len());
    for (n, token) in &tokens {
        assert_eq!(exported[token].0, row(*n).0);
    }
    logs.push_str(&vault.kill9().await);
    logs.push_str(&keyservice.kill9().await);
    assert!(
        logs.contains("import file checked") && logs.contains("export written"),
        "the vault logged the check and the export"
    );
    assert_no_pans(&logs, ROWS, "the vault's and keyservice's TRACE logs");
    assert_no_pans(&printed, ROWS, "vaultctl's output");
    let mut spooled = Vec::new();
    for entry in walk(&dir.path().join("vault-data-import")) {
        spooled.extend(std::fs::read(entry).unwrap());
    }
    assert!(!spooled.is_empty());
    assert_no_pans(&String::from_utf8_lossy(&spooled), ROWS, "the import spool");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The vault's peak resident memory (VmHWM), in MiB.
fn peak_mib(process: &Process) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", process.child.id().unwrap())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        / 1024
}

/// By hand: the import rate and the vault's peak memory on the real binaries, for
/// `IMPORT_BENCH_ROWS` rows (default 200,000); run it with two sizes to see memory stay
/// flat (with an 8 MiB block cache). `cargo test --release -p integration-tests --test e2e import_rate -- --ignored
/// --nocapture` (with `cargo build --release --bins` first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn import_rate_and_peak_memory() {
    let rows: u64 = std::env::var("IMPORT_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = import_dir();
    // A small block cache, so that what RocksDB caches (up to the cache's size, whatever
    // the import) does not hide what the import holds.
    dir.set_storage("block_cache_mb = 8\n");
    let keyservice = Process::start("keyservice", &dir.path().join("keyservice.toml"), &[]).await;
    let vault_config = dir.write_vault_config(keyservice.addr.port());
    let vault = Process::start("vault-server", &vault_config, &[]).await;
    let admin = config_at(dir.path(), ADMIN, vault.addr, keyservice.addr);
    let gpg = Gpg::new();
    let out = vaultctl(&admin, &["import", "key", "export"], "").await;
    gpg.import(&out.stdout);
    let fingerprint = out
        .stderr
        .split("fingerprint ")
        .nth(1)
        .unwrap()
        .trim()
        .to_owned();
    let file = make_file(dir.path(), "bench", rows, &gpg, &fingerprint, None);
    let job = vaultctl(
        &admin,
        &[
            "import",
            "propose",
            file.to_str().unwrap(),
            "--rows",
            &rows.to_string(),
        ],
        "",
    )
    .await
    .stdout
    .trim()
    .to_owned();
    let importer = config_at(dir.path(), IMPORTER, vault.addr, keyservice.addr);
    assert!(
        vaultctl(&importer, &["import", "approve", &job], "")
            .await
            .ok
    );
    let before = peak_mib(&vault);
    let started = std::time::Instant::now();
    let mapping = dir.path().join("bench.mapping.csv");
    let out = vaultctl(
        &admin,
        &[
            "import",
            file.to_str().unwrap(),
            "--job",
            &job,
            "--preset",
            "stripe",
            "--mapping",
            mapping.to_str().unwrap(),
            "--timeout-secs",
            "600",
        ],
        "",
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let elapsed = started.elapsed();
    let (encrypted_mib, after) = (
        // One decimal: a small file's size is not 0.
        (std::fs::metadata(&file).unwrap().len() as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0,
        peak_mib(&vault),
    );
    let rate = rows as f64 / elapsed.as_secs_f64();
    println!(
        "import: {rows} rows, {encrypted_mib} MiB encrypted, {:.1} s, {rate:.0} rows/s; vault \
         peak RSS {before} MiB before the job, {after} MiB after",
        elapsed.as_secs_f64(),
    );
    // For `make bench` (scripts/bench.sh), which puts it in docs/BENCHMARKS.md.
    if let Ok(path) = std::env::var("IMPORT_BENCH_JSON") {
        let report = serde_json::json!({
            "rows": rows,
            "encrypted_mib": encrypted_mib,
            "seconds": elapsed.as_secs_f64(),
            "rows_per_sec": rate,
            "peak_rss_mib_before": before,
            "peak_rss_mib_after": after,
        });
        std::fs::write(path, report.to_string()).unwrap();
    }
    vault.kill9().await;
    keyservice.kill9().await;
}
