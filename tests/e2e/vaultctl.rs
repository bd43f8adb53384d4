//! vaultctl, the real binary, against a running stack.

use std::process::Stdio;

use integration_tests::{ADMIN, Stack, binary};
use tokio::io::AsyncWriteExt;

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn vaultctl(config: &std::path::Path, args: &[&str], stdin: &str) -> Output {
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
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let output = child.wait_with_output().await.unwrap();
    Output {
        ok: output.status.success(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_info_delete_keys_and_health_through_vaultctl() {
    let stack = Stack::start().await;
    let config = stack.dir.path().join("vaultctl.toml");
    std::fs::write(
        &config,
        format!(
            "vault_endpoint = \"https://localhost:{}\"\nkeyservice_endpoint = \"https://localhost:{}\"\n\
             ca_file = \"ca.pem\"\ncert_file = \"{ADMIN}.pem\"\nkey_file = \"{ADMIN}.key\"\n",
            stack.vault_addr.port(),
            stack.keyservice_addr.port()
        ),
    )
    .unwrap();

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
