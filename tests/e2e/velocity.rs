//! Velocity flags: forwards of one card or by one caller above a limit within the
//! window are flagged in the audit log, and refused when so configured.

use integration_tests::{ADMIN, Stack};
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
