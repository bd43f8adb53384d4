//! Sealed intake, tried on the running vault as a relaying backend and as an attacker
//! holding sealed cards would: a card sealed by the Rust sealer tokenizes; sealed cards
//! under an unknown key, stamped outside the window, replayed, made for another tenant
//! or key, or changed on the way are refused with their distinct reasons; the same
//! sealed card again gets its first answer, across a restart; a rotated-away key is
//! still accepted within its overlap; and sealed cards feed the guessing detector.

use integration_tests::{ADMIN, Stack, StackDir, identity};
use tonic::Code;
use vault_client::{BatchItem, Card, KeyServiceClient, SealingKey, VaultClient};

const VISA: &str = "4242424242424242";
/// The admin's tenant in the test stack's policy.
const TENANT: &str = "acme";

/// A sealed card for `tenant` under `key`, stamped `issued_at` (the vault's clock), with
/// `nonce`: what an attacker with the public key (which is public) can make.
fn seal_raw(
    key: &SealingKey,
    tenant: &str,
    issued_at: i64,
    nonce: [u8; 16],
    number: &str,
) -> Vec<u8> {
    let json = format!(r#"{{"number":"{number}","exp_month":12,"exp_year":2031}}"#);
    let mut ikm = [0u8; 32];
    envelope::fill_random(&mut ikm).unwrap();
    envelope::sealed::seal_deterministic(
        &key.public_key,
        tenant,
        issued_at as u64,
        &nonce,
        &ikm,
        json.as_bytes(),
    )
    .unwrap()
}

fn random_nonce() -> [u8; 16] {
    let mut nonce = [0u8; 16];
    envelope::fill_random(&mut nonce).unwrap();
    nonce
}

/// The status code and ErrorInfo reason of a refusal; asserts the message does not
/// carry the card.
fn refusal<T: std::fmt::Debug>(result: Result<T, vault_client::Error>) -> (Code, String) {
    let error = result.unwrap_err();
    let text = error.to_string();
    assert!(!text.contains("4242"), "{text}");
    (
        error.code().unwrap(),
        error.reason().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_card_tokenizes_and_every_bad_one_is_refused_with_its_reason() {
    let mut stack = Stack::start().await;
    let mut vault = stack.client(ADMIN).await;
    let key = vault.sealing_key().await.unwrap();
    assert_eq!(key.tenant, "acme");
    assert_eq!(key.max_age_secs, 600);
    let local_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let skew = key.server_time_unix_ms - local_ms;
    assert!(skew.abs() < 5_000, "the vault's clock: {skew} ms off");
    assert!(key.accepted_until_unix_ms >= key.server_time_unix_ms + 86_400_000 - 1_000);

    // The Rust sealer's card, with CVC and name, tokenizes like a Tokenize.
    let card = Card::new(VISA, 12, 2031)
        .with_cvc("123")
        .with_cardholder_name("Ada Lovelace");
    let blob = key.seal(&card).unwrap();
    assert!(!blob.windows(4).any(|w| w == b"4242"), "the blob is opaque");
    let first = vault.tokenize_sealed(&blob, false).await.unwrap();
    assert_eq!(
        (first.brand.as_str(), first.last_four.as_str()),
        ("visa", "4242")
    );
    assert_eq!((first.exp_month, first.exp_year), (12, 2031));
    assert_eq!(
        vault.token_info(&first.token).await.unwrap().last_four,
        "4242"
    );
    // It forwards like any other token.
    let echoed = stack.forward_number(&mut vault, &first.token).await;
    assert_eq!(echoed, VISA);

    // The same sealed card again (a backend's retry after a timeout): the first answer.
    let again = vault.tokenize_sealed(&blob, false).await.unwrap();
    assert_eq!(again.token, first.token);
    assert!(!again.reused);

    // Another sealed card with the same nonce: a replay.
    let nonce: [u8; 16] = blob[17..33].try_into().unwrap();
    let now = key.server_time_unix_ms;
    let replay = seal_raw(&key, TENANT, now, nonce, "5555555555554444");
    assert_eq!(
        refusal(vault.tokenize_sealed(&replay, false).await),
        (Code::AlreadyExists, "SEALED_CARD_REPLAYED".into())
    );

    // Stamped outside the window: 11 minutes old, or 2 minutes ahead.
    for issued_at in [now - 660_000, now + 120_000] {
        let stale = seal_raw(&key, TENANT, issued_at, random_nonce(), VISA);
        assert_eq!(
            refusal(vault.tokenize_sealed(&stale, false).await),
            (Code::FailedPrecondition, "SEALED_CARD_EXPIRED".into())
        );
    }
    // Within it (9 minutes old) it goes through.
    let late = seal_raw(&key, TENANT, now - 540_000, random_nonce(), VISA);
    vault.tokenize_sealed(&late, false).await.unwrap();

    // An unknown key id, and a card sealed to a key the vault never had.
    let mut unknown = seal_raw(&key, TENANT, now, random_nonce(), VISA);
    unknown[1] ^= 0xff;
    assert_eq!(
        refusal(vault.tokenize_sealed(&unknown, false).await),
        (Code::FailedPrecondition, "SEALING_KEY_UNKNOWN".into())
    );

    // Wrong tenant, wrong key (sealed to another key, our key id written over its
    // own), tampered: one reason for all three.
    let other_tenant = seal_raw(&key, "globex", now, random_nonce(), VISA);
    let mut stranger = key.clone();
    let mut material = [0u8; 32];
    envelope::fill_random(&mut material).unwrap();
    let other =
        envelope::sealed::IntakeKey::derive(&envelope::SecretKey::from_slice(&material).unwrap());
    stranger.public_key = other.public_key();
    let mut wrong_key = seal_raw(&stranger, TENANT, now, random_nonce(), VISA);
    wrong_key[1..9].copy_from_slice(&key.key_id);
    let mut tampered = seal_raw(&key, TENANT, now, random_nonce(), VISA);
    let last = tampered.len() - 20;
    tampered[last] ^= 0x01;
    let mut restamped = seal_raw(&key, TENANT, now - 660_000, random_nonce(), VISA);
    restamped[9..17].copy_from_slice(&(now as u64).to_be_bytes());
    for bad in [&other_tenant, &wrong_key, &tampered, &restamped] {
        assert_eq!(
            refusal(vault.tokenize_sealed(bad, false).await),
            (Code::InvalidArgument, "SEALED_CARD_UNOPENABLE".into())
        );
    }
    // Not a sealed card at all.
    let (code, _) = refusal(vault.tokenize_sealed(&blob[..100], false).await);
    assert_eq!(code, Code::InvalidArgument);
    // A sealed card whose card is invalid: the field and rule, never the value.
    let bad_luhn = seal_raw(&key, TENANT, now, random_nonce(), "4242424242424241");
    let error = vault.tokenize_sealed(&bad_luhn, false).await.unwrap_err();
    assert_eq!(error.code(), Some(Code::InvalidArgument));
    assert!(error.to_string().contains("card.number"), "{error}");

    // A batch: each refusal by index with its rule, the rest stored.
    let fresh = key.seal(&Card::new("5555555555554444", 1, 2032)).unwrap();
    let expired = seal_raw(&key, TENANT, now - 660_000, random_nonce(), VISA);
    let items = vault
        .tokenize_sealed_batch(
            vec![
                fresh,
                expired,
                replay.clone(),
                tampered.clone(),
                unknown,
                blob.clone(),
            ],
            Default::default(),
        )
        .await
        .unwrap();
    let rules: Vec<String> = items
        .iter()
        .map(|item| match item {
            BatchItem::Stored(info) => format!("stored {}", info.last_four),
            BatchItem::Invalid { rule, .. } => rule.clone(),
        })
        .collect();
    assert_eq!(
        rules,
        [
            "stored 4444",
            "expired",
            "replayed",
            "unopenable",
            "unknown_key",
            "stored 4242"
        ]
    );
    let BatchItem::Stored(retried) = &items[5] else {
        unreachable!()
    };
    assert_eq!(
        retried.token, first.token,
        "the first answer, in a batch too"
    );

    // A card-shaped token, asked for with the sealed card.
    let shaped = key.seal(&Card::new("5555555555554444", 3, 2033)).unwrap();
    let options = vault_client::TokenizeOptions {
        format: vault_client::TokenFormat::Card,
        ..Default::default()
    };
    let shaped = vault.tokenize_sealed_with(&shaped, options).await.unwrap();
    assert_eq!(shaped.token.len(), 16);
    assert!(shaped.token.ends_with("4444"), "{}", shaped.token);
    assert!(shaped.token.bytes().all(|b| b.is_ascii_digit()));

    // Across a restart: the first answer is kept, and so is the replay's refusal.
    stack.restart_vault().await;
    let mut vault = stack.client(ADMIN).await;
    assert_eq!(
        vault.tokenize_sealed(&blob, false).await.unwrap().token,
        first.token
    );
    assert_eq!(
        refusal(vault.tokenize_sealed(&replay, false).await),
        (Code::AlreadyExists, "SEALED_CARD_REPLAYED".into())
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_intake_key_is_accepted_for_its_overlap_only() {
    let dir = StackDir::new();
    let mut stack = Stack::start_in(dir).await;
    let mut vault = stack.client(ADMIN).await;
    let old = vault.sealing_key().await.unwrap();
    let before = old.seal(&Card::new(VISA, 12, 2031)).unwrap();

    let mut keys = KeyServiceClient::connect(&stack.keyservice_config(ADMIN))
        .await
        .unwrap();
    keys.rotate("intake").await.unwrap();
    // The watch stream brings the new key within moments.
    let mut new = vault.sealing_key().await.unwrap();
    for _ in 0..100 {
        if new.key_id != old.key_id {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        new = vault.sealing_key().await.unwrap();
    }
    assert_ne!(
        new.key_id, old.key_id,
        "GetSealingKey hands out the new key"
    );
    let after = new.seal(&Card::new("5555555555554444", 12, 2031)).unwrap();
    vault.tokenize_sealed(&after, false).await.unwrap();
    // A page loaded before the rotation still works: within the default overlap.
    vault.tokenize_sealed(&before, false).await.unwrap();

    // With no overlap, the previous key is refused at once.
    stack.add_vault_config("[sealed_intake]\nkey_overlap_secs = 0\n");
    stack.restart_vault().await;
    let mut vault = stack.client(ADMIN).await;
    let late = old.seal(&Card::new(VISA, 12, 2031)).unwrap();
    assert_eq!(
        refusal(vault.tokenize_sealed(&late, false).await),
        (Code::FailedPrecondition, "SEALING_KEY_UNKNOWN".into())
    );
    stack.stop().await;
}

/// Sealed cards are counted by the guessing detector like any other: enumerating the
/// middle digits of a known first six and last four through TokenizeSealed is refused
/// after the same 32 different cards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_cards_feed_the_guessing_detector() {
    let dir = StackDir::new();
    dir.add_client_identity("relay");
    let stack = Stack::start_in(dir).await;
    let policy = stack.dir.path().join("policy.toml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(&format!(
        "\n[[identity]]\nid = \"{}\"\ntenant = \"shop\"\npermissions = [\"tokenize\"]\n",
        identity("relay")
    ));
    std::fs::write(&policy, text).unwrap();
    let mut admin = stack.client(ADMIN).await;
    admin.reload_policy().await.unwrap();
    let mut relay = VaultClient::connect(&stack.vault_config("relay"))
        .await
        .unwrap();
    let key = relay.sealing_key().await.unwrap();
    assert_eq!(key.tenant, "shop");
    let mut stored = 0;
    let mut refused = None;
    for middle in 0..100_000u64 {
        let body = format!("424242{middle:06}424");
        let number = format!("{body}{}", testcards::luhn_digit(&body));
        if !number.ends_with("4242") {
            continue;
        }
        let blob = key.seal(&Card::new(&number, 12, 2031)).unwrap();
        match relay.tokenize_sealed(&blob, false).await {
            Ok(_) => stored += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("the guesser was stopped");
    assert_eq!(refused.code(), Some(Code::PermissionDenied), "{refused}");
    assert_eq!(stored, 32);
    let flagged: Vec<String> = admin
        .list_blocks()
        .await
        .unwrap()
        .into_iter()
        .filter(|b| b.kind == "guessing")
        .map(|b| b.subject)
        .collect();
    assert_eq!(flagged.len(), 1, "{flagged:?}");
    stack.stop().await;
}

/// A caller that gives up (a deadline of a few hundred microseconds) leaves nothing
/// half done: its sealed card's nonce is claimed in the same durable write as its
/// record, so the retry right after is answered (with the first call's token if it got
/// that far), never refused as in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_giving_up_leaves_no_sealed_card_in_flight() {
    use vault_proto::vault::v1 as pb;
    let stack = Stack::start().await;
    let mut vault = stack.client(ADMIN).await;
    let key = vault.sealing_key().await.unwrap();
    let channel = integration_tests::raw_channel(&stack.dir, ADMIN, stack.vault_addr)
        .await
        .unwrap();
    let mut raw = pb::vault_client::VaultClient::new(channel);
    let mut gave_up = 0;
    for n in 0..5u64 {
        let body = format!("411111{:09}", 500_000 + n * 7);
        let number = format!("{body}{}", testcards::luhn_digit(&body));
        let blob = key.seal(&Card::new(&number, 12, 2031)).unwrap();
        let mut request = tonic::Request::new(pb::TokenizeSealedRequest {
            sealed_card: blob.clone(),
            ..Default::default()
        });
        request.set_timeout(std::time::Duration::from_micros(300));
        if raw.tokenize_sealed(request).await.is_err() {
            gave_up += 1;
        }
        let info = vault.tokenize_sealed(&blob, false).await.unwrap();
        assert_eq!(info.last_four, number[12..]);
        assert_eq!(
            vault.tokenize_sealed(&blob, false).await.unwrap().token,
            info.token
        );
    }
    assert!(gave_up > 0, "no call gave up: the test proves nothing");
    stack.stop().await;
}

/// The same sealed card sent by many callers at once (a backend retrying while its
/// first call still runs), alone and twice in one batch: one record is made, and every
/// call gets its token; another sealed card with the same nonce sent among them is
/// refused as a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_sealed_card_sent_at_once_is_stored_once() {
    let stack = Stack::start().await;
    let mut vault = stack.client(ADMIN).await;
    let key = vault.sealing_key().await.unwrap();
    let now = key.server_time_unix_ms;
    let nonce = random_nonce();
    let blob = seal_raw(&key, TENANT, now, nonce, "4242424242424242");
    let replay = seal_raw(&key, TENANT, now, nonce, "5555555555554444");
    let mut calls = Vec::new();
    for n in 0..12 {
        let mut client = stack.client(ADMIN).await;
        let blob = if n == 6 { replay.clone() } else { blob.clone() };
        calls.push(tokio::spawn(async move {
            client.tokenize_sealed(&blob, false).await
        }));
    }
    let mut tokens = Vec::new();
    let mut replayed = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(info) => tokens.push(info.token),
            Err(e) => {
                assert_eq!(e.reason(), Some("SEALED_CARD_REPLAYED"), "{e}");
                replayed += 1;
            }
        }
    }
    tokens.dedup();
    // The replay may have won the nonce: then every other call is the replay.
    match replayed {
        1 => assert_eq!(
            tokens.len(),
            1,
            "one record for one sealed card: {tokens:?}"
        ),
        11 => assert_eq!(tokens.len(), 1, "the replay won the nonce: {tokens:?}"),
        _ => panic!("{replayed} replays among {tokens:?}"),
    }
    let items = vault
        .tokenize_sealed_batch(vec![blob.clone(), blob.clone()], Default::default())
        .await
        .unwrap();
    let stored: Vec<_> = items
        .iter()
        .map(|item| match item {
            BatchItem::Stored(info) => Some(info.token.clone()),
            BatchItem::Invalid { .. } => None,
        })
        .collect();
    assert_eq!(stored[0], stored[1], "{items:?}");
    if replayed == 1 {
        assert_eq!(stored[0].as_ref(), Some(&tokens[0]));
    }
    stack.stop().await;
}

/// The same sealed card sent again after its token was deleted (a retry after an
/// erasure): refused with its own reason, never counted towards the caller's lockout,
/// alone and in a batch, where it does not stop the batch's other cards from being
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_card_whose_token_was_deleted_is_refused_without_its_batch() {
    let stack = Stack::start().await;
    let mut vault = stack.client(ADMIN).await;
    let key = vault.sealing_key().await.unwrap();
    let blob = key.seal(&Card::new(VISA, 12, 2031)).unwrap();
    let first = vault.tokenize_sealed(&blob, false).await.unwrap();
    vault.delete(&first.token).await.unwrap();
    // More often than the lockout's 20 failures: a backend retrying is not probing
    // tokens (it does not choose the token), so it is never blocked for it.
    for _ in 0..25 {
        assert_eq!(
            refusal(vault.tokenize_sealed(&blob, false).await),
            (Code::NotFound, "SEALED_CARD_TOKEN_DELETED".into())
        );
    }
    let other = key.seal(&Card::new("5555555555554444", 1, 2032)).unwrap();
    let items = vault
        .tokenize_sealed_batch(vec![other, blob], Default::default())
        .await
        .unwrap();
    assert!(
        matches!(&items[0], BatchItem::Stored(info) if info.last_four == "4444"),
        "{items:?}"
    );
    assert!(
        matches!(&items[1], BatchItem::Invalid { rule, .. } if rule == "token_deleted"),
        "{items:?}"
    );
    stack.stop().await;
}
