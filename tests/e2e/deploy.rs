//! Deployment files and process hardening: the systemd units pass
//! `systemd-analyze verify` and score a low exposure in `systemd-analyze security`, and
//! the running servers cannot dump core; the Kubernetes manifests validate and keep the
//! keyservice in its own network segment.

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

/// The Kubernetes manifests: valid against the Kubernetes schemas (kubernetes-validate,
/// from PyPI; `make deps` installs it), the keyservice in a namespace of its own that
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
    let validated = std::process::Command::new("kubernetes-validate")
        .arg("--strict")
        .args(&files)
        .output()
        .expect("kubernetes-validate is missing: run `make deps` (python3 -m pip install kubernetes-validate)");
    assert!(
        validated.status.success(),
        "{}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );
    // YAML to JSON with the PyYAML that kubernetes-validate brings.
    let converted = std::process::Command::new("python3")
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
    let settings =
        vault_server::Settings::load(&config(vault, "vault-server-config", "vault-server.toml"))
            .unwrap();
    assert!(settings.keyservice.endpoint.contains("tokenvault-keys"));
    let policy =
        std::fs::read_to_string(config(vault, "vault-server-policy", "policy.toml")).unwrap();
    vault_server::policy::Policy::parse(&policy).unwrap();
}
