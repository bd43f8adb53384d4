//! vault-bench, the real binary, against a test stack: a smoke test that each way of
//! offering load works and reports what it should. Not a timing gate: it asserts
//! calls were made and answered, never how fast.

use integration_tests::{ADMIN, Stack, binary};
use serde_json::Value;

/// Runs `vault-bench` as `ADMIN` for 2 s (after 1 s of warm-up) with `args`; returns
/// its JSON report.
async fn vault_bench(stack: &Stack, name: &str, args: &[&str]) -> Value {
    let dir = stack.dir.path();
    let config = dir.join("vault-bench.toml");
    std::fs::write(
        &config,
        format!(
            "vault_endpoint = \"https://localhost:{}\"\nca_file = \"ca.pem\"\n\
             cert_file = \"{ADMIN}.pem\"\nkey_file = \"{ADMIN}.key\"\n",
            stack.vault_addr.port()
        ),
    )
    .unwrap();
    let json = dir.join(format!("{name}.json"));
    let output = tokio::process::Command::new(binary("vault-bench"))
        .arg("--config")
        .arg(&config)
        .args(["--duration", "2", "--warmup", "1", "--connections", "2"])
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{name}: {stdout}\n{stderr}");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(report["calls"].as_u64().unwrap() > 0, "{name}: {report}");
    assert!(
        report["calls_per_sec"].as_f64().unwrap() > 0.0,
        "{name}: {report}"
    );
    assert_eq!(report["errors"], serde_json::json!({}), "{name}: {report}");
    let latency = &report["latency_ms"];
    for field in ["p50", "p90", "p99", "p999", "max"] {
        assert!(
            latency[field].as_f64().unwrap() > 0.0,
            "{name}: {field}: {report}"
        );
    }
    assert!(latency["p50"].as_f64() <= latency["max"].as_f64());
    // No card number (13 or more digits in a row) is ever printed.
    let longest_digit_run = format!("{stdout}{stderr}")
        .split(|c: char| !c.is_ascii_digit())
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(longest_digit_run < 13, "{stdout}{stderr}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_bench_runs_tokenize_echo_and_open_loop() {
    let stack = Stack::start().await;

    let tokenize = vault_bench(
        &stack,
        "tokenize",
        &["--scenario", "tokenize", "--in-flight", "4"],
    )
    .await;
    assert_eq!(tokenize["scenario"], "tokenize");
    assert_eq!(tokenize["in_flight_per_connection"], 4);
    assert!(tokenize["open_loop"].is_null());

    let echo = vault_bench(&stack, "echo", &["--scenario", "echo", "--in-flight", "4"]).await;
    assert_eq!(echo["scenario"], "echo");

    let open = vault_bench(
        &stack,
        "open-loop",
        &[
            "--scenario",
            "tokenize",
            "--rate",
            "100",
            "--max-outstanding",
            "64",
        ],
    )
    .await;
    assert!(open["in_flight_per_connection"].is_null());
    let schedule = &open["open_loop"];
    assert_eq!(schedule["target_rate"], 100);
    assert_eq!(schedule["max_outstanding"], 64);
    // 2 s at 100/s: every scheduled call is accounted for, answered or not issued.
    let scheduled = schedule["scheduled"].as_u64().unwrap();
    assert_eq!(scheduled, 200, "{open}");
    assert_eq!(
        open["calls"].as_u64().unwrap()
            + schedule["not_issued"].as_u64().unwrap()
            + schedule["unfinished"].as_u64().unwrap(),
        scheduled,
        "{open}"
    );
    assert!(schedule["max_issue_lag_ms"].as_f64().is_some());

    stack.stop().await;
}
