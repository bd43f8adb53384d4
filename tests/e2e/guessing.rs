//! Card guessing, tried on the running vault: with a card's first six and last four
//! known, the middle digits are enumerated through FindSubject, through Tokenize with
//! `reuse_existing`, and through TokenizeBatch. Each is refused after 32 different
//! cards in the bucket (far below the 10^5 candidates of a 16-digit card), the identity
//! is flagged there (audit event, metric, `blocks list`) until an admin lifts it, and
//! unrelated cards keep going through.

use integration_tests::{ADMIN, OTHER_TENANT, Stack, StackDir, http_get, identity};
use tonic::Code;
use vault_client::{BatchItem, Card, VaultClient};

/// The default threshold: different cards per identity and bucket.
const THRESHOLD: usize = 32;

/// Luhn-valid 16-digit numbers with the first six and last four of `known`, middle
/// digits counted up from `start` (the guesser's candidates).
fn candidates(known: &str, start: u64) -> impl Iterator<Item = String> + '_ {
    (start..1_000_000).filter_map(move |middle| {
        let body = format!("{}{middle:06}{}", &known[..6], &known[12..15]);
        let number = format!("{body}{}", testcards::luhn_digit(&body));
        (number.ends_with(&known[12..]) && number != known).then_some(number)
    })
}

fn card(number: &str) -> Card {
    Card::new(number, 12, 2031)
}

/// The code and message of a refused call.
fn refused<T: std::fmt::Debug>(result: Result<T, vault_client::Error>) -> (Code, String) {
    let error = result.unwrap_err();
    (error.code().unwrap(), error.to_string())
}

async fn flags(admin: &mut VaultClient) -> Vec<String> {
    admin
        .list_blocks()
        .await
        .unwrap()
        .into_iter()
        .filter(|block| block.kind == "guessing")
        .map(|block| {
            assert_eq!(block.until_unix_ms, 0, "a flag ends only when lifted");
            block.subject
        })
        .collect()
}

/// Control: PCI-3.5.1.1, TOK-ORACLE (docs/compliance.md).
/// Attack: from a card's first six and last four, try every candidate middle (lookups,
/// tokenize with reuse, fingerprints) to find the card; refused after 32 different cards
/// per bucket and flagged until an admin lifts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middle_digits_cannot_be_guessed_and_the_guesser_is_flagged_until_lifted() {
    let dir = StackDir::new();
    dir.add_client_identity("batcher");
    let mut stack = Stack::start_in(dir).await;
    // A service identity that tokenizes in bulk, and lets FindSubject be tried past
    // its rate limit here (the limit has a test of its own below).
    let policy = stack.dir.path().join("policy.toml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(&format!(
        "\n[[identity]]\nid = \"{}\"\ntenant = \"acme\"\npermissions = [\"tokenize\", \"read\"]\n",
        identity("batcher")
    ));
    std::fs::write(&policy, text).unwrap();
    stack.add_vault_config("[guessing]\nfind_subject_per_minute = 1000\n");
    stack.restart_vault().await;
    let mut admin = stack.client(ADMIN).await;

    // The victim's card is in acme; its first six and last four are known.
    let victim = "4242424242424242";
    let stored = admin.tokenize(card(victim), false).await.unwrap();
    assert!(!stored.fingerprint.is_empty(), "admin has `fingerprint`");

    // 1. FindSubject, as an identity with `subject` (here the admin, whose tokenization
    // of the victim's card counted as the bucket's first card).
    let mut guesses = candidates(victim, 0);
    for _ in 1..THRESHOLD {
        let guess = guesses.next().unwrap();
        assert!(admin.find_subject(&guess).await.unwrap().is_empty());
    }
    let (code, message) = refused(admin.find_subject(&guesses.next().unwrap()).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(message.contains("first six and last four"), "{message}");
    // Flagged in that bucket: even the right guess is refused now, and waiting does
    // not help (nothing expires it).
    let (code, _) = refused(admin.find_subject(victim).await);
    assert_eq!(code, Code::PermissionDenied);
    // Other cards of that identity go on.
    assert!(
        admin
            .find_subject("5555555555554444")
            .await
            .unwrap()
            .is_empty()
    );
    let subject = format!("{} bucket ", identity(ADMIN));
    let listed = flags(&mut admin).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].starts_with(&subject), "{listed:?}");

    // The audit event names the identity and tenant, and a keyed bucket id: no digits
    // of the card.
    // The flag is stored and audited by a task of its own (a caller that goes away
    // cannot stop it): within moments.
    let flag = integration_tests::within(
        std::time::Duration::from_secs(5),
        "the GuessingFlag event",
        || {
            let mut admin = admin.clone();
            async move {
                let events = admin.read_audit(0, None, None, 0).await.unwrap().events;
                events
                    .into_iter()
                    .find(|event| event.action == "GuessingFlag")
            }
        },
    )
    .await;
    let detail = flag.detail.clone().unwrap_or_default();
    assert_eq!(flag.actor, identity(ADMIN));
    assert_eq!(flag.tenant.as_deref(), Some("acme"));
    for digits in ["424242", "4242"] {
        assert!(!detail.contains(digits), "{detail}");
    }
    let (_, metrics) = http_get(stack.vault_admin_addr, "/metrics").await;
    assert!(
        metrics.contains("tokenvault_events_total{kind=\"guessing_flag\"} 1"),
        "{metrics}"
    );

    // 2. Tokenize with reuse_existing, as a service of another tenant guessing its
    // own customer's card.
    let mut globex = stack.client(OTHER_TENANT).await;
    let globex_card = "5555555555554444";
    globex.tokenize(card(globex_card), false).await.unwrap();
    let mut guesses = candidates(globex_card, 0);
    for _ in 1..THRESHOLD {
        let info = globex
            .tokenize(card(&guesses.next().unwrap()), true)
            .await
            .unwrap();
        assert!(info.fingerprint.is_empty(), "no `fingerprint` permission");
    }
    let (code, _) = refused(globex.tokenize(card(&guesses.next().unwrap()), true).await);
    assert_eq!(code, Code::PermissionDenied);
    let (code, _) = refused(globex.tokenize(card(globex_card), true).await);
    assert_eq!(
        code,
        Code::PermissionDenied,
        "the real card too, once flagged"
    );

    // 3. TokenizeBatch with reuse_existing: a thousand guesses in one call.
    let mut batcher = stack.client("batcher").await;
    let batch: Vec<Card> = candidates(victim, 500_000)
        .take(1000)
        .map(|n| card(&n))
        .collect();
    let results = batcher.tokenize_batch(&batch, true).await.unwrap();
    let stored = results
        .iter()
        .filter(|r| matches!(r, BatchItem::Stored(_)))
        .count();
    assert_eq!(stored, THRESHOLD, "only the first {THRESHOLD} go through");
    assert!(results[THRESHOLD..].iter().all(|r| matches!(
        r,
        BatchItem::Invalid { rule, .. } if rule == "guessing"
    )));
    // ...while a batch of a thousand unrelated cards goes through whole.
    let unrelated: Vec<Card> = (0..1000)
        .map(|n| card(&testcards::card_number(n)))
        .collect();
    let results = batcher.tokenize_batch(&unrelated, true).await.unwrap();
    assert!(
        results.iter().all(|r| matches!(r, BatchItem::Stored(_))),
        "{:?}",
        results.iter().find(|r| !matches!(r, BatchItem::Stored(_)))
    );
    assert_eq!(flags(&mut admin).await.len(), 3);

    // Flags survive a restart (they are in the store).
    stack.restart_vault().await;
    let mut admin = stack.client(ADMIN).await;
    let listed = flags(&mut admin).await;
    assert_eq!(listed.len(), 3, "{listed:?}");

    // An admin lifts one; that identity is served in that bucket again.
    let batcher_flag = listed
        .iter()
        .find(|s| s.starts_with(&identity("batcher")))
        .unwrap()
        .clone();
    admin.lift_block("guessing", &batcher_flag).await.unwrap();
    let (code, message) = refused(admin.lift_block("guessing", &batcher_flag).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    let mut batcher = stack.client("batcher").await;
    batcher.tokenize(card(victim), true).await.unwrap();
    assert_eq!(flags(&mut admin).await.len(), 2);
    stack.stop().await;
}

/// Control: TOK-ORACLE, GDPR-15 (docs/compliance.md).
/// Attack: use card lookup as an oracle, trying candidate numbers fast; the calls beyond
/// the per-identity rate are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_subject_is_rate_limited_per_identity() {
    let stack = Stack::start().await;
    let mut globex = stack.client(OTHER_TENANT).await;
    // The same card each time: nothing for the guessing detector.
    for _ in 0..30 {
        globex.find_subject("4242424242424242").await.unwrap();
    }
    let (code, message) = refused(globex.find_subject("4242424242424242").await);
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    // Another identity is not held by it.
    let mut admin = stack.client(ADMIN).await;
    admin.find_subject("4242424242424242").await.unwrap();
    stack.stop().await;
}
