use integration_tests::{ADMIN, FOREIGN, OTHER_TENANT, READER, STRANGER, Stack, raw_channel};
use tonic::Code;
use vault_client::{Card, VaultClient};
use vault_proto::keys::v1 as keys_pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let stack = Stack::start().await;
    for name in [FOREIGN, "foreign-admin"] {
        let outcome = async {
            let mut client = VaultClient::connect(&stack.vault_config(name)).await?;
            client
                .tokenize(Card::new("4242424242424242", 12, 2030), false)
                .await
        }
        .await;
        let err = outcome.expect_err("a foreign certificate must not be served");
        // The handshake is refused: a transport failure, never a served (or denied)
        // call.
        let refused = matches!(err, vault_client::Error::Connect(_))
            || matches!(
                err.code(),
                Some(Code::Unavailable | Code::Unknown | Code::Cancelled)
            );
        assert!(refused, "{name}: {err:?}");
    }
    // The keyservice refuses the same certificate too.
    let refused = async {
        let channel = raw_channel(&stack.dir, FOREIGN, stack.keyservice_addr)
            .await
            .map_err(|e| e.to_string())?;
        keys_pb::key_service_client::KeyServiceClient::new(channel)
            .get_keys(keys_pb::GetKeysRequest {})
            .await
            .map_err(|s| s.to_string())
    }
    .await;
    assert!(refused.is_err());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_are_enforced_deny_by_default() {
    let stack = Stack::start().await;
    let mut admin = stack.client(ADMIN).await;
    let stored = admin
        .tokenize(Card::new("4242424242424242", 12, 2030), false)
        .await
        .unwrap();

    let mut reader = stack.client(READER).await;
    assert_eq!(
        reader.token_info(&stored.token).await.unwrap().token,
        stored.token
    );
    let err = reader
        .tokenize(Card::new("4242424242424242", 12, 2030), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    assert!(!err.to_string().contains("4242"), "{err}");
    let err = reader.delete(&stored.token).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));

    let mut stranger = stack.client(STRANGER).await;
    for err in [
        stranger.token_info(&stored.token).await.unwrap_err(),
        stranger
            .tokenize(Card::new("4242424242424242", 12, 2030), false)
            .await
            .unwrap_err(),
    ] {
        assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    }
    assert_eq!(
        admin.token_info(&stored.token).await.unwrap().token,
        stored.token
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_see_another_tenants_token() {
    let stack = Stack::start().await;
    let mut acme = stack.client(ADMIN).await;
    let mut globex = stack.client(OTHER_TENANT).await;
    let acme_token = acme
        .tokenize(Card::new("4242424242424242", 12, 2030), true)
        .await
        .unwrap();

    let foreign = globex.token_info(&acme_token.token).await.unwrap_err();
    let unknown = globex
        .token_info("tok_0000000000000000000000")
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Some(Code::NotFound));
    assert_eq!(unknown.code(), Some(Code::NotFound));
    let strip = |e: &vault_client::Error| match e {
        vault_client::Error::Rejected { message, .. } => message.clone(),
        other => other.to_string(),
    };
    assert_eq!(
        strip(&foreign),
        strip(&unknown),
        "another tenant's token must look unknown"
    );
    let err = globex.delete(&acme_token.token).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));

    // The same card in another tenant: another fingerprint, no reuse across tenants.
    let globex_token = globex
        .tokenize(Card::new("4242424242424242", 12, 2030), true)
        .await
        .unwrap();
    assert_ne!(globex_token.token, acme_token.token);
    assert!(!globex_token.reused);
    assert_ne!(globex_token.fingerprint, acme_token.fingerprint);
    assert_eq!(
        acme.token_info(&acme_token.token).await.unwrap().token,
        acme_token.token
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keyservice_serves_material_to_the_vault_identity_only() {
    let stack = Stack::start().await;
    for name in [ADMIN, OTHER_TENANT, STRANGER] {
        let channel = raw_channel(&stack.dir, name, stack.keyservice_addr)
            .await
            .unwrap();
        let status = keys_pb::key_service_client::KeyServiceClient::new(channel)
            .get_keys(keys_pb::GetKeysRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{name}");
    }
    // Admins list versions (never material); others may not.
    let channel = raw_channel(&stack.dir, OTHER_TENANT, stack.keyservice_addr)
        .await
        .unwrap();
    let status = keys_pb::key_service_client::KeyServiceClient::new(channel)
        .list_key_versions(keys_pb::ListKeyVersionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let mut keys = vault_client::KeyServiceClient::connect(&stack.keyservice_config(ADMIN))
        .await
        .unwrap();
    let versions = keys.list_versions().await.unwrap();
    let mut purposes: Vec<_> = versions
        .versions
        .iter()
        .map(|v| (v.purpose.as_str(), v.version, v.state.as_str()))
        .collect();
    purposes.sort();
    assert_eq!(
        purposes,
        [
            ("audit", 1, "active"),
            ("card-data", 1, "active"),
            ("cvc", 1, "active"),
            ("fingerprint", 1, "active")
        ]
    );
    assert!(keys.health().await.unwrap());

    // The vault's own identity gets material.
    let channel = raw_channel(&stack.dir, integration_tests::VAULT, stack.keyservice_addr)
        .await
        .unwrap();
    let keys = keys_pb::key_service_client::KeyServiceClient::new(channel)
        .get_keys(keys_pb::GetKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(keys.keys.iter().all(|k| k.material.len() == 32));
    stack.stop().await;
}
