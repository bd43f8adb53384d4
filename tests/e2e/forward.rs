//! Forwarding to the sandbox processor: a real HTTPS server on 127.0.0.1.

use std::time::{Duration, Instant};

use integration_tests::{ADMIN, OTHER_TENANT, READER, Stack, StackDir, charge};
use tonic::Code;
use vault_client::{BatchItem, Card, ForwardRequest, VaultClient};

const CHARGE: &str = r#"{"amount": 1000, "number": "{{card.number}}", "exp_month": "{{card.exp_month}}", "exp_year": "{{card.exp_year}}", "name": "{{card.name}}"}"#;
const CHARGE_WITH_CVC: &str = r#"{"amount": 1000, "number": "{{card.number}}", "exp_month": "{{card.exp_month}}", "exp_year": "{{card.exp_year}}", "cvc": "{{card.cvc}}"}"#;

async fn tokenize(client: &mut VaultClient, card: Card) -> String {
    client.tokenize(card, false).await.unwrap().token
}

fn body_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// Control: PCI-3.4.1 (docs/compliance.md).
/// Attack: a processor echoes the card number back in its answer; the caller receives it
/// masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processor_gets_the_card_and_the_caller_gets_a_masked_answer() {
    let stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let token = tokenize(
        &mut client,
        Card::new("4242424242424242", 12, 2030).with_cardholder_name("Ada \"Countess\" Lovelace"),
    )
    .await;

    let answer = client
        .forward(charge("sandbox", &token, CHARGE))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", body_text(&answer.body));
    let body = body_text(&answer.body);
    assert!(
        body.contains("\"approved\"") && body.contains("\"last4\":\"4242\""),
        "{body}"
    );
    assert!(!answer.replayed);

    let received = stack.sandbox.requests();
    assert_eq!(received.len(), 1);
    let sent: serde_json::Value = serde_json::from_slice(&received[0].body).unwrap();
    assert_eq!(sent["number"], "4242424242424242");
    assert_eq!(
        (sent["exp_month"].as_str(), sent["exp_year"].as_str()),
        (Some("12"), Some("2030"))
    );
    assert_eq!(
        sent["name"], "Ada \"Countess\" Lovelace",
        "JSON escaping of the name"
    );

    // The sandbox echoes the whole request back: the caller sees the number masked.
    let mut echo = charge("sandbox", &token, CHARGE);
    echo.headers.push(("x-sandbox-echo".into(), "1".into()));
    let answer = client.forward(echo).await.unwrap();
    let body = body_text(&answer.body);
    assert_eq!(answer.status, 200);
    assert!(body.contains("************4242"), "{body}");
    assert!(!body.contains("4242424242424242"), "{body}");
    assert_eq!(stack.sandbox.requests().len(), 2);

    // Declines pass through as the processor's answer, not as a gRPC error.
    let declined = tokenize(&mut client, Card::new("4000000000000002", 12, 2030)).await;
    let answer = client
        .forward(charge("sandbox", &declined, CHARGE))
        .await
        .unwrap();
    assert_eq!(answer.status, 402);
    assert!(body_text(&answer.body).contains("card_declined"));
    stack.stop().await;
}

/// Control: PCI-4.2.1, PCI-7.2.6, TOK-DETOKENIZE (docs/compliance.md).
/// Attack: forward a card to a processor not on the allowlist, a path it does not allow, or
/// without `forward:<processor>`; refused before anything is decrypted or sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_outside_the_allowlist_are_refused_and_send_nothing() {
    let stack = Stack::start().await;
    let mut admin = stack.client(ADMIN).await;
    let token = tokenize(&mut admin, Card::new("4242424242424242", 12, 2030)).await;

    let base = || charge("sandbox", &token, CHARGE);
    let mut in_header = base();
    in_header
        .headers
        .push(("x-card".into(), "{{card.number}}".into()));
    let cases = vec![
        (
            "unknown processor",
            ForwardRequest {
                processor: "nowhere".into(),
                ..base()
            },
        ),
        (
            "path not allowed",
            ForwardRequest {
                path: "/v1/refunds".into(),
                ..base()
            },
        ),
        (
            "dot segments",
            ForwardRequest {
                path: "/v1/charges/../refunds".into(),
                ..base()
            },
        ),
        (
            "method not allowed",
            ForwardRequest {
                method: "DELETE".into(),
                ..base()
            },
        ),
        ("field not allowed in a header", in_header),
    ];
    for (what, request) in cases {
        let err = admin.forward(request).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::PermissionDenied), "{what}: {err}");
        assert!(!err.to_string().contains("4242"), "{what}: {err}");
    }

    // A caller without forward:sandbox.
    let mut reader = stack.client(READER).await;
    let err = reader
        .forward(charge("sandbox", &token, CHARGE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));

    // Another tenant's token: NOT_FOUND, as if it did not exist.
    let mut globex = stack.client(OTHER_TENANT).await;
    let err = globex
        .forward(charge("sandbox", &token, CHARGE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));

    // An unknown placeholder is the caller's mistake.
    let err = admin
        .forward(charge("sandbox", &token, r#"{"pin": "{{card.pin}}"}"#))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));

    assert!(
        stack.sandbox.requests().is_empty(),
        "the sandbox must receive nothing"
    );
    stack.stop().await;
}

/// Control: PCI-4.2.1 (docs/compliance.md).
/// Attack: a processor redirects elsewhere, presents a certificate its CA did not sign, or
/// resolves to a private address; the card is not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_bad_certificates_and_private_addresses_stop_the_card() {
    let stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let token = tokenize(&mut client, Card::new("4242424242424242", 12, 2030)).await;

    // A certificate that fails the pin, or comes from another CA: refused before any
    // card byte is sent.
    for processor in ["pinned", "foreign-ca"] {
        let err = client
            .forward(charge(processor, &token, CHARGE))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::Unavailable), "{processor}: {err}");
    }
    // localhost resolves to loopback, which this processor does not allow.
    let err = client
        .forward(charge("loopback-denied", &token, CHARGE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(stack.sandbox.requests().is_empty());

    // A redirect is returned to the caller, never followed.
    let mut redirect = charge("sandbox", &token, CHARGE);
    redirect.headers.push((
        "x-sandbox-redirect".into(),
        format!("https://localhost:{}/v1/charges", stack.sandbox_addr.port()),
    ));
    let answer = client.forward(redirect).await.unwrap();
    assert_eq!(answer.status, 302);
    assert_eq!(
        stack.sandbox.requests().len(),
        1,
        "the redirect was not followed"
    );
    stack.stop().await;
}

/// Control: PCI-4.2.1 (docs/compliance.md).
/// Attack: configure a processor over plain http, so that cards travel in clear; the config
/// is refused at load.
#[tokio::test]
async fn plain_http_processors_are_refused_at_config_load() {
    let dir = StackDir::new();
    let extra = integration_tests::processors_config(dir.path(), 9, 9, 60).replacen(
        "https://localhost:9",
        "http://localhost:9",
        1,
    );
    let config = dir.write_vault_config_with(1, &extra);
    let err = vault_server::Settings::load(&config)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sandbox") && err.contains("https"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_unreachable_and_oversize_answers_fail_precisely() {
    let stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let token = tokenize(&mut client, Card::new("4242424242424242", 12, 2030)).await;

    let mut slow = charge("slow", &token, CHARGE);
    slow.headers
        .push(("x-sandbox-delay-ms".into(), "3000".into()));
    let started = Instant::now();
    let err = client.forward(slow).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::DeadlineExceeded), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "took {:?} for a 1 s timeout",
        started.elapsed()
    );

    let started = Instant::now();
    let err = client
        .forward(charge("down", &token, CHARGE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(started.elapsed() < Duration::from_millis(2500));

    let err = client
        .forward(charge("tiny", &token, CHARGE))
        .await
        .unwrap_err();
    // Sent and answered, but withheld: not a call to retry blindly.
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("max_response_bytes"), "{err}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_charges_once() {
    let stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let token = tokenize(&mut client, Card::new("5555555555554444", 12, 2030)).await;
    let request = ForwardRequest {
        idempotency_key: Some("order-1001".into()),
        ..charge("sandbox", &token, CHARGE)
    };
    let first = client.forward(request.clone()).await.unwrap();
    let second = client.forward(request.clone()).await.unwrap();
    assert_eq!(
        stack.sandbox.requests().len(),
        1,
        "the processor was called once"
    );
    assert_eq!((first.status, &first.body), (second.status, &second.body));
    assert!(!first.replayed && second.replayed);

    let other = ForwardRequest {
        body: CHARGE.replace("1000", "2000"),
        ..request.clone()
    };
    let err = client.forward(other).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert_eq!(stack.sandbox.requests().len(), 1);

    // Once the token is deleted, a replay answers NOT_FOUND like any use of it.
    client.delete(&token).await.unwrap();
    let err = client.forward(request).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    stack.stop().await;
}

/// Control: PCI-3.3.1, PCI-3.3.1.2, PCI-3.3.2 (docs/compliance.md).
/// Attack: find a CVC after its authorization: a second forward of the same token, or any
/// file of the data directory; the first forward uses it, then it exists nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cvc_is_forwarded_once_and_never_stored() {
    if integration_tests::rocksdb_only("it scans the RocksDB data directory") {
        return;
    }
    let mut stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let token = tokenize(
        &mut client,
        Card::new("4242424242424242", 12, 2030).with_cvc("0000"),
    )
    .await;
    let answer = client
        .forward(charge("sandbox", &token, CHARGE_WITH_CVC))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", body_text(&answer.body));
    let sent: serde_json::Value =
        serde_json::from_slice(&stack.sandbox.requests()[0].body).unwrap();
    assert_eq!(sent["cvc"], "0000");

    let err = client
        .forward(charge("sandbox", &token, CHARGE_WITH_CVC))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("CVC"), "{err}");
    // Forwards that do not need it still work.
    client
        .forward(charge("sandbox", &token, CHARGE))
        .await
        .unwrap();

    // After a restart a CVC is gone.
    let kept = tokenize(
        &mut client,
        Card::new("5555555555554444", 12, 2030).with_cvc("0000"),
    )
    .await;
    stack.restart_vault().await;
    let mut client = stack.client(ADMIN).await;
    let err = client
        .forward(charge("sandbox", &kept, CHARGE_WITH_CVC))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");

    // Nothing in any column family holds a CVC: no key or value holds "0000" as a
    // word of its own, and no CVC was ever written as its own entry.
    stack.stop_vault().await;
    let db = integration_tests::open_vault_db(&stack.dir.data_dir());
    for family in rocksdb::DB::list_cf(&rocksdb::Options::default(), stack.dir.data_dir()).unwrap()
    {
        let cf = db.cf_handle(&family).unwrap();
        for entry in db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (key, value) = entry.unwrap();
            for bytes in [&key[..], &value[..]] {
                assert!(
                    !integration_tests::contains_word(bytes, b"0000"),
                    "a CVC in column family {family}"
                );
            }
        }
    }
    drop(db);
    stack.stop().await;
}

/// Control: PCI-3.3.1.2 (docs/compliance.md).
/// Attack: use a held CVC long after the purchase; after its TTL a forward that needs it is
/// refused and nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cvc_expires_after_its_ttl() {
    let stack = Stack::start_with_cvc_ttl(StackDir::new(), 1).await;
    let mut client = stack.client(ADMIN).await;
    let token = tokenize(
        &mut client,
        Card::new("4242424242424242", 12, 2030).with_cvc("123"),
    )
    .await;
    // The TTL is what is under test: waiting it out is the point.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let err = client
        .forward(charge("sandbox", &token, CHARGE_WITH_CVC))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(stack.sandbox.requests().is_empty());
    stack.stop().await;
}

/// Sequential forwards against the sandbox; prints the rate (the figure the forwarding
/// issue asks for; a benchmark harness will measure it properly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_rate_against_the_sandbox() {
    const COUNT: usize = 500;
    let stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let token = tokenize(&mut client, Card::new("4242424242424242", 12, 2030)).await;
    let started = Instant::now();
    for _ in 0..COUNT {
        assert_eq!(
            client
                .forward(charge("sandbox", &token, CHARGE))
                .await
                .unwrap()
                .status,
            200
        );
    }
    let elapsed = started.elapsed();
    println!(
        "{COUNT} sequential forwards in {elapsed:.2?} ({:.0}/s)",
        COUNT as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(stack.sandbox.requests().len(), COUNT);
    stack.stop().await;
}

/// Whatever shape the processor echoes the card in, the caller gets no card data back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_card_data_is_scrubbed_whatever_its_shape() {
    let stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let token = tokenize(
        &mut client,
        Card::new("4242424242424242", 12, 2030)
            .with_cardholder_name("Zyx Holder")
            .with_cvc("9731"),
    )
    .await;
    // The processor echoes every field; the vault scrubs the number it injected, and
    // the CVC and name too. (A field glued to other digits is refused before sending:
    // see `hostile_echoes_come_back_masked_or_refused`.)
    let body = r#"{"c":"{{card.cvc}}","d":"{{card.name}}","number":"{{card.number}}","exp_month":"{{card.exp_month}}","exp_year":"{{card.exp_year}}"}"#;
    let mut echo = charge("sandbox", &token, body);
    echo.headers.push(("x-sandbox-echo".into(), "1".into()));
    let answer = client.forward(echo).await.unwrap();
    let text = body_text(&answer.body);
    assert_eq!(answer.status, 200);
    assert!(!text.contains("424242424242"), "{text}");
    assert!(
        !text.contains("9731") && !text.contains("Zyx Holder"),
        "{text}"
    );
    let sent = body_text(&stack.sandbox.requests()[0].body);
    assert!(
        sent.contains("4242424242424242") && sent.contains("9731") && sent.contains("Zyx Holder")
    );
    stack.stop().await;
}

/// Control: PCI-6.2.4 (docs/compliance.md).
/// Attack: a caller asks for a compressed or partial answer (which the masker could not
/// read), hides path segments in characters a URL parser would drop, or puts the name where
/// it cannot be escaped; each request is refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_could_hide_or_misroute_the_card_are_refused() {
    let stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let token = tokenize(
        &mut client,
        Card::new("4242424242424242", 12, 2030).with_cardholder_name("Ada"),
    )
    .await;

    // A compressed or partial answer could not be masked.
    for header in ["accept-encoding", "range"] {
        let mut request = charge("sandbox", &token, CHARGE);
        request.headers.push((header.into(), "gzip".into()));
        let err = client.forward(request).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{header}: {err}");
    }
    // Characters a URL parser would drop are refused, not normalised.
    let request = ForwardRequest {
        path: "/v1/charges/.\t./x".into(),
        method: "GET".into(),
        ..charge("sandbox", &token, CHARGE)
    };
    assert_eq!(
        client.forward(request).await.unwrap_err().code(),
        Some(Code::PermissionDenied)
    );
    // The name only goes where it can be escaped.
    let mut raw = charge("sandbox", &token, "name={{card.name}}");
    raw.headers.clear();
    let err = client.forward(raw).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    let mut twice = charge("sandbox", &token, CHARGE);
    twice
        .headers
        .push(("Content-Type".into(), "text/plain".into()));
    assert_eq!(
        client.forward(twice).await.unwrap_err().code(),
        Some(Code::InvalidArgument)
    );
    assert!(stack.sandbox.requests().is_empty());
    stack.stop().await;
}

/// A forward whose outcome is unknown (the processor may have charged) is never sent
/// again under the same key; one that failed before sending may be retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_outcome_is_not_retried_under_the_same_key() {
    let stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let token = tokenize(&mut client, Card::new("4242424242424242", 12, 2030)).await;

    let mut slow = ForwardRequest {
        idempotency_key: Some("order-7".into()),
        ..charge("slow", &token, CHARGE)
    };
    slow.headers
        .push(("x-sandbox-delay-ms".into(), "3000".into()));
    assert_eq!(
        client.forward(slow.clone()).await.unwrap_err().code(),
        Some(Code::DeadlineExceeded)
    );
    let err = client.forward(slow).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Aborted), "{err}");
    assert_eq!(stack.sandbox.requests().len(), 1, "sent once, never again");

    let down = ForwardRequest {
        idempotency_key: Some("order-8".into()),
        ..charge("down", &token, CHARGE)
    };
    assert_eq!(
        client.forward(down.clone()).await.unwrap_err().code(),
        Some(Code::Unavailable)
    );
    assert_eq!(
        client.forward(down).await.unwrap_err().code(),
        Some(Code::Unavailable),
        "nothing was sent: retry allowed"
    );
    stack.stop().await;
}

/// A forward says why the card is sent: required where the processor's config says
/// so, checked (bounded, printable, nothing like a card number, never echoed), and
/// kept in the audit log with the intent and the call.
///
/// Control: PCI-10.2.1.1, TOK-DETOKENIZE (docs/compliance.md).
/// Attack: send cards out with no stated purpose, or smuggle a card number into the reason
/// field; a required reason is enforced and checked, and recorded with the intent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_gives_its_reason_to_the_audit_log() {
    let stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let token = tokenize(&mut client, Card::new("4242424242424242", 12, 2030)).await;
    let sent_before = stack.sandbox.requests().len();
    let with_reason = |reason: Option<&str>| ForwardRequest {
        reason: reason.map(str::to_owned),
        ..charge("reasoned", &token, CHARGE)
    };
    let long = "x".repeat(201);
    for (reason, rule) in [
        (None, "required"),
        (Some("refund of 4242 4242 4242 4242"), "card_number"),
        (Some("ref 5555-5555-5555-4444 again"), "card_number"),
        (Some("line\nbreak"), "characters"),
        (Some(long.as_str()), "too_long"),
    ] {
        let err = client.forward(with_reason(reason)).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{reason:?}: {err}");
        let message = err.to_string();
        assert!(
            message.contains("reason") && message.contains(rule),
            "{reason:?}: {message}"
        );
        assert!(
            !message.contains("4242") && !message.contains("5555"),
            "{message}"
        );
    }
    assert_eq!(
        stack.sandbox.requests().len(),
        sent_before,
        "nothing was sent"
    );

    let reason = "recurring charge 2026-12 (order 12345678901)";
    let answer = client.forward(with_reason(Some(reason))).await.unwrap();
    assert_eq!(answer.status, 200);
    // Elsewhere a reason is optional.
    client
        .forward(charge("sandbox", &token, CHARGE))
        .await
        .unwrap();

    let events = client.read_audit(0, None, None, 0).await.unwrap().events;
    for action in ["ForwardStarted", "Forward"] {
        let event = events
            .iter()
            .find(|e| {
                e.action == action
                    && e.processor.as_deref() == Some("reasoned")
                    && e.outcome != "INVALID_ARGUMENT"
            })
            .unwrap_or_else(|| panic!("no {action} event"));
        assert_eq!(event.reason.as_deref(), Some(reason), "{event:?}");
    }
    // A refused forward's event keeps no reason: it was not checked.
    assert!(
        events
            .iter()
            .filter(|e| e.outcome == "INVALID_ARGUMENT")
            .all(|e| e.reason.is_none())
    );
    stack.stop().await;
}

/// The CVC store is bounded per tenant and in all; a card refused for lack of room
/// leaves no record; a used CVC frees its room; a CVC sent with `reuse_existing`
/// replaces the one held only if the same identity sent that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cvc_store_is_bounded_and_only_its_sender_replaces_a_cvc() {
    let dir = StackDir::new();
    dir.add_client_identity("second-service");
    let policy = dir.path().join("policy.toml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(&format!(
        "\n[[identity]]\nid = \"{}\"\ntenant = \"acme\"\npermissions = [\"tokenize\", \"read\"]\n",
        integration_tests::identity("second-service")
    ));
    std::fs::write(&policy, text).unwrap();
    let stack = Stack::start_with_forwarding(
        dir,
        "cvc_ttl_secs = 3600\nmax_cvcs = 5\nmax_cvcs_per_tenant = 3\n",
    )
    .await;
    let mut acme = stack.client(ADMIN).await;
    let mut globex = stack.client(OTHER_TENANT).await;
    let with_cvc =
        |n: u64, cvc: &str| Card::new(&testcards::card_number(n), 12, 2030).with_cvc(cvc);
    let mut held = Vec::new();
    for n in 0..3 {
        held.push(
            acme.tokenize(with_cvc(n, "123"), false)
                .await
                .unwrap()
                .token,
        );
    }
    // acme's share is used up: refused, and nothing stored.
    let err = acme.tokenize(with_cvc(3, "123"), false).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("CVC"), "{err}");
    assert!(
        acme.find_subject(&testcards::card_number(3))
            .await
            .unwrap()
            .is_empty()
    );
    // Without a CVC the card goes in.
    acme.tokenize(Card::new(&testcards::card_number(3), 12, 2030), false)
        .await
        .unwrap();
    // A batch: the items with a CVC are refused, the others stored.
    let items = acme
        .tokenize_batch(
            &[
                with_cvc(4, "123"),
                Card::new(&testcards::card_number(5), 12, 2030),
            ],
            false,
        )
        .await
        .unwrap();
    assert!(
        matches!(&items[0], BatchItem::Invalid { field, rule, .. } if field == "cards.cvc" && rule == "capacity"),
        "{items:?}"
    );
    assert!(matches!(items[1], BatchItem::Stored(_)));
    assert!(
        acme.find_subject(&testcards::card_number(4))
            .await
            .unwrap()
            .is_empty()
    );
    // globex has its own share, up to what is left in all (5).
    for n in 10..12 {
        globex.tokenize(with_cvc(n, "123"), false).await.unwrap();
    }
    let err = globex
        .tokenize(with_cvc(12, "123"), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    let (_, metrics) = integration_tests::http_get(stack.vault_admin_addr, "/metrics").await;
    assert!(metrics.contains("tokenvault_cvcs_held 5"), "{metrics}");
    assert!(
        metrics.contains("tokenvault_events_total{kind=\"cvc_store_full\"} 3"),
        "{metrics}"
    );

    // A forward uses a CVC up, which frees its room (two, for room for the reservation
    // a reuse_existing call with a CVC makes below).
    for token in &held[..2] {
        acme.forward(charge("sandbox", token, CHARGE_WITH_CVC))
            .await
            .unwrap();
    }
    let fresh = acme
        .tokenize(with_cvc(20, "321"), false)
        .await
        .unwrap()
        .token;

    // Another identity of the tenant sends the same card with another CVC: the token is
    // reused, the CVC held stays, and the answer says so.
    let mut second = stack.client("second-service").await;
    let card = testcards::card_number(20);
    let info = second
        .tokenize(Card::new(&card, 12, 2030).with_cvc("999"), true)
        .await
        .unwrap();
    assert!(info.reused && info.cvc_not_kept, "{info:?}");
    assert_eq!(info.token, fresh);
    // The identity that sent it may replace it.
    let info = acme
        .tokenize(Card::new(&card, 12, 2030).with_cvc("456"), true)
        .await
        .unwrap();
    assert!(info.reused && !info.cvc_not_kept, "{info:?}");
    let before = stack.sandbox.requests().len();
    acme.forward(charge("sandbox", &fresh, CHARGE_WITH_CVC))
        .await
        .unwrap();
    let sent: serde_json::Value =
        serde_json::from_slice(&stack.sandbox.requests()[before].body).unwrap();
    assert_eq!(sent["cvc"], "456");
    stack.stop().await;
}

/// A processor that echoes the card back in a form meant to slip past the masker: each
/// comes back masked, or is withheld with FAILED_PRECONDITION (the request was sent;
/// a retry under its idempotency key gets the same, and nothing is sent twice).
///
/// Control: PCI-3.4.1 (docs/compliance.md).
/// Attack: a processor (or someone who controls its answers) echoes the card in shapes
/// meant to slip past the masker: escapes, fullwidth digits, cut over headers, compressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_echoes_come_back_masked_or_refused() {
    let stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let token = tokenize(
        &mut client,
        Card::new("4242424242424242", 12, 2030).with_cardholder_name("Ada Lovelace"),
    )
    .await;
    let body = r#"{"number":"{{card.number}}","name":"{{card.name}}","amount":"100"}"#;
    let echo_as = |mode: &str| ForwardRequest {
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-sandbox-echo-as".into(), mode.into()),
        ],
        ..charge("sandbox", &token, body)
    };
    // What the caller must never see, in any case or encoding.
    let leaks = |text: &str| {
        let lower = text.to_lowercase();
        let unescaped = lower.replace("\\u00", "%");
        let digits: String = unescaped
            .split('%')
            .map(|piece| {
                piece
                    .get(..2)
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .map_or_else(
                        || piece.to_owned(),
                        |b| format!("{}{}", b as char, &piece[2..]),
                    )
            })
            .collect();
        ["lovelace", "ada", "424242424242"]
            .into_iter()
            .filter(|word| lower.contains(word) || digits.contains(word))
            .collect::<Vec<_>>()
    };

    for mode in ["upper", "unicode"] {
        let answer = client.forward(echo_as(mode)).await.unwrap();
        let text = body_text(&answer.body);
        assert!(leaks(&text).is_empty(), "{mode}: {text}");
        let last_four = match mode {
            "upper" => "4242",
            _ => "\\u0034\\u0032\\u0034\\u0032",
        };
        assert!(
            text.contains(last_four),
            "{mode}: the last four stay: {text}"
        );
    }
    // The number cut over several headers.
    let answer = client.forward(echo_as("split-headers")).await.unwrap();
    let headers: String = answer
        .headers
        .iter()
        .filter(|(name, _)| name.starts_with("x-echo-"))
        .map(|(_, value)| value.as_str())
        .collect();
    assert!(headers.contains("\"number\""), "{headers}");
    assert!(leaks(&headers).is_empty(), "{headers}");

    // Answers the masker cannot read are withheld, without echoing their headers.
    for mode in ["gzip", "utf16", "binary"] {
        let before = stack.sandbox.requests().len();
        let request = ForwardRequest {
            idempotency_key: Some(format!("hostile-{mode}")),
            ..echo_as(mode)
        };
        let err = client.forward(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::FailedPrecondition), "{mode}: {err}");
        let message = err.to_string();
        assert!(
            message.contains("was sent") && message.contains("withheld"),
            "{message}"
        );
        for value in ["gzip", "utf-16", "octet-stream"] {
            assert!(!message.contains(value), "{mode}: {message}");
        }
        let again = client.forward(request).await.unwrap_err();
        assert_eq!(
            again.code(),
            Some(Code::FailedPrecondition),
            "{mode}: {again}"
        );
        assert_eq!(
            stack.sandbox.requests().len(),
            before + 1,
            "{mode}: sent once"
        );
    }

    // A card value glued to other characters is refused before anything is sent, and
    // so are the headers that would ask for another representation.
    let before = stack.sandbox.requests().len();
    let glued = charge(
        "sandbox",
        &token,
        r#"{"number":"{{card.number}}","amount":"1{{card.cvc}}"}"#,
    );
    let err = client.forward(glued).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("glued"), "{err}");
    for header in ["accept", "Accept-Charset"] {
        let request = ForwardRequest {
            headers: vec![(header.into(), "text/plain".into())],
            ..charge("sandbox", &token, body)
        };
        let err = client.forward(request).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{header}: {err}");
    }
    assert_eq!(stack.sandbox.requests().len(), before, "nothing was sent");
    stack.stop().await;
}

/// Processor-owned requests: a caller names a declared route and gives its fields;
/// the config owns method, path, body and the processor's credentials. A caller can
/// neither set a header the route does not list (the credentials least of all), nor
/// reach a route the processor did not declare, nor send free-form to it; a field
/// value reading like a placeholder is sent as text; fields are checked.
///
/// Control: PCI-6.2.4 (docs/compliance.md).
/// Attack: a forwarding service sets the processor's headers or credentials, reaches an
/// undeclared route, sends free-form, or injects a placeholder through a field value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_names_a_route_and_the_config_owns_the_request() {
    let stack = Stack::start().await;
    let mut client = stack.client(ADMIN).await;
    let token = tokenize(
        &mut client,
        Card::new("4242424242424242", 12, 2030).with_cvc("737"),
    )
    .await;
    let route =
        |name: &str, fields: &[(&str, &str)]| ForwardRequest::route("routed", name, &token, fields);

    let answer = client
        .forward(route(
            "charge",
            &[("amount", "10.50"), ("memo", "{{card.number}}")],
        ))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", body_text(&answer.body));
    let sent = stack.sandbox.requests().last().unwrap().clone();
    assert_eq!(
        (sent.method.as_str(), sent.path.as_str()),
        ("POST", "/v1/charges")
    );
    let body: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(body["number"], "4242424242424242");
    assert_eq!(body["amount"], "10.50");
    // One pass: the caller's value stays text, never expanded into the card.
    assert_eq!(body["memo"], "{{card.number}}");
    let header = |name: &str| {
        sent.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header("authorization").as_deref(),
        Some(format!("Bearer {}", integration_tests::SANDBOX_API_KEY).as_str())
    );
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    // The CVC goes only where the route declares it.
    assert!(body.get("cvc").is_none(), "{body}");
    client
        .forward(route("authorize", &[("amount", "1")]))
        .await
        .unwrap();
    let sent = stack.sandbox.requests().last().unwrap().clone();
    let body: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(body["cvc"], "737");
    // A path field: an id, one segment.
    client
        .forward(route("capture", &[("charge_id", "ch_123")]))
        .await
        .unwrap();
    assert_eq!(
        stack.sandbox.requests().last().unwrap().path,
        "/v1/charges/ch_123/capture"
    );

    let before = stack.sandbox.requests().len();
    let caller = client.clone();
    let refused = |request: ForwardRequest| {
        let mut client = caller.clone();
        async move { client.forward(request).await.unwrap_err() }
    };
    // Processor-owned headers, and any the route does not list.
    for header in ["authorization", "x-forwarded-host"] {
        let err = refused(ForwardRequest {
            headers: vec![(header.into(), "Bearer attacker".into())],
            ..route("charge", &[("amount", "1")])
        })
        .await;
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{header}: {err}");
    }
    // A header the route lists goes through as text.
    client
        .forward(ForwardRequest {
            headers: vec![("x-request-source".into(), "{{card.number}}".into())],
            ..route("charge", &[("amount", "1")])
        })
        .await
        .unwrap();
    let sent = stack.sandbox.requests().last().unwrap().clone();
    assert!(
        sent.headers
            .contains(&("x-request-source".into(), "{{card.number}}".into()))
    );
    let before = before + 1;
    // Undeclared routes, free-form, and the two mixed.
    let err = refused(route("refund", &[("amount", "1")])).await;
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    let err = refused(charge("routed", &token, CHARGE)).await;
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    let err = refused(ForwardRequest {
        path: "/v1/refunds".into(),
        ..route("charge", &[("amount", "1")])
    })
    .await;
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    // Fields: unknown, missing, of the wrong kind, too long, a path escape.
    for (what, fields) in [
        ("unknown", vec![("amount", "1"), ("account", "mine")]),
        ("missing", vec![]),
        ("kind", vec![("amount", "12a")]),
        ("length", vec![("amount", "1"), ("memo", &"x".repeat(41))]),
        ("control", vec![("amount", "1"), ("memo", "a\r\nb")]),
    ] {
        let err = refused(route("charge", &fields)).await;
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{what}: {err}");
    }
    for id in ["..", "a/b", "ch 1"] {
        let err = refused(route("capture", &[("charge_id", id)])).await;
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{id}: {err}");
    }
    assert_eq!(stack.sandbox.requests().len(), before, "nothing was sent");
    stack.stop().await;
}
