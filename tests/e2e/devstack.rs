//! The dev stack as a newcomer runs it (`make run`: the real devstack binary with its
//! generated CA, identities and configs, here on free ports), tried with what people
//! already use:
//! - the README's audit commands, as printed, with the auditor identity (who can read
//!   the audit log and do nothing else);
//! - the Python example client (`clients/python`, stubs generated from proto/ by
//!   grpcio-tools): tokenize, info, forward, a refused card;
//! - gRPC server reflection, through a client we did not write (grpcio-reflection's
//!   v1alpha descriptor database, and dynamic protobuf messages, no generated code) on
//!   both servers, and through v1, which must list the same services.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::{binary, python_tool};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The real devstack binary in a fresh directory, stopped with Ctrl-C (SIGINT) as a
/// person would, so that it stops its services too.
struct DevStack {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    output: Arc<Mutex<String>>,
}

impl DevStack {
    /// `--free-ports` releases the ports it found before the services bind them, so
    /// another test can take one in between: such a start is tried again.
    async fn start() -> Self {
        for _ in 0..3 {
            match Self::try_start().await {
                Ok(stack) => return stack,
                Err(output) if output.contains("Address already in use") => continue,
                Err(output) => panic!("devstack exited: {output}"),
            }
        }
        panic!("devstack found no free ports in three tries");
    }

    async fn try_start() -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(binary("devstack"))
            .arg("--dir")
            .arg(dir.path().join("dev"))
            .arg("--free-ports")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let (up_tx, up_rx) = tokio::sync::oneshot::channel();
        let mut up_tx = Some(up_tx);
        let pipes: [Box<dyn tokio::io::AsyncRead + Unpin + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        let mut readers = Vec::new();
        for pipe in pipes {
            let output = Arc::clone(&output);
            let mut up = up_tx.take();
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("Dev stack is up")
                        && let Some(up) = up.take()
                    {
                        let _ = up.send(());
                    }
                    let mut out = output.lock().unwrap();
                    out.push_str(&line);
                    out.push('\n');
                }
            }));
        }
        let up = tokio::time::timeout(Duration::from_secs(60), up_rx)
            .await
            .unwrap_or_else(|_| panic!("dev stack not up: {}", output.lock().unwrap()));
        if up.is_err() {
            // Exited: everything it printed, once its pipes are drained.
            let _ = child.wait().await;
            for reader in readers {
                reader.await.unwrap();
            }
            return Err(output.lock().unwrap().clone());
        }
        Ok(Self { child, dir, output })
    }

    fn dir(&self) -> PathBuf {
        self.dir.path().join("dev")
    }

    /// `host:port` and the TLS files of `identity`, from its vaultctl config.
    fn endpoint(&self, key: &str) -> String {
        let config = std::fs::read_to_string(self.dir().join("vaultctl.toml")).unwrap();
        let line = config
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = \"https://")))
            .unwrap_or_else(|| panic!("no {key} in {config}"));
        line.trim_end_matches('"').to_owned()
    }

    /// A command printed in the dev stack's welcome text, found by what it starts with
    /// (after the vaultctl path).
    fn printed_command(&self, rest: &str) -> Vec<String> {
        let output = self.output.lock().unwrap();
        let line = output
            .lines()
            .map(str::trim)
            .find(|l| l.contains("vaultctl") && l.contains(rest))
            .unwrap_or_else(|| panic!("the dev stack printed no `{rest}` command:\n{output}"));
        line.split_whitespace().map(str::to_owned).collect()
    }

    async fn stop(mut self) {
        let pid = self.child.id().unwrap();
        let status = std::process::Command::new("kill")
            .arg("-INT")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("devstack did not stop on SIGINT")
            .unwrap();
        assert!(exit.success(), "devstack: {exit}");
    }
}

/// Runs a program to completion with `stdin`, returning (success, stdout, stderr).
fn run(command: &mut std::process::Command, stdin: &str) -> (bool, String, String) {
    use std::io::Write as _;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `vaultctl --config CONFIG ARGS` with `stdin`, returning (success, stdout, stderr).
fn vaultctl(config: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    run(
        std::process::Command::new(binary("vaultctl"))
            .arg("--config")
            .arg(config)
            .args(args),
        stdin,
    )
}

/// The dev stack runs on RocksDB whatever the suite's storage: once is enough.
fn skip_on_postgres() -> bool {
    integration_tests::rocksdb_only("the dev stack runs on RocksDB; the RocksDB run covers it")
}

/// Control: PCI-10.3.1 (docs/compliance.md).
/// Attack: an identity without `audit` (a service, an admin of keys) reads the audit log;
/// only the auditor identity can.
#[tokio::test(flavor = "multi_thread")]
async fn readme_audit_commands_work_for_the_dev_auditor_and_nothing_else() {
    if skip_on_postgres() {
        return;
    }
    let stack = DevStack::start().await;
    let admin = stack.dir().join("vaultctl.toml");
    let auditor = stack.dir().join("vaultctl-auditor.toml");
    assert!(auditor.exists(), "devstack wrote no vaultctl-auditor.toml");

    // Something to audit.
    let (ok, token, err) = vaultctl(
        &admin,
        &["tokenize", "--exp", "12/2030"],
        "4242424242424242\n",
    );
    assert!(ok && token.trim().starts_with("tok_"), "{token}{err}");

    // The command the dev stack prints, exactly as printed.
    let printed = stack.printed_command("audit verify");
    let (ok, out, err) = run(
        std::process::Command::new(&printed[0]).args(&printed[1..]),
        "",
    );
    assert!(
        ok && out.contains("audit log intact"),
        "{printed:?}: {out}{err}"
    );
    // The README's commands, with the auditor's config.
    for args in [
        &["audit", "tail", "-n", "5"][..],
        &["audit", "export", "--since", "2026-01-01T00:00:00Z"],
    ] {
        let (ok, out, err) = vaultctl(&auditor, args, "");
        assert!(ok && out.contains("Tokenize"), "{args:?}: {out}{err}");
    }
    // The auditor reviews; it cannot tokenize, read tokens or administer keys.
    for (args, stdin) in [
        (&["tokenize", "--exp", "12/2030"][..], "5555555555554444\n"),
        (&["info", token.trim()], ""),
        (&["keys", "list"], ""),
    ] {
        let (ok, _, err) = vaultctl(&auditor, args, stdin);
        assert!(!ok && err.contains("PermissionDenied"), "{args:?}: {err}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_example_client_tokenizes_forwards_and_shows_a_refused_card() {
    if skip_on_postgres() {
        return;
    }
    let stack = DevStack::start().await;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stubs = tempfile::tempdir().unwrap();
    let (ok, out, err) = run(
        std::process::Command::new(repo.join("clients/python/generate.sh")).arg(stubs.path()),
        "",
    );
    assert!(ok, "generate.sh: {out}{err}");

    let (ok, out, err) = run(
        std::process::Command::new(python_tool("python"))
            .arg(repo.join("clients/python/example.py"))
            .arg("--config")
            .arg(stack.dir().join("vaultctl.toml"))
            .env("PYTHONPATH", stubs.path()),
        "",
    );
    assert!(ok, "example.py failed:\n{out}{err}");
    let token = out
        .split_whitespace()
        .find(|w| w.starts_with("tok_"))
        .unwrap_or_else(|| panic!("no token in:\n{out}"));
    assert!(out.contains("BRAND_VISA, last four 4242"), "{out}");
    assert!(
        out.contains("info: last four 4242, expires 12/2030"),
        "{out}"
    );
    assert!(
        out.contains("forward: HTTP 200") && out.contains("approved"),
        "{out}"
    );
    assert!(
        out.contains("bad card refused: INVALID_ARGUMENT: invalid card.number: fails the Luhn check (rule: luhn)"),
        "{out}"
    );
    // What went in never came back out: not the card, not the refused number, not the
    // CVC the sandbox received.
    for secret in ["4242424242424242", "4242424242424241"] {
        assert!(!out.contains(secret) && !err.contains(secret), "{out}{err}");
    }
    assert!(
        !integration_tests::contains_word(out.as_bytes(), b"123"),
        "{out}"
    );

    // The charge really happened through the vault: the token's forward is in the log.
    let (ok, log, err) = vaultctl(
        &stack.dir().join("vaultctl-auditor.toml"),
        &["audit", "tail", "-n", "20"],
        "",
    );
    assert!(ok, "{err}");
    assert!(
        log.lines()
            .any(|l| l.contains("Forward") && l.contains(token) && l.contains("sandbox")),
        "{log}"
    );
    stack.stop().await;
}

/// An mTLS channel to `endpoint` (`host:port`) as the dev identity `name`.
async fn channel(dir: &Path, endpoint: &str, name: &str) -> Channel {
    let read = |file: String| std::fs::read(dir.join(file)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem".into())))
        .identity(Identity::from_pem(
            read(format!("{name}.pem")),
            read(format!("{name}.key")),
        ))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://{endpoint}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The services a server lists through reflection v1 (tonic-reflection's client).
async fn list_services_v1(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_and_calls_both_servers_services_for_a_client_we_did_not_write() {
    if skip_on_postgres() {
        return;
    }
    let stack = DevStack::start().await;
    let dir = stack.dir();
    let reflect = |endpoint: &str, tokenize: Option<&str>| {
        let mut command = std::process::Command::new(python_tool("python"));
        command
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/reflection_client.py"))
            .args(["--target", endpoint])
            .arg("--ca")
            .arg(dir.join("ca.pem"))
            .arg("--cert")
            .arg(dir.join("admin.pem"))
            .arg("--key")
            .arg(dir.join("admin.key"));
        if tokenize.is_some() {
            command.arg("--tokenize");
        }
        let (ok, out, err) = run(&mut command, tokenize.unwrap_or(""));
        assert!(ok, "reflection_client.py: {out}{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };

    let vault = stack.endpoint("vault_endpoint");
    let keyservice = stack.endpoint("keyservice_endpoint");
    let seen = reflect(&vault, Some("4242424242424242\n"));
    let services: Vec<String> = serde_json::from_value(seen["services"].clone()).unwrap();
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "tokenvault.vault.v1.Vault",
        ],
        "vault"
    );
    let token = seen["token"].as_str().unwrap();
    assert!(token.starts_with("tok_"), "{seen}");
    // A real token: vaultctl reads it back.
    let (ok, info, err) = vaultctl(&dir.join("vaultctl.toml"), &["info", token], "");
    assert!(ok && info.contains("4242"), "{info}{err}");
    assert_eq!(
        list_services_v1(channel(&dir, &vault, "admin").await).await,
        services,
        "v1 and v1alpha list the same services"
    );

    let seen = reflect(&keyservice, None);
    let services: Vec<String> = serde_json::from_value(seen["services"].clone()).unwrap();
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "tokenvault.keys.v1.KeyService",
        ],
        "keyservice"
    );
    assert_eq!(
        list_services_v1(channel(&dir, &keyservice, "admin").await).await,
        services
    );
    stack.stop().await;
}
