//! A full disk: a real tmpfs of a few MiB under the vault's data directory. Needs root
//! (to mount); CI and `make test` run as root on our machines.

use integration_tests::{ADMIN, Stack, StackDir};
use tonic::Code;
use vault_client::{Card, TokenInfo};
use vault_proto::vault::v1 as pb;

fn mount_tmpfs(dir: &std::path::Path, size: &str) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0700"),
            "tmpfs",
        ])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

fn remount(dir: &std::path::Path, size: &str) {
    let ok = std::process::Command::new("mount")
        .args(["-o", &format!("remount,size={size}")])
        .arg(dir)
        .status()
        .unwrap()
        .success();
    assert!(ok, "remount {}", dir.display());
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The vault's disk fills up (the fault is in the write path every call takes: data and
/// audit events share one database): writes and then every audited call are refused,
/// nothing acknowledged is lost, and once space returns everything answers again with
/// no restart, the audit log intact.
///
/// Control: PCI-10.2.1, PCI-10.7.2 (docs/compliance.md).
/// Attack: fill the vault's disk so that audit events cannot be written, hoping calls go on
/// unaudited; every audited call is refused until space returns, nothing acknowledged is
/// lost, and the log verifies after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_resource_exhausted_loses_nothing_and_recovers_without_restart() {
    if integration_tests::rocksdb_only("it fills the RocksDB data disk") {
        return;
    }
    let dir = StackDir::new();
    let data = dir.data_dir();
    let is_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    assert!(
        is_root,
        "this test mounts a tmpfs and needs root (make test runs as root in CI)"
    );
    assert!(
        mount_tmpfs(&data, "3M"),
        "mount a tmpfs at {}",
        data.display()
    );
    let _unmount = Unmount(data.clone());

    let mut stack = Stack::start_in(dir).await;
    let mut client = stack.client(ADMIN).await;
    let name = "N".repeat(128);
    let mut stored: Vec<TokenInfo> = Vec::new();
    let mut refusal = None;
    for n in 0..200_000u64 {
        let pan = integration_tests::synthetic_pan("42", n, 16);
        match client
            .tokenize(Card::new(&pan, 1, 2031).with_cardholder_name(&name), false)
            .await
        {
            Ok(info) => stored.push(info),
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let refusal = refusal.expect("the disk filled up");
    assert_eq!(refusal.code(), Some(Code::ResourceExhausted), "{refusal}");
    assert!(refusal.to_string().contains("full"), "{refusal}");
    println!("disk full after {} tokens", stored.len());
    // Health says why: degraded, the data disk nearly full (within the 5 s it looks).
    let started = std::time::Instant::now();
    while client.storage_room().await.unwrap() {
        assert!(started.elapsed() < std::time::Duration::from_secs(8));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let (status, health) = integration_tests::http_get(stack.vault_admin_addr, "/healthz").await;
    assert_eq!(status, 200, "degraded still serves");
    assert!(
        health.starts_with("degraded") && health.contains("data disk is nearly full"),
        "{health}"
    );
    // Reads are refused too: each one's audit event is a write to the same disk, and
    // no call goes unaudited. Nothing is lost meanwhile.
    for info in stored.iter().step_by(50) {
        let err = client.token_info(&info.token).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
        assert!(err.to_string().contains("audit event"), "{err}");
    }

    // Space returns: with no restart, the store reopens itself at a write once the
    // filesystem has room, and writes go on, with nothing lost. Until then each write
    // is refused the same way.
    remount(&stack.dir.data_dir(), "64M");
    let started = std::time::Instant::now();
    let recovered = loop {
        match client
            .tokenize(Card::new("4242424242424242", 1, 2031), false)
            .await
        {
            Ok(info) => break info,
            Err(e) => {
                assert!(
                    matches!(e.code(), Some(Code::ResourceExhausted | Code::Unavailable)),
                    "{e}"
                );
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(15),
                    "writes did not come back once space returned: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    println!("writes back {:?} after space returned", started.elapsed());
    let started = std::time::Instant::now();
    while !client.storage_room().await.unwrap() {
        assert!(started.elapsed() < std::time::Duration::from_secs(8));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for info in &stored {
        assert_eq!(&client.token_info(&info.token).await.unwrap(), info);
    }
    // And after a restart, everything acknowledged before and after is there.
    stack.restart_vault().await;
    let mut client = stack.client(ADMIN).await;
    assert_eq!(
        client.token_info(&recovered.token).await.unwrap(),
        recovered
    );
    for info in &stored {
        assert_eq!(&client.token_info(&info.token).await.unwrap(), info);
    }
    let mut raw = pb::vault_client::VaultClient::new(
        integration_tests::raw_channel(&stack.dir, ADMIN, stack.vault_addr)
            .await
            .unwrap(),
    );
    let verification = raw
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verification.intact, "{verification:?}");
    stack.stop().await;
}

/// A read-only data directory (a filesystem with open files cannot be remounted
/// read-only, so this is the start-up case): a clear error naming the directory, and a
/// normal start once it is writable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_data_directory_is_a_clear_startup_error() {
    if integration_tests::rocksdb_only("it is about the RocksDB data directory") {
        return;
    }
    let dir = StackDir::new();
    let data = dir.data_dir();
    std::fs::create_dir_all(&data).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16M,ro", "tmpfs"])
        .arg(&data)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "mount a read-only tmpfs at {} (needs root)",
        data.display()
    );
    let _unmount = Unmount(data.clone());

    let keyservice =
        keyservice::bind(&keyservice::Settings::load(&dir.path().join("keyservice.toml")).unwrap())
            .await
            .unwrap();
    let port = keyservice.local_addr().port();
    let (ks_trigger, ks_stop) = runtime::shutdown::channel();
    let ks_task = tokio::spawn(keyservice.serve(ks_stop));
    let settings = vault_server::Settings::load(&dir.write_vault_config(port)).unwrap();
    let (_trigger, stop) = runtime::shutdown::channel();
    let err = vault_server::start(&settings, stop.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("vault-data") && err.contains("Read-only file system"),
        "{err}"
    );

    let ok = std::process::Command::new("mount")
        .args(["-o", "remount,rw"])
        .arg(&data)
        .status()
        .unwrap()
        .success();
    assert!(ok, "remount read-write");
    let bound = vault_server::start(&settings, stop).await.unwrap();
    drop(bound);
    ks_trigger.trigger();
    ks_task.await.unwrap().unwrap();
}
