//! Deployment files and process hardening: the systemd units pass
//! `systemd-analyze verify` and score a low exposure in `systemd-analyze security`; the
//! running servers cannot dump core and keep their memory locked (out of swap); the
//! Kubernetes manifests validate, probe each server's admin port over HTTP, and keep
//! the keyservice in its own network segment.

use integration_tests::{ADMIN, Process, StackDir, binary, python_tool};

const HARDENING: [&str; 9] = [
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "PrivateTmp=yes",
    "MemoryDenyWriteExecute=yes",
    "LimitCORE=0",
    // mlockall needs it: the servers keep keys and card data out of swap.
    "LimitMEMLOCK=infinity",
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

/// A field of `/proc/<pid>/<file>` in kB, e.g. `VmLck` of `status` or `Locked` of
/// `smaps_rollup`.
/// Fields of one read of `/proc/<pid>/<file>`, in kB (one read, so that they agree).
fn proc_kb<const N: usize>(pid: u32, file: &str, fields: [&str; N]) -> [u64; N] {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    fields.map(|field| {
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/{file}:\n{text}"))
    })
}

/// Whether a child of this process may lock all its memory: RLIMIT_MEMLOCK unlimited
/// or CAP_IPC_LOCK (bit 14) effective. True as root, which is how CI runs.
fn may_lock_memory() -> bool {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let unlimited = limits
        .lines()
        .any(|l| l.starts_with("Max locked memory") && l.contains("unlimited"));
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let ipc_lock = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 14) != 0);
    unlimited || ipc_lock
}

/// Both servers disable core dumps, and lock their memory (mlockall) so that keys and
/// card data never reach swap: `VmLck` in /proc/<pid>/status counts the locked
/// mappings (all of their address space: pages lock as they are first touched), and
/// `Locked` in smaps_rollup shows that the resident pages are locked.
///
/// Control: PCI-3.6.1 (docs/compliance.md).
/// Attack: read key material from a core dump or from swap; the servers disable core dumps
/// and lock their memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_cannot_dump_core_and_lock_their_memory() {
    let dir = StackDir::new();
    let keyservice = Process::start("keyservice", &dir.path().join("keyservice.toml"), &[]).await;
    let vault_config = dir.write_vault_config(keyservice.addr.port());
    let vault = Process::start("vault-server", &vault_config, &[]).await;
    // Some work first, so that locked pages include ones that held keys and a card.
    let mut client = vault_client::VaultClient::connect(&dir.client_config(ADMIN, vault.addr))
        .await
        .unwrap();
    client
        .tokenize(vault_client::Card::new("4242424242424242", 12, 2030), false)
        .await
        .unwrap();
    let locking = may_lock_memory();
    for process in [&keyservice, &vault] {
        let pid = process.child.id().unwrap();
        assert_eq!(
            core_limit(pid),
            "0 0",
            "soft and hard core limits of pid {pid}"
        );
        let [locked_mappings] = proc_kb(pid, "status", ["VmLck"]);
        // `Locked` counts shared pages (libc) in proportion, like `Pss`; both from one
        // read, as another process mapping the same pages changes both.
        let [pss, locked] = proc_kb(pid, "smaps_rollup", ["Pss", "Locked"]);
        println!("pid {pid}: VmLck {locked_mappings} kB, Pss {pss} kB, Locked {locked} kB");
        if locking {
            assert!(locked_mappings > 0, "pid {pid}: VmLck is 0");
            // Every resident page but the kernel's special mappings (vdso, vvar).
            assert!(
                locked * 100 >= pss * 98,
                "pid {pid}: only {locked} of {pss} kB resident are locked"
            );
        } else {
            assert_eq!(locked_mappings, 0, "pid {pid}");
        }
    }
    drop(client);
    for output in [vault.terminate().await, keyservice.terminate().await] {
        let expected = if locking {
            "memory locked"
        } else {
            "memory NOT locked"
        };
        assert!(output.contains(expected), "{output}");
        if locking {
            assert!(!output.contains("memory NOT locked"), "{output}");
        }
    }
}

/// A keyservice that may not lock its memory (finite RLIMIT_MEMLOCK, no CAP_IPC_LOCK)
/// warns and runs unlocked, or with `[memory] require_lock = true` refuses to start
/// and says why.
///
/// Control: PCI-3.6.1 (docs/compliance.md).
/// Attack: run the keyservice where it cannot lock its memory, so that key material can
/// reach swap; it says so at WARN, and refuses to start when the operator required it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_cannot_lock_memory_warns_or_refuses_as_configured() {
    let dir = StackDir::new();
    let config = dir.path().join("keyservice.toml");
    // An 8 MiB limit, and (as root) CAP_IPC_LOCK out of the bounding set, so that the
    // exec'd keyservice cannot have it.
    let unprivileged = |config: &std::path::Path| {
        let mut command = tokio::process::Command::new("sh");
        command
            .arg("-c")
            .arg(
                r#"ulimit -l 8192 || exit 99
                   if [ "$(id -u)" = 0 ]; then exec setpriv --bounding-set=-ipc_lock "$@"; fi
                   exec "$@""#,
            )
            .arg("sh")
            .arg(binary("keyservice"))
            .arg("--config")
            .arg(config);
        command
    };

    let keyservice = Process::start_command(unprivileged(&config), "keyservice").await;
    let pid = keyservice.child.id().unwrap();
    assert_eq!(proc_kb(pid, "status", ["VmLck"]), [0]);
    let output = keyservice.terminate().await;
    assert!(
        output.contains("memory NOT locked") && output.contains("RLIMIT_MEMLOCK"),
        "{output}"
    );

    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[memory]\nrequire_lock = true\n");
    let strict = dir.path().join("keyservice-strict.toml");
    std::fs::write(&strict, text).unwrap();
    let refused = unprivileged(&strict).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert_ne!(refused.status.code(), Some(99), "ulimit failed: {stderr}");
    assert!(
        stderr.contains("require_lock") && stderr.contains("RLIMIT_MEMLOCK"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&refused.stdout).is_empty(),
        "it must not listen"
    );
}

/// The Kubernetes manifests: valid against the Kubernetes schemas (kubernetes-validate,
/// from PyPI, in the tests' virtualenv that `make deps` makes), the keyservice in a namespace of its own that
/// only the vault (and key admins) can reach, deny-by-default network policies, hardened
/// non-root containers, secrets as files, and configs that our own loaders accept.
#[test]
fn kubernetes_manifests_validate_and_isolate_the_keyservice() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 4, "{files:?}");
    let validated = std::process::Command::new(python_tool("kubernetes-validate"))
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    assert!(
        validated.status.success(),
        "{}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );
    // YAML to JSON with the PyYAML that kubernetes-validate brings.
    let converted = std::process::Command::new(python_tool("python"))
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]))",
        ])
        .args(&files)
        .output()
        .unwrap();
    assert!(
        converted.status.success(),
        "{}",
        String::from_utf8_lossy(&converted.stderr)
    );
    let docs: Vec<serde_json::Value> = serde_json::from_slice(&converted.stdout).unwrap();
    let find = |kind: &str, namespace: &str, name: &str| {
        docs.iter()
            .find(|d| {
                d["kind"] == kind
                    && d["metadata"]["namespace"] == namespace
                    && d["metadata"]["name"] == name
            })
            .unwrap_or_else(|| panic!("no {kind} {namespace}/{name}"))
    };
    let (keys, vault) = ("tokenvault-keys", "tokenvault-vault");

    // Deny by default in both namespaces.
    for namespace in [keys, vault] {
        let deny = &find("NetworkPolicy", namespace, "default-deny")["spec"];
        assert_eq!(deny["podSelector"], serde_json::json!({}));
        assert_eq!(
            deny["policyTypes"],
            serde_json::json!(["Ingress", "Egress"])
        );
        assert!(deny.get("ingress").is_none() && deny.get("egress").is_none());
    }
    // Only the vault (and key admins) reach the keyservice, on 7443; it calls nothing
    // but DNS.
    let keyservice = &find("NetworkPolicy", keys, "keyservice")["spec"];
    let ingress = keyservice["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 1);
    assert_eq!(
        ingress[0]["ports"],
        serde_json::json!([{"protocol": "TCP", "port": 7443}])
    );
    assert_eq!(
        ingress[0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "vault-server"
    );
    for rule in keyservice["egress"].as_array().unwrap() {
        for port in rule["ports"].as_array().unwrap() {
            assert_eq!(port["port"], 53, "keyservice egress beyond DNS: {rule}");
        }
    }
    // The vault calls the keyservice, DNS and the processor allowlist only.
    let vault_policy = &find("NetworkPolicy", vault, "vault-server")["spec"];
    for rule in vault_policy["egress"].as_array().unwrap() {
        let port = &rule["ports"][0]["port"];
        let to = &rule["to"][0];
        assert!(
            (port == 7443
                && to["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "keyservice")
                || port == 53
                || (port == 443 && to.get("ipBlock").is_some()),
            "unexpected vault egress: {rule}"
        );
    }

    for (namespace, name) in [(keys, "keyservice"), (vault, "vault-server")] {
        let spec = &find("StatefulSet", namespace, name)["spec"];
        assert!(!spec["volumeClaimTemplates"].as_array().unwrap().is_empty());
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["automountServiceAccountToken"], false);
        let container = &pod["containers"][0];
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert!(
            container.get("readinessProbe").is_some() && container.get("livenessProbe").is_some()
        );
        assert!(
            container.get("env").is_none(),
            "secrets come as files, not env"
        );
        for volume in pod["volumes"].as_array().unwrap() {
            if let Some(secret) = volume.get("secret") {
                assert_eq!(secret["defaultMode"], 0o400, "{volume}");
            }
        }
    }

    // The configs in the ConfigMaps are ones our loaders accept.
    let scratch = tempfile::tempdir().unwrap();
    let config = |namespace: &str, name: &str, key: &str| {
        let text = find("ConfigMap", namespace, name)["data"][key]
            .as_str()
            .unwrap()
            .to_owned();
        let path = scratch.path().join(key);
        std::fs::write(&path, text).unwrap();
        path
    };
    let settings =
        keyservice::Settings::load(&config(keys, "keyservice-config", "keyservice.toml")).unwrap();
    assert_eq!(settings.listen_addr.port(), 7443);
    let keyservice_admin = settings.admin.listen_addr.port();
    let settings =
        vault_server::Settings::load(&config(vault, "vault-server-config", "vault-server.toml"))
            .unwrap();
    assert!(settings.keyservice.endpoint.contains("tokenvault-keys"));
    let vault_admin = settings.admin.listen_addr.port();

    // Probes are HTTP GETs of /healthz on each server's admin port (the gRPC ports speak
    // mutual TLS only, which kubelet cannot).
    for (namespace, name, admin_port) in [
        (keys, "keyservice", keyservice_admin),
        (vault, "vault-server", vault_admin),
    ] {
        let container =
            &find("StatefulSet", namespace, name)["spec"]["template"]["spec"]["containers"][0];
        let admin = container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["containerPort"] == admin_port)
            .unwrap_or_else(|| panic!("{name}: no container port {admin_port}"));
        for probe in ["readinessProbe", "livenessProbe"] {
            let probe = &container[probe];
            assert!(probe.get("tcpSocket").is_none(), "{name}: {probe}");
            let get = &probe["httpGet"];
            assert_eq!(get["path"], "/healthz", "{name}: {probe}");
            assert!(
                get["port"] == admin["name"] || get["port"] == admin_port,
                "{name}: probe on {} rather than the admin port",
                get["port"]
            );
        }
    }
    // The keyservice's admin port stays inside its pod: its Service does not expose it
    // and no NetworkPolicy lets anyone (another namespace or pod) in on it.
    for port in find("Service", keys, "keyservice")["spec"]["ports"]
        .as_array()
        .unwrap()
    {
        assert_ne!(port["port"], keyservice_admin, "{port}");
        assert_ne!(port["targetPort"], keyservice_admin, "{port}");
        assert_ne!(port["targetPort"], "admin", "{port}");
    }
    for policy in docs.iter().filter(|d| d["kind"] == "NetworkPolicy") {
        for rule in policy["spec"]["ingress"].as_array().into_iter().flatten() {
            for port in rule["ports"].as_array().into_iter().flatten() {
                let opens_keyservice_admin = policy["metadata"]["namespace"] == keys
                    && (port["port"] == keyservice_admin || port["port"] == "admin");
                assert!(!opens_keyservice_admin, "{policy}");
            }
            // No port list would open every port, the admin port included.
            if policy["metadata"]["namespace"] == keys {
                assert!(rule.get("ports").is_some(), "{policy}");
            }
        }
    }
    let policy =
        std::fs::read_to_string(config(vault, "vault-server-policy", "policy.toml")).unwrap();
    vault_server::policy::Policy::parse(&policy).unwrap();
}

/// `make deps` looks for libclang under the names clang-sys loads. Debian images ship
/// `libclang-cpp.so.14`, a different library: an older check took it for libclang,
/// installed nothing, and bindgen failed on a fresh machine.
#[test]
fn install_check_does_not_take_libclang_cpp_for_libclang() {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-deps.sh");
    let libs = tempfile::tempdir().unwrap();
    let check = || {
        let out = std::process::Command::new(&script)
            .arg("--check")
            .env("LIBCLANG_SEARCH_DIRS", libs.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    std::fs::write(libs.path().join("libclang-cpp.so.14"), b"").unwrap();
    let report = check();
    assert!(report.contains("libclang: missing"), "{report}");
    assert!(report.contains("libclang-dev"), "{report}");

    std::fs::write(libs.path().join("libclang-14.so.1"), b"").unwrap();
    let report = check();
    assert!(!report.contains("libclang"), "{report}");
}
