//! The rows of an import file's plaintext: CSV with a header row, or JSON lines, each
//! row mapped to a source id and a card by field names (Stripe's export: `id`,
//! `card.number`, `card.exp_month`, `card.exp_year`, `name`). A row that does not make
//! a valid card is that row's error (its number, the field and the rule, never the
//! value); a header or line that cannot be read at all fails the whole file.
//!
//! Every buffer that holds a row's text is zeroized when dropped.

use std::io::BufRead;

use zeroize::{Zeroize, Zeroizing};

use crate::card::{CardData, CardholderName, Expiry, Pan, Today, Violation, violation};

/// The longest line (or CSV record) accepted: a card row is a few hundred bytes.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Blank lines a file may hold beyond one per row.
const MAX_EXTRA_BLANK_LINES: u64 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileFormat {
    Csv,
    JsonLines,
}

/// Which source field holds what. In JSON lines a dotted name is a path
/// (`card.number`); in CSV it is the column's name as written in the header.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fields {
    pub id: String,
    pub number: String,
    pub exp_month: String,
    pub exp_year: String,
    /// Empty: the file has no cardholder names.
    pub name: String,
}

impl Fields {
    /// Stripe's card export.
    pub fn stripe() -> Self {
        Self {
            id: "id".into(),
            number: "card.number".into(),
            exp_month: "card.exp_month".into(),
            exp_year: "card.exp_year".into(),
            name: "name".into(),
        }
    }
}

/// The whole file is refused, nothing stored. The text names the rule and a row
/// number, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("the file is empty: no header row")]
    NoHeader,
    #[error("the header has no column `{0}` (named by the column mapping)")]
    MissingColumn(String),
    #[error(
        "the file has a card security code column or field (`{0}`): CVCs are never \
         imported; remove it and encrypt the file again"
    )]
    CvcColumn(String),
    #[error("row {0} is longer than 64 KiB")]
    LineTooLong(u64),
    #[error("row {0} is not valid UTF-8")]
    NotUtf8(u64),
    #[error("row {0} is not a JSON object")]
    NotJson(u64),
    #[error("row {0} has an unterminated quoted field")]
    Unterminated(u64),
    #[error("the plaintext could not be read")]
    Read,
    #[error("the file holds more than the {0} rows the job was approved for")]
    MoreRows(u64),
    #[error("the file holds more blank lines than rows (after row {0})")]
    Blank(u64),
    #[error("{0}")]
    Zip(super::zip::ZipProblem),
}

/// The rows of a plaintext that may be zipped (see `zip`).
pub fn open<'r, R: BufRead + 'r>(
    source: R,
    format: FileFormat,
    fields: Fields,
) -> Result<RowReader<Box<dyn BufRead + 'r>>, FileError> {
    let source = super::zip::unzip(source).map_err(|e| read_error(&e))?;
    RowReader::new(source, format, fields)
}

fn read_error(error: &std::io::Error) -> FileError {
    match super::zip::zip_problem(error) {
        Some(problem) => FileError::Zip(problem),
        None => FileError::Read,
    }
}

/// One data row: its number (1 = the first row after a CSV header, or the first JSON
/// line), the source's id for it, and the card or why it is not one.
#[derive(Debug)]
pub struct SourceRow {
    pub row: u64,
    pub source_id: String,
    pub card: Result<CardData, Violation>,
}

/// Names that hold a card security code: refused wherever they appear.
fn is_cvc_name(name: &str) -> bool {
    let last = name.rsplit(['.', '/']).next().unwrap_or(name);
    let normal: String = last
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    matches!(
        normal.as_str(),
        "cvc"
            | "cvv"
            | "cvc2"
            | "cvv2"
            | "cid"
            | "csc"
            | "securitycode"
            | "cardsecuritycode"
            | "cardverificationvalue"
            | "cardverificationcode"
    )
}

/// Reads rows from the plaintext.
pub struct RowReader<R> {
    source: R,
    format: FileFormat,
    fields: Fields,
    /// CSV: the column of id, number, month, year and name (`usize::MAX`: none).
    columns: [usize; 5],
    row: u64,
    /// Blank lines skipped so far: bounded, so that a file of nothing but line ends
    /// (a few bytes each once compressed) cannot keep a pass busy without end.
    blank: u64,
    today: Today,
    line: Zeroizing<Vec<u8>>,
}

impl<R> std::fmt::Debug for RowReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowReader")
            .field("format", &self.format)
            .field("row", &self.row)
            .finish_non_exhaustive()
    }
}

impl<R: BufRead> RowReader<R> {
    /// Reads the header (CSV), checking the mapping names existing columns and no
    /// column holds a CVC.
    pub fn new(source: R, format: FileFormat, fields: Fields) -> Result<Self, FileError> {
        let mut reader = Self {
            source,
            format,
            fields,
            columns: [usize::MAX; 5],
            row: 0,
            blank: 0,
            today: Today::now(),
            line: Zeroizing::new(Vec::with_capacity(512)),
        };
        if format == FileFormat::Csv {
            let header = reader.record(0)?.ok_or(FileError::NoHeader)?;
            let names: Vec<String> = header.iter().map(|c| c.trim().to_owned()).collect();
            if let Some(cvc) = names.iter().find(|n| is_cvc_name(n)) {
                // Its last segment only: what precedes it is the sender's to name.
                let last = cvc.rsplit(['.', '/']).next().unwrap_or("cvc");
                return Err(FileError::CvcColumn(last.to_owned()));
            }
            let wanted = [
                &reader.fields.id,
                &reader.fields.number,
                &reader.fields.exp_month,
                &reader.fields.exp_year,
                &reader.fields.name,
            ];
            for (slot, name) in wanted.into_iter().enumerate() {
                if name.is_empty() {
                    continue;
                }
                reader.columns[slot] = names
                    .iter()
                    .position(|n| n == name)
                    .ok_or_else(|| FileError::MissingColumn(name.clone()))?;
            }
        }
        Ok(reader)
    }

    /// The rows read so far.
    pub fn rows_read(&self) -> u64 {
        self.row
    }

    /// The next row, `None` at the end.
    pub fn next_row(&mut self) -> Result<Option<SourceRow>, FileError> {
        loop {
            let row = self.row + 1;
            let parsed = match self.format {
                FileFormat::Csv => match self.record(row)? {
                    None => return Ok(None),
                    Some(cells) if cells.iter().all(|c| c.trim().is_empty()) => {
                        self.skip_blank()?;
                        continue;
                    }
                    Some(cells) => self.csv_row(row, &cells),
                },
                FileFormat::JsonLines => {
                    if !self.read_line(row)? {
                        return Ok(None);
                    }
                    let text =
                        std::str::from_utf8(&self.line).map_err(|_| FileError::NotUtf8(row))?;
                    if text.trim().is_empty() {
                        self.skip_blank()?;
                        continue;
                    }
                    let mut value: serde_json::Value =
                        serde_json::from_str(text).map_err(|_| FileError::NotJson(row))?;
                    let parsed = if value.is_object() {
                        self.json_row(row, &value)
                    } else {
                        Err(FileError::NotJson(row))
                    };
                    erase_json(&mut value);
                    parsed?
                }
            };
            self.row = row;
            return Ok(Some(parsed));
        }
    }

    /// Counts a blank line: at most as many as rows, and a thousand more.
    fn skip_blank(&mut self) -> Result<(), FileError> {
        self.blank += 1;
        match self.blank > self.row + MAX_EXTRA_BLANK_LINES {
            true => Err(FileError::Blank(self.row)),
            false => Ok(()),
        }
    }

    /// Reads one line into `self.line` (without its end); false at the end of input.
    fn read_line(&mut self, row: u64) -> Result<bool, FileError> {
        self.line.clear();
        loop {
            let available = self.source.fill_buf().map_err(|e| read_error(&e))?;
            if available.is_empty() {
                return Ok(!self.line.is_empty());
            }
            let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
                Some(end) => (&available[..end], Some(end + 1)),
                None => (available, None),
            };
            if self.line.len() + chunk.len() > MAX_LINE_BYTES {
                return Err(FileError::LineTooLong(row));
            }
            self.line.extend_from_slice(chunk);
            let used = done.unwrap_or(chunk.len());
            self.source.consume(used);
            if done.is_some() {
                if self.line.last() == Some(&b'\r') {
                    self.line.pop();
                }
                return Ok(true);
            }
        }
    }

    /// One CSV record (RFC 4180: quoted fields may hold commas, quotes and line breaks).
    fn record(&mut self, row: u64) -> Result<Option<Vec<Zeroizing<String>>>, FileError> {
        if !self.read_line(row)? {
            return Ok(None);
        }
        let mut cells = Vec::with_capacity(8);
        let mut cell = Zeroizing::new(String::new());
        let mut quoted = false;
        // The whole record, over all its lines, is bounded like one line: quotes closed
        // and opened again on each line would otherwise grow it without end.
        let mut record_bytes = 0usize;
        loop {
            record_bytes += self.line.len() + 1;
            if record_bytes > MAX_LINE_BYTES {
                return Err(FileError::LineTooLong(row));
            }
            let text = std::str::from_utf8(&self.line).map_err(|_| FileError::NotUtf8(row))?;
            let mut chars = text.chars().peekable();
            while let Some(c) = chars.next() {
                match (quoted, c) {
                    (true, '"') if chars.peek() == Some(&'"') => {
                        cell.push('"');
                        chars.next();
                    }
                    (true, '"') => quoted = false,
                    (true, c) => cell.push(c),
                    (false, '"') if cell.is_empty() => quoted = true,
                    (false, ',') => cells.push(std::mem::take(&mut cell)),
                    (false, c) => cell.push(c),
                }
            }
            if !quoted {
                break;
            }
            // A line break inside a quoted field: the record goes on.
            cell.push('\n');
            if cell.len() > MAX_LINE_BYTES || !self.read_line(row)? {
                return Err(FileError::Unterminated(row));
            }
        }
        cells.push(cell);
        Ok(Some(cells))
    }

    fn csv_row(&self, row: u64, cells: &[Zeroizing<String>]) -> SourceRow {
        let cell = |slot: usize| -> &str {
            cells
                .get(self.columns[slot])
                .map_or("", |c| c.as_str())
                .trim()
        };
        SourceRow {
            row,
            source_id: short_id(cell(0)),
            card: card(
                cell(1),
                Number::Text(cell(2)),
                Number::Text(cell(3)),
                cell(4),
                self.today,
            ),
        }
    }

    fn json_row(&self, row: u64, value: &serde_json::Value) -> Result<SourceRow, FileError> {
        if let Some(cvc) = find_cvc_key(value) {
            return Err(FileError::CvcColumn(cvc));
        }
        let get = |path: &str| -> Option<&serde_json::Value> {
            if path.is_empty() {
                return None;
            }
            path.split('.').try_fold(value, |v, key| v.get(key))
        };
        let text = |path: &str| get(path).and_then(serde_json::Value::as_str).unwrap_or("");
        let number = |path: &str| match get(path) {
            Some(serde_json::Value::Number(n)) => Number::Value(n.as_u64()),
            Some(serde_json::Value::String(s)) => Number::Text(s.as_str()),
            _ => Number::Text(""),
        };
        let source_id = match get(&self.fields.id) {
            Some(serde_json::Value::Number(n)) => short_id(&n.to_string()),
            _ => short_id(text(&self.fields.id)),
        };
        let card = match get(&self.fields.number) {
            Some(serde_json::Value::Number(_)) => Err(violation(
                "card.number",
                "string",
                "must be a JSON string (a number loses digits)",
            )),
            _ => card(
                text(&self.fields.number),
                number(&self.fields.exp_month),
                number(&self.fields.exp_year),
                text(&self.fields.name),
                self.today,
            ),
        };
        Ok(SourceRow {
            row,
            source_id,
            card,
        })
    }
}

/// A month or year as the source wrote it.
enum Number<'a> {
    Text(&'a str),
    Value(Option<u64>),
}

impl Number<'_> {
    fn value(&self) -> Option<u32> {
        match self {
            Number::Text(t) => t.trim().parse().ok(),
            Number::Value(v) => v.and_then(|v| u32::try_from(v).ok()),
        }
    }
}

/// The source id is an identifier in the mapping file, never card data; it is cut to
/// 128 characters, and one made only of digits that could be a card number is refused
/// as an id (it is replaced by nothing: the row's number still identifies it).
fn short_id(id: &str) -> String {
    let id: String = id.chars().take(128).collect();
    // The longest run of digits that only separators interrupt ("4242.4242 4242-4242",
    // "card 4242..."): letters end a run, anything else does not.
    let mut run = 0usize;
    let mut longest = 0usize;
    for c in id.chars() {
        if c.is_ascii_digit() {
            run += 1;
            longest = longest.max(run);
        } else if c.is_alphanumeric() {
            run = 0;
        }
    }
    if longest >= 12 {
        return String::new();
    }
    id
}

fn card(
    number: &str,
    month: Number<'_>,
    year: Number<'_>,
    name: &str,
    today: Today,
) -> Result<CardData, Violation> {
    let pan = Pan::parse(number)?;
    let month = month.value().ok_or(violation(
        "card.exp_month",
        "required",
        "is required (1 to 12)",
    ))?;
    let year = year.value().ok_or(violation(
        "card.exp_year",
        "required",
        "is required (a four-digit year)",
    ))?;
    Ok(CardData {
        pan,
        expiry: Expiry::parse(month, year, today)?,
        name: CardholderName::parse(name)?,
        cvc: None,
    })
}

/// The name of a CVC field anywhere in a row. Only that name is returned, not its path:
/// the keys above it are the sender's and could be anything, a card number too.
fn find_cvc_key(value: &serde_json::Value) -> Option<String> {
    let object = value.as_object()?;
    for (key, inner) in object {
        if is_cvc_name(key) && !inner.is_null() {
            // Its last dotted segment only: the rest of a key is the sender's too.
            return Some(key.rsplit(['.', '/']).next().unwrap_or_default().to_owned());
        }
        if let Some(found) = find_cvc_key(inner) {
            return Some(found);
        }
    }
    None
}

/// Zeroizes every string of a parsed JSON row before it is dropped.
fn erase_json(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(s) => s.zeroize(),
        serde_json::Value::Array(items) => items.iter_mut().for_each(erase_json),
        serde_json::Value::Object(map) => map.values_mut().for_each(erase_json),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VISA: &str = "4242424242424242";

    fn rows(format: FileFormat, fields: Fields, text: &str) -> Result<Vec<SourceRow>, FileError> {
        let mut reader = RowReader::new(text.as_bytes(), format, fields)?;
        let mut out = Vec::new();
        while let Some(row) = reader.next_row()? {
            out.push(row);
        }
        Ok(out)
    }

    #[test]
    fn blank_lines_are_bounded_by_the_rows() {
        let line = format!(
            "{{\"id\":\"c\",\"card\":{{\"number\":\"{VISA}\",\"exp_month\":7,\"exp_year\":2040}}}}\n"
        );
        let text = |blank: usize| format!("{line}{line}{}{line}", "\n".repeat(blank));
        let json = || (FileFormat::JsonLines, Fields::stripe());
        let (format, fields) = json();
        assert_eq!(rows(format, fields, &text(1002)).unwrap().len(), 3);
        let (format, fields) = json();
        assert_eq!(
            rows(format, fields, &text(1003)).unwrap_err(),
            FileError::Blank(2)
        );
        let csv = |blank: usize| {
            format!(
                "id,number,exp_month,exp_year,name\nc,{VISA},7,2040,\n{}",
                ",,,,\n".repeat(blank)
            )
        };
        assert!(rows(FileFormat::Csv, csv_fields(), &csv(1001)).is_ok());
        assert_eq!(
            rows(FileFormat::Csv, csv_fields(), &csv(1002)).unwrap_err(),
            FileError::Blank(1)
        );
    }

    fn csv_fields() -> Fields {
        Fields {
            id: "id".into(),
            number: "number".into(),
            exp_month: "exp_month".into(),
            exp_year: "exp_year".into(),
            name: "name".into(),
        }
    }

    #[test]
    fn csv_rows_map_columns_and_keep_quotes() {
        let text = format!(
            "id,name,number,exp_month,exp_year\r\ncus_1,\"Lovelace, Ada\",{VISA},12,2040\n\ncus_2,Bob,4242424242424241,1,2040\n"
        );
        let rows = rows(FileFormat::Csv, csv_fields(), &text).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].row, 1);
        assert_eq!(rows[0].source_id, "cus_1");
        let card = rows[0].card.as_ref().unwrap();
        assert_eq!(card.name.as_ref().unwrap().expose(), "Lovelace, Ada");
        assert_eq!(rows[1].row, 2);
        let error = rows[1].card.as_ref().unwrap_err();
        assert_eq!((error.field, error.rule), ("card.number", "luhn"));
    }

    #[test]
    fn cvc_columns_and_fields_refuse_the_file() {
        let text = format!("id,number,exp_month,exp_year,name,CVC\n1,{VISA},1,2040,A,123\n");
        assert_eq!(
            rows(FileFormat::Csv, csv_fields(), &text).unwrap_err(),
            FileError::CvcColumn("CVC".into())
        );
        let text = format!("id,number,exp_month,exp_year,name,{VISA}.cvv\n");
        assert_eq!(
            rows(FileFormat::Csv, csv_fields(), &text).unwrap_err(),
            FileError::CvcColumn("cvv".into()),
            "no more of the header than the security code's own name"
        );
        let line = format!(
            "{{\"id\":\"c\",\"card\":{{\"number\":\"{VISA}\",\"exp_month\":1,\"exp_year\":2040,\"cvc\":\"123\"}}}}\n"
        );
        assert_eq!(
            rows(FileFormat::JsonLines, Fields::stripe(), &line).unwrap_err(),
            FileError::CvcColumn("cvc".into())
        );
    }

    #[test]
    fn stripe_json_lines_and_errors_name_no_value() {
        let text = format!(
            "{{\"id\":\"card_1\",\"name\":\"Ada\",\"card\":{{\"number\":\"{VISA}\",\"exp_month\":3,\"exp_year\":2041}}}}\n\
             {{\"id\":\"card_2\",\"card\":{{\"number\":\"{VISA}\",\"exp_month\":13,\"exp_year\":2041}}}}\n"
        );
        let rows = rows(FileFormat::JsonLines, Fields::stripe(), &text).unwrap();
        assert_eq!(rows[0].source_id, "card_1");
        assert!(rows[0].card.is_ok());
        let error = rows[1].card.as_ref().unwrap_err();
        assert_eq!((error.field, error.rule), ("card.exp_month", "range"));
        let broken = rows_err("{\"id\": 4242424242424242");
        assert_eq!(broken, FileError::NotJson(1));
        assert!(!broken.to_string().contains("4242"));
    }

    fn rows_err(text: &str) -> FileError {
        rows(FileFormat::JsonLines, Fields::stripe(), text).unwrap_err()
    }

    #[test]
    fn a_missing_column_or_card_shaped_id_is_caught() {
        assert_eq!(
            rows(FileFormat::Csv, csv_fields(), "id,number\n").unwrap_err(),
            FileError::MissingColumn("exp_month".into())
        );
        assert_eq!(short_id(VISA), "");
        assert_eq!(short_id("cus_42"), "cus_42");
        // Separators do not hide a card number; letters end a run of digits.
        assert_eq!(short_id("4242.4242.4242.4242"), "");
        assert_eq!(short_id("card 4242424242424242"), "");
        assert_eq!(short_id("order-2026-12-07-000123"), "");
        assert_eq!(short_id("cus_202612x07000123"), "cus_202612x07000123");
    }

    /// A JSON id that is a number goes through the same check as a string one, and a
    /// security code under a key that carries a card number names only its last part.
    #[test]
    fn a_numeric_json_id_or_a_cvc_key_carries_no_card_number() {
        let line = format!(
            "{{\"id\":{VISA},\"card\":{{\"number\":\"{VISA}\",\"exp_month\":3,\"exp_year\":2041}}}}\n"
        );
        let rows = rows(FileFormat::JsonLines, Fields::stripe(), &line).unwrap();
        assert_eq!(rows[0].source_id, "");
        let line = format!(
            "{{\"id\":\"c\",\"card\":{{\"number\":\"{VISA}\",\"exp_month\":1,\"exp_year\":2040,\"{VISA}.cvc\":\"123\"}}}}\n"
        );
        let refused = rows_err(&line);
        assert_eq!(refused, FileError::CvcColumn("cvc".into()));
        assert!(!refused.to_string().contains("4242"));
    }

    /// Quotes closed and opened again on every line keep one CSV record going: the
    /// record as a whole is bounded like a line, whatever its lines.
    #[test]
    fn a_csv_record_is_bounded_over_all_its_lines() {
        let mut text = String::from("id,number,exp_month,exp_year,name\n\"");
        let piece = "x\",\"x\n";
        while text.len() < 2 * MAX_LINE_BYTES {
            text.push_str(piece);
        }
        assert_eq!(
            rows(FileFormat::Csv, csv_fields(), &text).unwrap_err(),
            FileError::LineTooLong(1)
        );
    }
}
