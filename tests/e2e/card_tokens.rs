//! Card-shaped tokens (`format = card`) through the real servers: their shape, every
//! RPC that takes a token, the tenant defaults of `[tokens]`, a card number sent where
//! a token belongs, and a token space that runs out (first six and last four kept).

use std::collections::HashSet;

use integration_tests::{ADMIN, OTHER_TENANT, Stack, synthetic_pan};
use tonic::Code;
use vault_client::{BatchItem, Card, TokenFormat, TokenizeOptions};

/// globex gets card-shaped tokens by default, keeping the first six; acme asks for
/// them per call and keeps the last four only.
const TOKENS: &str = r#"
[tokens]
tenant_default_format = { globex = "card" }
keep_first_six_tenants = ["globex"]
"#;

async fn stack() -> Stack {
    let mut stack = Stack::start().await;
    stack.add_vault_config(TOKENS);
    stack.restart_vault().await;
    stack
}

fn card_format() -> TokenizeOptions {
    TokenizeOptions {
        format: TokenFormat::Card,
        ..TokenizeOptions::default()
    }
}

/// The Luhn check, from the test cards' crate (not the vault's).
fn luhn_valid(digits: &str) -> bool {
    let (body, check) = digits.split_at(digits.len() - 1);
    check.starts_with(testcards::luhn_digit(body))
}

/// A card-shaped token of `card`: its length, all digits, failing the Luhn check, its
/// last four, never the card.
fn assert_card_shaped(token: &str, card: &str) {
    assert_eq!(token.len(), card.len(), "{token}");
    assert!(token.bytes().all(|b| b.is_ascii_digit()), "{token}");
    assert!(!luhn_valid(token), "{token} passes the Luhn check");
    assert_eq!(token[token.len() - 4..], card[card.len() - 4..]);
    assert!(token != card, "the token is the card");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn card_shaped_tokens_work_wherever_a_token_does() {
    let stack = stack().await;
    let mut client = stack.client(ADMIN).await;
    let card = "4242424242424242";

    let stored = client
        .tokenize_with(Card::new(card, 12, 2030), card_format())
        .await
        .unwrap();
    assert_card_shaped(&stored.token, card);
    assert_ne!(&stored.token[..1], "0");
    assert_eq!(
        (stored.brand.as_str(), stored.last_four.as_str()),
        ("visa", "4242")
    );
    // acme has no default: opaque, unless asked.
    let opaque = client
        .tokenize(Card::new(card, 12, 2030), false)
        .await
        .unwrap();
    assert!(opaque.token.starts_with("tok_"), "{}", opaque.token);
    let batch = client
        .tokenize_batch_with(
            &[
                Card::new("5555555555554444", 1, 2031),
                Card::new("378282246310005", 1, 2031),
            ],
            card_format(),
        )
        .await
        .unwrap();
    for (item, card) in batch.iter().zip(["5555555555554444", "378282246310005"]) {
        let BatchItem::Stored(info) = item else {
            panic!("refused: {item:?}")
        };
        assert_card_shaped(&info.token, card);
    }

    // GetTokenInfo, Forward, FindSubject, DeleteToken.
    assert_eq!(client.token_info(&stored.token).await.unwrap(), stored);
    assert_eq!(stack.forward_number(&mut client, &stored.token).await, card);
    let found = client.find_subject(card).await.unwrap();
    assert!(found.contains(&stored.token) && found.contains(&opaque.token));
    // Another tenant's card-shaped token is unknown, as an opaque one would be.
    let mut globex = stack.client(OTHER_TENANT).await;
    let err = globex.token_info(&stored.token).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    client.delete(&stored.token).await.unwrap();
    let err = client.token_info(&stored.token).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));

    // The audit log names card-shaped tokens like opaque ones.
    let page = client.read_audit(0, None, None, 1000).await.unwrap();
    assert!(
        page.events
            .iter()
            .any(|e| e.action == "DeleteToken" && e.token.as_deref() == Some(&stored.token))
    );
    stack.stop().await;
}

/// Control: TOK-DISTINGUISH (docs/compliance.md).
/// Attack: a caller sends a real card number where a token belongs (by mistake or to
/// probe); it is refused as no token and the number is echoed nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_number_sent_as_a_token_is_refused_and_never_echoed() {
    let stack = stack().await;
    let mut client = stack.client(ADMIN).await;
    let stored = client
        .tokenize(Card::new("4242424242424242", 12, 2030), false)
        .await
        .unwrap();
    let cards = [
        "4242424242424242".to_owned(),
        "378282246310005".to_owned(),
        synthetic_pan("500000", 42, 12),
        synthetic_pan("600000", 7, 19),
    ];
    for card in &cards {
        let errors = [
            client.token_info(card).await.unwrap_err(),
            client.delete(card).await.unwrap_err(),
            client
                .forward(integration_tests::charge(
                    "sandbox",
                    card,
                    integration_tests::CHARGE,
                ))
                .await
                .unwrap_err(),
        ];
        for err in errors {
            assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
            let text = err.to_string();
            assert!(text.contains("Luhn"), "{text}");
            assert!(!text.contains(card.as_str()), "the card number is echoed");
            assert!(!text.contains(&card[card.len() - 4..]), "its last four too");
        }
    }
    // Nothing of them reached the audit log.
    let page = client.read_audit(0, None, None, 1000).await.unwrap();
    let log = format!("{:?}", page.events);
    for card in &cards {
        assert!(
            !log.contains(card.as_str()),
            "a card number is in the audit log"
        );
    }
    // The forward was refused before anything was sent.
    assert!(stack.sandbox.requests().is_empty());
    assert_eq!(
        client.token_info(&stored.token).await.unwrap().token,
        stored.token
    );
    stack.stop().await;
}

/// globex keeps the first six: a 12-digit card leaves 90 tokens. Tokenizing it again
/// and again fills them; then Tokenize answers RESOURCE_EXHAUSTED after a bounded
/// number of draws, and TokenizeBatch refuses that card alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_card_token_space_is_resource_exhausted() {
    let stack = stack().await;
    let mut client = stack.client(OTHER_TENANT).await;
    let card = synthetic_pan("500000", 12_345, 12);

    // The tenant's default format, first six kept.
    let other = client
        .tokenize(Card::new("5555555555554444", 1, 2031), false)
        .await
        .unwrap();
    assert_card_shaped(&other.token, "5555555555554444");
    assert_eq!(&other.token[..6], "555555");

    let mut tokens = HashSet::new();
    let mut exhausted = None;
    for _ in 0..300 {
        match client.tokenize(Card::new(&card, 1, 2031), false).await {
            Ok(stored) => {
                assert_card_shaped(&stored.token, &card);
                assert_eq!(stored.token[..6], card[..6]);
                assert!(tokens.insert(stored.token), "a token was handed out twice");
            }
            Err(err) => {
                exhausted = Some(err);
                break;
            }
        }
    }
    let err = exhausted.expect("90 tokens cannot take 300 calls");
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("card-shaped") && text.contains("draws"),
        "{text}"
    );
    assert!(!text.contains(&card), "{text}");
    assert!(
        (40..=90).contains(&tokens.len()),
        "{} tokens before giving up",
        tokens.len()
    );

    let items = client
        .tokenize_batch(
            &[
                Card::new(&card, 1, 2031),
                Card::new("4242424242424242", 1, 2031),
            ],
            false,
        )
        .await
        .unwrap();
    // With nearly every token taken the card may still find a free one now and then;
    // most often it is refused alone, and the other card is stored.
    match &items[0] {
        BatchItem::Invalid { field, rule, .. } => {
            assert_eq!((field.as_str(), rule.as_str()), ("cards", "token_space"));
        }
        BatchItem::Stored(info) => assert!(tokens.insert(info.token.clone())),
    }
    assert!(matches!(&items[1], BatchItem::Stored(info) if info.token.starts_with("424242")));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vaultctl_tokenizes_with_format_card() {
    use crate::vaultctl::{config_for, vaultctl};
    let stack = Stack::start().await;
    let config = config_for(&stack, ADMIN);
    let card = "4242424242424242";
    let out = vaultctl(
        &config,
        &["tokenize", "--exp", "12/2030", "--format", "card"],
        "4242 4242 4242 4242\n",
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let token = out.stdout.trim().to_owned();
    assert_card_shaped(&token, card);
    let out = vaultctl(&config, &["info", &token, "--json"], "").await;
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains(&token) && !out.stdout.contains(card));
    let out = vaultctl(
        &config,
        &["tokenize", "--exp", "12/2030", "--format", "opaque"],
        "4242424242424242\n",
    )
    .await;
    assert!(
        out.ok && out.stdout.trim().starts_with("tok_"),
        "{}",
        out.stderr
    );
    let out = vaultctl(&config, &["tokenize", "--format", "digits"], "").await;
    assert!(!out.ok && out.stderr.contains("digits"), "{}", out.stderr);
    stack.stop().await;
}

/// A deleted card-shaped token is not handed out again within the tombstone window:
/// whoever still holds it must never reach another card with it. globex keeps the first
/// six, so a 12-digit card has 90 tokens; tokenized and deleted 45 times, the card
/// never gets a token it had before (drawn blindly, a repeat comes after about a dozen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_card_shaped_token_is_not_handed_out_again() {
    let stack = stack().await;
    let mut client = stack.client(OTHER_TENANT).await;
    let card = synthetic_pan("500000", 54_321, 12);
    let mut deleted = HashSet::new();
    for round in 0..45 {
        let stored = client
            .tokenize(Card::new(&card, 1, 2031), false)
            .await
            .unwrap();
        assert_card_shaped(&stored.token, &card);
        assert!(
            !deleted.contains(&stored.token),
            "round {round}: a deleted token was handed out again"
        );
        client.delete(&stored.token).await.unwrap();
        deleted.insert(stored.token);
    }
    stack.stop().await;
}
