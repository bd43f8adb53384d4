use std::net::SocketAddr;
use std::time::Duration;

use integration_tests::{ADMIN, StackDir};
use runtime::shutdown;
use vault_client::{Card, VaultClient};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn set_listen_port(config: &std::path::Path, port: u16) {
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(
        config,
        // The listener only (the first address); the admin port stays on port 0.
        text.replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1),
    )
    .unwrap();
}

/// The vault waits (retrying) for its keys and serves nothing meanwhile; once the
/// keyservice comes up it starts by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vault_does_not_serve_without_its_keys() {
    let dir = StackDir::new();
    let (keyservice_port, vault_port) = (free_port(), free_port());
    let vault_config = dir.write_vault_config(keyservice_port);
    set_listen_port(&vault_config, vault_port);
    let settings = vault_server::Settings::load(&vault_config).unwrap();
    let (trigger, stop) = shutdown::channel();
    let mut starting = tokio::spawn({
        let stop = stop.clone();
        async move { vault_server::start(&settings, stop).await }
    });

    // A bounded look at a negative: still waiting, and nothing listens on the port.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), &mut starting)
            .await
            .is_err()
    );
    assert!(
        tokio::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], vault_port)))
            .await
            .is_err()
    );

    set_listen_port(&dir.path().join("keyservice.toml"), keyservice_port);
    let ks_settings = keyservice::Settings::load(&dir.path().join("keyservice.toml")).unwrap();
    let keyservice = keyservice::bind(&ks_settings).await.unwrap();
    let (ks_trigger, ks_stop) = shutdown::channel();
    let ks_task = tokio::spawn(keyservice.serve(ks_stop));

    let bound = tokio::time::timeout(Duration::from_secs(30), starting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(bound.local_addr().port(), vault_port);
    let serving = tokio::spawn(bound.serve(stop));
    let mut client = VaultClient::connect(
        &dir.client_config(ADMIN, SocketAddr::from(([127, 0, 0, 1], vault_port))),
    )
    .await
    .unwrap();
    client
        .tokenize(Card::new("4242424242424242", 12, 2030), false)
        .await
        .unwrap();

    trigger.trigger();
    serving.await.unwrap().unwrap();
    ks_trigger.trigger();
    ks_task.await.unwrap().unwrap();
}

/// Control: PCI-3.7.2 (docs/compliance.md).
/// Attack: a vault (or an impostor) whose identity the keyservice does not list asks for
/// keys; it gets none and stops with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_identity_the_keyservice_refuses_is_a_clear_startup_error() {
    let dir = StackDir::new();
    let config = dir.path().join("keyservice.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("tokenvault.dev/vault-server", "tokenvault.dev/someone-else"),
    )
    .unwrap();
    let keyservice = keyservice::bind(&keyservice::Settings::load(&config).unwrap())
        .await
        .unwrap();
    let port = keyservice.local_addr().port();
    let (ks_trigger, ks_stop) = shutdown::channel();
    let ks_task = tokio::spawn(keyservice.serve(ks_stop));

    let settings = vault_server::Settings::load(&dir.write_vault_config(port)).unwrap();
    let (_trigger, stop) = shutdown::channel();
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        vault_server::start(&settings, stop),
    )
    .await
    .unwrap()
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("refused this vault's identity"),
        "{message}"
    );
    ks_trigger.trigger();
    ks_task.await.unwrap().unwrap();
}

/// Control: PCI-3.6.1.2, PCI-3.7.3 (docs/compliance.md).
/// Attack: another local user reads the root key file; the keyservice refuses to start with
/// a root key others can read.
#[tokio::test]
async fn the_keyservice_refuses_a_root_key_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let dir = StackDir::new();
    let root_key = dir.path().join("root.key");
    std::fs::set_permissions(&root_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let settings = keyservice::Settings::load(&dir.path().join("keyservice.toml")).unwrap();
    let err = keyservice::bind(&settings).await.unwrap_err().to_string();
    assert!(err.contains("644") && err.contains("chmod 600"), "{err}");
    let key = std::fs::read_to_string(&root_key).unwrap();
    assert!(
        !err.contains(key.trim()),
        "the error must not print the key"
    );
}
