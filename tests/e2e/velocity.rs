//! Velocity flags: forwards of one card or by one caller above a limit within the
//! window are flagged in the audit log, and refused when so configured (before the
//! card is decrypted).

use integration_tests::{ADMIN, Stack, http_get};
use tonic::Code;
use vault_client::{Card, ForwardRequest, VaultClient};

fn charge(token: &str) -> ForwardRequest {
    integration_tests::charge("sandbox", token, integration_tests::CHARGE)
}

async fn flags(vault: &mut VaultClient) -> Vec<(String, String)> {
    vault
        .read_audit(0, None, None, 1000)
        .await
        .unwrap()
        .events
        .into_iter()
        .filter(|e| e.action == "VelocityFlag")
        .map(|e| (e.outcome, e.detail.unwrap_or_default()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwards_above_the_card_limit_are_flagged_then_refused() {
    let mut stack = Stack::start().await;
    stack.add_vault_config("[velocity]\nwindow_secs = 600\nmax_forwards_per_card = 2\n");
    stack.restart_vault().await;
    let mut vault = stack.client(ADMIN).await;
    let card = || Card::new("4242424242424242", 12, 2030);
    let first = vault.tokenize(card(), false).await.unwrap().token;
    // A second token of the same card counts for the same card.
    let second = vault.tokenize(card(), false).await.unwrap().token;
    let other = vault
        .tokenize(Card::new("5555555555554444", 12, 2030), false)
        .await
        .unwrap()
        .token;
    for token in [&first, &second, &first, &other] {
        assert_eq!(vault.forward(charge(token)).await.unwrap().status, 200);
    }
    let flagged = flags(&mut vault).await;
    assert_eq!(flagged.len(), 1, "{flagged:?}");
    assert_eq!(flagged[0].0, "flagged");
    assert!(
        flagged[0].1.contains("card forwarded 3 times"),
        "{flagged:?}"
    );
    assert_eq!(stack.sandbox.requests().len(), 4, "flagged, still sent");

    // Refusing: the fourth forward of the card never reaches the processor.
    stack.add_vault_config("refuse = true\n");
    stack.restart_vault().await;
    let mut vault = stack.client(ADMIN).await;
    for _ in 0..2 {
        vault.forward(charge(&first)).await.unwrap();
    }
    let err = vault.forward(charge(&second)).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert_eq!(stack.sandbox.requests().len(), 6);
    let flagged = flags(&mut vault).await;
    assert_eq!(flagged.last().unwrap().0, "refused", "{flagged:?}");
    assert!(!format!("{flagged:?}").contains("4242424242424242"));
    stack.stop().await;
}

/// How many times the vault has decrypted a card so far
/// (`tokenvault_events_total{kind="card_opened"}`; 0 before the first).
async fn cards_opened(stack: &Stack) -> u64 {
    let (status, metrics) = http_get(stack.vault_admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(r#"tokenvault_events_total{kind="card_opened"} "#))
        .map_or(0, |value| value.trim().parse::<f64>().unwrap() as u64)
}

/// A forward the velocity rules refuse is refused before the record is decrypted: the
/// card never sits in the vault's memory for a request that cannot send it.
///
/// Control: TOK-DETOKENIZE (docs/compliance.md).
/// Attack: a caller past its velocity limit keeps asking, so that the card is decrypted
/// into memory for requests that cannot be sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forward_refused_by_velocity_never_decrypts_the_record() {
    let mut stack = Stack::start().await;
    stack.add_vault_config(
        "[velocity]\nwindow_secs = 600\nmax_forwards_per_card = 2\nrefuse = true\n",
    );
    stack.restart_vault().await;
    let mut vault = stack.client(ADMIN).await;
    let token = vault
        .tokenize(Card::new("4242424242424242", 12, 2030), false)
        .await
        .unwrap()
        .token;

    // The forwards within the limit decrypt the card, one decryption each.
    let mut opened = cards_opened(&stack).await;
    for n in 1..=2 {
        assert_eq!(vault.forward(charge(&token)).await.unwrap().status, 200);
        let now = cards_opened(&stack).await;
        assert_eq!(now, opened + 1, "forward {n} within the limit");
        opened = now;
    }

    let err = vault.forward(charge(&token)).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert_eq!(
        cards_opened(&stack).await,
        opened,
        "the refused forward decrypted the card"
    );
    assert_eq!(
        stack.sandbox.requests().len(),
        2,
        "the refused one sent nothing"
    );
    stack.stop().await;
}
