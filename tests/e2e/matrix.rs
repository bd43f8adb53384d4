//! Access control as a whole: sets of permissions against every RPC of the Vault
//! service (every set of at most two permissions and every complement of one), the lockout after repeated failures, and policy reload (by RPC
//! and by SIGHUP) that never leaves the vault without a valid policy.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::{
    ADMIN, OTHER_TENANT, Process, READER, STRANGER, Stack, identity, raw_channel, synthetic_pan,
};
use tonic::transport::Channel;
use tonic::{Code, Status};
use vault_proto::vault::v1 as pb;
use vault_proto::vault::v1::vault_client::VaultClient;

type Client = VaultClient<Channel>;

/// Every permission the policy knows, as written in the policy file, with the label
/// used in the names of the matrix identities.
/// `every_permission_is_in_the_matrix` checks it against the policy's parser.
const PERMISSIONS: [(&str, &str); 10] = [
    ("tokenize", "tok"),
    ("read", "read"),
    ("delete", "del"),
    ("subject", "subj"),
    ("fingerprint", "fp"),
    ("forward:sandbox", "fwd"),
    ("import", "imp"),
    ("export", "exp"),
    ("audit", "aud"),
    ("admin", "adm"),
];

/// ADMIN's grants in the policies these tests write: everything, so that it can set
/// up, inspect the audit log and manage blocks whatever the harness policy says.
const ADMIN_PERMISSIONS: [&str; 10] = [
    "tokenize",
    "read",
    "delete",
    "subject",
    "fingerprint",
    "forward:sandbox",
    "import",
    "export",
    "audit",
    "admin",
];

const CHARGE: &str = r#"{"amount": 1000, "number": "{{card.number}}", "exp_month": "{{card.exp_month}}", "exp_year": "{{card.exp_year}}"}"#;

async fn connect_at(stack: &Stack, name: &str, addr: SocketAddr) -> Client {
    VaultClient::new(raw_channel(&stack.dir, name, addr).await.unwrap())
}

async fn connect(stack: &Stack, name: &str) -> Client {
    connect_at(stack, name, stack.vault_addr).await
}

/// One `[[identity]]` entry of a policy file.
fn policy_entry(name: &str, tenant: &str, permissions: &[&str]) -> String {
    let permissions: Vec<String> = permissions.iter().map(|p| format!("{p:?}")).collect();
    format!(
        "[[identity]]\nid = {:?}\ntenant = {tenant:?}\npermissions = [{}]\n\n",
        identity(name),
        permissions.join(", ")
    )
}

fn write_policy(stack: &Stack, text: &str) {
    std::fs::write(stack.dir.path().join("policy.toml"), text).unwrap();
}

fn card(n: u64) -> pb::Card {
    pb::Card {
        number: synthetic_pan("424242", n, 16),
        exp_month: 12,
        exp_year: 2030,
        ..pb::Card::default()
    }
}

async fn tokenize(client: &mut Client, card: pb::Card) -> String {
    client
        .tokenize(pb::TokenizeRequest {
            ttl_secs: 0,
            card: Some(card),
            reuse_existing: false,
            format: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap()
        .token
}

async fn token_info(client: &mut Client, token: &str) -> Result<pb::TokenInfo, Status> {
    client
        .get_token_info(pb::GetTokenInfoRequest {
            token: token.into(),
        })
        .await
        .map(|r| r.into_inner().info.unwrap())
}

async fn delete(client: &mut Client, token: &str) -> Result<(), Status> {
    client
        .delete_token(pb::DeleteTokenRequest {
            token: token.into(),
        })
        .await
        .map(drop)
}

async fn reload_policy(client: &mut Client) -> Result<u32, Status> {
    client
        .reload_policy(pb::ReloadPolicyRequest {})
        .await
        .map(|r| r.into_inner().identities)
}

async fn list_blocks(client: &mut Client) -> Vec<pb::Block> {
    client
        .list_blocks(pb::ListBlocksRequest {})
        .await
        .unwrap()
        .into_inner()
        .blocks
}

/// The whole audit log up to now, page by page. Each read is itself audited, so the
/// log grows while it is read: stop at the last sequence of the first answer.
async fn all_events(client: &mut Client) -> Vec<pb::AuditEvent> {
    let mut events: Vec<pb::AuditEvent> = Vec::new();
    let mut end = None;
    loop {
        let page = client
            .read_audit(pb::ReadAuditRequest {
                after_sequence: events.last().map_or(0, |e| e.sequence),
                ..pb::ReadAuditRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        let end = *end.get_or_insert(page.last_sequence);
        events.extend(page.events.into_iter().take_while(|e| e.sequence <= end));
        if events.last().is_none_or(|e| e.sequence >= end) {
            return events;
        }
    }
}

/// A well-formed token that was never issued (tokens are 128 random bits).
/// The number of calls a `CallsRefused` summary counts for `reason`.
pub fn refused_calls(detail: &str, reason: &str) -> Option<u32> {
    let (calls, rest) = detail.split_once(" calls refused (")?;
    rest.starts_with(&format!("{reason})"))
        .then(|| calls.parse().ok())
        .flatten()
}

fn unknown_token(n: u64) -> String {
    format!("tok_Unknown{n:015}")
}

/// Every RPC of the Vault service.
#[derive(Debug, Clone, Copy)]
enum Rpc {
    Tokenize,
    TokenizeBatch,
    GetSealingKey,
    TokenizeSealed,
    TokenizeSealedBatch,
    GetTokenInfo,
    DeleteToken,
    Forward,
    CreateBackup,
    VerifyBackup,
    StartRewrap,
    GetRewrapStatus,
    ReloadPolicy,
    ReadAudit,
    VerifyAudit,
    ListBlocks,
    LiftBlock,
    FindSubject,
    EraseSubject,
    GetImportKey,
    ProposeImport,
    ApproveImport,
    ImportUpload,
    ImportRows,
    ProposeExport,
    ApproveExport,
    RunExport,
}

/// When adding an RPC to vault.proto, add it here and to `Rpc::call`
/// (`every_rpc_is_in_the_permission_matrix` checks it against vault.proto).
const RPCS: [Rpc; 27] = [
    Rpc::Tokenize,
    Rpc::TokenizeBatch,
    Rpc::GetSealingKey,
    Rpc::TokenizeSealed,
    Rpc::TokenizeSealedBatch,
    Rpc::GetTokenInfo,
    Rpc::DeleteToken,
    Rpc::Forward,
    Rpc::CreateBackup,
    Rpc::VerifyBackup,
    Rpc::StartRewrap,
    Rpc::GetRewrapStatus,
    Rpc::ReloadPolicy,
    Rpc::ReadAudit,
    Rpc::VerifyAudit,
    Rpc::ListBlocks,
    Rpc::LiftBlock,
    Rpc::FindSubject,
    Rpc::EraseSubject,
    Rpc::GetImportKey,
    Rpc::ProposeImport,
    Rpc::ApproveImport,
    Rpc::ImportUpload,
    Rpc::ImportRows,
    Rpc::ProposeExport,
    Rpc::ApproveExport,
    Rpc::RunExport,
];

/// What the matrix calls work on, made by ADMIN beforehand.
struct Fixtures {
    /// An acme token to read and forward.
    token: String,
    /// A backup that exists.
    backup: String,
    /// Identities in the policy in force.
    identities: u32,
}

impl Rpc {
    /// The permission the documentation names for this RPC.
    fn permission(self) -> &'static str {
        match self {
            Rpc::Tokenize
            | Rpc::TokenizeBatch
            | Rpc::GetSealingKey
            | Rpc::TokenizeSealed
            | Rpc::TokenizeSealedBatch => "tokenize",
            Rpc::GetTokenInfo => "read",
            Rpc::DeleteToken => "delete",
            Rpc::FindSubject | Rpc::EraseSubject => "subject",
            Rpc::Forward => "forward:sandbox",
            Rpc::ReadAudit | Rpc::VerifyAudit => "audit",
            Rpc::GetImportKey
            | Rpc::ProposeImport
            | Rpc::ApproveImport
            | Rpc::ImportUpload
            | Rpc::ImportRows => "import",
            Rpc::ProposeExport | Rpc::ApproveExport | Rpc::RunExport => "export",
            Rpc::CreateBackup
            | Rpc::VerifyBackup
            | Rpc::StartRewrap
            | Rpc::GetRewrapStatus
            | Rpc::ReloadPolicy
            | Rpc::ListBlocks
            | Rpc::LiftBlock => "admin",
        }
    }

    /// The code a caller with the permission gets. Nobody is blocked, so lifting a
    /// block is refused as a failed precondition. The sealed, import and export calls
    /// that change state are sent empty: past the permission check, the request is
    /// refused as invalid (a sealed card, a job), which a caller without the permission
    /// never gets to learn (the permission is checked before the request is read).
    fn permitted_code(self) -> Code {
        match self {
            Rpc::LiftBlock => Code::FailedPrecondition,
            Rpc::TokenizeSealed
            | Rpc::TokenizeSealedBatch
            | Rpc::ProposeImport
            | Rpc::ApproveImport
            | Rpc::ImportUpload
            | Rpc::ImportRows
            | Rpc::ProposeExport
            | Rpc::ApproveExport
            | Rpc::RunExport => Code::InvalidArgument,
            _ => Code::Ok,
        }
    }

    /// Makes the call; an `Ok` whose content is wrong is reported in the `String`.
    /// `fingerprint`: whether the caller has the `fingerprint` permission, and so must
    /// see fingerprints in what it tokenizes and reads (and must not without it).
    async fn call(
        self,
        client: &mut Client,
        fixtures: &Fixtures,
        to_delete: &str,
        unique: &str,
        fingerprint: bool,
    ) -> Result<Option<String>, Status> {
        let problem = |bad: bool, what: String| Some(what).filter(|_| bad);
        Ok(match self {
            Rpc::Tokenize => {
                let response = client
                    .tokenize(pb::TokenizeRequest {
                        ttl_secs: 0,
                        card: Some(card(1)),
                        reuse_existing: false,
                        format: 0,
                    })
                    .await?
                    .into_inner();
                let info = response.info.unwrap_or_default();
                problem(
                    !info.token.starts_with("tok_")
                        || info.last_four != card(1).number[12..]
                        || info.fingerprint.is_empty() == fingerprint,
                    format!("tokenized {info:?}"),
                )
            }
            Rpc::TokenizeBatch => {
                let response = client
                    .tokenize_batch(pb::TokenizeBatchRequest {
                        ttl_secs: 0,
                        cards: vec![card(2), card(3)],
                        reuse_existing: false,
                        format: 0,
                    })
                    .await?
                    .into_inner();
                let stored = response
                    .results
                    .iter()
                    .filter(|r| {
                        matches!(r.outcome, Some(pb::batch_item_result::Outcome::Stored(_)))
                    })
                    .count();
                problem(stored != 2, format!("{stored} of 2 cards stored"))
            }
            Rpc::GetTokenInfo => {
                let info = token_info(client, &fixtures.token).await?;
                problem(
                    info.token != fixtures.token || info.fingerprint.is_empty() == fingerprint,
                    format!("read {info:?}"),
                )
            }
            Rpc::DeleteToken => {
                delete(client, to_delete).await?;
                None
            }
            Rpc::Forward => {
                let response = client
                    .forward(pb::ForwardRequest {
                        processor: "sandbox".into(),
                        method: "POST".into(),
                        path: "/v1/charges".into(),
                        headers: vec![pb::Header {
                            name: "content-type".into(),
                            value: "application/json".into(),
                        }],
                        body: CHARGE.into(),
                        token: fixtures.token.clone(),
                        idempotency_key: String::new(),
                        reason: String::new(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                problem(
                    response.status != 200,
                    format!("processor answered {}", response.status),
                )
            }
            Rpc::CreateBackup => {
                let response = client
                    .create_backup(pb::CreateBackupRequest {
                        name: format!("backup-{unique}"),
                    })
                    .await?
                    .into_inner();
                problem(
                    !std::path::Path::new(&response.path).is_dir(),
                    format!("no backup at {}", response.path),
                )
            }
            Rpc::VerifyBackup => {
                let counts = client
                    .verify_backup(pb::VerifyBackupRequest {
                        name: fixtures.backup.clone(),
                    })
                    .await?
                    .into_inner();
                problem(
                    counts.records == 0 || counts.verified != counts.records || counts.failed != 0,
                    format!("verified {counts:?}"),
                )
            }
            Rpc::StartRewrap => {
                client.start_rewrap(pb::StartRewrapRequest {}).await?;
                None
            }
            Rpc::GetRewrapStatus => {
                client
                    .get_rewrap_status(pb::GetRewrapStatusRequest {})
                    .await?;
                None
            }
            Rpc::ReloadPolicy => {
                let identities = reload_policy(client).await?;
                problem(
                    identities != fixtures.identities,
                    format!("reloaded {identities} identities"),
                )
            }
            Rpc::ReadAudit => {
                let response = client
                    .read_audit(pb::ReadAuditRequest {
                        limit: 5,
                        ..pb::ReadAuditRequest::default()
                    })
                    .await?
                    .into_inner();
                problem(
                    response.events.len() != 5,
                    format!("read {} events", response.events.len()),
                )
            }
            Rpc::VerifyAudit => {
                let verified = client
                    .verify_audit(pb::VerifyAuditRequest {})
                    .await?
                    .into_inner();
                problem(!verified.intact, format!("audit log {verified:?}"))
            }
            Rpc::ListBlocks => {
                let blocks = client
                    .list_blocks(pb::ListBlocksRequest {})
                    .await?
                    .into_inner()
                    .blocks;
                problem(!blocks.is_empty(), format!("blocks {blocks:?}"))
            }
            Rpc::LiftBlock => {
                client
                    .lift_block(pb::LiftBlockRequest {
                        kind: "identity".into(),
                        subject: identity(READER),
                    })
                    .await?;
                None
            }
            // Cards nobody tokenized: nothing found, nothing erased.
            Rpc::FindSubject | Rpc::EraseSubject => {
                let request = pb::SubjectRequest {
                    card: Some(card(999_999)),
                };
                let tokens = if matches!(self, Rpc::FindSubject) {
                    client.find_subject(request).await?
                } else {
                    client.erase_subject(request).await?
                }
                .into_inner()
                .tokens;
                problem(!tokens.is_empty(), format!("tokens {tokens:?}"))
            }
            Rpc::GetSealingKey => {
                let key = client
                    .get_sealing_key(pb::GetSealingKeyRequest {})
                    .await?
                    .into_inner();
                problem(
                    key.public_key.is_empty() || key.tenant != "acme",
                    format!("sealing key for {:?}", key.tenant),
                )
            }
            Rpc::TokenizeSealed => {
                client
                    .tokenize_sealed(pb::TokenizeSealedRequest::default())
                    .await?;
                None
            }
            Rpc::TokenizeSealedBatch => {
                client
                    .tokenize_sealed_batch(pb::TokenizeSealedBatchRequest::default())
                    .await?;
                None
            }
            Rpc::GetImportKey => {
                let key = client
                    .get_import_key(pb::GetImportKeyRequest::default())
                    .await?
                    .into_inner();
                problem(
                    key.fingerprint.len() != 40,
                    format!("import key {:?}", key.fingerprint),
                )
            }
            Rpc::ProposeImport => {
                client
                    .propose_import(pb::ProposeImportRequest::default())
                    .await?;
                None
            }
            Rpc::ApproveImport => {
                client
                    .approve_import(pb::ApproveImportRequest::default())
                    .await?;
                None
            }
            Rpc::ImportUpload => {
                client
                    .import_upload(pb::ImportUploadRequest::default())
                    .await?;
                None
            }
            Rpc::ImportRows => {
                client.import_rows(pb::ImportRowsRequest::default()).await?;
                None
            }
            Rpc::ProposeExport => {
                client
                    .propose_export(pb::ProposeExportRequest::default())
                    .await?;
                None
            }
            Rpc::ApproveExport => {
                client
                    .approve_export(pb::ApproveExportRequest::default())
                    .await?;
                None
            }
            Rpc::RunExport => {
                client.run_export(pb::RunExportRequest::default()).await?;
                None
            }
        })
    }
}

/// The permission sets the matrix tries, as masks (one bit per entry of `PERMISSIONS`):
/// none, each one alone, every pair, and the complement of each of those (all but
/// one, all but two, all). Each RPC needs one permission: alone it shows what each
/// permission grants, the complements that nothing else grants it, the pairs and their
/// complements that no two permissions together grant more than each does.
/// (All 2^10 sets would be 1,024 identities, each with its certificate.)
fn masks() -> Vec<usize> {
    let all = (1usize << PERMISSIONS.len()) - 1;
    let small: Vec<usize> = (0..=all).filter(|m| m.count_ones() <= 2).collect();
    let sets: BTreeSet<usize> = small.iter().flat_map(|m| [*m, all & !m]).collect();
    sets.into_iter().collect()
}

/// The permissions of matrix combination `mask` (one bit per entry of `PERMISSIONS`).
fn granted(mask: usize) -> Vec<&'static str> {
    PERMISSIONS
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, (permission, _))| *permission)
        .collect()
}

fn matrix_name(mask: usize) -> String {
    let labels: Vec<&str> = PERMISSIONS
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, (_, label))| *label)
        .collect();
    if labels.is_empty() {
        "matrix-none".into()
    } else {
        format!("matrix-{}", labels.join("-"))
    }
}

/// Control: PCI-7.2.1, PCI-7.2.2, PCI-7.2.6, PCI-10.3.1, PCI-3.5.1.1 (docs/compliance.md).
/// Attack: each permission set of `masks()` (none, each alone, every pair, and their
/// complements, over all ten permissions) calls every RPC, looking for one that gives
/// more than its grant (a card number, another permission's data, the audit log, a
/// fingerprint without `fingerprint`, an import or export step); each answer matches
/// the grant exactly, and an identity the policy does not list gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn permission_sets_against_every_rpc() {
    if integration_tests::rocksdb_only("its CreateBackup cells expect RocksDB backups") {
        return;
    }
    let mut stack = Stack::start().await;
    let masks = masks();
    let combinations = masks.len();
    let names: Vec<String> = masks.iter().map(|m| matrix_name(*m)).collect();
    for name in &names {
        stack.dir.add_client_identity(name);
    }
    // Hundreds of refusals from one address and identity: the lockout must not turn
    // them into blocks here (it has its own test). The processor allowlist is a second
    // gate besides `forward:sandbox`; every matrix identity is on it, so that the
    // policy alone decides.
    stack.add_vault_config("[lockout]\nmax_failures = 1000000\n");
    stack.allow_forwarding(&names.iter().map(|n| identity(n)).collect::<Vec<_>>());
    stack.restart_vault().await;

    let mut policy = policy_entry(ADMIN, "acme", &ADMIN_PERMISSIONS);
    for (mask, name) in masks.iter().zip(&names) {
        policy.push_str(&policy_entry(name, "acme", &granted(*mask)));
    }
    write_policy(&stack, &policy);
    let mut admin = connect(&stack, ADMIN).await;
    let identities = reload_policy(&mut admin).await.unwrap();
    assert_eq!(identities as usize, combinations + 1);

    let token = tokenize(&mut admin, card(0)).await;
    // One token per combination for its delete attempt.
    let to_delete: Vec<String> = admin
        .tokenize_batch(pb::TokenizeBatchRequest {
            ttl_secs: 0,
            cards: (0..combinations as u64).map(|n| card(100 + n)).collect(),
            reuse_existing: false,
            format: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .into_iter()
        .map(|r| match r.outcome {
            Some(pb::batch_item_result::Outcome::Stored(stored)) => stored.info.unwrap().token,
            other => panic!("{other:?}"),
        })
        .collect();
    let backup = "before-the-matrix".to_owned();
    admin
        .create_backup(pb::CreateBackupRequest {
            name: backup.clone(),
        })
        .await
        .unwrap();
    let fixtures = Fixtures {
        token,
        backup,
        identities,
    };
    let forwards_before = stack.sandbox.requests().len();

    let mut mismatches = Vec::new();
    let mut denied_by_identity = BTreeMap::new();
    for (i, (mask, name)) in masks.iter().zip(&names).enumerate() {
        let permissions = granted(*mask);
        let mut client = connect(&stack, name).await;
        let mut denied = 0;
        let fingerprint = permissions.contains(&"fingerprint");
        for rpc in RPCS {
            let has = permissions.contains(&rpc.permission());
            let outcome = rpc
                .call(&mut client, &fixtures, &to_delete[i], name, fingerprint)
                .await;
            let code = outcome.as_ref().map_or_else(Status::code, |_| Code::Ok);
            let expected = if has {
                rpc.permitted_code()
            } else {
                Code::PermissionDenied
            };
            if code == Code::PermissionDenied {
                denied += 1;
            }
            if code != expected {
                mismatches.push(format!(
                    "{name} {permissions:?} {rpc:?}: expected {expected:?}, got {outcome:?}"
                ));
            } else if let Ok(Some(problem)) = outcome {
                mismatches.push(format!("{name} {permissions:?} {rpc:?}: {problem}"));
            }
        }
        denied_by_identity.insert(identity(name), denied);
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );

    // A refused delete deleted nothing; a permitted one deleted the token.
    for (i, token) in to_delete.iter().enumerate() {
        let result = token_info(&mut admin, token).await;
        if granted(masks[i]).contains(&"delete") {
            assert_eq!(result.unwrap_err().code(), Code::NotFound, "{}", names[i]);
        } else {
            result.unwrap();
        }
    }
    // Only the callers with forward:sandbox reached the processor.
    let forwarders = masks
        .iter()
        .filter(|m| granted(**m).contains(&"forward:sandbox"))
        .count();
    assert_eq!(stack.sandbox.requests().len() - forwards_before, forwarders);
    // Every refusal is in the audit log, under the caller who was refused.
    let mut denied_in_log = BTreeMap::new();
    for event in all_events(&mut admin).await {
        if event.actor.contains("/matrix-") && event.outcome == "PERMISSION_DENIED" {
            *denied_in_log.entry(event.actor).or_insert(0) += 1;
        }
    }
    denied_by_identity.retain(|_, denied| *denied > 0);
    assert_eq!(denied_in_log, denied_by_identity);

    // An identity the policy does not list is refused everything.
    let mut stranger = connect(&stack, STRANGER).await;
    for (i, rpc) in RPCS.into_iter().enumerate() {
        let status = rpc
            .call(
                &mut stranger,
                &fixtures,
                &to_delete[0],
                &format!("stranger-{i}"),
                false,
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{rpc:?}: {status:?}");
        assert_eq!(status.message(), "permission denied", "{rpc:?}");
    }
    stack.stop().await;
}

/// Control: PCI-8.3.4, PCI-10.2.1.2, PCI-10.2.1.5 (docs/compliance.md).
/// Attack: an identity keeps trying calls it is denied (probing permissions or tokens);
/// after the threshold it is blocked, audited, until the block ends or an admin lifts it
/// (the lift is an audit event under the admin).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_failures_block_an_identity_until_lifted_or_expired() {
    let mut stack = Stack::start().await;
    write_policy(
        &stack,
        &[
            policy_entry(ADMIN, "acme", &ADMIN_PERMISSIONS),
            policy_entry(READER, "acme", &["read"]),
            policy_entry(OTHER_TENANT, "globex", &["tokenize", "read"]),
        ]
        .concat(),
    );
    stack.add_vault_config(
        "[lockout]\nmax_failures = 3\nmax_unknown_tokens = 3\nwindow_secs = 60\nblock_secs = 5\n\
         by_address = false\nsummary_secs = 1\n",
    );
    stack.restart_vault().await;
    let mut admin = connect(&stack, ADMIN).await;
    let mut reader = connect(&stack, READER).await;
    let mut other = connect(&stack, OTHER_TENANT).await;
    let token = tokenize(&mut admin, card(0)).await;
    let other_token = tokenize(&mut other, card(1)).await;
    token_info(&mut reader, &token).await.unwrap();

    // Three refused deletes block the reader: even what it may do is refused now, with
    // the same answer as any refusal.
    for _ in 0..3 {
        let status = delete(&mut reader, &token).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    let status = token_info(&mut reader, &token).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), "permission denied");
    // Others (same address, but blocks by address are off) are served.
    token_info(&mut admin, &token).await.unwrap();
    token_info(&mut other, &other_token).await.unwrap();

    let blocks = list_blocks(&mut admin).await;
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    assert_eq!(blocks[0].kind, "identity");
    assert_eq!(blocks[0].subject, identity(READER));
    assert_eq!(blocks[0].failures, 3);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        (now_ms..=now_ms + 5_000).contains(&blocks[0].until_unix_ms),
        "blocked until {} (now {now_ms})",
        blocks[0].until_unix_ms
    );

    // An admin lifts the block at once; lifting it again finds nothing to lift.
    let lift = pb::LiftBlockRequest {
        kind: "identity".into(),
        subject: identity(READER),
    };
    admin.lift_block(lift.clone()).await.unwrap();
    assert_eq!(list_blocks(&mut admin).await, []);
    token_info(&mut reader, &token).await.unwrap();
    let status = admin.lift_block(lift.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    // Blocked again, the block ends by itself after block_secs.
    for _ in 0..3 {
        let status = delete(&mut reader, &token).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    let blocked_at = Instant::now();
    let status = token_info(&mut reader, &token).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    tokio::time::sleep(Duration::from_millis(5_200).saturating_sub(blocked_at.elapsed())).await;
    token_info(&mut reader, &token).await.unwrap();
    assert_eq!(list_blocks(&mut admin).await, []);

    // Lookups of tokens that do not exist count as failures too (token probing).
    for n in 0..3 {
        let status = token_info(&mut other, &unknown_token(n)).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    let status = token_info(&mut other, &other_token).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let blocks = list_blocks(&mut admin).await;
    assert_eq!(
        blocks
            .iter()
            .map(|b| (b.kind.as_str(), b.subject.clone()))
            .collect::<Vec<_>>(),
        [("identity", identity(OTHER_TENANT))]
    );

    // The audit log shows each block, and sums up the calls refused because of one
    // (one event per caller and period, not one per call).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let events = all_events(&mut admin).await;
    let lockouts: Vec<&str> = events
        .iter()
        .filter(|e| e.action == "Lockout")
        .map(|e| e.detail.as_str())
        .collect();
    let reader_blocked = format!(
        "identity {} blocked after repeated permission denials",
        identity(READER)
    );
    let other_blocked = format!(
        "identity {} blocked after repeated unknown tokens",
        identity(OTHER_TENANT)
    );
    assert_eq!(
        lockouts,
        [
            reader_blocked.as_str(),
            reader_blocked.as_str(),
            other_blocked.as_str()
        ],
        "{events:#?}"
    );
    let mut refused_while_blocked = BTreeMap::new();
    for event in events.iter().filter(|e| e.action == "CallsRefused") {
        let calls = refused_calls(&event.detail, "blocked").unwrap_or_else(|| panic!("{event:?}"));
        *refused_while_blocked
            .entry(event.actor.clone())
            .or_insert(0) += calls;
    }
    assert_eq!(
        refused_while_blocked,
        BTreeMap::from([(identity(READER), 2), (identity(OTHER_TENANT), 1)])
    );
    assert!(
        !events
            .iter()
            .any(|e| e.outcome == "PERMISSION_DENIED" && e.action == "GetTokenInfo"),
        "a call refused while blocked has no event of its own"
    );
    assert!(
        events
            .iter()
            .any(|e| e.action == "LiftBlock" && e.outcome == "ok" && e.actor == identity(ADMIN)),
        "the lift is audited"
    );
    stack.stop().await;
}

/// A billing service whose customers deleted their saved cards is not probing: 25
/// lookups of tokens another identity of its tenant deleted answer NOT_FOUND and block
/// nothing. Unknown tokens still do, and so do another tenant's deleted ones (the
/// tombstones are per tenant). An `alert_only` identity is flagged, never blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_tokens_lock_nobody_out_and_alert_only_services_stay_served() {
    let mut stack = Stack::start().await;
    write_policy(
        &stack,
        &[
            policy_entry(ADMIN, "acme", &ADMIN_PERMISSIONS),
            policy_entry(READER, "acme", &["read"]),
            policy_entry(STRANGER, "acme", &["read"]),
            policy_entry(OTHER_TENANT, "globex", &["tokenize", "read"]),
        ]
        .concat(),
    );
    stack.add_vault_config(&format!(
        "[lockout]\nmax_failures = 3\nmax_unknown_tokens = 3\nalert_only = [\"uri:{}\"]\n",
        identity(STRANGER)
    ));
    stack.restart_vault().await;
    let mut admin = connect(&stack, ADMIN).await;
    let mut reader = connect(&stack, READER).await;
    let live = tokenize(&mut admin, card(100)).await;
    let mut deleted = Vec::new();
    for n in 0..25 {
        let token = tokenize(&mut admin, card(n)).await;
        delete(&mut admin, &token).await.unwrap();
        deleted.push(token);
    }
    for token in &deleted {
        let status = token_info(&mut reader, token).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(
            status.message(),
            "token not found",
            "same answer as unknown"
        );
    }
    token_info(&mut reader, &live).await.unwrap();
    assert_eq!(list_blocks(&mut admin).await, []);

    // Another tenant asking for them is probing: blocked at the third.
    let mut other = connect(&stack, OTHER_TENANT).await;
    for token in &deleted[..3] {
        let status = token_info(&mut other, token).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    // Unknown tokens block the reader at the third too.
    for n in 0..3 {
        let status = token_info(&mut reader, &unknown_token(n))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    let blocked: Vec<String> = list_blocks(&mut admin)
        .await
        .into_iter()
        .map(|b| b.subject)
        .collect();
    assert_eq!(blocked, [identity(OTHER_TENANT), identity(READER)]);

    // The alert-only identity probing the same way is flagged and served on.
    let mut billing = connect(&stack, STRANGER).await;
    for n in 0..6 {
        let status = token_info(&mut billing, &unknown_token(n))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    token_info(&mut billing, &live).await.unwrap();
    assert_eq!(list_blocks(&mut admin).await.len(), 2);
    let alerts: Vec<String> = all_events(&mut admin)
        .await
        .into_iter()
        .filter(|e| e.action == "LockoutAlert")
        .map(|e| e.detail)
        .collect();
    let alert = format!(
        "identity {} flagged after repeated unknown tokens (alert only, not blocked)",
        identity(STRANGER)
    );
    assert_eq!(alerts, [alert.clone(), alert]);
    stack.stop().await;
}

/// Any certificate the CA signed can call; one the policy does not list must not make
/// the vault write an audit event per call (a tight loop would fill the audit disk,
/// and then every tenant is refused). Its flood costs a counter and a summary per
/// period, and a listed caller is served meanwhile.
///
/// Control: PCI-8.3.1, PCI-10.2.1.4 (docs/compliance.md).
/// Attack: a certificate the CA signed but the policy does not list calls in a tight loop
/// to fill the audit disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_from_an_unlisted_certificate_leaves_the_audit_log_bounded() {
    const FLOOD: u32 = 2_000;
    let mut stack = Stack::start().await;
    stack.add_vault_config("[lockout]\nsummary_secs = 1\n");
    stack.restart_vault().await;
    let mut admin = connect(&stack, ADMIN).await;
    let token = tokenize(&mut admin, card(1)).await;
    let before = all_events(&mut admin).await.len();

    let stranger = connect(&stack, STRANGER).await;
    let flood: Vec<_> = (0..8)
        .map(|_| {
            let (mut stranger, token) = (stranger.clone(), token.clone());
            tokio::spawn(async move {
                for _ in 0..FLOOD / 8 {
                    let status = token_info(&mut stranger, &token).await.unwrap_err();
                    assert_eq!(status.code(), Code::PermissionDenied);
                }
            })
        })
        .collect();
    // A listed caller is served while the flood runs.
    let mut served = 0;
    while !flood.iter().all(|f| f.is_finished()) {
        token_info(&mut admin, &token).await.unwrap();
        served += 1;
    }
    for f in flood {
        f.await.unwrap();
    }
    assert!(served > 0);

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let events = all_events(&mut admin).await;
    let stranger_id = identity(STRANGER);
    let from_stranger: Vec<&pb::AuditEvent> =
        events.iter().filter(|e| e.actor == stranger_id).collect();
    let summed: u32 = from_stranger
        .iter()
        .filter(|e| e.action == "CallsRefused")
        .map(|e| {
            refused_calls(&e.detail, "unlisted")
                .or_else(|| refused_calls(&e.detail, "blocked"))
                .unwrap_or_else(|| panic!("{e:?}"))
        })
        .sum();
    assert_eq!(summed, FLOOD, "every refused call is counted");
    // The block (after the default 20 denials) and a few summaries: not 2,000 events.
    assert!(
        from_stranger.len() <= 30,
        "{} events for {FLOOD} refused calls",
        from_stranger.len()
    );
    assert!(
        from_stranger
            .iter()
            .any(|e| e.action == "Lockout" && e.detail.contains("blocked")),
        "the block is audited"
    );
    // The admin's own reads are audited one by one, as always.
    assert!(events.len() - before >= served + from_stranger.len());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policy_reload_keeps_the_old_policy_when_the_file_is_invalid() {
    let mut stack = Stack::start().await;
    let admin_entry = policy_entry(ADMIN, "acme", &ADMIN_PERMISSIONS);
    let reader_entry = policy_entry(READER, "acme", &["read"]);
    let other_entry = policy_entry(OTHER_TENANT, "globex", &["read"]);
    write_policy(&stack, &format!("{admin_entry}{reader_entry}{other_entry}"));
    let mut admin = connect(&stack, ADMIN).await;
    assert_eq!(reload_policy(&mut admin).await.unwrap(), 3);
    let token = tokenize(&mut admin, card(0)).await;
    let mut reader = connect(&stack, READER).await;
    token_info(&mut reader, &token).await.unwrap();

    // An unknown permission, then a syntax error: refused, naming the problem, and the
    // policy in force stays.
    write_policy(
        &stack,
        &format!(
            "{admin_entry}{}",
            reader_entry.replace("\"read\"", "\"raed\"")
        ),
    );
    let status = reload_policy(&mut admin).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("\"raed\"") && status.message().contains("identity[1]"),
        "{status:?}"
    );
    token_info(&mut reader, &token).await.unwrap();
    write_policy(&stack, &format!("{admin_entry}[[identity]\nid = \"x\"\n"));
    let status = reload_policy(&mut admin).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("invalid"), "{status:?}");
    token_info(&mut reader, &token).await.unwrap();

    // A valid file without the reader takes effect at once, without a restart.
    write_policy(&stack, &format!("{admin_entry}{other_entry}"));
    assert_eq!(reload_policy(&mut admin).await.unwrap(), 2);
    let status = token_info(&mut reader, &token).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    token_info(&mut admin, &token).await.unwrap();

    // The same through SIGHUP to the real binary. Polling while refused must not
    // block the reader.
    stack.add_vault_config("[lockout]\nmax_failures = 1000000\n");
    stack.stop_vault().await;
    let config = stack.write_vault_config();
    let process = Process::start("vault-server", &config, &[]).await;
    let pid = process.child.id().unwrap();
    let mut admin = connect_at(&stack, ADMIN, process.addr).await;
    let mut reader = connect_at(&stack, READER, process.addr).await;
    let status = token_info(&mut reader, &token).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let hangup = || {
        let status = std::process::Command::new("kill")
            .arg("-HUP")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    };
    write_policy(&stack, &format!("{admin_entry}{reader_entry}{other_entry}"));
    hangup();
    let started = Instant::now();
    while let Err(status) = token_info(&mut reader, &token).await {
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "SIGHUP did not reload the policy: {}",
            process.output.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An invalid file on SIGHUP is refused (and audited as such); the policy stays.
    write_policy(&stack, &format!("{admin_entry}[[identity]\n"));
    hangup();
    let started = Instant::now();
    loop {
        let refused = all_events(&mut admin).await.into_iter().any(|e| {
            e.action == "PolicyReload" && e.actor == "SIGHUP" && e.outcome == "FAILED_PRECONDITION"
        });
        if refused {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the refused reload was not audited: {}",
            process.output.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token_info(&mut reader, &token).await.unwrap();
    process.terminate().await;
    stack.stop().await;
}

/// Control: PCI-7.2.1 (docs/compliance.md).
/// Attack: an RPC added to vault.proto, or a permission added to the policy, that the
/// permission matrix never tries: its access control would go untested. Both lists
/// here must equal what vault.proto declares and what the policy parser accepts.
#[test]
fn every_rpc_and_permission_is_in_the_permission_matrix() {
    let proto = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../proto/proto/tokenvault/vault/v1/vault.proto"
    ))
    .unwrap();
    let declared: BTreeSet<String> = proto
        .lines()
        .filter_map(|line| line.trim().strip_prefix("rpc "))
        .filter_map(|rest| rest.split('(').next())
        .map(|name| name.trim().to_owned())
        .collect();
    let covered: BTreeSet<String> = RPCS.iter().map(|rpc| format!("{rpc:?}")).collect();
    assert_eq!(declared, covered, "add the new RPC to RPCS and Rpc::call");

    let policy = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../vault-server/src/policy.rs"
    ))
    .unwrap();
    // The parser's arms: `"read" => Some(Self::Read),`; `forward:` takes a processor.
    let parsed: BTreeSet<String> = policy
        .lines()
        .filter_map(|line| line.trim().strip_prefix('"'))
        .filter_map(|rest| rest.split_once("\" => Some(Self::"))
        .map(|(name, _)| name.to_owned())
        .chain(std::iter::once("forward:sandbox".to_owned()))
        .collect();
    let tried: BTreeSet<String> = PERMISSIONS.iter().map(|(p, _)| (*p).to_owned()).collect();
    assert_eq!(parsed, tried, "add the new permission to PERMISSIONS");
}
