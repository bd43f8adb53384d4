//! Processor-owned requests. Each processor declares its routes in the config: method,
//! path, content type, body and header templates, the headers the vault sets itself
//! (credentials read from a file, never from the caller), the headers a caller may
//! set, and the fields a caller supplies, each typed and bounded. The card fields a
//! route may carry, and where, are those its templates name (and the processor's
//! `inject` table allows). A caller names a route and gives field values only; they are
//! bound into the templates in one pass (a value reading `{{card.number}}` stays text).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Deserialize;
use zeroize::Zeroizing;

use super::Outbound;
use super::template::{Encoding, Template};
use crate::card::Violation;

/// `[[processor.route]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// What callers name (`ForwardRequest.route`): 1 to 64 of `[a-z0-9_-]`.
    pub name: String,
    pub method: String,
    /// Below the processor's base URL; `{{field.<name>}}` may stand for a whole segment.
    pub path: String,
    /// The request's content type (sets how fields and card values are escaped).
    #[serde(default)]
    pub content_type: Option<String>,
    /// Body template: `{{card.*}}` and `{{field.<name>}}` placeholders.
    #[serde(default)]
    pub body: String,
    /// Header templates the vault sets: `{{card.*}}` and `{{field.<name>}}`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Headers the vault sets from a file (credentials): read at start-up, never
    /// logged, never taken from a caller.
    #[serde(default)]
    pub secret_headers: BTreeMap<String, SecretHeader>,
    /// Header names a caller may set (plain values, no placeholders).
    #[serde(default)]
    pub caller_headers: Vec<String>,
    /// The fields a caller supplies.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretHeader {
    pub file: PathBuf,
    /// Put before the file's content, e.g. `"Bearer "`.
    #[serde(default)]
    pub prefix: String,
}

/// What a field's value may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    /// Printable text, no control characters.
    Text,
    /// `[0-9]+`.
    Digits,
    /// An amount: `[0-9]+` with an optional `.` and 1 to 4 decimals.
    Amount,
    /// `[A-Za-z0-9._-]+`, not `.` or `..`: safe in a path segment and a header.
    Id,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldRule {
    pub kind: FieldKind,
    /// Longest value, in characters (at most 1024).
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default = "default_required")]
    pub required: bool,
}

fn default_max_len() -> usize {
    64
}
fn default_required() -> bool {
    true
}

impl FieldRule {
    fn accepts(&self, value: &str) -> bool {
        let len = value.chars().count();
        if len == 0 || len > self.max_len {
            return false;
        }
        match self.kind {
            FieldKind::Text => !value.chars().any(char::is_control),
            FieldKind::Digits => value.bytes().all(|b| b.is_ascii_digit()),
            FieldKind::Amount => {
                let (whole, decimals) = value.split_once('.').unwrap_or((value, "0"));
                !whole.is_empty()
                    && whole.bytes().all(|b| b.is_ascii_digit())
                    && (1..=4).contains(&decimals.len())
                    && decimals.bytes().all(|b| b.is_ascii_digit())
            }
            FieldKind::Id => {
                value != "."
                    && value != ".."
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            }
        }
    }
}

/// A route, ready to build requests.
pub struct Route {
    pub method: String,
    path: Template,
    content_type: Option<String>,
    body: Template,
    headers: Vec<(String, Template)>,
    secret_headers: Vec<(String, Zeroizing<String>)>,
    caller_headers: BTreeSet<String>,
    fields: BTreeMap<String, FieldRule>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("method", &self.method)
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

fn route_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl Route {
    /// Checks a route's settings and reads its secret headers. `inject` is the
    /// processor's table of which card field may go where.
    pub fn from_settings(
        settings: &RouteSettings,
        inject: &BTreeMap<String, Vec<String>>,
    ) -> Result<Self, String> {
        let name = &settings.name;
        let err = |what: String| Err(format!("route {name:?}: {what}"));
        if !route_name_ok(name) {
            return err("name must be 1 to 64 of [a-z0-9_-]".into());
        }
        if !METHODS.contains(&settings.method.as_str()) {
            return err("method must be one of GET, POST, PUT, PATCH, DELETE".into());
        }
        let parse = |what: &str, text: &str| {
            Template::parse_route(text).map_err(|e| format!("route {name:?}: {what}: {e}"))
        };
        let path = parse("path", &settings.path)?;
        let body = parse("body", &settings.body)?;
        if !settings.path.starts_with('/') || settings.path.contains(['?', '#', '%']) {
            return err("path must start with '/' and hold no '?', '#' or '%'".into());
        }
        if path.fields().next().is_some() {
            return err("path may not hold card fields".into());
        }
        let allowed = |field: super::template::Field, location: &str| {
            inject
                .get(field.config_name())
                .is_some_and(|l| l.iter().any(|l| l == location))
        };
        if body.fields().any(|f| !allowed(f, "body")) {
            return err(
                "body holds a card field the processor's inject table does not allow there".into(),
            );
        }
        let mut headers = Vec::new();
        for (header, text) in &settings.headers {
            if header.eq_ignore_ascii_case("content-type") {
                return err(
                    "headers may not set content-type: the route's content_type does".into(),
                );
            }
            let template = parse(&format!("headers.{header}"), text)?;
            if template.fields().any(|f| !allowed(f, "header")) {
                return err(format!(
                    "headers.{header} holds a card field the inject table does not allow in a header"
                ));
            }
            if template.glued() {
                return err(format!(
                    "headers.{header} glues a card field to other characters"
                ));
            }
            headers.push((header.to_ascii_lowercase(), template));
        }
        if body.glued() {
            return err("body glues a card field to other characters".into());
        }
        let mut secret_headers = Vec::new();
        for (header, secret) in &settings.secret_headers {
            let content = std::fs::read_to_string(&secret.file).map_err(|e| {
                format!(
                    "route {name:?}: secret_headers.{header}: cannot read {}: {e}",
                    secret.file.display()
                )
            })?;
            let value = Zeroizing::new(format!("{}{}", secret.prefix, content.trim()));
            if reqwest::header::HeaderValue::from_str(&value).is_err() {
                return err(format!("secret_headers.{header}: not a valid header value"));
            }
            secret_headers.push((header.to_ascii_lowercase(), value));
        }
        let vault_set: BTreeSet<String> = headers
            .iter()
            .map(|(n, _)| n.clone())
            .chain(secret_headers.iter().map(|(n, _)| n.clone()))
            .chain(std::iter::once("content-type".to_owned()))
            .collect();
        let mut caller_headers = BTreeSet::new();
        for header in vault_set.iter().chain(&settings.caller_headers) {
            if !super::valid_header_name(header) {
                return err(format!(
                    "header {header:?} is not a header name the vault lets through"
                ));
            }
        }
        for header in &settings.caller_headers {
            let header = header.to_ascii_lowercase();
            if vault_set.contains(&header) {
                return err(format!(
                    "caller_headers names {header:?}, which the vault sets itself"
                ));
            }
            caller_headers.insert(header);
        }
        for (field, rule) in &settings.fields {
            if !route_name_ok(field) || field.contains('-') {
                return err(format!(
                    "field {field:?}: name must be 1 to 64 of [a-z0-9_]"
                ));
            }
            if rule.max_len == 0 || rule.max_len > 1024 {
                return err(format!("field {field:?}: max_len must be 1 to 1024"));
            }
        }
        let named: BTreeSet<&str> = path
            .params()
            .chain(body.params())
            .chain(headers.iter().flat_map(|(_, t)| t.params()))
            .collect();
        for param in &named {
            if !settings.fields.contains_key(*param) {
                return err(format!("{{{{field.{param}}}}} is not declared in fields"));
            }
        }
        for param in path.params() {
            if settings.fields.get(param).map(|r| r.kind) != Some(FieldKind::Id) {
                return err(format!(
                    "field {param:?} stands in the path: its kind must be id"
                ));
            }
        }
        // Free text is escaped only in JSON and form bodies: elsewhere (XML, plain
        // text) it could rewrite the request around it.
        if Encoding::for_content_type(settings.content_type.as_deref()) == Encoding::Raw {
            for param in body.params() {
                if settings.fields.get(param).map(|r| r.kind) == Some(FieldKind::Text) {
                    return err(format!(
                        "field {param:?} is free text in a body that is neither JSON nor \
                         form-encoded, where it cannot be escaped: use kind digits, amount or id"
                    ));
                }
            }
        }
        Ok(Self {
            method: settings.method.clone(),
            path,
            content_type: settings.content_type.clone(),
            body,
            headers,
            secret_headers,
            caller_headers,
            fields: settings.fields.clone(),
        })
    }

    /// The request for a caller's field values and headers: each checked against the
    /// route, then bound into the templates (the card still to be rendered).
    pub fn outbound(
        &self,
        fields: &BTreeMap<String, String>,
        caller_headers: &[(String, String)],
    ) -> Result<Outbound, Violation> {
        let invalid =
            |field: &'static str, rule: &'static str, description: &'static str| Violation {
                field,
                rule,
                description,
            };
        if let Some(unknown) = fields.keys().find(|k| !self.fields.contains_key(*k)) {
            let _ = unknown;
            return Err(invalid(
                "fields",
                "unknown",
                "names a field this route does not declare",
            ));
        }
        for (name, rule) in &self.fields {
            match fields.get(name) {
                None if rule.required => {
                    return Err(invalid(
                        "fields",
                        "required",
                        "a field the route requires is missing",
                    ));
                }
                None => {}
                Some(value) if !rule.accepts(value) => {
                    return Err(invalid(
                        "fields",
                        "format",
                        "a field's value breaks the route's rule for it (kind or length)",
                    ));
                }
                Some(_) => {}
            }
        }
        let mut headers = Vec::new();
        for (name, value) in caller_headers {
            if !self.caller_headers.contains(&name.to_ascii_lowercase()) {
                return Err(invalid(
                    "headers.name",
                    "not_allowed",
                    "this route lets a caller set only the headers it lists",
                ));
            }
            if value.len() > 1024 || reqwest::header::HeaderValue::from_str(value).is_err() {
                return Err(invalid(
                    "headers.value",
                    "characters",
                    "must be a valid header value of at most 1024 bytes",
                ));
            }
            // Plain text: a value that reads like a placeholder is sent as it is.
            headers.push((name.to_ascii_lowercase(), Template::text(value)));
        }
        let encoding = Encoding::for_content_type(self.content_type.as_deref());
        if let Some(content_type) = &self.content_type {
            headers.push(("content-type".into(), Template::text(content_type)));
        }
        for (name, template) in &self.headers {
            headers.push((name.clone(), template.bind(fields, Encoding::Raw)));
        }
        for (name, secret) in &self.secret_headers {
            headers.push((name.clone(), Template::text(secret)));
        }
        let path = self
            .path
            .bind(fields, Encoding::Raw)
            .plain()
            .ok_or_else(|| invalid("route", "path", "the route's path did not bind"))?;
        Ok(Outbound {
            method: self.method.clone(),
            path,
            headers,
            body: self.body.bind(fields, encoding),
            // The whole value, and the credential without a prefix such as "Bearer ".
            secrets: self
                .secret_headers
                .iter()
                .flat_map(|(_, value)| {
                    let bare = value.rsplit(' ').next().unwrap_or_default();
                    [value.to_string(), bare.to_owned()]
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inject() -> BTreeMap<String, Vec<String>> {
        [("number", "body"), ("exp_month", "body"), ("cvc", "body")]
            .into_iter()
            .map(|(f, l)| (f.to_owned(), vec![l.to_owned()]))
            .collect()
    }

    fn route(toml_text: &str) -> Result<Route, String> {
        let settings: RouteSettings = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        Route::from_settings(&settings, &inject())
    }

    const BASE: &str = r#"
name = "charge"
method = "POST"
path = "/v1/charges"
content_type = "application/json"
body = '{"amount":"{{field.amount}}","memo":"{{field.memo}}","number":"{{card.number}}"}'
caller_headers = ["x-source"]
fields = { amount = { kind = "amount" }, memo = { kind = "text", max_len = 40, required = false } }
"#;

    #[test]
    fn a_route_binds_fields_escaped_and_once() {
        let route = route(BASE).unwrap();
        let fields: BTreeMap<String, String> = [
            ("amount".to_owned(), "12.5".to_owned()),
            ("memo".to_owned(), r#"a"},"x":"{{card.cvc}}"#.to_owned()),
        ]
        .into();
        let outbound = route.outbound(&fields, &[]).unwrap();
        assert_eq!(outbound.path, "/v1/charges");
        // The memo is escaped for JSON, and its placeholder-like text is not a field.
        assert!(!outbound.uses(super::super::template::Field::Cvc));
        assert_eq!(
            outbound.body.plain(),
            None,
            "the card number is still to be rendered"
        );
        let memo_only = BASE.replace(r#","number":"{{card.number}}""#, "");
        let outbound =
            super::Route::outbound(&self::route(&memo_only).unwrap(), &fields, &[]).unwrap();
        assert_eq!(
            outbound.body.plain().unwrap(),
            r#"{"amount":"12.5","memo":"a\"},\"x\":\"{{card.cvc}}"}"#
        );
        let err = route
            .outbound(&fields, &[("authorization".into(), "x".into())])
            .unwrap_err();
        assert_eq!(err.rule, "not_allowed");
    }

    #[test]
    fn a_route_that_could_be_bent_is_refused_at_load() {
        for (change, why) in [
            (
                (
                    "content_type = \"application/json\"",
                    "content_type = \"application/xml\"",
                ),
                "free text",
            ),
            (
                ("path = \"/v1/charges\"", "path = \"/v1/{{field.memo}}\""),
                "kind must be id",
            ),
            (
                (
                    "caller_headers = [\"x-source\"]",
                    "caller_headers = [\"content-type\"]",
                ),
                "sets itself",
            ),
            (
                (
                    "\"number\":\"{{card.number}}\"",
                    "\"name\":\"{{card.name}}\"",
                ),
                "inject",
            ),
            (("{{field.memo}}", "{{field.other}}"), "not declared"),
            (
                (
                    "\"number\":\"{{card.number}}\"",
                    "\"number\":\"4{{card.number}}\"",
                ),
                "glues",
            ),
            (
                (
                    "caller_headers = [\"x-source\"]",
                    "caller_headers = [\"accept-encoding\"]",
                ),
                "lets through",
            ),
        ] {
            let err = route(&BASE.replace(change.0, change.1)).unwrap_err();
            assert!(err.contains(why), "{change:?}: {err}");
        }
    }
}
