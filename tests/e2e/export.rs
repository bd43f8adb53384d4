//! Export jobs (issue 21) on the real binaries: a tenant's cards to a new processor's
//! OpenPGP key (made with Debian's `gpg`, pinned in the vault's config), under dual
//! control; the processor's `gpg` opens the file to exactly the tenant's cards.

use std::collections::BTreeMap;
use std::path::Path;

use integration_tests::{ADMIN, OTHER_TENANT, Stack};
use vault_client::{BatchItem, Card};

use crate::import::{Gpg, IMPORTER, import_dir};
use crate::vaultctl::{config_for, vaultctl};

pub(crate) const PROCESSOR: &str = "new-processor";

/// A processor entry that takes exports under `fingerprint` (its key in `key_file`).
pub(crate) fn processor_entry(key_file: &Path, fingerprint: &str) -> String {
    format!(
        r#"
[[processor]]
name = "{PROCESSOR}"
base_url = "https://localhost:9"
ca_file = "ca.pem"
inject = {{ number = ["body"] }}
allowed_identities = ["{}"]
allow_private_network = true
[processor.export]
public_key_file = "{}"
fingerprint = "{fingerprint}"
"#,
        integration_tests::identity(ADMIN),
        key_file.display()
    )
}

/// The processor's key pair in `gpg`: an EdDSA primary with a Curve25519 encryption
/// subkey; its public key written to `file`; returns its fingerprint.
pub(crate) fn processor_key(gpg: &Gpg, file: &Path) -> String {
    let fingerprint = gpg.generate("New Processor <exports@new-processor.example>");
    gpg.run(&["--quick-add-key", &fingerprint, "cv25519", "encr", "never"]);
    std::fs::write(file, gpg.export(&fingerprint)).unwrap();
    fingerprint
}

/// The file as the processor reads it: token → (number, month, year, name).
pub(crate) fn decrypt(gpg: &Gpg, file: &str) -> BTreeMap<String, (String, String, String, String)> {
    let out = gpg.run(&["--decrypt", file]);
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("token,number,exp_month,exp_year,name"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[0].to_owned(),
                (
                    f[1].to_owned(),
                    f[2].to_owned(),
                    f[3].to_owned(),
                    f[4].to_owned(),
                ),
            )
        })
        .collect()
}

fn number(n: u64) -> String {
    testcards::card_number(500_000 + n)
}

/// Control: PCI-7.2.6, TOK-DETOKENIZE, PCI-3.4.1, PCI-7.2.2, PCI-10.2.1.1 (docs/compliance.md).
/// Attack: take the tenant's cards out in bulk without a second person, with an approval
/// of another kind or tenant, twice from one approval, or to a key other than the
/// processor's pinned one; the proposer cannot approve, an unapproved job writes nothing,
/// the approved file opens only with the processor's key and holds exactly the tenant's
/// live cards (not another tenant's, not a deleted one), and no number reaches vaultctl's
/// output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_export_opens_at_the_processor_to_exactly_the_tenants_cards() {
    let dir = import_dir();
    let gpg = Gpg::new();
    let key_file = dir.path().join("new-processor.asc");
    let fingerprint = processor_key(&gpg, &key_file);
    let mut stack = Stack::start_in(dir).await;
    stack.add_vault_config(&processor_entry(&key_file, &fingerprint));
    stack.restart_vault().await;

    // acme's cards (one deleted since), and globex's, which must not go.
    let mut admin = stack.client(ADMIN).await;
    let cards: Vec<Card> = (0..40)
        .map(|n| {
            Card::new(&number(n), 1 + (n % 12) as u32, 2032)
                .with_cardholder_name(&format!("Holder {n}"))
        })
        .collect();
    let mut acme = BTreeMap::new();
    for (n, item) in admin
        .tokenize_batch(&cards, false)
        .await
        .unwrap()
        .into_iter()
        .enumerate()
    {
        let BatchItem::Stored(info) = item else {
            panic!("{item:?}")
        };
        acme.insert(info.token, n as u64);
    }
    let deleted = acme.keys().next().unwrap().clone();
    admin.delete(&deleted).await.unwrap();
    acme.remove(&deleted);
    let mut globex = stack.client(OTHER_TENANT).await;
    let other = globex
        .tokenize(Card::new(&number(99), 5, 2033), false)
        .await
        .unwrap();

    // Dual control: the proposer cannot approve, and an unapproved job writes nothing.
    let config = config_for(&stack, ADMIN);
    let out = vaultctl(
        &config,
        &["export", "propose", "--processor", PROCESSOR],
        "",
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let job = out.stdout.trim().to_owned();
    let own = vaultctl(&config, &["export", "approve", &job], "").await;
    assert!(
        !own.ok && own.stderr.contains("PermissionDenied"),
        "{}",
        own.stderr
    );
    let early = vaultctl(&config, &["export", "run", &job], "").await;
    assert!(
        !early.ok && early.stderr.contains("not approved"),
        "{}",
        early.stderr
    );
    // An import approval cannot approve an export, nor another tenant's identity.
    let as_import = vaultctl(
        &config_for(&stack, IMPORTER),
        &["import", "approve", &job],
        "",
    )
    .await;
    assert!(
        !as_import.ok && as_import.stderr.contains("NotFound"),
        "{}",
        as_import.stderr
    );
    let globex_approval = vaultctl(
        &config_for(&stack, OTHER_TENANT),
        &["export", "approve", &job],
        "",
    )
    .await;
    assert!(!globex_approval.ok, "{}", globex_approval.stderr);
    let approved = vaultctl(
        &config_for(&stack, IMPORTER),
        &["export", "approve", &job],
        "",
    )
    .await;
    assert!(approved.ok, "{}", approved.stderr);

    let run = vaultctl(&config, &["export", "run", &job], "").await;
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout.contains(&format!(
            "exported 39 cards to processor {PROCESSOR} (key {fingerprint})"
        )),
        "{}",
        run.stdout
    );
    let path = run.stdout.trim().rsplit(": ").next().unwrap().to_owned();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let file = decrypt(&gpg, &path);
    assert_eq!(file.len(), acme.len());
    for (token, n) in &acme {
        let (num, month, year, name) = &file[token];
        assert_eq!(num, &number(*n));
        assert_eq!(month, &(1 + n % 12).to_string());
        assert_eq!(year, "2032");
        assert_eq!(name, &format!("Holder {n}"));
    }
    assert!(!file.contains_key(&other.token) && !file.contains_key(&deleted));
    for n in 0..100 {
        assert!(!run.stdout.contains(&number(n)) && !run.stderr.contains(&number(n)));
    }
    // Once per job: refused while the file is there, and after it is gone (finding
    // HIGH #2: the approval is used up at the keyservice, not by the file's name).
    let again = vaultctl(&config, &["export", "run", &job], "").await;
    assert!(
        !again.ok && again.stderr.contains("exported already"),
        "{}",
        again.stderr
    );
    std::fs::remove_file(&path).unwrap();
    let again = vaultctl(&config, &["export", "run", &job], "").await;
    assert!(
        !again.ok
            && again.stderr.contains("FailedPrecondition")
            && again.stderr.contains("an approval is used once"),
        "{}",
        again.stderr
    );
    let export_dir = std::path::Path::new(&path).parent().unwrap().to_path_buf();
    let files = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(job.as_str()))
            .collect()
    };
    assert!(files(&export_dir).is_empty(), "{:?}", files(&export_dir));

    // A list of tokens: the run must give the list the job was approved for.
    let list = stack.dir.path().join("tokens.txt");
    let chosen: Vec<&String> = acme.keys().take(3).collect();
    std::fs::write(
        &list,
        chosen.iter().map(|t| format!("{t}\n")).collect::<String>(),
    )
    .unwrap();
    let importer = config_for(&stack, IMPORTER);
    let out = vaultctl(
        &importer,
        &[
            "export",
            "propose",
            "--processor",
            PROCESSOR,
            "--tokens",
            list.to_str().unwrap(),
        ],
        "",
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let job = out.stdout.trim().to_owned();
    assert!(vaultctl(&config, &["export", "approve", &job], "").await.ok);
    let other_list = stack.dir.path().join("other.txt");
    std::fs::write(&other_list, format!("{}\n", acme.keys().last().unwrap())).unwrap();
    let wrong = vaultctl(
        &importer,
        &[
            "export",
            "run",
            &job,
            "--tokens",
            other_list.to_str().unwrap(),
        ],
        "",
    )
    .await;
    assert!(
        !wrong.ok && wrong.stderr.contains("not the list"),
        "{}",
        wrong.stderr
    );
    let run = vaultctl(
        &importer,
        &["export", "run", &job, "--tokens", list.to_str().unwrap()],
        "",
    )
    .await;
    assert!(run.ok, "{}", run.stderr);
    let path = run.stdout.trim().rsplit(": ").next().unwrap().to_owned();
    let file = decrypt(&gpg, &path);
    assert_eq!(file.keys().collect::<Vec<_>>(), chosen);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_key_that_is_not_the_pinned_one_stops_the_vault() {
    let dir = integration_tests::StackDir::new();
    let gpg = Gpg::new();
    let key_file = dir.path().join("new-processor.asc");
    let fingerprint = processor_key(&gpg, &key_file);
    let wrong: String = fingerprint.chars().rev().collect();
    let config = dir.write_vault_config_with(9, &processor_entry(&key_file, &wrong));
    let settings = vault_server::Settings::load(&config).unwrap();
    let (_trigger, shutdown) = runtime::shutdown::channel();
    let error = vault_server::start(&settings, shutdown)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("not the pinned export.fingerprint"),
        "{error}"
    );
}

/// The done-when of issue 21: an approved export reaches the sandbox processor's upload
/// route over HTTPS and decrypts there (the sandbox holds the test processor key) to
/// exactly the tenant's cards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_export_reaches_the_sandbox_upload_route_and_decrypts_there() {
    let dir = import_dir();
    let sandbox = integration_tests::SandboxServer::start(&dir).await;
    let (armored, fingerprint) = sandbox.export_key.clone();
    let key_file = dir.path().join("sandbox-export.asc");
    std::fs::write(&key_file, armored).unwrap();
    let journal = sandbox.journal.clone();
    let mut stack = Stack::start_in(dir).await;
    stack.add_vault_config(
        &processor_entry(&key_file, &fingerprint)
            .replace(
                "https://localhost:9",
                &format!("https://localhost:{}", sandbox.addr.port()),
            )
            .replace(
                &format!("fingerprint = \"{fingerprint}\""),
                &format!("fingerprint = \"{fingerprint}\"\nupload_path = \"/v1/imports\""),
            ),
    );
    stack.restart_vault().await;

    let mut admin = stack.client(ADMIN).await;
    let cards: Vec<Card> = (0..25).map(|n| Card::new(&number(n), 3, 2031)).collect();
    let mut acme = BTreeMap::new();
    for (n, item) in admin
        .tokenize_batch(&cards, false)
        .await
        .unwrap()
        .into_iter()
        .enumerate()
    {
        let BatchItem::Stored(info) = item else {
            panic!("{item:?}")
        };
        acme.insert(info.token, number(n as u64));
    }
    let mut globex = stack.client(OTHER_TENANT).await;
    globex
        .tokenize(Card::new(&number(77), 5, 2033), false)
        .await
        .unwrap();

    let config = config_for(&stack, ADMIN);
    let out = vaultctl(
        &config,
        &["export", "propose", "--processor", PROCESSOR],
        "",
    )
    .await;
    let job = out.stdout.trim().to_owned();
    assert!(
        vaultctl(
            &config_for(&stack, IMPORTER),
            &["export", "approve", &job],
            ""
        )
        .await
        .ok
    );
    assert!(journal.exports().is_empty());
    let run = vaultctl(&config, &["export", "run", &job], "").await;
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout.contains("POST /v1/imports at processor"),
        "{}",
        run.stdout
    );
    let exports = journal.exports();
    assert_eq!(exports.len(), 1);
    let mut lines = exports[0].lines();
    assert_eq!(lines.next(), Some("token,number,exp_month,exp_year,name"));
    let received: BTreeMap<String, String> = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_owned(), f[1].to_owned())
        })
        .collect();
    assert_eq!(received, acme, "exactly the tenant's cards");
    // What travelled was ciphertext: no card number in the request the sandbox got.
    let upload = journal
        .requests()
        .into_iter()
        .find(|r| r.path == "/v1/imports")
        .unwrap();
    for number in acme.values() {
        assert!(
            !upload
                .body
                .windows(number.len())
                .any(|w| w == number.as_bytes())
        );
    }
    // A second run is refused before any card is read, also with the first run's
    // marker gone: the processor gets one upload.
    let marker_dir = stack.dir.path().join("vault-data-export");
    for round in 0..2 {
        let again = vaultctl(&config, &["export", "run", &job], "").await;
        assert!(
            !again.ok && again.stderr.contains("an approval is used once"),
            "{}",
            again.stderr
        );
        assert_eq!(journal.exports().len(), 1);
        if round == 0 {
            for entry in std::fs::read_dir(&marker_dir).unwrap() {
                std::fs::remove_file(entry.unwrap().path()).unwrap();
            }
        }
    }
    assert_eq!(
        journal
            .requests()
            .iter()
            .filter(|r| r.path == "/v1/imports")
            .count(),
        1
    );
    // The job shows as done; the audit log has its claim and its finish.
    let out = vaultctl(&config_for(&stack, ADMIN), &["audit", "export"], "").await;
    assert!(out.ok, "{}", out.stderr);
    for action in ["ClaimExport", "FinishExport"] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.contains(action) && l.contains(&job)),
            "{action}: {}",
            out.stdout
        );
    }
    stack.stop().await;
    sandbox.stop().await;
}
