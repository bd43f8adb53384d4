//! Who may do what: client identities (certificate URI SAN or CN) mapped to one tenant
//! and a set of permissions. Deny by default: an identity not in the file, or a
//! permission not granted, is refused.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A tenant name: 1 to 64 characters of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(String);

impl Tenant {
    pub fn parse(name: &str) -> Result<Self, &'static str> {
        if name.is_empty() || name.len() > 64 {
            return Err("a tenant name has 1 to 64 characters");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err("a tenant name has only letters, digits, '.', '_' and '-'");
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    Tokenize,
    Read,
    Delete,
    /// `forward:<processor>`.
    Forward(String),
    /// Reading and verifying the audit log.
    Audit,
    /// Operations on the vault itself: backups, rewrap, policy reload, blocks.
    Admin,
    /// Looking a card up by its number (FindSubject, EraseSubject): for the privacy
    /// team's data-subject requests, never for services.
    Subject,
    /// Seeing cards' keyed fingerprints in TokenInfo (to tell two tokens of one card
    /// apart from two cards).
    Fingerprint,
    /// Bulk import of an encrypted card file into the tenant (issue 21): exporting
    /// the import key, proposing an import job, approving another identity's, and
    /// running an approved one. Two identities with it are needed for any import.
    Import,
    /// Exporting the tenant's cards to a processor's OpenPGP key (issue 21): proposing
    /// an export job, approving another identity's, running an approved one.
    Export,
}

impl Permission {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "tokenize" => Some(Self::Tokenize),
            "read" => Some(Self::Read),
            "delete" => Some(Self::Delete),
            "audit" => Some(Self::Audit),
            "admin" => Some(Self::Admin),
            "subject" => Some(Self::Subject),
            "fingerprint" => Some(Self::Fingerprint),
            "import" => Some(Self::Import),
            "export" => Some(Self::Export),
            _ => name
                .strip_prefix("forward:")
                .filter(|p| !p.is_empty())
                .map(|p| Self::Forward(p.to_owned())),
        }
    }
}

/// An authenticated, authorized caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identity: String,
    pub tenant: Tenant,
    /// The call's request id, for audit events written during the call.
    pub request_id: String,
    /// Whether the answers show cards' keyed fingerprints (`fingerprint`).
    pub sees_fingerprints: bool,
    /// The call's audit event, for the write that finishes the call to carry (set by
    /// the call's envelope).
    pub event: Option<std::sync::Arc<crate::event::CallEvent>>,
}

#[derive(Debug, Clone)]
struct Grant {
    tenant: Tenant,
    permissions: BTreeSet<Permission>,
}

#[derive(Debug, Clone, Default)]
pub struct Policy {
    grants: HashMap<String, Grant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default, rename = "identity")]
    identities: Vec<IdentityEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityEntry {
    /// Certificate URI SAN (e.g. `spiffe://tokenvault.dev/checkout`) or CN.
    id: String,
    tenant: String,
    permissions: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid policy file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The policy in force, read by every call and replaced whole by a reload.
#[derive(Debug)]
pub struct SharedPolicy(std::sync::RwLock<std::sync::Arc<Policy>>);

impl SharedPolicy {
    pub fn new(policy: Policy) -> Self {
        Self(std::sync::RwLock::new(std::sync::Arc::new(policy)))
    }

    pub fn current(&self) -> std::sync::Arc<Policy> {
        std::sync::Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    pub fn replace(&self, policy: Policy) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(policy);
    }
}

/// Why a call was refused. Deliberately coarse for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No client certificate identity.
    Unauthenticated,
    /// An identity the policy does not list.
    Unlisted,
    /// Permission not granted.
    PermissionDenied,
}

impl Policy {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| PolicyError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let mut grants = HashMap::new();
        for (i, entry) in file.identities.into_iter().enumerate() {
            let tenant = Tenant::parse(&entry.tenant)
                .map_err(|rule| format!("identity[{i}].tenant: {rule}"))?;
            let permissions = entry
                .permissions
                .iter()
                .map(|p| {
                    Permission::parse(p).ok_or_else(|| {
                        format!(
                            "identity[{i}].permissions: unknown permission {p:?} \
                             (known: tokenize, read, delete, subject, fingerprint, import, export, \
                             audit, admin, forward:<processor>)"
                        )
                    })
                })
                .collect::<Result<BTreeSet<_>, _>>()?;
            if entry.id.is_empty() {
                return Err(format!("identity[{i}].id is empty"));
            }
            let id = runtime::tls::configured_identity(&entry.id)
                .map_err(|e| format!("identity[{i}].id: {e}"))?;
            if grants
                .insert(
                    id,
                    Grant {
                        tenant,
                        permissions,
                    },
                )
                .is_some()
            {
                return Err(format!("identity[{i}].id {:?} is listed twice", entry.id));
            }
        }
        Ok(Self { grants })
    }

    /// Identities in the policy.
    pub fn len(&self) -> usize {
        self.grants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    pub fn authorize(
        &self,
        identity: Option<&str>,
        permission: &Permission,
    ) -> Result<Caller, Denied> {
        let identity = identity.ok_or(Denied::Unauthenticated)?;
        let grant = self.grants.get(identity).ok_or(Denied::Unlisted)?;
        if !grant.permissions.contains(permission) {
            return Err(Denied::PermissionDenied);
        }
        Ok(Caller {
            identity: identity.to_owned(),
            tenant: grant.tenant.clone(),
            request_id: String::new(),
            sees_fingerprints: grant.permissions.contains(&Permission::Fingerprint),
            event: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [[identity]]
        id = "spiffe://tokenvault.dev/checkout"
        tenant = "acme"
        permissions = ["tokenize", "read", "forward:sandbox"]
    "#;

    /// Control: PCI-7.2.1 (docs/compliance.md).
    /// Attack: an identity or permission the policy does not name is allowed; nothing
    /// unnamed is.
    #[test]
    fn deny_by_default() {
        let policy = Policy::parse(POLICY).unwrap();
        let caller = policy
            .authorize(Some("spiffe://tokenvault.dev/checkout"), &Permission::Read)
            .unwrap();
        assert_eq!(caller.tenant.as_str(), "acme");
        assert_eq!(
            policy.authorize(
                Some("spiffe://tokenvault.dev/checkout"),
                &Permission::Delete
            ),
            Err(Denied::PermissionDenied)
        );
        assert_eq!(
            policy.authorize(Some("spiffe://other"), &Permission::Read),
            Err(Denied::Unlisted)
        );
        assert_eq!(
            policy.authorize(None, &Permission::Read),
            Err(Denied::Unauthenticated)
        );
        let checkout = Some("spiffe://tokenvault.dev/checkout");
        assert!(
            policy
                .authorize(checkout, &Permission::Forward("sandbox".into()))
                .is_ok()
        );
        assert_eq!(
            policy.authorize(checkout, &Permission::Forward("other".into())),
            Err(Denied::PermissionDenied)
        );
        assert_eq!(
            Policy::default().authorize(Some("x"), &Permission::Read),
            Err(Denied::Unlisted)
        );
    }

    #[test]
    fn invalid_files_say_where() {
        let err = Policy::parse(&POLICY.replace("\"read\"", "\"raed\"")).unwrap_err();
        assert!(
            err.contains("identity[0].permissions") && err.contains("raed"),
            "{err}"
        );
        let err = Policy::parse(&POLICY.replace("acme", "ac me")).unwrap_err();
        assert!(err.contains("identity[0].tenant"), "{err}");
        let err = Policy::parse(&format!("{POLICY}{POLICY}")).unwrap_err();
        assert!(err.contains("twice"), "{err}");
        assert!(
            Policy::parse("[[identity]]\nid = \"a\"\ntenant = \"t\"\npermissions = []\nextra = 1")
                .is_err()
        );
    }
}
