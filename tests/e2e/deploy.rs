//! Deployment files and process hardening: the systemd units pass
//! `systemd-analyze verify` and score a low exposure in `systemd-analyze security`, and
//! the running servers cannot dump core.

use integration_tests::{Process, StackDir, binary};

const HARDENING: [&str; 8] = [
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "PrivateTmp=yes",
    "MemoryDenyWriteExecute=yes",
    "LimitCORE=0",
    "CapabilityBoundingSet=\n",
    "DynamicUser=yes",
    "ReadWritePaths=/var/lib/",
];

/// The highest `systemd-analyze security` exposure we accept (0 is best, 10 worst;
/// below 2 is rated "OK").
const MAX_EXPOSURE: f64 = 2.0;

#[test]
fn systemd_units_verify_and_are_hardened() {
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let scratch = tempfile::tempdir().unwrap();
    for service in ["keyservice", "vault-server"] {
        let text = std::fs::read_to_string(units.join(format!("{service}.service"))).unwrap();
        for directive in HARDENING {
            assert!(
                text.contains(directive),
                "{service}.service lacks {directive:?}"
            );
        }
        // verify checks that ExecStart exists: point it at the binary this build made.
        let unit = scratch.path().join(format!("{service}.service"));
        let local = text.replace(
            &format!("/usr/local/bin/{service}"),
            binary(service).to_str().unwrap(),
        );
        std::fs::write(&unit, local).unwrap();

        let verify = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        let complaints = String::from_utf8_lossy(&verify.stderr);
        assert!(
            verify.status.success() && complaints.trim().is_empty(),
            "{service}: {complaints}"
        );

        let security = std::process::Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&unit)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&security.stdout);
        let exposure: f64 = report
            .lines()
            .find_map(|l| l.split("Overall exposure level for").nth(1))
            .and_then(|rest| rest.split(':').nth(1))
            .and_then(|score| score.split_whitespace().next())
            .and_then(|score| score.parse().ok())
            .unwrap_or_else(|| panic!("no exposure score for {service}: {report}"));
        println!("systemd-analyze security {service}.service: exposure {exposure}");
        assert!(
            exposure <= MAX_EXPOSURE,
            "{service}: exposure {exposure}\n{report}"
        );
    }
}

fn core_limit(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .split_whitespace()
        .skip(4)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_cannot_dump_core() {
    let dir = StackDir::new();
    let keyservice = Process::start("keyservice", &dir.path().join("keyservice.toml"), &[]).await;
    let vault_config = dir.write_vault_config(keyservice.addr.port());
    let vault = Process::start("vault-server", &vault_config, &[]).await;
    for process in [&keyservice, &vault] {
        let pid = process.child.id().unwrap();
        assert_eq!(
            core_limit(pid),
            "0 0",
            "soft and hard core limits of pid {pid}"
        );
    }
    vault.terminate().await;
    keyservice.terminate().await;
}
