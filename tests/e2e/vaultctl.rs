//! vaultctl, the real binary, against a running stack.

use std::process::Stdio;

use integration_tests::{ADMIN, OFFICER, Stack, binary};
use tokio::io::AsyncWriteExt;

pub(crate) struct Output {
    pub(crate) ok: bool,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

pub(crate) async fn vaultctl(config: &std::path::Path, args: &[&str], stdin: &str) -> Output {
    let mut child = tokio::process::Command::new(binary("vaultctl"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    // A command refused on its arguments exits without reading its input.
    if let Err(e) = input.write_all(stdin.as_bytes()).await {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    drop(input);
    let output = child.wait_with_output().await.unwrap();
    Output {
        ok: output.status.success(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// A vaultctl config file acting as `name` against `stack`.
pub(crate) fn config_for(stack: &Stack, name: &str) -> std::path::PathBuf {
    let config = stack.dir.path().join(format!("vaultctl-{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "vault_endpoint = \"https://localhost:{}\"\nkeyservice_endpoint = \"https://localhost:{}\"\n\
             ca_file = \"ca.pem\"\ncert_file = \"{name}.pem\"\nkey_file = \"{name}.key\"\n",
            stack.vault_addr.port(),
            stack.keyservice_addr.port()
        ),
    )
    .unwrap();
    // Whatever the umask: vaultctl refuses a config others could write.
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    config
}

/// Attack: a `.dev/vaultctl.toml` planted in a shared parent directory (`/tmp`),
/// pointing at the attacker's server, for an operator working in a directory below it.
/// vaultctl never reads it; nor a config in this directory that others may write.
///
/// Control: PCI-8.3.2 (docs/compliance.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vaultctl_reads_no_planted_or_writable_config() {
    use std::os::unix::fs::PermissionsExt;
    let shared = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let planted = shared.path().join(".dev");
    std::fs::create_dir(&planted).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = planted.join("vaultctl.toml");
    std::fs::write(&config, "vault_endpoint = \"https://attacker.invalid:1\"\n").unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let below = shared.path().join("anything");
    std::fs::create_dir(&below).unwrap();
    // What `vaultctl health` says (it prints each service's state, errors included).
    let run = |dir: &std::path::Path| {
        let output = std::process::Command::new(binary("vaultctl"))
            .arg("health")
            .current_dir(dir)
            .env("HOME", home.path())
            .env_remove("VAULTCTL_CONFIG")
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&[output.stdout, output.stderr].concat()).into_owned()
    };
    // From below: the planted file is not read at all.
    let said = run(&below);
    assert!(said.contains("no vault-endpoint configured"), "{said}");
    assert!(!said.contains("attacker"), "{said}");
    // In its own directory it is read, unless others may write it or its directory.
    for (file_mode, dir_mode) in [(0o666, 0o755), (0o644, 0o777)] {
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(file_mode)).unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(dir_mode)).unwrap();
        let said = run(shared.path());
        assert!(said.contains("may be written by group or others"), "{said}");
    }
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let said = run(shared.path());
    // Read once it is safe: the endpoint came from it (the TLS files it lacks did not).
    assert!(said.contains("no ca-file configured"), "{said}");
    assert!(!said.contains("no vault-endpoint configured"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_info_delete_keys_and_health_through_vaultctl() {
    let stack = Stack::start().await;
    let config = config_for(&stack, ADMIN);

    let out = vaultctl(
        &config,
        &["tokenize", "--exp", "12/2030"],
        "4242 4242 4242 4242\n",
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let token = out.stdout.trim().to_owned();
    assert!(token.starts_with("tok_") && token.len() == 26, "{token}");

    let out = vaultctl(&config, &["info", &token, "--json"], "").await;
    assert!(out.ok, "{}", out.stderr);
    let info: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(info["last_four"], "4242");
    assert_eq!(info["brand"], "visa");
    assert_eq!(info["token"], token.as_str());
    assert!(!out.stdout.contains("4242424242424242"));

    let json_card = r#"{"number": "5555555555554444", "exp_month": 3, "exp_year": 2031, "name": "Ada Lovelace"}"#;
    let out = vaultctl(&config, &["tokenize", "--json"], json_card).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains("\"last_four\": \"4444\"") && out.stdout.contains("mastercard"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("Ada") && !out.stdout.contains("5555555555554444"));

    // Headers from a file keep credentials out of argv.
    let headers_file = stack.dir.path().join("forward-headers");
    std::fs::write(&headers_file, "content-type: application/json\n").unwrap();
    let out = vaultctl(
        &config,
        &[
            "forward",
            "--processor",
            "sandbox",
            "--path",
            "/v1/charges",
            "--token",
            &token,
            "--header-file",
            headers_file.to_str().unwrap(),
            "--header",
            "x-sandbox-echo: 1",
            "--body",
            r#"{"number":"{{card.number}}","exp_month":"{{card.exp_month}}","exp_year":"{{card.exp_year}}"}"#,
        ],
        "",
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.starts_with("HTTP 200"), "{}", out.stdout);
    assert!(
        out.stdout.contains("************4242") && !out.stdout.contains("4242424242424242"),
        "{}",
        out.stdout
    );
    let received = stack.sandbox.requests();
    assert_eq!(received.len(), 1);
    assert!(String::from_utf8_lossy(&received[0].body).contains("4242424242424242"));

    let out = vaultctl(&config, &["delete", &token], "").await;
    assert!(out.ok, "{}", out.stderr);
    let out = vaultctl(&config, &["info", &token], "").await;
    assert!(!out.ok);
    assert!(out.stderr.contains("NotFound"), "{}", out.stderr);

    let out = vaultctl(
        &config,
        &["tokenize", "--exp", "12/2030"],
        "4242424242424241\n",
    )
    .await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains("card.number") && out.stderr.contains("luhn"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("4242424242424241"), "{}", out.stderr);

    let out = vaultctl(&config, &["tokenize"], "4242424242424242\n").await;
    assert!(!out.ok && out.stderr.contains("--exp"), "{}", out.stderr);
    assert!(!out.stderr.contains("4242424242424242"));

    let out = vaultctl(&config, &["keys", "list"], "").await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains("card-data") && out.stdout.contains("active"),
        "{}",
        out.stdout
    );

    let out = vaultctl(&config, &["health"], "").await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains("vault: serving") && out.stdout.contains("keyservice: serving"),
        "{}",
        out.stdout
    );
    stack.stop().await;
}

/// Control: PCI-3.7.5 (docs/compliance.md).
/// Attack: one operator rotates and destroys a key with the CLI alone; destruction needs a
/// second admin's approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_rewrap_and_destroy_under_dual_control_through_vaultctl() {
    let stack = Stack::start().await;
    let admin = config_for(&stack, ADMIN);
    let officer = config_for(&stack, OFFICER);
    let mut tokens = Vec::new();
    for pan in ["4242424242424242", "5555555555554444", "378282246310005"] {
        let out = vaultctl(&admin, &["tokenize", "--exp", "12/2030"], pan).await;
        assert!(out.ok, "{}", out.stderr);
        tokens.push(out.stdout.trim().to_owned());
    }

    let out = vaultctl(&admin, &["keys", "rotate", "--purpose", "card-data"], "").await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("rotated card-data: version 2 is active; version 1 is now decrypt-only"),
        "{}",
        out.stdout
    );
    // Wait until the vault uses version 2, then rewrap and wait for the end.
    let started = std::time::Instant::now();
    loop {
        let out = vaultctl(&admin, &["keys", "rewrap", "--status"], "").await;
        assert!(out.ok, "{}", out.stderr);
        if out.stdout.contains("card-data v2") {
            break;
        }
        assert!(started.elapsed().as_secs() < 20, "{}", out.stdout);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let out = vaultctl(&admin, &["keys", "rewrap"], "").await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("rewrap finished: 3 records re-encrypted onto card-data v2"),
        "{}",
        out.stdout
    );
    for token in &tokens {
        let out = vaultctl(&admin, &["info", token, "--json"], "").await;
        let info: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(info["key_version"], 2);
    }

    // keys list shows states, budget use and record counts (once reported).
    let started = std::time::Instant::now();
    let listing = loop {
        let out = vaultctl(&admin, &["keys", "list", "--json"], "").await;
        assert!(out.ok, "{}", out.stderr);
        let listing: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let v2 = listing["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["purpose"] == "card-data" && v["version"] == 2)
            .cloned()
            .unwrap();
        if v2["records"] == 3 {
            break listing;
        }
        assert!(started.elapsed().as_secs() < 20, "{listing}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let v1 = listing["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["purpose"] == "card-data" && v["version"] == 1)
        .unwrap();
    assert_eq!(
        (v1["state"].as_str(), v1["records"].as_u64()),
        (Some("decrypt-only"), Some(0))
    );
    assert!(v1["encryptions_leased"].as_u64().unwrap() >= 3);

    // Propose as admin, refuse self-approval, approve as officer.
    // Refused until the destroy grace period (1 s in tests) has passed since rotation.
    let started = std::time::Instant::now();
    let out = loop {
        let out = vaultctl(&admin, &["keys", "propose", "destroy", "1"], "").await;
        if out.ok {
            break out;
        }
        assert!(out.stderr.contains("too recently"), "{}", out.stderr);
        assert!(started.elapsed().as_secs() < 20, "{}", out.stderr);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let id = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("proposal id: "))
        .unwrap()
        .trim()
        .to_owned();
    let out = vaultctl(&admin, &["keys", "approve", &id], "").await;
    assert!(!out.ok);
    assert!(out.stderr.contains("dual control"), "{}", out.stderr);
    let out = vaultctl(&officer, &["keys", "approve", &id], "").await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains("destroyed card-data version 1"),
        "{}",
        out.stdout
    );
    let out = vaultctl(&officer, &["keys", "approve", &id], "").await;
    assert!(
        !out.ok && out.stderr.contains("already approved"),
        "{}",
        out.stderr
    );

    let out = vaultctl(&admin, &["keys", "history"], "").await;
    assert!(out.ok, "{}", out.stderr);
    for action in ["rotate", "propose", "approve"] {
        assert!(out.stdout.contains(action), "{}", out.stdout);
    }
    for token in &tokens {
        let out = vaultctl(&admin, &["info", token], "").await;
        assert!(out.ok, "{}", out.stderr);
    }
    stack.stop().await;
}

/// Control: PCI-10.2.1.2, PCI-10.2.1.5 (docs/compliance.md).
/// Attack: change access rights unnoticed, or load a broken policy hoping it opens access,
/// or run administrative operations (a rewrap, a backup) unlogged; the bad policy is
/// refused, the old one stays, and the refused reload, the rewrap and the backup are in
/// the audit log under the admin's identity, with the calls before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_and_audit_through_vaultctl() {
    let stack = Stack::start().await;
    let admin = config_for(&stack, ADMIN);
    let out = vaultctl(
        &admin,
        &["tokenize", "--exp", "12/2030"],
        "4242424242424242",
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let token = out.stdout.trim().to_owned();

    // Offline check, then reload: a bad file is refused and the old policy stays.
    let policy = stack.dir.path().join("policy.toml");
    let good = std::fs::read_to_string(&policy).unwrap();
    let out = vaultctl(&admin, &["policy", "check", policy.to_str().unwrap()], "").await;
    assert!(
        out.ok && out.stdout.contains("valid"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    std::fs::write(&policy, good.replace("\"read\"", "\"raed\"")).unwrap();
    let out = vaultctl(&admin, &["policy", "check", policy.to_str().unwrap()], "").await;
    assert!(!out.ok && out.stderr.contains("raed"), "{}", out.stderr);
    let out = vaultctl(&admin, &["policy", "reload"], "").await;
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.stderr.contains("raed") && out.stderr.contains("previous policy stays"),
        "{}",
        out.stderr
    );
    std::fs::write(&policy, &good).unwrap();
    let out = vaultctl(&admin, &["policy", "reload"], "").await;
    assert!(
        out.ok && out.stdout.contains("policy reloaded"),
        "{}",
        out.stderr
    );

    // Administrative operations: a rewrap, and a backup (RocksDB only; on PostgreSQL
    // the call is refused, and audited all the same).
    let out = vaultctl(&admin, &["keys", "rewrap"], "").await;
    assert!(out.ok, "{}", out.stderr);
    let out = vaultctl(&admin, &["backup", "create", "audited"], "").await;
    assert!(out.ok || integration_tests::on_postgres(), "{}", out.stderr);

    // The audit log tells what happened, verifies, and exports as JSON lines.
    let out = vaultctl(&admin, &["audit", "tail", "-n", "100"], "").await;
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("Tokenize ok"), "{}", out.stdout);
    assert!(
        out.stdout.contains(&format!("token={token}")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("PolicyReload FAILED_PRECONDITION"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("StartRewrap ok"), "{}", out.stdout);
    let backup = if integration_tests::on_postgres() {
        "CreateBackup "
    } else {
        "CreateBackup ok"
    };
    assert!(out.stdout.contains(backup), "{}", out.stdout);
    assert!(!out.stdout.contains("4242424242424242"));
    let out = vaultctl(&admin, &["audit", "verify"], "").await;
    assert!(
        out.ok && out.stdout.contains("audit log intact"),
        "{}",
        out.stdout
    );
    let out = vaultctl(&admin, &["audit", "export"], "").await;
    assert!(out.ok, "{}", out.stderr);
    let events: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.len() >= 5, "{}", out.stdout);
    assert!(
        events
            .windows(2)
            .all(|w| w[0]["sequence"].as_u64() < w[1]["sequence"].as_u64())
    );

    let out = vaultctl(&admin, &["blocks", "list"], "").await;
    assert!(out.ok && out.stdout.contains("no blocks"), "{}", out.stdout);
    stack.stop().await;
}

/// Control: PCI-3.2.1, GDPR-15 (docs/compliance.md).
/// Attack: an operator's retention or erasure through the CLI does not take effect; a TTL
/// given to the CLI is the token's, and after `subject erase` the card has no token left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_and_subject_erasure_through_vaultctl() {
    let stack = Stack::start().await;
    let admin = config_for(&stack, ADMIN);
    let mut tokens = Vec::new();
    for exp in ["12/2030", "01/2031"] {
        let out = vaultctl(&admin, &["tokenize", "--exp", exp], "4242424242424242").await;
        assert!(out.ok, "{}", out.stderr);
        tokens.push(out.stdout.trim().to_owned());
    }
    let out = vaultctl(
        &admin,
        &["tokenize", "--exp", "12/2030", "--ttl", "30d", "--json"],
        "5555555555554444",
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let info: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let ttl_ms =
        info["expires_at_unix_ms"].as_i64().unwrap() - info["created_at_unix_ms"].as_i64().unwrap();
    assert!(
        (30 * 86_400_000 - 5_000..=30 * 86_400_000).contains(&ttl_ms),
        "{ttl_ms}"
    );
    let out = vaultctl(
        &admin,
        &["tokenize", "--exp", "12/2030", "--ttl", "3w"],
        "4242424242424242",
    )
    .await;
    assert!(!out.ok && out.stderr.contains("unit"), "{}", out.stderr);

    let out = vaultctl(&admin, &["subject", "find"], "4242 4242 4242 4242\n").await;
    assert!(out.ok, "{}", out.stderr);
    let mut found: Vec<&str> = out.stdout.lines().collect();
    found.sort();
    let mut expected: Vec<&str> = tokens.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(found, expected);
    let out = vaultctl(&admin, &["subject", "erase"], "4242424242424242").await;
    assert!(
        out.ok && out.stderr.contains("erased 2 tokens"),
        "{}",
        out.stderr
    );
    let out = vaultctl(&admin, &["subject", "find"], "4242424242424242").await;
    assert!(out.ok && out.stdout.trim().is_empty(), "{}", out.stdout);
    assert!(!out.stderr.contains("4242424242424242"));
    stack.stop().await;
}
