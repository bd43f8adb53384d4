//! What every `vaultctl` command group prints with: tables, times, JSON, and lines to a
//! stdout that may close early (`| head`).
//!
//! Tables have a header line, columns at least two spaces apart and "-" for an empty
//! cell; times are UTC, RFC 3339.

use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A Unix time in ms as UTC RFC 3339, to the second: `2025-06-01T12:00:00Z`.
pub fn utc(unix_ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{unix_ms} ms since 1970"))
}

/// A Unix time in ms as UTC RFC 3339 with milliseconds: `2025-06-01T12:00:00.042Z`.
/// A time out of range prints as `<ms>ms`: still one word, for line formats that
/// split on spaces.
pub fn utc_ms(unix_ms: i64) -> String {
    const FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_else(|| format!("{unix_ms}ms"))
}

pub fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_owned()
    }
}

/// A table: a header line, then the rows; columns padded to their widest cell and two
/// spaces apart, numbers right-aligned, the last column not padded.
pub fn table(columns: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|(title, _)| title.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = columns.iter().map(|(t, _)| (*t).to_owned()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            let last = i + 1 == row.len();
            if i > 0 {
                line.push_str("  ");
            }
            match columns.get(i).map(|(_, align)| align) {
                Some(Align::Right) => line.push_str(&format!("{cell:>width$}")),
                _ if last => line.push_str(cell),
                _ => line.push_str(&format!("{cell:<width$}")),
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[derive(Debug, Clone, Copy)]
pub enum Align {
    Left,
    Right,
}

/// Text from the server as one printable line: control characters (newlines, terminal
/// escape sequences) are shown escaped, as `\n` or `\u{1b}`, never sent to the
/// terminal.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Lines to stdout, buffered until [`Lines::flush`]. A reader that goes away
/// (`vaultctl audit export | head`) is not an error: [`Lines::closed`] turns true and
/// the command stops quietly.
#[derive(Debug)]
pub struct Lines {
    out: io::BufWriter<io::Stdout>,
    closed: bool,
}

impl Lines {
    pub fn new() -> Self {
        Self {
            out: io::BufWriter::new(io::stdout()),
            closed: false,
        }
    }

    pub fn closed(&self) -> bool {
        self.closed
    }

    pub fn line(&mut self, text: &str) -> anyhow::Result<()> {
        if !self.closed {
            let result = writeln!(self.out, "{text}");
            self.check(result)?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        if !self.closed {
            let result = self.out.flush();
            self.check(result)?;
        }
        Ok(())
    }

    fn check(&mut self, result: io::Result<()>) -> anyhow::Result<()> {
        match result {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            Err(e) => Err(anyhow::Error::new(e).context("write to stdout")),
            Ok(()) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_rfc3339_to_the_second() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(utc(-1), "1969-12-31T23:59:59Z");
        assert_eq!(utc(i64::MAX), format!("{} ms since 1970", i64::MAX));
    }

    #[test]
    fn times_to_the_millisecond() {
        assert_eq!(utc_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_ms(1_700_000_000_042), "2023-11-14T22:13:20.042Z");
        assert_eq!(utc_ms(1_700_000_000_999), "2023-11-14T22:13:20.999Z");
        assert_eq!(utc_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(utc_ms(i64::MAX), format!("{}ms", i64::MAX));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("velocity: 5/min"), "velocity: 5/min");
        assert_eq!(printable("a\nb\tc"), "a\\nb\\tc");
        assert_eq!(printable("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(printable("café"), "café");
    }
}
