//! `vaultctl policy ...`: reload the vault's policy, and check a policy file offline.
//!
//! The checker mirrors the vault's rules (`vault-server/src/policy.rs`) without linking
//! the server: a client never depends on it. When the vault's rules change (a new
//! permission, a new key), change [`check`] and [`PERMISSIONS`] the same way.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use vault_client::VaultClient;

use crate::ConfigFn;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Have the vault re-read its policy file (as SIGHUP does). An invalid file is
    /// refused and the previous policy stays in force; `policy check` it first.
    Reload,
    /// Check a policy file offline, by the vault's rules: every `[[identity]]` has a
    /// non-empty `id` listed once, a `tenant` of 1 to 64 of `[A-Za-z0-9._-]`, and
    /// `permissions` from tokenize, read, delete, subject, fingerprint, import, export,
    /// audit, admin, `forward:<processor>`.
    /// Exits 1 and names the first problem if it is not valid.
    Check {
        /// The policy file (TOML).
        file: PathBuf,
    },
}

pub async fn run(command: PolicyCommand, vault: ConfigFn<'_>) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Reload => {
            let mut client = VaultClient::connect(&vault()?).await?;
            match client.reload_policy().await {
                Ok(identities) => println!("policy reloaded: {}", identities_text(identities)),
                Err(e) if e.code() == Some(tonic::Code::FailedPrecondition) => {
                    bail!("{}", refused_text(&e));
                }
                Err(e) => return Err(e).context("reload policy"),
            }
        }
        PolicyCommand::Check { file } => {
            println!("{}", check_file(&file)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The reload error: the vault's message names the problem in the file.
fn refused_text(error: &vault_client::Error) -> String {
    let message = match error {
        vault_client::Error::Rejected { message, .. } => message.clone(),
        other => other.to_string(),
    };
    format!(
        "reload policy: the vault refused the policy file: {message}; the previous policy stays in force"
    )
}

fn identities_text(n: u32) -> String {
    if n == 1 {
        "1 identity".into()
    } else {
        format!("{n} identities")
    }
}

/// `FILE: valid, N identities`, or the error naming the file and the place in it.
pub fn check_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read policy file {}", path.display()))?;
    match check(&text) {
        Ok(n) => Ok(format!(
            "{}: valid, {}",
            path.display(),
            identities_text(u32::try_from(n).unwrap_or(u32::MAX))
        )),
        Err(problem) => bail!("{}: {problem}", path.display()),
    }
}

/// The permissions the vault knows, as they are written in the file.
pub const PERMISSIONS: &str = "tokenize, read, delete, subject, fingerprint, import, export, audit, admin, \
     forward:<processor>";

fn known_permission(name: &str) -> bool {
    match name {
        "tokenize" | "read" | "delete" | "subject" | "fingerprint" | "import" | "export"
        | "audit" | "admin" => true,
        _ => name.strip_prefix("forward:").is_some_and(|p| !p.is_empty()),
    }
}

/// The vault's tenant rule (`Tenant::parse` in the server), with its messages.
fn check_tenant(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 64 {
        return Err("a tenant name has 1 to 64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("a tenant name has only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// Checks a policy file's text by the vault's rules; returns how many identities it
/// has, or the first problem, named by place (`identity[2].permissions: ...`, indexes
/// from 0 in file order, as the vault names them).
pub fn check(text: &str) -> Result<usize, String> {
    let file: toml::Table = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
    for key in file.keys() {
        if key != "identity" {
            return Err(format!("unknown key {key:?} (known: identity)"));
        }
    }
    let Some(identities) = file.get("identity") else {
        return Ok(0); // no identities: the vault denies everyone
    };
    let identities = identities
        .as_array()
        .ok_or("identity: must be an array of tables ([[identity]])")?;
    let mut ids: Vec<&str> = Vec::with_capacity(identities.len());
    for (i, entry) in identities.iter().enumerate() {
        let entry = entry
            .as_table()
            .ok_or_else(|| format!("identity[{i}]: must be a table ([[identity]])"))?;
        for key in entry.keys() {
            if !matches!(key.as_str(), "id" | "tenant" | "permissions") {
                return Err(format!(
                    "identity[{i}]: unknown key {key:?} (known: id, tenant, permissions)"
                ));
            }
        }
        let string = |key: &str| -> Result<&str, String> {
            match entry.get(key) {
                None => Err(format!("identity[{i}].{key}: missing")),
                Some(value) => value
                    .as_str()
                    .ok_or_else(|| format!("identity[{i}].{key}: must be a string")),
            }
        };
        let id = string("id")?;
        if id.is_empty() {
            return Err(format!("identity[{i}].id: must not be empty"));
        }
        check_tenant(string("tenant")?).map_err(|rule| format!("identity[{i}].tenant: {rule}"))?;
        let permissions = entry
            .get("permissions")
            .ok_or_else(|| format!("identity[{i}].permissions: missing"))?
            .as_array()
            .ok_or_else(|| format!("identity[{i}].permissions: must be an array of strings"))?;
        for (j, permission) in permissions.iter().enumerate() {
            let permission = permission
                .as_str()
                .ok_or_else(|| format!("identity[{i}].permissions[{j}]: must be a string"))?;
            if !known_permission(permission) {
                return Err(format!(
                    "identity[{i}].permissions: unknown permission {permission:?} (known: {PERMISSIONS})"
                ));
            }
        }
        if let Some(first) = ids.iter().position(|seen| *seen == id) {
            return Err(format!(
                "identity[{i}].id: {id:?} is listed twice (first at identity[{first}])"
            ));
        }
        ids.push(id);
    }
    Ok(ids.len())
}

/// A TOML syntax error on one line, with where it is.
fn syntax_error(text: &str, error: &toml::de::Error) -> String {
    let message = error
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    match error.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
        [[identity]]
        id = "spiffe://tokenvault.dev/checkout"
        tenant = "acme"
        permissions = ["tokenize", "read", "forward:sandbox"]

        [[identity]]
        id = "spiffe://tokenvault.dev/ops"
        tenant = "acme.ops_1-x"
        permissions = ["delete", "audit", "admin"]

        [[identity]]
        id = "CN=nobody"
        tenant = "acme"
        permissions = []
    "#;

    #[test]
    fn valid_files() {
        assert_eq!(check(VALID), Ok(3));
        assert_eq!(check(""), Ok(0));
        assert_eq!(check("# nothing granted\n"), Ok(0));
        let long = format!(
            "[[identity]]\nid = \"a\"\ntenant = \"{}\"\npermissions = [\"read\", \"read\"]\n",
            "t".repeat(64)
        );
        assert_eq!(check(&long), Ok(1));
    }

    #[test]
    fn unknown_permission_is_named_with_the_known_ones() {
        let text = VALID.replace("\"delete\"", "\"raed\"");
        assert_eq!(
            check(&text),
            Err(
                "identity[1].permissions: unknown permission \"raed\" (known: tokenize, read, \
                 delete, subject, fingerprint, import, export, audit, admin, forward:<processor>)"
                    .into()
            )
        );
        for bad in ["forward:", "forward", "Read", "", "audit "] {
            let text = VALID.replace("\"audit\"", &format!("{bad:?}"));
            let err = check(&text).unwrap_err();
            assert!(
                err.starts_with("identity[1].permissions: unknown permission"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn tenant_rules() {
        for (tenant, rule) in [
            ("", "1 to 64 characters"),
            (&*"t".repeat(65), "1 to 64 characters"),
            ("ac me", "only letters"),
            ("acmé", "only letters"),
            ("acme/x", "only letters"),
        ] {
            let text = VALID.replacen("\"acme\"", &format!("{tenant:?}"), 1);
            let err = check(&text).unwrap_err();
            assert!(
                err.starts_with("identity[0].tenant: a tenant name has") && err.contains(rule),
                "{tenant:?}: {err}"
            );
        }
    }

    #[test]
    fn ids_are_non_empty_and_unique() {
        let text = VALID.replace("\"CN=nobody\"", "\"\"");
        assert_eq!(
            check(&text),
            Err("identity[2].id: must not be empty".into())
        );
        let text = VALID.replace("CN=nobody", "spiffe://tokenvault.dev/checkout");
        assert_eq!(
            check(&text),
            Err(
                "identity[2].id: \"spiffe://tokenvault.dev/checkout\" is listed twice \
                 (first at identity[0])"
                    .into()
            )
        );
    }

    #[test]
    fn unknown_and_missing_keys() {
        let text = format!("{VALID}extra = 1\n");
        assert_eq!(
            check(&text),
            Err("identity[2]: unknown key \"extra\" (known: id, tenant, permissions)".into())
        );
        assert_eq!(
            check(&format!("version = 2\n{VALID}")),
            Err("unknown key \"version\" (known: identity)".into())
        );
        assert_eq!(
            check(&VALID.replace("tenant = \"acme.ops_1-x\"", "")),
            Err("identity[1].tenant: missing".into())
        );
        assert_eq!(
            check(&VALID.replace("permissions = []", "")),
            Err("identity[2].permissions: missing".into())
        );
    }

    #[test]
    fn wrong_types() {
        assert_eq!(
            check("[identity]\nid = \"a\"\n"),
            Err("identity: must be an array of tables ([[identity]])".into())
        );
        assert_eq!(
            check("identity = [1]\n"),
            Err("identity[0]: must be a table ([[identity]])".into())
        );
        assert_eq!(
            check(&VALID.replace("\"CN=nobody\"", "7")),
            Err("identity[2].id: must be a string".into())
        );
        assert_eq!(
            check(&VALID.replace("permissions = []", "permissions = \"read\"")),
            Err("identity[2].permissions: must be an array of strings".into())
        );
        assert_eq!(
            check(&VALID.replace("permissions = []", "permissions = [\"read\", 3]")),
            Err("identity[2].permissions[1]: must be a string".into())
        );
    }

    #[test]
    fn syntax_errors_say_where() {
        let err = check("[[identity]]\nid = \"a\"\ntenant = acme\n").unwrap_err();
        assert!(err.starts_with("line 3, column 10: "), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let err = check("[[identity]]\nid = \"a\"\nid = \"b\"\n").unwrap_err();
        assert!(err.starts_with("line 3, "), "{err}");
    }

    #[test]
    fn check_file_names_the_file() {
        let dir = std::env::temp_dir().join(format!("vaultctl-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy.toml");
        std::fs::write(&path, VALID).unwrap();
        assert_eq!(
            check_file(&path).unwrap(),
            format!("{}: valid, 3 identities", path.display())
        );
        std::fs::write(&path, VALID.replace("\"read\"", "\"raed\"")).unwrap();
        let err = format!("{:#}", check_file(&path).unwrap_err());
        assert!(
            err.starts_with(&format!(
                "{}: identity[0].permissions: unknown permission \"raed\"",
                path.display()
            )),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let err = format!("{:#}", check_file(&path).unwrap_err());
        assert!(err.starts_with("read policy file "), "{err}");
    }

    #[test]
    fn reload_messages() {
        assert_eq!(identities_text(1), "1 identity");
        assert_eq!(identities_text(0), "0 identities");
        assert_eq!(identities_text(12), "12 identities");
        let refused = vault_client::Error::Rejected {
            code: tonic::Code::FailedPrecondition,
            message: "invalid policy file /etc/vault/policy.toml: identity[0].tenant: a tenant \
                      name has 1 to 64 characters"
                .into(),
            request_id: Some("r-1".into()),
            reason: None,
        };
        assert_eq!(
            refused_text(&refused),
            "reload policy: the vault refused the policy file: invalid policy file \
             /etc/vault/policy.toml: identity[0].tenant: a tenant name has 1 to 64 characters; \
             the previous policy stays in force"
        );
    }
}
