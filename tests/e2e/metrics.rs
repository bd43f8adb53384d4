//! The admin port: Prometheus metrics with low-cardinality labels (never a token or an
//! identity) and a plain health check that shows a degraded vault.

use integration_tests::{ADMIN, READER, Stack, identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vault_client::Card;

/// `GET path` on the admin port: (status code, body).
async fn get(stack: &Stack, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(stack.vault_admin_addr)
        .await
        .unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_calls_and_records_without_tokens_or_identities() {
    let mut stack = Stack::start().await;
    let mut admin = stack.client(ADMIN).await;
    let mut tokens = Vec::new();
    for pan in ["4242424242424242", "5555555555554444"] {
        tokens.push(
            admin
                .tokenize(Card::new(pan, 12, 2030), false)
                .await
                .unwrap()
                .token,
        );
    }
    let mut reader = stack.client(READER).await;
    assert!(reader.delete(&tokens[0]).await.is_err());

    let (status, metrics) = get(&stack, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"tokenvault_rpc_calls_total{method="Tokenize",code="ok"} 2"#,
        r#"tokenvault_rpc_calls_total{method="DeleteToken",code="PERMISSION_DENIED"} 1"#,
        r#"tokenvault_records{purpose="card-data",version="1"} 2"#,
        r#"tokenvault_active_key_version{purpose="card-data"} 1"#,
        "tokenvault_keyservice_connected 1",
        "tokenvault_rewrap_remaining 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line}:\n{metrics}"
        );
    }
    assert!(
        metrics.contains(r#"tokenvault_rpc_seconds_count{method="Tokenize"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"tokenvault_events_total{kind="audit"}"#));
    for token in &tokens {
        assert!(!metrics.contains(token.as_str()));
    }
    assert!(!metrics.contains(&identity(ADMIN)) && !metrics.contains("127.0.0.1"));
    assert!(!metrics.contains("4242424242424242"));

    let (status, health) = get(&stack, "/healthz").await;
    assert_eq!((status, health.trim()), (200, "serving"));
    stack.stop_keyservice().await;
    let started = std::time::Instant::now();
    loop {
        let (status, health) = get(&stack, "/healthz").await;
        if health.starts_with("degraded") {
            assert_eq!(status, 200, "degraded still serves");
            break;
        }
        assert!(started.elapsed().as_secs() < 5, "{health}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, metrics) = get(&stack, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "tokenvault_keyservice_connected 0")
    );
    assert_eq!(get(&stack, "/nope").await.0, 404);
    stack.start_keyservice().await;
    stack.stop().await;
}
