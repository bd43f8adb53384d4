use integration_tests::{ADMIN, FOREIGN, OTHER_TENANT, READER, STRANGER, Stack, raw_channel};
use tonic::Code;
use vault_client::{Card, VaultClient};
use vault_proto::keys::v1 as keys_pb;

/// Control: PCI-3.7.7, PCI-4.2.1, PCI-8.3.1, PCI-8.3.2 (docs/compliance.md).
/// Attack: a client with a certificate from a CA the vault does not trust (self-made, or
/// another environment's) calls the vault and the keyservice; the handshake is refused and
/// nothing is served.
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
            .get_keys(keys_pb::GetKeysRequest::default())
            .await
            .map_err(|s| s.to_string())
    }
    .await;
    assert!(refused.is_err());
    stack.stop().await;
}

/// Control: PCI-7.2.1, GDPR-25 (docs/compliance.md).
/// Attack: identities call RPCs they were not granted (a reader deleting, an unlisted
/// certificate tokenizing); every call outside the grant is refused.
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

/// Control: PCI-7.2.2 (docs/compliance.md).
/// Attack: a service of one tenant looks up, deletes or forwards a token of another tenant
/// it learned; it gets NOT_FOUND, exactly as for an unknown token, so it cannot even tell
/// the token exists.
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

/// Control: PCI-3.6.1, PCI-3.7.2, PCI-7.2.5 (docs/compliance.md).
/// Attack: admins, services and strangers ask the keyservice for key material; only the
/// vault identity gets any, and admins see versions, never material.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keyservice_serves_material_to_the_vault_identity_only() {
    let stack = Stack::start().await;
    for name in [ADMIN, OTHER_TENANT, STRANGER] {
        let channel = raw_channel(&stack.dir, name, stack.keyservice_addr)
            .await
            .unwrap();
        let status = keys_pb::key_service_client::KeyServiceClient::new(channel)
            .get_keys(keys_pb::GetKeysRequest::default())
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
            ("fingerprint", 1, "active"),
            ("import", 1, "active"),
            ("import-rsa", 1, "active"),
            ("intake", 1, "active")
        ]
    );
    assert!(keys.health().await.unwrap());

    // The vault's own identity gets material.
    let channel = raw_channel(&stack.dir, integration_tests::VAULT, stack.keyservice_addr)
        .await
        .unwrap();
    let keys = keys_pb::key_service_client::KeyServiceClient::new(channel)
        .get_keys(keys_pb::GetKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(keys.keys.iter().all(|k| k.material.len() == 32));
    stack.stop().await;
}

/// Attack: a certificate with no URI SAN whose CN reads like the vault's (or an
/// admin's) SPIFFE id, signed by the trusted CA (standing in for an internal CA that lets
/// a requester pick the CN). Its identity is `cn:spiffe://...`, which no list names: no
/// key material, no admin rights, no card data. A CN-typed policy entry does name it.
///
/// Control: PCI-3.7.2, PCI-7.2.5, PCI-8.2.1 (docs/compliance.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cn_that_reads_like_a_spiffe_id_gets_nothing() {
    let mut stack = Stack::start().await;
    let vault = integration_tests::identity(integration_tests::VAULT);
    let admin = integration_tests::identity(ADMIN);
    stack.dir.write_cn_only_identity("impostor-vault", &vault);
    stack.dir.write_cn_only_identity("impostor-admin", &admin);

    let keyservice = |name: &'static str| {
        let stack = &stack;
        async move {
            let channel = raw_channel(&stack.dir, name, stack.keyservice_addr)
                .await
                .unwrap();
            keys_pb::key_service_client::KeyServiceClient::new(channel)
        }
    };
    let status = keyservice("impostor-vault")
        .await
        .get_keys(keys_pb::GetKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = keyservice("impostor-admin")
        .await
        .list_proposals(keys_pb::ListProposalsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let status = tokenize_as(&stack, "impostor-admin").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // Named by its kind, a CN identity is served as the policy says.
    stack
        .dir
        .write_cn_only_identity("legacy-client", "legacy-pos");
    let policy = std::fs::read_to_string(stack.dir.path().join("policy.toml")).unwrap();
    std::fs::write(
        stack.dir.path().join("policy.toml"),
        format!(
            "{policy}\n[[identity]]\nid = \"cn:legacy-pos\"\ntenant = \"acme\"\npermissions = [\"tokenize\"]\n"
        ),
    )
    .unwrap();
    stack.restart_vault().await;
    tokenize_as(&stack, "legacy-client").await.unwrap();
    let status = tokenize_as(&stack, "impostor-admin").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    stack.stop().await;
}

/// A Tokenize call over a raw channel as the certificate `name` of the stack's
/// directory.
async fn tokenize_as(
    stack: &Stack,
    name: &str,
) -> Result<tonic::Response<vault_proto::vault::v1::TokenizeResponse>, tonic::Status> {
    let channel = raw_channel(&stack.dir, name, stack.vault_addr)
        .await
        .unwrap();
    vault_proto::vault::v1::vault_client::VaultClient::new(channel)
        .tokenize(vault_proto::vault::v1::TokenizeRequest {
            card: Some(vault_proto::vault::v1::Card {
                number: "4242424242424242".into(),
                exp_month: 12,
                exp_year: 2030,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
}
