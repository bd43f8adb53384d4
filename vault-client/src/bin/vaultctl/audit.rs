//! `vaultctl audit ...`: read, export and verify the vault's audit log.
//!
//! Output is meant for people and for tests and log shippers that parse it. One event
//! is one line: in text,
//!
//! ```text
//! #<seq> <time> <actor> <action> <outcome> tenant=<t> token=<tok> count=<n> processor=<p> key_version=<v> peer=<addr> request_id=<id> reason="<r>" detail=<d>
//! ```
//!
//! with the time in UTC, RFC 3339 to the millisecond, the `key=value` fields left out
//! when empty, `reason` (a forward's, free text) quoted, `detail` (free text, may hold
//! spaces) always last, and control
//! characters escaped; in JSON, one object per line with every field of
//! [`vault_client::AuditEvent`] (null when empty). When changing a line's wording,
//! check `tests/` for parsers of it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use vault_client::{AUDIT_PAGE_MAX, AuditEvent, AuditGap, AuditVerification, VaultClient};

use crate::ConfigFn;
use crate::output::{Lines, printable, utc_ms};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the last events of the audit log, oldest first, one per line:
    /// `#SEQ TIME ACTOR ACTION OUTCOME key=value... detail=...`.
    Tail {
        /// How many events.
        #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 20)]
        lines: u64,
        /// Keep printing new events as they are written, until Ctrl-C.
        #[arg(short, long)]
        follow: bool,
        /// One JSON object per event and line.
        #[arg(long)]
        json: bool,
    },
    /// Print every event in a time window as JSON lines, oldest first: the log as it
    /// was when the export started. TIME is RFC 3339 (2026-11-21T08:00:00Z) or Unix
    /// milliseconds; both bounds are inclusive and optional.
    Export {
        /// Events at or after this time.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        since: Option<i64>,
        /// Events at or before this time.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        until: Option<i64>,
    },
    /// Check the whole audit chain; exits 1 and names the first entry at fault (edited,
    /// removed, inserted, reordered, or unverifiable) if it is not intact.
    Verify,
}

/// How often `tail --follow` asks for new events.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

pub async fn run(command: AuditCommand, vault: ConfigFn<'_>) -> anyhow::Result<ExitCode> {
    let mut client = VaultClient::connect(&vault()?).await?;
    match command {
        AuditCommand::Tail {
            lines,
            follow,
            json,
        } => tail(&mut client, lines, follow, json).await,
        AuditCommand::Export { since, until } => {
            if let (Some(since), Some(until)) = (since, until)
                && since > until
            {
                bail!("--until must not be before --since");
            }
            export(&mut client, since, until).await
        }
        AuditCommand::Verify => {
            let verification = client.verify_audit().await.context("verify audit log")?;
            println!("{}", verification_line(&verification));
            for gap in &verification.gaps {
                println!(
                    "{}",
                    gap_line(gap, &verification.node, &verification.vault_identity)
                );
            }
            Ok(if verification.intact {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

async fn tail(
    client: &mut VaultClient,
    lines: u64,
    follow: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut out = Lines::new();
    let format = |event: &AuditEvent| -> anyhow::Result<String> {
        Ok(if json {
            serde_json::to_string(event)?
        } else {
            event_line(event)
        })
    };
    // Where the log ends now; the last `lines` events are those up to there.
    let end = client
        .read_audit(0, None, None, 1)
        .await
        .context("read audit log")?
        .last_sequence;
    let mut cursor = end.saturating_sub(lines);
    while cursor < end {
        let want = u32::try_from(end - cursor)
            .unwrap_or(u32::MAX)
            .min(AUDIT_PAGE_MAX);
        let page = client
            .read_audit(cursor, None, None, want)
            .await
            .context("read audit log")?;
        let mut progressed = false;
        for event in page.events.iter().take_while(|e| e.sequence <= end) {
            cursor = advance(cursor, event)?;
            out.line(&format(event)?)?;
            progressed = true;
        }
        out.flush()?;
        if out.closed() {
            return Ok(ExitCode::SUCCESS);
        }
        // Nothing up to `end` came back (a gap in the sequence): the tail is printed.
        if !progressed {
            break;
        }
    }
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }

    // One listener for the whole follow: a Ctrl-C during a call must not be lost.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut unreachable = false;
    loop {
        let poll = async {
            tokio::time::sleep(FOLLOW_INTERVAL).await;
            client.read_audit(cursor, None, None, AUDIT_PAGE_MAX).await
        };
        tokio::select! {
            signal = &mut interrupted => {
                signal.context("listen for Ctrl-C")?;
                out.flush()?;
                return Ok(ExitCode::SUCCESS);
            }
            result = poll => match result {
                Ok(page) => {
                    if unreachable {
                        eprintln!("the vault is reachable again");
                        unreachable = false;
                    }
                    for event in &page.events {
                        cursor = advance(cursor, event)?;
                        out.line(&format(event)?)?;
                    }
                    out.flush()?;
                    if out.closed() {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                // A restarting vault: keep polling, say so once.
                Err(e) if e.code() == Some(tonic::Code::Unavailable) => {
                    if !unreachable {
                        eprintln!("the vault is unreachable ({e}); still polling");
                        unreachable = true;
                    }
                }
                Err(e) => return Err(e).context("read audit log"),
            },
        }
    }
}

/// Every event in the window up to the end of the log as it was at the first page:
/// reading the log may itself add events, and an export must end.
async fn export(
    client: &mut VaultClient,
    since: Option<i64>,
    until: Option<i64>,
) -> anyhow::Result<ExitCode> {
    let mut out = Lines::new();
    let mut cursor = 0;
    let mut end = None;
    let mut exported: u64 = 0;
    loop {
        let page = client
            .read_audit(cursor, since, until, AUDIT_PAGE_MAX)
            .await
            .context("read audit log")?;
        let end = *end.get_or_insert(page.last_sequence);
        let mut done = page.events.is_empty();
        for event in &page.events {
            if event.sequence > end {
                done = true;
                break;
            }
            cursor = advance(cursor, event)?;
            out.line(&serde_json::to_string(event)?)?;
            exported += 1;
        }
        out.flush()?;
        if out.closed() {
            return Ok(ExitCode::SUCCESS);
        }
        if done || cursor >= end {
            break;
        }
    }
    eprintln!("exported {exported} audit events");
    Ok(ExitCode::SUCCESS)
}

/// The next read starts after `event`; a vault answering out of order would have
/// us read forever.
fn advance(cursor: u64, event: &AuditEvent) -> anyhow::Result<u64> {
    if event.sequence <= cursor {
        bail!(
            "the vault sent audit event #{} after asked for events after #{cursor}",
            event.sequence
        );
    }
    Ok(event.sequence)
}

/// `#42 2026-11-21T08:00:00.123Z spiffe://tokenvault.dev/checkout Tokenize ok tenant=acme token=tok_... request_id=r-1`
pub fn event_line(e: &AuditEvent) -> String {
    let word = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            printable(s)
        }
    };
    let mut line = format!(
        "#{} {} {} {} {}",
        e.sequence,
        utc_ms(e.at_unix_ms),
        word(&e.actor),
        word(&e.action),
        word(&e.outcome)
    );
    let count = e.count.map(|n| n.to_string());
    let key_version = e.key_version.map(|v| v.to_string());
    for (key, value) in [
        ("tenant", e.tenant.as_deref()),
        ("token", e.token.as_deref()),
        ("count", count.as_deref()),
        ("processor", e.processor.as_deref()),
        ("key_version", key_version.as_deref()),
        ("peer", e.peer.as_deref()),
        ("request_id", e.request_id.as_deref()),
    ] {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            line.push_str(&format!(" {key}={}", printable(value)));
        }
    }
    if let Some(reason) = e.reason.as_deref().filter(|r| !r.is_empty()) {
        line.push_str(&format!(" reason={:?}", printable(reason)));
    }
    if let Some(detail) = e.detail.as_deref().filter(|d| !d.is_empty()) {
        line.push_str(&format!(" detail={}", printable(detail)));
    }
    line
}

/// `audit log intact: N entries`, or `audit log NOT intact: entry #S PROBLEM (checked
/// N entries)`.
pub fn verification_line(v: &AuditVerification) -> String {
    if v.intact {
        return format!("audit log intact: {}", entries(v.entries));
    }
    format!(
        "audit log NOT intact: entry #{} {} (checked {})",
        v.first_bad_sequence
            .map_or_else(|| "?".to_owned(), |s| s.to_string()),
        v.problem
            .as_deref()
            .map_or_else(|| "at fault".into(), printable),
        entries(v.entries)
    )
}

/// One gap: acknowledged (by whom), or what two admins run to acknowledge it.
pub fn gap_line(gap: &AuditGap, node: &str, identity: &str) -> String {
    let (first, last) = (gap.first_sequence, gap.last_sequence);
    match &gap.acknowledged_by {
        Some(by) => format!("gap: entries {first}..={last} missing, acknowledged by {by}"),
        None => format!(
            "gap: entries {first}..={last} missing, NOT acknowledged; to acknowledge: vaultctl \
             keys propose audit-gap {first} {last} --node {node} --vault-identity {identity}, \
             then a second admin approves"
        ),
    }
}

fn entries(n: u64) -> String {
    if n == 1 {
        "1 entry".into()
    } else {
        format!("{n} entries")
    }
}

/// A time as Unix ms: RFC 3339 (`2026-11-21T08:00:00Z`, any offset, fractions of a
/// second cut to the millisecond) or Unix milliseconds. Times up to 1970 are refused
/// (the vault reads 0 as "no bound"), and so are numbers that look like Unix seconds.
pub fn parse_time(text: &str) -> Result<i64, String> {
    const EXPECTED: &str = "expected RFC 3339 (e.g. 2026-11-21T08:00:00Z) or Unix milliseconds";
    let text = text.trim();
    let ms = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let ms: i64 = text
            .parse()
            .map_err(|_| format!("{text:?} is too large: {EXPECTED}"))?;
        // 10^11 ms is March 1973; 10 digits are seconds (2001 to 2286), not ms.
        if ms < 100_000_000_000 {
            return Err(format!(
                "{text} looks like Unix seconds, not milliseconds (as ms it is {}): {EXPECTED}",
                utc_ms(ms)
            ));
        }
        ms
    } else {
        let time =
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .map_err(|e| format!("{text:?} is not a time ({e}): {EXPECTED}"))?;
        i64::try_from(time.unix_timestamp_nanos().div_euclid(1_000_000))
            .map_err(|_| format!("{text:?} is out of range: {EXPECTED}"))?
    };
    if ms <= 0 {
        return Err(format!("{text:?} is not after 1970-01-01T00:00:00Z"));
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> AuditEvent {
        AuditEvent {
            sequence: 42,
            at_unix_ms: 1_700_000_000_042,
            actor: "spiffe://tokenvault.dev/checkout".into(),
            action: "Forward".into(),
            outcome: "ok".into(),
            tenant: Some("acme".into()),
            token: Some("tok_abc".into()),
            count: None,
            processor: Some("sandbox".into()),
            key_version: Some(2),
            peer: Some("127.0.0.1:50432".into()),
            request_id: Some("r-1".into()),
            detail: Some("velocity: 6 forwards in 60 s".into()),
            reason: Some("recurring \"charge\" 2026-12".into()),
            audit_key_version: 1,
            chain: "ab".repeat(32),
            chained_on: None,
        }
    }

    #[test]
    fn event_lines() {
        assert_eq!(
            event_line(&event()),
            "#42 2023-11-14T22:13:20.042Z spiffe://tokenvault.dev/checkout Forward ok \
             tenant=acme token=tok_abc processor=sandbox key_version=2 peer=127.0.0.1:50432 \
             request_id=r-1 reason=\"recurring \\\"charge\\\" 2026-12\" detail=velocity: 6 forwards in 60 s"
        );
        let batch = AuditEvent {
            action: "TokenizeBatch".into(),
            outcome: "PERMISSION_DENIED".into(),
            actor: "-".into(),
            token: None,
            count: Some(3),
            processor: None,
            key_version: None,
            detail: None,
            reason: None,
            tenant: None,
            ..event()
        };
        assert_eq!(
            event_line(&batch),
            "#42 2023-11-14T22:13:20.042Z - TokenizeBatch PERMISSION_DENIED count=3 \
             peer=127.0.0.1:50432 request_id=r-1"
        );
    }

    #[test]
    fn event_lines_stay_one_line() {
        let sneaky = AuditEvent {
            actor: String::new(),
            detail: Some("a\nb\u{1b}[2J".into()),
            tenant: Some(String::new()),
            ..event()
        };
        let line = event_line(&sneaky);
        assert!(!line.contains('\n') && !line.contains('\u{1b}'), "{line}");
        assert!(line.starts_with("#42 2023-11-14T22:13:20.042Z - Forward ok token="));
        assert!(line.ends_with(" detail=a\\nb\\u{1b}[2J"), "{line}");
    }

    #[test]
    fn json_lines_have_every_field() {
        let json = serde_json::to_string(&AuditEvent {
            count: None,
            ..event()
        })
        .unwrap();
        assert!(!json.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["sequence"], 42);
        assert_eq!(value["at_unix_ms"], 1_700_000_000_042_i64);
        assert_eq!(value["key_version"], 2);
        assert!(value["count"].is_null());
        assert_eq!(value["chain"], "ab".repeat(32));
        assert!(value["chained_on"].is_null());
        assert_eq!(value.as_object().unwrap().len(), 17);
    }

    #[test]
    fn gap_lines_say_who_acknowledged_or_how_to() {
        let mut gap = AuditGap {
            first_sequence: 5,
            last_sequence: 38,
            acknowledged_by: None,
        };
        assert_eq!(
            gap_line(&gap, "vault-1:8443", "spiffe://example.com/vault"),
            "gap: entries 5..=38 missing, NOT acknowledged; to acknowledge: vaultctl keys \
             propose audit-gap 5 38 --node vault-1:8443 --vault-identity \
             spiffe://example.com/vault, then a second admin approves"
        );
        gap.acknowledged_by = Some("admin-a, admin-b".into());
        assert_eq!(
            gap_line(&gap, "vault-1:8443", "spiffe://example.com/vault"),
            "gap: entries 5..=38 missing, acknowledged by admin-a, admin-b"
        );
    }

    #[test]
    fn verification_lines() {
        let mut v = AuditVerification {
            entries: 1234,
            intact: true,
            first_bad_sequence: None,
            problem: None,
            ..Default::default()
        };
        assert_eq!(verification_line(&v), "audit log intact: 1234 entries");
        v.entries = 1;
        assert_eq!(verification_line(&v), "audit log intact: 1 entry");
        v = AuditVerification {
            entries: 1234,
            intact: false,
            first_bad_sequence: Some(17),
            problem: Some("edited".into()),
            ..Default::default()
        };
        assert_eq!(
            verification_line(&v),
            "audit log NOT intact: entry #17 edited (checked 1234 entries)"
        );
        v.first_bad_sequence = None;
        v.problem = None;
        assert_eq!(
            verification_line(&v),
            "audit log NOT intact: entry #? at fault (checked 1234 entries)"
        );
    }

    #[test]
    fn times_parse() {
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(
            parse_time("2023-11-14T22:13:20.042Z"),
            Ok(1_700_000_000_042)
        );
        assert_eq!(
            parse_time("2023-11-14T22:13:20.0429999Z"),
            Ok(1_700_000_000_042)
        );
        assert_eq!(
            parse_time("2023-11-15T00:13:20+02:00"),
            Ok(1_700_000_000_000)
        );
        assert_eq!(parse_time("1700000000042"), Ok(1_700_000_000_042));
        assert_eq!(parse_time(" 1700000000042 "), Ok(1_700_000_000_042));
    }

    #[test]
    fn bad_times_are_refused() {
        for bad in [
            "",
            "yesterday",
            "2023-11-14",
            "2023-11-14 22:13:20",
            "2023-11-14T22:13:20",
            "-5",
            "1.5",
            "99999999999999999999",
        ] {
            let err = parse_time(bad).unwrap_err();
            assert!(
                err.contains("RFC 3339") || err.contains("1970"),
                "{bad:?}: {err}"
            );
        }
        let err = parse_time("1700000000").unwrap_err();
        assert!(err.contains("looks like Unix seconds"), "{err}");
        assert!(parse_time("1970-01-01T00:00:00Z").is_err());
        assert!(parse_time("1969-12-31T23:59:59Z").is_err());
    }

    #[test]
    fn reads_only_move_forward() {
        assert_eq!(advance(0, &event()).unwrap(), 42);
        assert!(advance(42, &event()).is_err());
        assert!(advance(50, &event()).is_err());
    }
}
