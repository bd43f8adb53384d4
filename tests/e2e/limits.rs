//! Connection limits on the real vault: silent handshakes and idle authenticated
//! connections by the thousand do not keep a new caller out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::{ADMIN, Stack, StackDir};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use vault_client::Card;

const SILENT: usize = 10_000;
const IDLE: usize = 2_000;

/// The test process holds both ends of every connection (the vault runs in-process):
/// it needs `SILENT + IDLE` descriptors for its own ends plus the vault's (at most
/// `max_connections + max_handshakes` for these, and its files). The soft
/// open-files limit is raised to the hard one (Debian's default soft limit is 1024;
/// the hard one is far higher); below what is needed the test says so and fails.
fn raise_open_files_limit(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= needed,
        "this test needs {needed} open files; the hard limit is {hard} (raise it, e.g. `ulimit -Hn {needed}` as root)"
    );
    if soft < needed {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
}

/// A client TLS config presenting `name`'s certificate, speaking h2: an authenticated
/// connection without any call on it.
fn tls_client(dir: &StackDir, name: &str) -> Arc<rustls::ClientConfig> {
    let read = |file: &str| std::fs::read(dir.path().join(file)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut read("ca.pem").as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain = rustls_pemfile::certs(&mut read(&format!("{name}.pem")).as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut read(&format!("{name}.key")).as_slice())
        .unwrap()
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Whether the server has closed `stream` (a read ends or fails within `wait`).
async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, wait: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue, // the server's HTTP/2 settings
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_silent_and_idle_connections_leave_room_for_a_new_caller() {
    raise_open_files_limit((SILENT + IDLE) as u64 + 2_500);
    let stack = Stack::start().await;
    let addr = stack.vault_addr;
    let connector = tokio_rustls::TlsConnector::from(tls_client(&stack.dir, ADMIN));
    let server_name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // Authenticated and idle: the handshake done, no call ever made.
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE / 50 {
        let opened = (0..50).map(|_| {
            let (connector, server_name) = (connector.clone(), server_name.clone());
            tokio::spawn(async move {
                let tcp = TcpStream::connect(addr).await.unwrap();
                connector.connect(server_name, tcp).await.unwrap()
            })
        });
        for connection in opened {
            idle.push(connection.await.unwrap());
        }
    }
    // Silent: connected, never a byte of handshake.
    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }

    // A new caller: connected, handshaken and answered within a second.
    let started = Instant::now();
    let mut client = stack.client(ADMIN).await;
    client
        .tokenize(Card::new("4242424242424242", 12, 2030), false)
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "a new caller waited {took:?}"
    );

    // The vault kept at most max_connections (1024 by default) of the idle ones, and
    // at most max_handshakes (128) of the silent ones: the rest it closed.
    let mut idle_closed = 0;
    for connection in &mut idle {
        if closed_by_server(connection, Duration::from_millis(2)).await {
            idle_closed += 1;
        }
    }
    assert!(
        idle_closed >= IDLE - 1024,
        "{idle_closed} of {IDLE} idle connections closed"
    );
    let mut silent_open = 0;
    for connection in silent.iter_mut().rev().take(1_000) {
        if !closed_by_server(connection, Duration::from_millis(2)).await {
            silent_open += 1;
        }
    }
    assert!(
        silent_open <= 128,
        "{silent_open} silent connections still open"
    );
    stack.stop().await;
}

/// A connection with no call in flight for `idle_secs` is closed by the vault; one
/// whose caller keeps calling is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_idle_secs() {
    let mut stack = Stack::start().await;
    stack.dir.set_limits("idle_secs = 1\n");
    stack.restart_vault().await;
    let connector = tokio_rustls::TlsConnector::from(tls_client(&stack.dir, ADMIN));
    let tcp = TcpStream::connect(stack.vault_addr).await.unwrap();
    let mut idle = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    // A caller that keeps calling (every 200 ms) is never idle that long: every call on
    // its one connection succeeds while the idle one is closed.
    let mut client = stack.client(ADMIN).await;
    let busy = tokio::spawn(async move {
        for _ in 0..15 {
            client
                .tokenize(Card::new("4242424242424242", 12, 2030), false)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let started = Instant::now();
    let closed = closed_by_server(&mut idle, Duration::from_secs(5)).await;
    assert!(closed, "an idle connection was kept");
    assert!(started.elapsed() >= Duration::from_millis(900));
    busy.await.unwrap();
    stack.stop().await;
}

/// The admin port serves a few short connections at a time: silent ones beyond its
/// cap are closed at once, the others after the header timeout, and a scraper is
/// served again after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_to_the_admin_port_are_cut() {
    let stack = Stack::start().await;
    let addr = stack.vault_admin_addr;
    let mut silent = Vec::new();
    for _ in 0..runtime::admin::MAX_CONNECTIONS + 8 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let started = Instant::now();
    let mut closed_at_once = 0;
    for connection in silent.iter_mut().rev().take(8) {
        if closed_by_server(connection, Duration::from_millis(500)).await {
            closed_at_once += 1;
        }
    }
    assert_eq!(
        closed_at_once, 8,
        "connections beyond the cap are closed at once"
    );
    for connection in &mut silent {
        assert!(closed_by_server(connection, runtime::admin::HEADER_TIMEOUT * 2).await);
    }
    let took = started.elapsed();
    assert!(
        took >= runtime::admin::HEADER_TIMEOUT - Duration::from_millis(600),
        "{took:?}"
    );
    let (status, body) = integration_tests::http_get(addr, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "serving"));
    stack.stop().await;
}

/// A server stream is a call in flight for as long as it lasts: a health watch (as the
/// vaults' key watch on the keyservice) outlives `idle_secs` on its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_open_longer_than_idle_secs_is_not_idle() {
    let mut stack = Stack::start().await;
    stack.dir.set_limits("idle_secs = 1\n");
    stack.restart_vault().await;
    let channel = integration_tests::raw_channel(&stack.dir, ADMIN, stack.vault_addr)
        .await
        .unwrap();
    let mut watch = tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap();
    assert!(first.is_some());
    // Nothing changes; the stream must simply stay open past the idle limit.
    let next = tokio::time::timeout(Duration::from_millis(2_500), watch.message()).await;
    assert!(next.is_err(), "the stream ended or failed: {next:?}");
    // A shutdown closes it after its grace period.
    let stopping = Instant::now();
    stack.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "{:?}",
        stopping.elapsed()
    );
    drop(watch);
}
