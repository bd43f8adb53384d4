//! Import jobs (issue 21) on the real binaries: files made with Debian's `gpg`, as a
//! sending party would, sent by the real `vaultctl` to a vault under dual control.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use integration_tests::{ADMIN, OTHER_TENANT, READER, Stack, StackDir, identity, within};
use vault_client::{Card, KeyServiceClient};

use crate::vaultctl::{Output, config_for, vaultctl};

/// The second identity of tenant acme with `import` and `export` (the admin is the
/// first).
pub(crate) const IMPORTER: &str = "importer";

const HEADER: &str = "id,card.number,card.exp_month,card.exp_year,name";

/// A stack whose admin and `importer` may import into acme, and `globex-service` into
/// globex.
async fn import_stack() -> Stack {
    Stack::start_in(import_dir()).await
}

/// A stack directory whose policy lets the admin and `importer` import into acme, and
/// `globex-service` into globex.
pub(crate) fn import_dir() -> StackDir {
    let dir = StackDir::new();
    dir.add_client_identity(IMPORTER);
    let policy = dir.path().join("policy.toml");
    let text = std::fs::read_to_string(&policy)
        .unwrap()
        .replacen(
            "permissions = [\"tokenize\", \"read\", \"delete\", \"subject\", \"forward:sandbox\"]",
            "permissions = [\"tokenize\", \"read\", \"delete\", \"subject\", \"import\", \"export\", \"forward:sandbox\"]",
            1,
        );
    assert!(text.contains("\"import\", \"export\", \"admin\""));
    std::fs::write(
        &policy,
        format!(
            "{text}\n[[identity]]\nid = \"{}\"\ntenant = \"acme\"\npermissions = [\"import\", \"export\"]\n",
            identity(IMPORTER)
        ),
    )
    .unwrap();
    dir
}

/// Debian's GnuPG with a home of its own.
pub(crate) struct Gpg {
    home: tempfile::TempDir,
}

impl Gpg {
    pub(crate) fn new() -> Self {
        let home = tempfile::Builder::new()
            .prefix("gpg")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(
            home.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        Self { home }
    }

    pub(crate) fn run(&self, args: &[&str]) -> std::process::Output {
        let output = std::process::Command::new("/usr/bin/gpg")
            .arg("--homedir")
            .arg(self.home.path())
            .args([
                "--batch",
                "--quiet",
                "--no-tty",
                "--pinentry-mode",
                "loopback",
            ])
            .args(["--passphrase", ""])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("gpg (Debian's gnupg; scripts/install-deps.sh installs it)");
        assert!(
            output.status.success(),
            "gpg {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Imports a public key; returns the primary fingerprints and each key's algorithms.
    pub(crate) fn import(&self, armored: &str) -> Vec<String> {
        let file = self.home.path().join("import.asc");
        std::fs::write(&file, armored).unwrap();
        self.run(&["--import", file.to_str().unwrap()]);
        let listing = self.run(&["--with-colons", "--fingerprint", "--list-keys"]);
        String::from_utf8(listing.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// A new signing key; its fingerprint.
    pub(crate) fn generate(&self, name: &str) -> String {
        self.run(&["--quick-gen-key", name, "ed25519", "sign", "never"]);
        let listing = self.run(&["--with-colons", "--fingerprint", "--list-secret-keys", name]);
        let text = String::from_utf8(listing.stdout).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("fpr:"))
            .map(|l| l.trim_matches(':').to_owned())
            .unwrap()
    }

    pub(crate) fn export(&self, fingerprint: &str) -> String {
        String::from_utf8(self.run(&["--armor", "--export", fingerprint]).stdout).unwrap()
    }

    /// Encrypts `plain` to `recipient` (signed by `signer`), as a sender would.
    fn encrypt(&self, plain: &Path, recipient: &str, signer: Option<&str>, out: &Path) {
        let mut args = vec!["--trust-model", "always", "--recipient", recipient];
        if let Some(signer) = signer {
            args.extend(["--local-user", signer, "--sign"]);
        }
        args.extend([
            "--encrypt",
            "--output",
            out.to_str().unwrap(),
            plain.to_str().unwrap(),
        ]);
        let _ = std::fs::remove_file(out);
        self.run(&args);
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = std::process::Command::new("/usr/bin/gpgconf")
            .arg("--homedir")
            .arg(self.home.path())
            .args(["--kill", "gpg-agent"])
            .status();
    }
}

/// `vaultctl import key export ARGS`, imported into `gpg`: the fingerprint vaultctl
/// printed (checked against what gpg computes) and gpg's listing.
async fn export_key(stack: &Stack, gpg: &Gpg, args: &[&str]) -> (String, Vec<String>) {
    let mut command = vec!["import", "key", "export"];
    command.extend(args);
    let out = vaultctl(&config_for(stack, ADMIN), &command, "").await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout
            .starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"),
        "{}",
        out.stdout
    );
    let fingerprint = out
        .stderr
        .split("fingerprint ")
        .nth(1)
        .unwrap()
        .trim()
        .to_owned();
    let listing = gpg.import(&out.stdout);
    assert!(
        listing
            .iter()
            .any(|l| l == &format!("fpr:::::::::{fingerprint}:")),
        "gpg computes the fingerprint vaultctl printed: {listing:?}"
    );
    (fingerprint, listing)
}

/// The vault's import key, exported with vaultctl and imported into `gpg`: its
/// fingerprint, checked against what gpg computes, with a Curve25519 ECDH subkey.
async fn export_import_key(stack: &Stack, gpg: &Gpg) -> String {
    let (fingerprint, listing) = export_key(stack, gpg, &[]).await;
    // pub: EdDSA (22); sub: ECDH (18) on Curve25519, for encryption.
    assert!(
        listing
            .iter()
            .any(|l| l.starts_with("pub:") && l.split(':').nth(3) == Some("22"))
    );
    assert!(
        listing.iter().any(|l| {
            let f: Vec<&str> = l.split(':').collect();
            f[0] == "sub" && f[3] == "18" && f[11].contains('e') && f[16] == "cv25519"
        }),
        "{listing:?}"
    );
    fingerprint
}

/// Card `n` of the file (a synthetic, Luhn-valid number) and its CSV line; every
/// 1000th row has a number that fails the Luhn check.
pub(crate) fn row(n: u64) -> (String, String) {
    let mut number = testcards::card_number(n);
    if n % 1000 == 999 {
        let last = number.pop().unwrap();
        number.push(if last == '0' { '1' } else { '0' });
    }
    let line = format!(
        "src_{n},{number},{},{},Holder {n}",
        1 + n % 12,
        2031 + n % 5
    );
    (number, line)
}

/// Writes a CSV of `rows` cards, encrypts it to the vault, removes the plaintext.
pub(crate) fn make_file(
    dir: &Path,
    name: &str,
    rows: u64,
    gpg: &Gpg,
    to: &str,
    signer: Option<&str>,
) -> PathBuf {
    make_file_of(dir, name, 0..rows, gpg, to, signer)
}

/// [`make_file`] of the cards `numbers` (row numbers of [`row`]).
fn make_file_of(
    dir: &Path,
    name: &str,
    numbers: std::ops::Range<u64>,
    gpg: &Gpg,
    to: &str,
    signer: Option<&str>,
) -> PathBuf {
    let plain = dir.join(format!("{name}.csv"));
    let mut text = String::with_capacity((numbers.end - numbers.start) as usize * 64);
    text.push_str(HEADER);
    text.push('\n');
    for n in numbers {
        text.push_str(&row(n).1);
        text.push('\n');
    }
    std::fs::write(&plain, text).unwrap();
    let out = dir.join(format!("{name}.csv.gpg"));
    gpg.encrypt(&plain, to, signer, &out);
    std::fs::remove_file(&plain).unwrap();
    out
}

/// Proposes importing `file` (`extra`: --sender-key); returns the job id.
async fn propose(stack: &Stack, who: &str, file: &Path, rows: u64, extra: &[&str]) -> String {
    let rows = rows.to_string();
    let mut args = vec!["import", "propose", file.to_str().unwrap(), "--rows", &rows];
    args.extend(extra);
    let out = vaultctl(&config_for(stack, who), &args, "").await;
    assert!(out.ok, "{}", out.stderr);
    out.stdout.trim().to_owned()
}

/// A job for `file` proposed by the admin and approved by `importer`.
async fn approved_job(stack: &Stack, file: &Path, rows: u64, extra: &[&str]) -> String {
    let job = propose(stack, ADMIN, file, rows, extra).await;
    let out = approve(stack, IMPORTER, &job).await;
    assert!(out.ok, "{}", out.stderr);
    job
}

async fn approve(stack: &Stack, who: &str, job: &str) -> Output {
    vaultctl(&config_for(stack, who), &["import", "approve", job], "").await
}

async fn import(stack: &Stack, file: &Path, job: &str, mapping: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "import",
        file.to_str().unwrap(),
        "--job",
        job,
        "--preset",
        "stripe",
        "--mapping",
        mapping.to_str().unwrap(),
    ];
    args.extend(extra);
    vaultctl(&config_for(stack, ADMIN), &args, "").await
}

/// The mapping file's rows: row number → (source id, token, last four, error).
fn read_mapping(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("row,source_id,token,last_four,fingerprint,error_field,error_rule,job")
    );
    lines
        .map(|l| l.split(',').map(str::to_owned).collect())
        .collect()
}

/// Checks the mapping holds rows 1..=rows once each, in order, each with the token of
/// its card or the Luhn error; returns the tokens by row.
pub(crate) fn check_mapping(path: &Path, rows: u64) -> HashMap<u64, String> {
    let mapping = read_mapping(path);
    assert_eq!(
        mapping.len() as u64,
        rows,
        "one line per row, no more, no less"
    );
    let mut tokens = HashMap::new();
    for (i, fields) in mapping.iter().enumerate() {
        let n = i as u64;
        assert_eq!(
            fields[0],
            (n + 1).to_string(),
            "rows in order, without gaps"
        );
        assert_eq!(fields[1], format!("src_{n}"));
        let (number, _) = row(n);
        if n % 1000 == 999 {
            assert_eq!(
                &fields[2..7],
                ["", "", "", "card.number", "luhn"],
                "row {}",
                n + 1
            );
        } else {
            assert!(fields[2].starts_with("tok_"), "{fields:?}");
            assert_eq!(fields[3], number[number.len() - 4..]);
            assert_eq!(fields[4].len(), 64, "admin sees fingerprints");
            tokens.insert(n, fields[2].clone());
        }
    }
    let distinct: HashSet<&String> = tokens.values().collect();
    assert_eq!(distinct.len(), tokens.len(), "a token per card");
    tokens
}

/// Records the vault holds under card-data keys, as its usage reports count them.
async fn records(stack: &Stack) -> u64 {
    let mut keys = KeyServiceClient::connect(&stack.keyservice_config(ADMIN))
        .await
        .unwrap();
    keys.list_versions()
        .await
        .unwrap()
        .versions
        .iter()
        .filter(|v| v.purpose == "card-data")
        .map(|v| v.records)
        .sum()
}

async fn wait_for_records(stack: &Stack, expected: u64) {
    within(
        Duration::from_secs(30),
        "the vault's record count",
        || async { (records(stack).await == expected).then_some(()) },
    )
    .await;
}

/// No card number of the file in `text` (any 15- or 16-digit window).
pub(crate) fn assert_no_pans(text: &str, rows: u64, what: &str) {
    let pans: HashSet<String> = (0..rows).map(|n| row(n).0).collect();
    let bytes = text.as_bytes();
    for len in [15, 16] {
        for window in bytes.windows(len) {
            let w = std::str::from_utf8(window).unwrap_or("");
            assert!(!pans.contains(w), "a card number in {what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpg_file_imports_100000_rows_under_dual_control_with_a_correct_mapping() {
    const ROWS: u64 = 100_000;
    let stack = import_stack().await;
    let gpg = Gpg::new();
    let fingerprint = export_import_key(&stack, &gpg).await;
    let work = stack.dir.path();
    let file = make_file(work, "cards", ROWS, &gpg, &fingerprint, None);
    let mapping = work.join("cards.mapping.csv");

    // Without `import`, nothing: not the key, not a proposal.
    for args in [
        &["import", "key", "export"][..],
        &["import", "propose", file.to_str().unwrap(), "--rows", "1"],
    ] {
        let out = vaultctl(&config_for(&stack, READER), args, "").await;
        assert!(
            !out.ok && out.stderr.contains("PermissionDenied"),
            "{}",
            out.stderr
        );
    }
    // One identity alone cannot import: the proposer cannot approve, and an unapproved
    // job takes no file.
    let job = propose(&stack, ADMIN, &file, ROWS, &[]).await;
    let refused = approve(&stack, ADMIN, &job).await;
    assert!(!refused.ok);
    assert!(
        refused.stderr.contains("PermissionDenied") && refused.stderr.contains("dual control"),
        "{}",
        refused.stderr
    );
    let early = import(&stack, &file, &job, &mapping, &[]).await;
    assert!(!early.ok);
    assert!(early.stderr.contains("not approved"), "{}", early.stderr);
    // Nor can another tenant's identity approve it.
    let other = approve(&stack, OTHER_TENANT, &job).await;
    assert!(
        !other.ok && other.stderr.contains("NotFound"),
        "{}",
        other.stderr
    );
    let approved = approve(&stack, IMPORTER, &job).await;
    assert!(approved.ok, "{}", approved.stderr);
    assert!(
        approved.stdout.contains(&identity(ADMIN)),
        "{}",
        approved.stdout
    );

    let started = std::time::Instant::now();
    let out = import(&stack, &file, &job, &mapping, &[]).await;
    let elapsed = started.elapsed();
    assert!(out.ok, "{}", out.stderr);
    println!(
        "imported {ROWS} rows ({} bytes encrypted) in {elapsed:?}: {:.0} rows/s",
        std::fs::metadata(&file).unwrap().len(),
        ROWS as f64 / elapsed.as_secs_f64()
    );
    let tokens = check_mapping(&mapping, ROWS);
    assert!(
        out.stderr.contains(&format!("{ROWS} of {ROWS} rows")),
        "{}",
        out.stderr
    );
    assert_no_pans(&out.stdout, ROWS, "vaultctl's output");
    assert_no_pans(&out.stderr, ROWS, "vaultctl's progress and errors");
    assert_no_pans(
        &std::fs::read_to_string(&mapping).unwrap(),
        ROWS,
        "the mapping",
    );
    wait_for_records(&stack, tokens.len() as u64).await;

    // The tokens are the cards: they forward as the file's numbers, and tokenizing a
    // card of the file again finds its token.
    let mut admin = stack.client(ADMIN).await;
    for n in [0, 4_321, ROWS - 2] {
        let (number, _) = row(n);
        assert_eq!(stack.forward_number(&mut admin, &tokens[&n]).await, number);
        let card = Card::new(&number, (1 + n % 12) as u32, (2031 + n % 5) as u32);
        let again = admin.tokenize(card, true).await.unwrap();
        assert!(again.reused);
        assert_eq!(again.token, tokens[&n]);
    }

    // Run again: the job is done, nothing changes.
    let again = import(&stack, &file, &job, &mapping, &[]).await;
    assert!(again.ok, "{}", again.stderr);
    check_mapping(&mapping, ROWS);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_import_resumes_with_each_row_tokenized_exactly_once() {
    const ROWS: u64 = 30_000;
    let mut stack = import_stack().await;
    let gpg = Gpg::new();
    let fingerprint = export_import_key(&stack, &gpg).await;
    let work = stack.dir.path().to_path_buf();
    let file = make_file(&work, "resume", ROWS, &gpg, &fingerprint, None);
    let mapping = work.join("resume.mapping.csv");
    let job = approved_job(&stack, &file, ROWS, &[]).await;

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    for (round, kill_after_rows) in [(0, 2_000 + seed % 5_000), (1, 12_000 + seed % 5_000)] {
        // vaultctl, killed with SIGKILL once the mapping holds some rows.
        let config = config_for(&stack, ADMIN);
        let mut child = tokio::process::Command::new(integration_tests::binary("vaultctl"))
            .arg("--config")
            .arg(&config)
            .args([
                "import",
                file.to_str().unwrap(),
                "--job",
                &job,
                "--preset",
                "stripe",
            ])
            .arg("--mapping")
            .arg(&mapping)
            .args(["--batch", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = |path: &Path| {
            std::fs::read(path).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count() as u64)
        };
        within(Duration::from_secs(120), "rows in the mapping", || {
            let done = lines(&mapping);
            async move { (done > kill_after_rows).then_some(()) }
        })
        .await;
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        println!(
            "round {round}: killed vaultctl after {} mapping lines",
            lines(&mapping)
        );
        // The second time the vault restarts too, forgetting its decryption session.
        if round == 1 {
            stack.restart_vault().await;
        }
    }
    let out = import(&stack, &file, &job, &mapping, &[]).await;
    assert!(out.ok, "{}", out.stderr);
    let tokens = check_mapping(&mapping, ROWS);
    // Exactly once: as many records as valid rows, none twice.
    wait_for_records(&stack, tokens.len() as u64).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_wrongly_encrypted_or_wrongly_signed_file_stores_nothing() {
    const ROWS: u64 = 500;
    let stack = import_stack().await;
    let gpg = Gpg::new();
    let fingerprint = export_import_key(&stack, &gpg).await;
    let sender = gpg.generate("Old Vault <export@old-vault.example>");
    let impostor = gpg.generate("Impostor <export@impostor.example>");
    let receiver = gpg.generate("Other Receiver <r@example>");
    gpg.run(&["--quick-add-key", &receiver, "cv25519", "encr", "never"]);
    let work = stack.dir.path().to_path_buf();
    let sender_key = work.join("sender.asc");
    std::fs::write(&sender_key, gpg.export(&sender)).unwrap();
    let signed = ["--sender-key", sender_key.to_str().unwrap()];
    let mapping = work.join("refused.mapping.csv");
    // Each file on a job approved for it (a job takes only its own file), so that the
    // checks after the file's digest are reached.
    let mut jobs = Vec::new();

    let refused = |out: &Output, rule: &str| {
        assert!(!out.ok, "refused");
        assert!(
            out.stderr.contains("nothing of it was stored"),
            "{}",
            out.stderr
        );
        assert!(out.stderr.contains(rule), "{rule}: {}", out.stderr);
        assert_no_pans(&out.stderr, ROWS, "the refusal");
    };

    // 1. A bit flipped in the middle of the ciphertext.
    let good = make_file(&work, "good", ROWS, &gpg, &fingerprint, Some(&sender));
    let corrupt = work.join("corrupt.gpg");
    let mut bytes = std::fs::read(&good).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&corrupt, bytes).unwrap();
    let job = approved_job(&stack, &corrupt, ROWS, &signed).await;
    jobs.push(job.clone());
    refused(
        &import(&stack, &corrupt, &job, &mapping, &signed).await,
        "integrity check failed",
    );
    // A file large enough to be read as a stream: its tag (MDC, the last bytes) altered.
    let large = make_file(&work, "large", 40_000, &gpg, &fingerprint, Some(&sender));
    let mut bytes = std::fs::read(&large).unwrap();
    let end = bytes.len() - 3;
    bytes[end] ^= 0x01;
    std::fs::write(&large, bytes).unwrap();
    let job = approved_job(&stack, &large, 40_000, &signed).await;
    jobs.push(job.clone());
    refused(
        &import(&stack, &large, &job, &mapping, &signed).await,
        "integrity check failed",
    );

    // 2. Encrypted to another key than the vault's.
    let other = make_file(&work, "other", ROWS, &gpg, "Other Receiver", Some(&sender));
    let job = approved_job(&stack, &other, ROWS, &signed).await;
    jobs.push(job.clone());
    refused(
        &import(&stack, &other, &job, &mapping, &signed).await,
        "not encrypted to an import key",
    );

    // 3. Signed by another key than the job's sender, and not signed at all.
    let forged = make_file(&work, "forged", ROWS, &gpg, &fingerprint, Some(&impostor));
    let job = approved_job(&stack, &forged, ROWS, &signed).await;
    jobs.push(job.clone());
    refused(
        &import(&stack, &forged, &job, &mapping, &signed).await,
        "not signed by the sender key",
    );
    let unsigned = make_file(&work, "unsigned", ROWS, &gpg, &fingerprint, None);
    let job = approved_job(&stack, &unsigned, ROWS, &signed).await;
    jobs.push(job.clone());
    refused(
        &import(&stack, &unsigned, &job, &mapping, &signed).await,
        "not signed by the sender key",
    );

    // 4. A CVC column, and a row count other than the job's.
    let plain = work.join("cvc.csv");
    let mut text = format!("{HEADER},card.cvc\n");
    for n in 0..ROWS {
        text.push_str(&format!("{},123\n", row(n).1));
    }
    std::fs::write(&plain, text).unwrap();
    let cvc = work.join("cvc.csv.gpg");
    gpg.encrypt(&plain, &fingerprint, Some(&sender), &cvc);
    std::fs::remove_file(&plain).unwrap();
    let job = approved_job(&stack, &cvc, ROWS, &signed).await;
    jobs.push(job.clone());
    refused(
        &import(&stack, &cvc, &job, &mapping, &signed).await,
        "card security code",
    );
    let short = make_file(&work, "short", ROWS - 1, &gpg, &fingerprint, Some(&sender));
    let job = approved_job(&stack, &short, ROWS, &signed).await;
    jobs.push(job.clone());
    refused(
        &import(&stack, &short, &job, &mapping, &signed).await,
        "holds 499 rows",
    );

    // Nothing of any of them was stored, and the spool holds no file.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(records(&stack).await, 0);
    for job in &jobs {
        assert!(
            !work
                .join("vault-data-import")
                .join(job)
                .join("file.pgp")
                .exists()
        );
    }

    // The right file, signed by the sender, goes through on its job (its columns
    // named in a fields file this time, over the preset's).
    let job = approved_job(&stack, &good, ROWS, &signed).await;
    let fields = work.join("fields.toml");
    std::fs::write(&fields, "number = \"card.number\"\nname = \"name\"\n").unwrap();
    let mut with_fields = signed.to_vec();
    with_fields.extend(["--fields", fields.to_str().unwrap()]);
    let out = import(&stack, &good, &job, &mapping, &with_fields).await;
    assert!(out.ok, "{}", out.stderr);
    let tokens = check_mapping(&mapping, ROWS);
    wait_for_records(&stack, tokens.len() as u64).await;
    stack.stop().await;
}

/// `count` card numbers other than `known` with its first six and last four: the
/// candidates a guesser of `known` would try.
fn candidates(known: &str, count: usize) -> Vec<String> {
    (0..1_000_000u64)
        .filter_map(|middle| {
            let body = format!("{}{middle:06}{}", &known[..6], &known[12..15]);
            let number = format!("{body}{}", testcards::luhn_digit(&body));
            (number.ends_with(&known[12..]) && number != known).then_some(number)
        })
        .take(count)
        .collect()
}

/// `cards` as Stripe's JSON lines (ids `card_0`...), zipped if asked, encrypted to
/// the import key; no plaintext is left on disk.
fn stripe_file(
    work: &Path,
    gpg: &Gpg,
    fingerprint: &str,
    cards: &[String],
    name: &str,
    zip: bool,
) -> PathBuf {
    let mut jsonl = String::new();
    for (i, number) in cards.iter().enumerate() {
        jsonl.push_str(&format!(
            "{{\"id\":\"card_{i}\",\"object\":\"card\",\"name\":\"Jane Roe\",\"card\":{{\"number\":\"{number}\",\"exp_month\":7,\"exp_year\":2032,\"brand\":\"visa\"}}}}\n"
        ));
    }
    let mut plain = work.join(format!("{name}.jsonl"));
    std::fs::write(&plain, jsonl).unwrap();
    if zip {
        let zipped = work.join(format!("{name}.zip"));
        let status = std::process::Command::new("/usr/bin/python3")
            .args(["-c", "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z: z.write(sys.argv[2], 'cards.jsonl')"])
            .arg(&zipped)
            .arg(&plain)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::remove_file(&plain).unwrap();
        plain = zipped;
    }
    let file = work.join(format!("{name}.gpg"));
    gpg.encrypt(&plain, fingerprint, None, &file);
    std::fs::remove_file(&plain).unwrap();
    file
}

/// A file of 1,001 candidates for one card (its first six and last four) is how
/// guessing through an import looks (imports skip the guessing detector, and whoever
/// sees fingerprints would find the card's): refused whole at its check, storing
/// nothing. The same file cut to 1,000 goes in.
///
/// Control: TOK-ORACLE (docs/compliance.md).
/// Attack: two importers upload every candidate for a card's middle digits as one approved
/// import.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_guesses_for_one_card_is_refused_whole() {
    let stack = import_stack().await;
    let gpg = Gpg::new();
    let fingerprint = export_import_key(&stack, &gpg).await;
    let work = stack.dir.path().to_path_buf();
    let cards = candidates("5555555555554444", 1_001);
    let file = stripe_file(&work, &gpg, &fingerprint, &cards, "guesses", false);
    let job = propose(&stack, ADMIN, &file, 1_001, &[]).await;
    assert!(approve(&stack, IMPORTER, &job).await.ok);
    let mapping = work.join("guesses.csv");
    let out = import(&stack, &file, &job, &mapping, &["--format", "jsonl"]).await;
    assert!(!out.ok, "{}", out.stderr);
    assert!(
        out.stderr.contains("nothing of it was stored")
            && out.stderr.contains("max_cards_per_bucket"),
        "{}",
        out.stderr
    );
    assert_no_pans(&out.stderr, 0, "vaultctl's error");
    for card in &cards {
        assert!(!out.stderr.contains(card.as_str()));
    }
    assert_eq!(records(&stack).await, 0);

    let file = stripe_file(&work, &gpg, &fingerprint, &cards[..1_000], "spread", false);
    let job = propose(&stack, ADMIN, &file, 1_000, &[]).await;
    assert!(approve(&stack, IMPORTER, &job).await.ok);
    let out = import(&stack, &file, &job, &mapping, &["--format", "jsonl"]).await;
    assert!(out.ok, "{}", out.stderr);
    wait_for_records(&stack, 1_000).await;
    stack.stop().await;
}

/// Stripe's JSON lines, zipped, then encrypted: 100 cards that share their first six
/// and last four, which the guessing detector would refuse from one identity's
/// TokenizeBatch, all go in (an approved import is exempt). One of them is a card a
/// service of the tenant tokenized before: its row gets a token of its own, never the
/// service's (which would tell the importers which of their candidates the tenant held).
/// The same file imported again by a second job gets new tokens everywhere, and the
/// second job, whose every row matched a known card, is flagged in the audit log and
/// the server log, never to the importers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_never_hands_out_a_token_the_tenant_held_and_is_flagged_only_in_the_log() {
    let stack = import_stack().await;
    let gpg = Gpg::new();
    let fingerprint = export_import_key(&stack, &gpg).await;
    let work = stack.dir.path().to_path_buf();
    let known = "4242424242424242";
    let mut admin = stack.client(ADMIN).await;
    let held = admin
        .tokenize(Card::new(known, 7, 2032), false)
        .await
        .unwrap()
        .token;
    let mut cards = candidates(known, 99);
    cards.insert(37, known.to_owned());
    let file = stripe_file(&work, &gpg, &fingerprint, &cards, "cards", true);

    let mut mappings = Vec::new();
    let mut jobs = Vec::new();
    for round in 0..2 {
        let job = approved_job(&stack, &file, 100, &[]).await;
        let mapping = work.join(format!("zipped-{round}.csv"));
        if round == 1 {
            // The first job's (complete) mapping is not this job's cursor.
            let first = work.join("zipped-0.csv");
            let out = import(&stack, &file, &job, &first, &["--format", "jsonl"]).await;
            assert!(!out.ok);
            assert!(
                out.stderr.contains("mapping of another import job"),
                "{}",
                out.stderr
            );
        }
        let out = import(&stack, &file, &job, &mapping, &["--format", "jsonl"]).await;
        assert!(out.ok, "{}", out.stderr);
        assert!(!out.stderr.contains("flag"), "{}", out.stderr);
        let rows = read_mapping(&mapping);
        assert_eq!(rows.len(), 100);
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row[1], format!("card_{i}"));
            assert!(row[2].starts_with("tok_"), "{row:?}");
            assert_ne!(row[2], held, "row {i} got the token the tenant held");
            assert_eq!(row[3], "4242");
            assert_eq!(row[7], job);
        }
        mappings.push(rows);
        jobs.push(job);
    }
    for (first, second) in mappings[0].iter().zip(&mappings[1]) {
        assert_ne!(
            first[2], second[2],
            "a second job reused the first job's token"
        );
    }
    // A finished job run again (its mapping lost) stores nothing: its rows' tokens come
    // from their entries, and a row whose token was deleted since stays deleted.
    admin.delete(&mappings[0][5][2]).await.unwrap();
    let again = work.join("zipped-again.csv");
    let out = import(&stack, &file, &jobs[0], &again, &["--format", "jsonl"]).await;
    assert!(out.ok, "{}", out.stderr);
    let rows = read_mapping(&again);
    assert_eq!(rows.len(), 100);
    for (i, (row, first)) in rows.iter().zip(&mappings[0]).enumerate() {
        match i {
            5 => assert_eq!(&row[2..7], ["", "", "", "token", "deleted"], "{row:?}"),
            _ => assert_eq!(row[2], first[2], "row {i}"),
        }
    }
    // The card the service tokenized, 200 rows of two jobs, one of them deleted.
    wait_for_records(&stack, 200).await;
    // The service's token is still the card's (Tokenize with reuse finds the oldest).
    let again = admin
        .tokenize(Card::new(known, 7, 2032), true)
        .await
        .unwrap();
    assert_eq!(again.token, held);
    // The audit log has each job's end; only the second is flagged.
    let page = admin.read_audit(0, None, None, 1000).await.unwrap();
    let finished: Vec<&str> = page
        .events
        .iter()
        .filter(|e| e.action == "ImportFinished")
        .map(|e| e.detail.as_deref().unwrap_or(""))
        .collect();
    assert_eq!(finished.len(), 2, "{finished:?}");
    assert!(finished[0].contains(&jobs[0]), "{finished:?}");
    assert!(
        finished[0].contains("1 of the 100 looked up"),
        "{finished:?}"
    );
    assert!(!finished[0].contains("flagged"), "{finished:?}");
    assert!(
        finished[1].contains("100 of the 100 looked up"),
        "{finished:?}"
    );
    assert!(finished[1].contains("flagged"), "{finished:?}");
    let flags: Vec<_> = admin
        .list_blocks()
        .await
        .unwrap()
        .into_iter()
        .filter(|b| b.kind == "guessing")
        .collect();
    assert!(flags.is_empty(), "{flags:?}");
    stack.stop().await;
}

/// The import key rotates like the others: after `keys rotate --purpose import` the
/// vault hands out version 2 (another fingerprint), and a file encrypted to version 1
/// before the rotation still imports, as does one encrypted to version 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_import_key_rotates_and_older_versions_still_open_files() {
    const ROWS: u64 = 300;
    let stack = import_stack().await;
    let gpg = Gpg::new();
    let first = export_import_key(&stack, &gpg).await;
    let work = stack.dir.path().to_path_buf();
    let old = make_file(&work, "old", ROWS, &gpg, &first, None);

    let mut keys = KeyServiceClient::connect(&stack.keyservice_config(ADMIN))
        .await
        .unwrap();
    let rotated = keys.rotate("import").await.unwrap();
    assert_eq!(rotated.version, 2);
    let config = config_for(&stack, ADMIN);
    within(
        Duration::from_secs(30),
        "the vault's import key version 2",
        || {
            let config = config.clone();
            async move {
                let out = vaultctl(&config, &["import", "key", "export"], "").await;
                out.stderr.contains("version 2,").then_some(())
            }
        },
    )
    .await;
    let second = export_import_key(&stack, &gpg).await;
    assert_ne!(first, second);
    let new = make_file(&work, "new", ROWS, &gpg, &second, None);

    for (file, name) in [(&old, "old"), (&new, "new")] {
        let job = approved_job(&stack, file, ROWS, &[]).await;
        let mapping = work.join(format!("{name}.mapping.csv"));
        let out = import(&stack, file, &job, &mapping, &[]).await;
        assert!(out.ok, "{name}: {}", out.stderr);
        check_mapping(&mapping, ROWS);
    }
    stack.stop().await;
}

/// The import key for senders whose tools cannot use Curve25519: an RSA 4096 key
/// (keyservice purpose `import-rsa`) that gpg encrypts to and the vault opens, beside
/// the Curve25519 one.
/// Attack: a sender forced onto RSA gets a weak or wrong key (not 4096 bits, not the
/// fingerprint the vault prints), or a file encrypted to it does not import whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rsa_4096_import_key_opens_a_file_gpg_encrypted_to_it() {
    const ROWS: u64 = 500;
    let stack = import_stack().await;
    let gpg = Gpg::new();
    let (rsa, listing) = export_key(&stack, &gpg, &["--algorithm", "rsa4096"]).await;
    // pub and sub: RSA (algorithm 1), 4096 bits; the subkey encrypts.
    let fields = |l: &String| l.split(':').map(str::to_owned).collect::<Vec<_>>();
    assert!(
        listing
            .iter()
            .map(fields)
            .any(|f| f[0] == "pub" && f[2] == "4096" && f[3] == "1"),
        "{listing:?}"
    );
    assert!(
        listing
            .iter()
            .map(fields)
            .any(|f| f[0] == "sub" && f[2] == "4096" && f[3] == "1" && f[11].contains('e')),
        "{listing:?}"
    );
    let curve = export_import_key(&stack, &gpg).await;
    assert_ne!(curve, rsa, "two keys, one per algorithm");

    let work = stack.dir.path().to_path_buf();
    let file = make_file(&work, "rsa", ROWS, &gpg, &rsa, None);
    let job = approved_job(&stack, &file, ROWS, &[]).await;
    let mapping = work.join("rsa.mapping.csv");
    let out = import(&stack, &file, &job, &mapping, &[]).await;
    assert!(out.ok, "{}", out.stderr);
    check_mapping(&mapping, ROWS);
    stack.stop().await;
}

/// Finding HIGH #2: an approval binds the file and the sender key, and starts one job
/// on one vault. A file other than the approved one (same row count, made the same
/// way) is refused before it is decrypted, stores nothing and leaves no spool file; a
/// sender key other than the approved one, or none where one was approved (and one
/// where none was), is refused; and another vault identity cannot claim the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_takes_only_the_approved_file_and_sender_once_on_one_vault() {
    const ROWS: u64 = 200;
    const OTHER_VAULT: &str = "vault-b";
    let dir = import_dir();
    dir.add_client_identity(OTHER_VAULT);
    let keyservice_toml = dir.path().join("keyservice.toml");
    let text = std::fs::read_to_string(&keyservice_toml).unwrap();
    let vault_line = format!(
        "vault_identities = [\"uri:{}\"]",
        identity(integration_tests::VAULT)
    );
    assert!(text.contains(&vault_line), "{text}");
    std::fs::write(
        &keyservice_toml,
        text.replace(
            &vault_line,
            &format!(
                "vault_identities = [\"uri:{}\", \"uri:{}\"]",
                identity(integration_tests::VAULT),
                identity(OTHER_VAULT)
            ),
        ),
    )
    .unwrap();
    let stack = Stack::start_in(dir).await;
    let gpg = Gpg::new();
    let fingerprint = export_import_key(&stack, &gpg).await;
    let sender = gpg.generate("Old Vault <export@old-vault.example>");
    let impostor = gpg.generate("Impostor <export@impostor.example>");
    let receiver = gpg.generate("Other Receiver <r@example>");
    gpg.run(&["--quick-add-key", &receiver, "cv25519", "encr", "never"]);
    let work = stack.dir.path().to_path_buf();
    let sender_key = work.join("sender.asc");
    std::fs::write(&sender_key, gpg.export(&sender)).unwrap();
    let impostor_key = work.join("impostor.asc");
    std::fs::write(&impostor_key, gpg.export(&impostor)).unwrap();
    let signed = ["--sender-key", sender_key.to_str().unwrap()];
    let mapping = work.join("bound.mapping.csv");

    // File A is approved; file B has other cards, as many rows, the same sender.
    let a = make_file(&work, "a", ROWS, &gpg, &fingerprint, Some(&sender));
    let b = make_file_of(
        &work,
        "b",
        10_000..10_000 + ROWS,
        &gpg,
        &fingerprint,
        Some(&sender),
    );
    let job = propose(&stack, ADMIN, &a, ROWS, &signed).await;
    let approved = approve(&stack, IMPORTER, &job).await;
    assert!(approved.ok, "{}", approved.stderr);
    let digest = vault_client::file_sha256(&a).unwrap();
    assert!(approved.stdout.contains(&digest), "{}", approved.stdout);
    assert!(approved.stdout.contains(&sender), "{}", approved.stdout);

    let spool_file = work.join("vault-data-import").join(&job).join("file.pgp");
    let refused = |out: &Output, rule: &str| {
        assert!(!out.ok, "refused: {rule}");
        assert!(
            out.stderr.contains("nothing of it was stored") && out.stderr.contains(rule),
            "{rule}: {}",
            out.stderr
        );
        assert_no_pans(&out.stderr, 10_000 + ROWS, "the refusal");
        assert!(!spool_file.exists(), "the refused file is deleted");
    };
    let not_approved_file = "SHA-256 is not the one the job was approved for";
    refused(
        &import(&stack, &b, &job, &mapping, &signed).await,
        not_approved_file,
    );
    // Checked before decryption: a file the vault cannot even open is refused for its
    // digest, not for its encryption.
    let foreign = make_file(
        &work,
        "foreign",
        ROWS,
        &gpg,
        "Other Receiver",
        Some(&sender),
    );
    refused(
        &import(&stack, &foreign, &job, &mapping, &signed).await,
        not_approved_file,
    );
    // The approved file, with another sender key than the approved one, or none.
    refused(
        &import(
            &stack,
            &a,
            &job,
            &mapping,
            &["--sender-key", impostor_key.to_str().unwrap()],
        )
        .await,
        "not the one the job was approved for",
    );
    refused(
        &import(&stack, &a, &job, &mapping, &[]).await,
        "give the sender key",
    );
    // A job approved without a sender key takes none (strict).
    let unsigned_job = approved_job(&stack, &a, ROWS, &[]).await;
    let out = import(&stack, &a, &unsigned_job, &mapping, &signed).await;
    assert!(
        !out.ok && out.stderr.contains("approved without a sender key"),
        "{}",
        out.stderr
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        records(&stack).await,
        0,
        "nothing of any of them was stored"
    );

    // The approved file and key go through.
    let out = import(&stack, &a, &job, &mapping, &signed).await;
    assert!(out.ok, "{}", out.stderr);
    let tokens = check_mapping(&mapping, ROWS);
    wait_for_records(&stack, tokens.len() as u64).await;

    // Claimed once: another vault identity can neither take over the job this vault
    // started (running) nor one it finished, nor finish it.
    let channel = integration_tests::raw_channel(&stack.dir, OTHER_VAULT, stack.keyservice_addr)
        .await
        .unwrap();
    let mut other = vault_proto::keys::v1::key_service_client::KeyServiceClient::new(channel);
    let job_of = |id: &str| vault_proto::keys::v1::GetJobRequest { id: id.to_owned() };
    let running = other
        .get_job(job_of(&unsigned_job))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        running.state,
        vault_proto::keys::v1::ProposalState::Running as i32
    );
    assert!(
        running
            .claimed_by
            .ends_with(&identity(integration_tests::VAULT)),
        "{}",
        running.claimed_by
    );
    let done = other.get_job(job_of(&job)).await.unwrap().into_inner();
    assert_eq!(
        done.state,
        vault_proto::keys::v1::ProposalState::Done as i32
    );
    for (id, rule) in [
        (&unsigned_job, "already running on vault identity"),
        (&job, "an approval is used once"),
    ] {
        let claim = other
            .claim_job(vault_proto::keys::v1::ClaimJobRequest {
                id: id.clone(),
                tenant: "acme".into(),
                kind: vault_proto::keys::v1::OperationKind::Import as i32,
            })
            .await
            .unwrap_err();
        assert_eq!(claim.code(), tonic::Code::FailedPrecondition, "{claim:?}");
        assert!(claim.message().contains(rule), "{}", claim.message());
    }
    let finish = other
        .finish_job(vault_proto::keys::v1::FinishJobRequest {
            id: unsigned_job.clone(),
            tenant: "acme".into(),
            kind: vault_proto::keys::v1::OperationKind::Import as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(finish.code(), tonic::Code::FailedPrecondition);

    // The vault's audit log has the claims and the finish.
    let out = vaultctl(&config_for(&stack, ADMIN), &["audit", "export"], "").await;
    assert!(out.ok, "{}", out.stderr);
    for action in ["ClaimImport", "FinishImport"] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.contains(action) && l.contains(&job)),
            "{action}: {}",
            out.stdout
        );
    }
    stack.stop().await;
}
