//! The processor allowlist as configured: static, validated at start-up, refused with a
//! message naming the processor and the key when wrong.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::address::{is_private, literal_ip};

/// One `[[processor]]` entry of the vault config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorSettings {
    /// Name callers use, and the `forward:<name>` permission.
    pub name: String,
    /// `https://host[:port][/prefix]`. Plain http is refused.
    pub base_url: String,
    /// The requests callers may have sent here, each named (`[[processor.route]]`):
    /// the processor's config, not the caller, owns method, path, headers and body.
    #[serde(default, rename = "route")]
    pub named_routes: Vec<super::route::RouteSettings>,
    /// Lets callers write the method, path, headers and body themselves (free-form
    /// forwards), within `routes`. Off by default: a caller could then send cards to
    /// its own account at the processor, or set the processor's own headers. For
    /// sandboxes and tests of the mode.
    #[serde(default)]
    pub dangerous_free_form: bool,
    /// With `dangerous_free_form`: allowed requests, method and path (a `*` segment
    /// matches any one segment).
    #[serde(default)]
    pub routes: Vec<RouteSettings>,
    /// CA that must have signed the processor's certificate (PEM).
    pub ca_file: PathBuf,
    /// Optional pins: base64 SHA-256 of the processor certificate's SubjectPublicKeyInfo.
    /// When set, the certificate must also match one of them.
    #[serde(default)]
    pub spki_sha256_pins: Vec<String>,
    /// Which card fields may be injected where: field (`number`, `exp_month`,
    /// `exp_year`, `name`, `cvc`) → locations (`body`, `header`).
    pub inject: BTreeMap<String, Vec<String>>,
    /// Client identities that may forward to this processor (they also need the
    /// `forward:<name>` permission in the policy).
    pub allowed_identities: Vec<String>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Deadline for the whole exchange with the processor.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Allow loopback and private addresses (sandboxes and tests only). Off by default.
    #[serde(default)]
    pub allow_private_network: bool,
    /// Every forward to this processor must give a reason (`ForwardRequest.reason`),
    /// kept in the audit log.
    #[serde(default)]
    pub require_reason: bool,
    /// `[processor.export]`: the OpenPGP key this processor takes card exports under
    /// (`vaultctl export`); none: no export to it.
    #[serde(default)]
    pub export: Option<ProcessorExportSettings>,
}

/// `[processor.export]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorExportSettings {
    /// The processor's ASCII-armored OpenPGP public key.
    pub public_key_file: PathBuf,
    /// Its primary key's fingerprint (40 hex digits, spaces allowed), as the processor
    /// gave it out of band: a file holding another key stops the vault at start.
    pub fingerprint: String,
    /// `csv` (token, number, exp_month, exp_year, name) or `json-lines`.
    #[serde(default)]
    pub format: ExportFormat,
    /// Where the processor takes the file: POSTed (`application/pgp-encrypted`) to
    /// `base_url` + this path over the processor's TLS settings. None: the file is
    /// written to the vault's export directory instead.
    #[serde(default)]
    pub upload_path: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportFormat {
    #[default]
    Csv,
    JsonLines,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    pub method: String,
    pub path: String,
}

/// `[forwarding]`: settings shared by every processor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardingSettings {
    /// How long a CVC is kept (in memory only) after tokenization.
    #[serde(default = "default_cvc_ttl_secs")]
    pub cvc_ttl_secs: u64,
    /// How long a forward's outcome is kept for idempotent retries.
    #[serde(default = "default_idempotency_ttl_secs")]
    pub idempotency_ttl_secs: u64,
    /// Most CVCs held (in memory) at once, in all and per tenant. Beyond it a card
    /// sent with a CVC is refused (RESOURCE_EXHAUSTED), and nothing is stored.
    #[serde(default = "default_max_cvcs")]
    pub max_cvcs: usize,
    #[serde(default = "default_max_cvcs_per_tenant")]
    pub max_cvcs_per_tenant: usize,
}

impl Default for ForwardingSettings {
    fn default() -> Self {
        Self {
            cvc_ttl_secs: default_cvc_ttl_secs(),
            idempotency_ttl_secs: default_idempotency_ttl_secs(),
            max_cvcs: default_max_cvcs(),
            max_cvcs_per_tenant: default_max_cvcs_per_tenant(),
        }
    }
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_timeout_ms() -> u64 {
    30_000
}
fn default_max_response_bytes() -> usize {
    1024 * 1024
}
fn default_max_cvcs() -> usize {
    1_000_000
}
fn default_max_cvcs_per_tenant() -> usize {
    250_000
}
fn default_cvc_ttl_secs() -> u64 {
    3600
}
fn default_idempotency_ttl_secs() -> u64 {
    24 * 3600
}

pub const FIELDS: [&str; 5] = ["number", "exp_month", "exp_year", "name", "cvc"];
pub const LOCATIONS: [&str; 2] = ["body", "header"];
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

impl ProcessorSettings {
    /// Checks everything that can be checked without the network. Errors name the
    /// processor and the key.
    pub fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        let err = |key: &str, rule: &str| Err(format!("processor {name:?}: {key} {rule}"));
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "processor name {name:?} must be letters, digits, '-' or '_'"
            ));
        }
        let Ok(url) = reqwest::Url::parse(&self.base_url) else {
            return err("base_url", "is not a URL");
        };
        if url.scheme() != "https" {
            return err("base_url", "must be https:// (plain http is never allowed)");
        }
        if url.host_str().is_none()
            || url.query().is_some()
            || url.fragment().is_some()
            || !url.username().is_empty()
        {
            return err(
                "base_url",
                "must be https://host[:port][/prefix] without query, fragment or credentials",
            );
        }
        if let Some(ip) = literal_ip(&url)
            && is_private(ip)
            && !self.allow_private_network
        {
            return err(
                "base_url",
                "is a private or loopback address; set allow_private_network = true for sandboxes",
            );
        }
        match (
            self.dangerous_free_form,
            self.routes.is_empty(),
            self.named_routes.is_empty(),
        ) {
            (true, true, _) => {
                return err(
                    "routes",
                    "must list at least one method and path when dangerous_free_form = true",
                );
            }
            // A processor that only takes exports needs no route.
            _ if self
                .export
                .as_ref()
                .and_then(|e| e.upload_path.as_deref())
                .is_some_and(|p| !p.starts_with('/') || p.contains(['?', '#', '{'])) =>
            {
                return err(
                    "export.upload_path",
                    "must be a path starting with / (no query, fragment or placeholder)",
                );
            }
            (false, _, true) if self.export.is_none() => {
                return err(
                    "route",
                    "must declare at least one [[processor.route]] (or set dangerous_free_form \
                     = true, for sandboxes), or an [processor.export] key",
                );
            }
            (false, false, _) => {
                return err("routes", "apply only with dangerous_free_form = true");
            }
            _ => {}
        }
        for route in &self.routes {
            if !METHODS.contains(&route.method.as_str()) {
                return err(
                    "routes.method",
                    "must be one of GET, POST, PUT, PATCH, DELETE (upper case)",
                );
            }
            if !route.path.starts_with('/') || route.path.contains(['?', '#', '%']) {
                return err(
                    "routes.path",
                    "must start with '/' and hold no '?', '#' or '%'",
                );
            }
        }
        for (field, locations) in &self.inject {
            if !FIELDS.contains(&field.as_str()) {
                return err(
                    "inject",
                    "names an unknown field (known: number, exp_month, exp_year, name, cvc)",
                );
            }
            if locations.iter().any(|l| !LOCATIONS.contains(&l.as_str())) {
                return err("inject", "locations must be \"body\" or \"header\"");
            }
        }
        if self.allowed_identities.is_empty() {
            return err(
                "allowed_identities",
                "is empty: nobody could use this processor",
            );
        }
        if self.connect_timeout_ms == 0 || self.timeout_ms == 0 || self.max_response_bytes == 0 {
            return err("timeouts and max_response_bytes", "must be greater than 0");
        }
        for pin in &self.spki_sha256_pins {
            use base64::Engine;
            match base64::engine::general_purpose::STANDARD.decode(pin) {
                Ok(bytes) if bytes.len() == 32 => {}
                _ => {
                    return err(
                        "spki_sha256_pins",
                        "must be base64 SHA-256 digests (32 bytes)",
                    );
                }
            }
        }
        Ok(())
    }
}
