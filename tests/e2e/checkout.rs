//! Sealed intake end to end, in a real browser: headless Chromium (driven over the W3C
//! WebDriver protocol through chromedriver) loads the checkout demo's page from the real
//! `checkout-demo` binary, which calls a real vault as a `tokenize` identity. A card
//! typed into the page comes back as a token, brand and last four, and the merchant
//! backend never held the card (number or name): not in its log (which has every request body) and not
//! in a core dump of its process taken after the payment.
//!
//! Needs /usr/bin/chromium, /usr/bin/chromedriver, gcore and clients/web/node_modules;
//! `make deps` (scripts/install-deps.sh) installs them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use integration_tests::{Process, Stack, StackDir, binary, identity};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The merchant's backend identity: `tokenize` only, in a tenant of its own.
const SHOP: &str = "shop-backend";
const SHOP_TENANT: &str = "shop";
/// A published test number, typed as customers do.
const CARD_TYPED: &str = "4242 4242 4242 4242";
/// A Luhn-invalid number, for the refusal shown on the page.
const BAD_CARD_TYPED: &str = "4242 4242 4242 4241";
/// The cardholder's name: made up, so that finding it anywhere means it came from here.
const NAME: &str = "Zyxwvut Cardholder";
/// The W3C WebDriver element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The forms of a number that must never reach the backend.
fn forms(typed: &str) -> Vec<String> {
    let digits: String = typed.chars().filter(char::is_ascii_digit).collect();
    let groups: Vec<&str> = typed.split(' ').collect();
    vec![digits, groups.join(" "), groups.join("-")]
}

fn web_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/web");
    assert!(
        dir.join("node_modules/@hpke/core").is_dir(),
        "{} has no node_modules: run `make deps` (scripts/install-deps.sh runs npm ci)",
        dir.display()
    );
    dir.canonicalize().unwrap()
}

/// chromedriver in a process group of its own, so that the browsers it starts go with
/// it whatever happens to the test.
struct Driver {
    child: std::process::Child,
    base: String,
    http: reqwest::Client,
    session: Option<String>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Only the group of the chromedriver this test started: its pid is its group's
        // id (process_group(0)), and cannot be reused before the wait below. killpg,
        // not `kill -KILL -PGID`: procps-ng 4.0.2 (Debian 12) turns that into kill(-1),
        // every process there is.
        if let Ok(pid) = i32::try_from(self.child.id())
            && pid > 1
        {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start(scratch: &Path) -> Self {
        for tool in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: run `make deps` (scripts/install-deps.sh installs chromium and chromium-driver)"
            );
        }
        // A port free a moment ago (chromedriver cannot report one it picked itself).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = {
            use std::os::unix::process::CommandExt;
            std::process::Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .arg(format!(
                    "--log-path={}",
                    scratch.join("chromedriver.log").display()
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap()
        };
        // reqwest is built without a default TLS provider; plain HTTP here, but the
        // builder wants one all the same.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .no_proxy()
            .build()
            .unwrap();
        let driver = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http,
            session: None,
        };
        integration_tests::within(Duration::from_secs(30), "chromedriver ready", || async {
            let response = driver
                .http
                .get(format!("{}/status", driver.base))
                .send()
                .await
                .ok()?;
            let status: Value = serde_json::from_slice(&response.bytes().await.ok()?).ok()?;
            status["value"]["ready"].as_bool().filter(|ready| *ready)
        })
        .await;
        driver
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let answer: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert!(status.is_success(), "WebDriver {method} {path}: {answer}");
        answer["value"].clone()
    }

    async fn new_session(&mut self, profile: &Path) {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--disable-crash-reporter",
            "--disable-breakpad",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let session = self
            .call(
                reqwest::Method::POST,
                "/session",
                Some(json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
                }}})),
            )
            .await;
        self.session = Some(session["sessionId"].as_str().unwrap().to_owned());
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session.as_deref().unwrap())
    }

    async fn goto(&self, url: &str) {
        self.call(
            reqwest::Method::POST,
            &self.session_path("/url"),
            Some(json!({ "url": url })),
        )
        .await;
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .call(
                reqwest::Method::POST,
                &self.session_path("/element"),
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found[ELEMENT].as_str().unwrap().to_owned()
    }

    async fn clear_and_type(&self, css: &str, text: &str) {
        let element = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &self.session_path(&format!("/element/{element}/clear")),
            Some(json!({})),
        )
        .await;
        self.call(
            reqwest::Method::POST,
            &self.session_path(&format!("/element/{element}/value")),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let element = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &self.session_path(&format!("/element/{element}/click")),
            Some(json!({})),
        )
        .await;
    }

    async fn script(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            &self.session_path("/execute/sync"),
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    async fn text(&self, css: &str) -> String {
        self.script(&format!(
            "return document.querySelector({}).textContent",
            json!(css)
        ))
        .await
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_owned()
    }

    /// Waits until the page's `data-state` is one of `states`; returns it.
    async fn wait_for_state(&self, states: &[&str]) -> String {
        integration_tests::within(Duration::from_secs(30), "checkout page state", || async {
            let state = self.script("return document.body.dataset.state").await;
            state
                .as_str()
                .filter(|state| states.contains(state))
                .map(str::to_owned)
        })
        .await
    }

    async fn quit(&mut self) {
        if self.session.is_some() {
            self.call(reqwest::Method::DELETE, &self.session_path(""), None)
                .await;
            self.session = None;
        }
    }
}

/// Every place in `haystack` where one of `needles` stands, with a little context.
fn occurrences(haystack: &[u8], needles: &[String]) -> Vec<String> {
    needles
        .iter()
        .filter_map(|needle| {
            let at = memchr::memmem::find(haystack, needle.as_bytes())?;
            let start = at.saturating_sub(40);
            let end = (at + needle.len() + 40).min(haystack.len());
            Some(format!(
                "{needle:?} in {:?}",
                String::from_utf8_lossy(&haystack[start..end])
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_paid_in_the_browser_never_reaches_the_merchant_backend() {
    if integration_tests::rocksdb_only(
        "the browser path does not depend on the vault's storage (the sealed intake tests \
         run on PostgreSQL, tests/e2e/sealed.rs and postgres.rs)",
    ) {
        return;
    }
    let web = web_dir();
    let dir = StackDir::new();
    dir.add_client_identity(SHOP);
    let policy = dir.path().join("policy.toml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(&format!(
        "\n[[identity]]\nid = \"{}\"\ntenant = \"{SHOP_TENANT}\"\npermissions = [\"tokenize\"]\n",
        identity(SHOP)
    ));
    std::fs::write(&policy, text).unwrap();
    let stack = Stack::start_in(dir).await;
    let path = |file: &str| stack.dir.path().join(file).display().to_string();
    let endpoint = format!("https://localhost:{}", stack.vault_addr.port());

    // The merchant backend, as its real binary.
    let mut command = tokio::process::Command::new(binary("checkout-demo"));
    command
        .args([
            "--listen-addr",
            "127.0.0.1:0",
            "--vault-endpoint",
            &endpoint,
        ])
        .args(["--ca-file", &path("ca.pem")])
        .args(["--cert-file", &path(&format!("{SHOP}.pem"))])
        .args(["--key-file", &path(&format!("{SHOP}.key"))])
        .arg("--web-dir")
        .arg(&web);
    let backend = Process::start_command(command, "checkout-demo").await;
    let backend_pid = backend.child.id().unwrap();
    let page = format!("http://127.0.0.1:{}/", backend.addr.port());

    let scratch = tempfile::tempdir().unwrap();
    let mut driver = Driver::start(scratch.path()).await;
    driver.new_session(&scratch.path().join("profile")).await;
    driver.goto(&page).await;
    let state = driver.wait_for_state(&["ready", "error"]).await;
    assert_eq!(
        state,
        "ready",
        "the page could not load the sealing key: {}",
        driver.text("#error").await
    );

    // 1. A number that fails the Luhn check: the vault refuses it, the page says so.
    driver.clear_and_type("#number", BAD_CARD_TYPED).await;
    driver.clear_and_type("#expiry", "12/34").await;
    driver.clear_and_type("#cvc", "123").await;
    driver.clear_and_type("#name", NAME).await;
    driver.click("#pay").await;
    assert_eq!(driver.wait_for_state(&["paid", "error"]).await, "error");
    let refusal = driver.text("#error").await;
    assert!(refusal.starts_with("Payment refused:"), "{refusal}");
    assert!(refusal.contains("number"), "{refusal}");
    for form in forms(BAD_CARD_TYPED) {
        assert!(!refusal.contains(&form), "{refusal}");
    }

    // 2. The test card: paid, brand and last four shown.
    driver.clear_and_type("#number", CARD_TYPED).await;
    driver.click("#pay").await;
    let state = driver.wait_for_state(&["paid", "error"]).await;
    assert_eq!(state, "paid", "{}", driver.text("#error").await);
    assert_eq!(driver.text("#brand").await, "visa");
    assert_eq!(driver.text("#last-four").await, "4242");
    let token = driver.text("#token").await;
    assert!(token.starts_with("tok_"), "{token}");
    driver.quit().await;

    // 3. What the backend held. Its core first, while it runs.
    let core_prefix = scratch.path().join("core");
    let gcore = tokio::process::Command::new("gcore")
        .arg("-o")
        .arg(&core_prefix)
        .arg(backend_pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .expect("gcore is missing: run `make deps` (scripts/install-deps.sh installs gdb)");
    let core_file = scratch.path().join(format!("core.{backend_pid}"));
    assert!(
        gcore.status.success() && core_file.exists(),
        "gcore failed: {}",
        String::from_utf8_lossy(&gcore.stderr)
    );
    let core = std::fs::read(&core_file).unwrap();
    let log = backend.terminate().await;

    // The log has every request, bodies included: the sealed cards, and never a number.
    let sealed: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("POST /api/pay"))
        .filter_map(|line| line.split("{\"sealed_card\":\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert_eq!(sealed.len(), 2, "two payments posted:\n{log}");
    assert_ne!(sealed[0], sealed[1]);
    // Each one is a sealed card (format 1) under the key the backend handed the page.
    let key_id = log
        .split("\"key_id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no sealing key answer in the backend's log:\n{log}"));
    let key_id = URL_SAFE_NO_PAD.decode(key_id).unwrap();
    for sealed in &sealed {
        let bytes = URL_SAFE_NO_PAD.decode(sealed).unwrap();
        assert_eq!(bytes[0], 1, "{sealed}");
        assert_eq!(bytes[1..9], key_id[..], "{sealed}");
    }
    assert!(log.contains("\"last_four\":\"4242\""), "{log}");
    let mut card_forms = forms(CARD_TYPED);
    card_forms.extend(forms(BAD_CARD_TYPED));
    card_forms.push(NAME.to_owned());
    let in_log = occurrences(log.as_bytes(), &card_forms);
    assert!(
        in_log.is_empty(),
        "card numbers in the backend's log: {in_log:?}"
    );

    // The core: no number in any form, no name, and (so that this is not vacuous) what the
    // backend did hold is there: the last sealed card it relayed and its settings.
    let in_core = occurrences(&core, &card_forms);
    assert!(
        in_core.is_empty(),
        "card numbers in the backend's memory: {in_core:?}"
    );
    let last_sealed = sealed[1];
    let controls = [
        last_sealed[last_sealed.len() / 2..last_sealed.len() / 2 + 48].to_owned(),
        web.display().to_string(),
    ];
    for control in &controls {
        assert!(
            !occurrences(&core, std::slice::from_ref(control)).is_empty(),
            "the core dump ({} bytes) lacks {control:?}, which the backend held: the scan proves nothing",
            core.len()
        );
    }

    stack.stop().await;
}
