//! Forward templates: text with `{{card.<field>}}` placeholders, rendered into a
//! zeroizing buffer with each value escaped for where it goes.

use zeroize::Zeroizing;

use crate::card::CardData;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Field {
    Number,
    ExpMonth,
    ExpYear,
    Name,
    Cvc,
}

impl Field {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "card.number" => Some(Self::Number),
            "card.exp_month" => Some(Self::ExpMonth),
            "card.exp_year" => Some(Self::ExpYear),
            "card.name" => Some(Self::Name),
            "card.cvc" => Some(Self::Cvc),
            _ => None,
        }
    }

    /// The name used in the processor's `inject` table.
    pub fn config_name(self) -> &'static str {
        match self {
            Self::Number => "number",
            Self::ExpMonth => "exp_month",
            Self::ExpYear => "exp_year",
            Self::Name => "name",
            Self::Cvc => "cvc",
        }
    }
}

/// How values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Inside a JSON string: quotes, backslashes and control characters escaped.
    Json,
    /// application/x-www-form-urlencoded.
    Form,
    /// As is (header values, other content types). Card values hold no CR or LF.
    Raw,
}

impl Encoding {
    pub fn for_content_type(content_type: Option<&str>) -> Self {
        let media = content_type
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if media == "application/json" || media.ends_with("+json") {
            Self::Json
        } else if media == "application/x-www-form-urlencoded" {
            Self::Form
        } else {
            Self::Raw
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
    /// `{{field.<name>}}`: a value the caller supplies to a processor's route (see
    /// `route`), bound before anything is rendered.
    Param(String),
}

#[derive(Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

/// Header templates may hold the caller's processor credentials: only the placeholders
/// are printed.
impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Template")
            .field(&self.fields().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "unknown placeholder (known: card.number, card.exp_month, card.exp_year, card.name, card.cvc)"
    )]
    Unknown,
    #[error("a placeholder is not closed with }}}}")]
    Unclosed,
}

/// A route field's name: 1 to 64 of `[a-z0-9_]`.
fn param_name(name: &str) -> Option<&str> {
    let name = name.strip_prefix("field.")?;
    (!name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
    .then_some(name)
}

impl Template {
    /// A caller's template: card placeholders only.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        Self::parse_with(text, false)
    }

    /// A processor route's template (from the config): card placeholders and
    /// `{{field.<name>}}`.
    pub fn parse_route(text: &str) -> Result<Self, TemplateError> {
        Self::parse_with(text, true)
    }

    fn parse_with(text: &str, params: bool) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or(TemplateError::Unclosed)?;
            let name = after[..end].trim();
            let part = match (Field::parse(name), param_name(name)) {
                (Some(field), _) => Part::Field(field),
                (None, Some(param)) if params => Part::Param(param.to_owned()),
                _ => return Err(TemplateError::Unknown),
            };
            parts.push(part);
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Self(parts))
    }

    /// Plain text, no placeholder (a value that reads like one stays text).
    pub fn text(text: &str) -> Self {
        Self(vec![Part::Text(text.to_owned())])
    }

    /// The route fields (`{{field.<name>}}`) the template names.
    pub fn params(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.iter().filter_map(|p| match p {
            Part::Param(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The template with each route field replaced by its value, escaped for
    /// `encoding`, as plain text: one pass, so a value that reads like a placeholder
    /// stays text and is never expanded. Fields without a value become empty.
    pub fn bind(
        &self,
        values: &std::collections::BTreeMap<String, String>,
        encoding: Encoding,
    ) -> Self {
        let parts = self
            .0
            .iter()
            .map(|part| match part {
                Part::Param(name) => {
                    let mut text = String::new();
                    escape_into(
                        &mut text,
                        values.get(name).map_or("", String::as_str),
                        encoding,
                    );
                    Part::Text(text)
                }
                other => other.clone(),
            })
            .collect();
        Self(parts)
    }

    /// The template's text when it holds no placeholder.
    pub fn plain(&self) -> Option<String> {
        self.0
            .iter()
            .map(|p| match p {
                Part::Text(text) => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Whether a card number, CVC or name placeholder stands next to anything but a
    /// delimiter (quote, space, `=`, `&`, `,`, `:`, `;`, `<`, `>`, brackets): next to a
    /// digit or letter (`"1{{card.cvc}}"`), an escape (`%`, `\`, `&#`), a `.` or another
    /// placeholder, an echo could hide the value in a longer run, or the processor
    /// could turn it into one (`{{card.cvc}}\u0030`, `{{card.cvc}}.0e3`).
    pub fn glued(&self) -> bool {
        // A CVC is short and all digits: next to a space, comma, quote mark or colon a
        // lenient parser may join it to a number ("1,737", `{"cvc":012}` read as 12).
        let delimiters = |field: Field| match field {
            Field::Cvc => "\"=&<>",
            _ => "\"'=&,:;<>()[]{}|^/ \t\r\n",
        };
        let sticks = |field: Field, part: Option<&Part>, at_end: bool| match part {
            None => false,
            Some(Part::Field(_) | Part::Param(_)) => true,
            Some(Part::Text(text)) => {
                let c = if at_end {
                    text.chars().next_back()
                } else {
                    text.chars().next()
                };
                c.is_some_and(|c| !delimiters(field).contains(c))
            }
        };
        self.0.iter().enumerate().any(|(i, part)| match part {
            Part::Field(field @ (Field::Number | Field::Cvc | Field::Name)) => {
                sticks(*field, i.checked_sub(1).and_then(|p| self.0.get(p)), true)
                    || sticks(*field, self.0.get(i + 1), false)
            }
            _ => false,
        })
    }

    pub fn fields(&self) -> impl Iterator<Item = Field> + '_ {
        self.0.iter().filter_map(|p| match p {
            Part::Field(f) => Some(*f),
            Part::Text(_) | Part::Param(_) => None,
        })
    }

    /// Renders with the card's values (and the CVC, when the template uses it).
    pub fn render(
        &self,
        card: &CardData,
        cvc: Option<&str>,
        encoding: Encoding,
    ) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::new());
        for part in &self.0 {
            match part {
                Part::Text(text) => out.push_str(text),
                // Bound before rendering (see `bind`); an unbound one renders empty.
                Part::Param(_) => {}
                Part::Field(field) => {
                    let value: Zeroizing<String> = Zeroizing::new(match field {
                        Field::Number => card.pan.expose_digits().to_owned(),
                        Field::ExpMonth => format!("{:02}", card.expiry.month),
                        Field::ExpYear => format!("{:04}", card.expiry.year),
                        Field::Name => card.name.as_ref().map_or("", |n| n.expose()).to_owned(),
                        Field::Cvc => cvc.unwrap_or("").to_owned(),
                    });
                    escape_into(&mut out, &value, encoding);
                }
            }
        }
        out
    }
}

fn escape_into(out: &mut String, value: &str, encoding: Encoding) {
    match encoding {
        Encoding::Raw => out.push_str(value),
        Encoding::Form => out.extend(form_urlencoded::byte_serialize(value.as_bytes())),
        Encoding::Json => escape_json(out, value),
    }
}

/// `value` as the inside of a JSON string: the one escaper for a rendered body and for
/// the forms of a name looked for in the processor's answer.
pub fn escape_json(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::{CardholderName, Expiry, Pan};

    #[test]
    fn a_card_value_may_not_be_glued_to_other_characters() {
        let glued = |text: &str| Template::parse(text).unwrap().glued();
        for alone in [
            r#"{"cvc":"{{card.cvc}}","n":"{{card.number}}"}"#,
            "{{card.number}}|{{card.exp_month}}",
            "number={{card.number}}&cvc={{card.cvc}}",
            "{{card.exp_month}}/{{card.exp_year}}",
            "{{card.exp_month}}{{card.exp_year}}",
            "Bearer {{card.name}}",
            "{{card.number}}",
        ] {
            assert!(!glued(alone), "{alone}");
        }
        for stuck in [
            r#"{"amount":"1{{card.cvc}}"}"#,
            "{{card.number}}{{card.cvc}}",
            "x{{card.name}}",
            "{{card.number}}0",
            "{{card.exp_year}}{{card.cvc}}",
            r#""{{card.cvc}}\u0030""#,
            "cvc={{card.cvc}}%30",
            r#"{"a":{{card.cvc}}.0e3}"#,
            "%{{card.number}}",
            "x-{{card.cvc}}",
            r#"{"cvc":{{card.cvc}}}"#,
            r#"{"amount":"1,{{card.cvc}}"}"#,
            "1 {{card.cvc}}",
        ] {
            assert!(glued(stuck), "{stuck}");
        }
    }

    fn card(name: &str) -> CardData {
        CardData {
            pan: Pan::parse("4242424242424242").unwrap(),
            expiry: Expiry {
                year: 2030,
                month: 7,
            },
            name: CardholderName::parse(name).unwrap(),
            cvc: None,
        }
    }

    #[test]
    fn renders_json_with_escaping() {
        let t = Template::parse(r#"{"n":"{{card.number}}","m":"{{ card.exp_month }}","y":"{{card.exp_year}}","h":"{{card.name}}","c":"{{card.cvc}}"}"#).unwrap();
        let out = t.render(&card(r#"O"Brien \ Jr"#), Some("123"), Encoding::Json);
        assert_eq!(
            out.as_str(),
            r#"{"n":"4242424242424242","m":"07","y":"2030","h":"O\"Brien \\ Jr","c":"123"}"#
        );
    }

    #[test]
    fn renders_form_encoding() {
        let t = Template::parse("number={{card.number}}&name={{card.name}}").unwrap();
        let out = t.render(&card("Ada & Co=1"), None, Encoding::Form);
        assert_eq!(out.as_str(), "number=4242424242424242&name=Ada+%26+Co%3D1");
    }

    #[test]
    fn unknown_and_unclosed_placeholders_are_errors() {
        assert_eq!(Template::parse("{{card.pin}}"), Err(TemplateError::Unknown));
        assert_eq!(
            Template::parse("{{card.number"),
            Err(TemplateError::Unclosed)
        );
        assert_eq!(
            Template::parse("no placeholders").unwrap().fields().count(),
            0
        );
        let fields: Vec<_> = Template::parse("{{card.cvc}}{{card.number}}")
            .unwrap()
            .fields()
            .collect();
        assert_eq!(fields, [Field::Cvc, Field::Number]);
    }

    #[test]
    fn encoding_from_content_type() {
        assert_eq!(
            Encoding::for_content_type(Some("application/json; charset=utf-8")),
            Encoding::Json
        );
        assert_eq!(
            Encoding::for_content_type(Some("application/x-www-form-urlencoded")),
            Encoding::Form
        );
        assert_eq!(Encoding::for_content_type(None), Encoding::Raw);
    }
}
