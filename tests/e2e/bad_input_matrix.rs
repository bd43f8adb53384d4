//! The bad-input matrix: every RPC of the Vault service against hostile variants of its
//! request, sent as raw protobuf bytes (what a well-behaved client cannot send): empty,
//! required fields missing, strings at, over and far over the message size limit, bytes
//! that are not UTF-8, negative and overflowing integers, fields repeated on the wire,
//! unknown values, oversize batches, truncated and garbage protobuf. Each row asserts
//! the exact code, that the message names the field where there is one, and that it
//! never echoes what was sent. Then the vault still serves a normal round trip.
//!
//! `cargo test --test e2e bad_input_matrix -- --nocapture` prints the table.

use std::collections::BTreeSet;

use integration_tests::{ADMIN, Stack, raw_channel, synthetic_pan};
use prost::Message;
use tonic::Code;
use vault_client::Card;
use vault_proto::vault::v1 as pb;

use super::bad_input::{Wire, fill, frame_header, raw_call, raw_http_call, sized};

/// The harness keeps the default `[limits] max_request_bytes` (4 MiB).
const LIMIT: usize = 4 * 1024 * 1024;
const HUGE: usize = 10 * 1024 * 1024;
/// The harness's `max_batch_size`.
const MAX_BATCH: usize = 1000;
/// A recognisable value that must never come back in a status message.
const MARKER: &str = "Zq9EchoMarkerXv";
/// A published test number: must never come back either.
const PAN: &str = "4242424242424242";

/// A string full of markers, so an echo of any part of it is caught.
fn marked(len: usize) -> Vec<u8> {
    fill(&format!("{MARKER} "), len)
}

fn card(number: &str) -> Wire {
    Wire::new().bytes(1, number).varint(2, 12).varint(3, 2030)
}

/// -1 as an int64 on the wire: ten bytes, every bit set.
const MINUS_ONE: u64 = u64::MAX;
/// A value that needs more than 32 bits: prost keeps the low 32 (protobuf's rule for
/// 64-bit values parsed into 32-bit fields), so `2^32 + n` arrives as `n`.
const OVER_U32: u64 = 1 << 32;

type Check = Box<dyn Fn(&[u8]) -> Option<String> + Send>;

struct Row {
    rpc: &'static str,
    variant: String,
    body: Vec<u8>,
    code: Code,
    /// What the status message must name (a field), when the refusal is about one.
    names: Option<&'static str>,
    /// A check of the answer of a successful call; `Some` is the problem.
    check: Option<Check>,
}

struct Rows(Vec<Row>);

impl Rows {
    fn add(&mut self, rpc: &'static str, variant: &str, body: Wire, code: Code) -> &mut Row {
        self.add_bytes(rpc, variant, body.build(), code)
    }

    fn add_bytes(
        &mut self,
        rpc: &'static str,
        variant: &str,
        body: Vec<u8>,
        code: Code,
    ) -> &mut Row {
        self.0.push(Row {
            rpc,
            variant: variant.into(),
            body,
            code,
            names: None,
            check: None,
        });
        self.0.last_mut().unwrap()
    }
}

impl Row {
    fn names(&mut self, field: &'static str) -> &mut Self {
        self.names = Some(field);
        self
    }

    fn check(&mut self, check: impl Fn(&[u8]) -> Option<String> + Send + 'static) -> &mut Self {
        self.check = Some(Box::new(check));
        self
    }
}

/// Every RPC of the Vault service: (name, code of an empty request, field it names).
/// `every_rpc_is_in_the_matrix` checks this against vault.proto.
const RPCS: [(&str, Code, Option<&str>); 27] = [
    ("Tokenize", Code::InvalidArgument, Some("card")),
    ("TokenizeBatch", Code::InvalidArgument, Some("cards")),
    ("GetSealingKey", Code::Ok, None),
    ("TokenizeSealed", Code::InvalidArgument, Some("sealed_card")),
    (
        "TokenizeSealedBatch",
        Code::InvalidArgument,
        Some("sealed_cards"),
    ),
    ("GetTokenInfo", Code::InvalidArgument, Some("token")),
    ("DeleteToken", Code::InvalidArgument, Some("token")),
    // No processor: refused exactly like a processor the caller may not use.
    ("Forward", Code::PermissionDenied, None),
    ("CreateBackup", Code::InvalidArgument, Some("name")),
    ("VerifyBackup", Code::InvalidArgument, Some("name")),
    ("StartRewrap", Code::Ok, None),
    ("GetRewrapStatus", Code::Ok, None),
    ("ReloadPolicy", Code::Ok, None),
    ("ReadAudit", Code::Ok, None),
    ("VerifyAudit", Code::Ok, None),
    ("ListBlocks", Code::Ok, None),
    ("LiftBlock", Code::InvalidArgument, Some("kind")),
    ("FindSubject", Code::InvalidArgument, Some("card")),
    ("EraseSubject", Code::InvalidArgument, Some("card")),
    ("GetImportKey", Code::Ok, None),
    (
        "ProposeImport",
        Code::InvalidArgument,
        Some("expected_rows"),
    ),
    ("ApproveImport", Code::InvalidArgument, Some("job_id")),
    ("ImportUpload", Code::InvalidArgument, Some("job_id")),
    ("ImportRows", Code::InvalidArgument, Some("job_id")),
    ("ProposeExport", Code::InvalidArgument, Some("processor")),
    ("ApproveExport", Code::InvalidArgument, Some("job_id")),
    ("RunExport", Code::InvalidArgument, Some("job_id")),
];

/// Variants every RPC gets, whatever its fields.
fn common_rows(rows: &mut Rows) {
    for (rpc, empty_code, empty_field) in RPCS {
        let mut add = |variant: &str, body: Vec<u8>, code: Code, names: Option<&'static str>| {
            rows.add_bytes(rpc, variant, body, code).names = names;
        };
        add("empty", Vec::new(), empty_code, empty_field);
        // Unknown fields are skipped (proto3): the answer is the empty message's.
        let unknown = Wire::new()
            .varint(99, 7)
            .bytes(100, MARKER)
            .fixed32(101, 1)
            .build();
        add("unknown fields", unknown, empty_code, empty_field);
        let at_limit = sized(LIMIT, |n| Wire::new().bytes(100, marked(n)).build());
        add(
            "unknown field, message at limit",
            at_limit,
            empty_code,
            empty_field,
        );
        let over = sized(LIMIT + 1, |n| Wire::new().bytes(100, marked(n)).build());
        add("message at limit + 1", over, Code::OutOfRange, None);
        let huge = Wire::new().bytes(100, marked(HUGE)).build();
        add("10 MiB message", huge, Code::OutOfRange, None);
        let invalid = Code::InvalidArgument;
        add("garbage bytes", vec![0xff; 12], invalid, None);
        // Field 100, length 16, then only 4 bytes.
        let truncated = Wire::new().raw(&[0xa2, 0x06, 16]).raw(b"4242").build();
        add("truncated field", truncated, invalid, None);
        add("field number 0", vec![0x00, 0x01], invalid, None);
        // A varint of 11 bytes (at most 10 are valid).
        let overlong = Wire::new()
            .raw(&[0xa0, 0x06])
            .raw(&[0xff; 10])
            .raw(&[0x01])
            .build();
        add("overlong varint", overlong, invalid, None);
        add(
            "end-group tag without a group",
            vec![0xa4, 0x06],
            invalid,
            None,
        );
    }
}

struct Fixtures {
    /// An acme token that exists.
    token: String,
    /// A backup that exists.
    backup: &'static str,
}

fn token_of(bytes: &[u8]) -> Option<String> {
    pb::TokenizeResponse::decode(bytes)
        .ok()
        .and_then(|r| r.info)
        .map(|info| info.token)
}

fn tokenize_rows(rows: &mut Rows, pans: &DuplicatePans) {
    let rpc = "Tokenize";
    let invalid = Code::InvalidArgument;
    let request = |card: Wire| Wire::new().message(1, card);
    rows.add(
        rpc,
        "card.number missing",
        request(Wire::new().varint(2, 12).varint(3, 2030)),
        invalid,
    )
    .names("card.number");
    rows.add(
        rpc,
        "card.exp_month missing",
        request(Wire::new().bytes(1, PAN).varint(3, 2030)),
        invalid,
    )
    .names("card.exp_month");
    rows.add(
        rpc,
        "card.exp_year missing",
        request(Wire::new().bytes(1, PAN).varint(2, 12)),
        invalid,
    )
    .names("card.exp_year");
    for (field, name) in [
        (1, "card.number"),
        (4, "card.cardholder_name"),
        (5, "card.cvc"),
    ] {
        let bad = card(PAN).bytes(field, b"4242\xff\xfe4242424242");
        rows.add(rpc, &format!("{name} not UTF-8"), request(bad), invalid)
            .names(name);
    }
    // The whole message at the size limit, the filler in one field: decoded, then
    // refused by that field's rule.
    for (field, name, unit) in [
        (1, "card.number", PAN),
        (4, "card.cardholder_name", MARKER),
        (5, "card.cvc", "737"),
    ] {
        let body = sized(LIMIT, |n| {
            let mut card = card(PAN);
            if field == 1 {
                card = Wire::new().varint(2, 12).varint(3, 2030);
            }
            request(card.bytes(field, fill(unit, n))).build()
        });
        rows.add_bytes(rpc, &format!("{name} fills the size limit"), body, invalid)
            .names(name);
    }
    let over = sized(LIMIT + 1, |n| {
        request(card(PAN).bytes(4, marked(n))).build()
    });
    rows.add_bytes(
        rpc,
        "card.cardholder_name at limit + 1",
        over,
        Code::OutOfRange,
    );
    rows.add(
        rpc,
        "card.cardholder_name 10 MiB",
        request(card(PAN).bytes(4, marked(HUGE))),
        Code::OutOfRange,
    );
    rows.add(
        rpc,
        "card.number 10 MiB",
        request(Wire::new().bytes(1, fill(PAN, HUGE))),
        Code::OutOfRange,
    );
    rows.add(
        rpc,
        "card.number letters",
        request(card(&format!("4242{MARKER}4242"))),
        invalid,
    )
    .names("card.number");
    rows.add(
        rpc,
        "card.number fullwidth digits",
        request(card("４２４２４２４２４２４２４２４２")),
        invalid,
    )
    .names("card.number");
    rows.add(
        rpc,
        "card.number NUL bytes",
        request(card("4242\u{0}\u{0}\u{0}\u{0}424242424242")),
        invalid,
    )
    .names("card.number");
    rows.add(
        rpc,
        "card.number fails Luhn",
        request(card("4242424242424241")),
        invalid,
    )
    .names("card.number");
    rows.add(
        rpc,
        "card.cardholder_name control chars",
        request(card(PAN).bytes(4, format!("{MARKER}\u{7}\u{1b}[2J"))),
        invalid,
    )
    .names("card.cardholder_name");
    rows.add(
        rpc,
        "card.exp_month -1 (int64 on the wire)",
        request(card(PAN).varint(2, MINUS_ONE)),
        invalid,
    )
    .names("card.exp_month");
    rows.add(
        rpc,
        "card.exp_year u64::MAX",
        request(card(PAN).varint(3, u64::MAX)),
        invalid,
    )
    .names("card.exp_year");
    rows.add(
        rpc,
        "card.exp_month 13",
        request(card(PAN).varint(2, 13)),
        invalid,
    )
    .names("card.exp_month");
    // 2^32 + 12 keeps its low 32 bits: month 12, as protobuf specifies.
    rows.add(
        rpc,
        "card.exp_month 2^32+12 (truncated to 12)",
        request(card(PAN).varint(2, OVER_U32 + 12)),
        Code::Ok,
    )
    .check(|bytes| {
        let info = pb::TokenizeResponse::decode(bytes).ok()?.info?;
        (info.exp_month != 12).then(|| format!("stored exp_month {}", info.exp_month))
    });
    rows.add(
        rpc,
        "card.exp_year 2^32 (truncated to 0)",
        request(card(PAN).varint(3, OVER_U32)),
        invalid,
    )
    .names("card.exp_year");
    rows.add(
        rpc,
        "card.number as a varint (wrong wire type)",
        request(Wire::new().varint(1, 4242).varint(2, 12).varint(3, 2030)),
        invalid,
    )
    .names("card.number");
    rows.add(
        rpc,
        "card as a fixed32 (wrong wire type)",
        Wire::new().fixed32(1, 4242),
        invalid,
    )
    .names("card");
    rows.add(
        rpc,
        "ttl_secs u64::MAX",
        request(card(PAN)).varint(3, u64::MAX),
        invalid,
    )
    .names("ttl_secs");
    rows.add(
        rpc,
        "format 7 (not a TokenFormat)",
        request(card(PAN)).varint(4, 7),
        invalid,
    )
    .names("format");
    rows.add(
        rpc,
        "format card",
        request(card(PAN)).varint(4, 2),
        Code::Ok,
    );
    rows.add(
        rpc,
        "reuse_existing = 7 (bool as any varint)",
        request(card(PAN)).varint(2, 7),
        Code::Ok,
    );
    // Repeated on the wire: the last scalar wins, embedded messages merge; one token.
    rows.add(
        rpc,
        "card.number twice (bad, then good)",
        request(card(MARKER).bytes(1, &pans.last_wins)),
        Code::Ok,
    )
    .check(|bytes| token_of(bytes).is_none().then(|| "no token".into()));
    rows.add(
        rpc,
        "card.number twice (good, then bad)",
        request(card(PAN).bytes(1, format!("4242{MARKER}"))),
        invalid,
    )
    .names("card.number");
    let merged = Wire::new()
        .message(1, Wire::new().bytes(1, &pans.merged))
        .message(1, Wire::new().varint(2, 12).varint(3, 2030));
    rows.add(rpc, "card twice (merged into one card)", merged, Code::Ok)
        .check(|bytes| token_of(bytes).is_none().then(|| "no token".into()));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    rows.add(
        rpc,
        "ttl_secs twice (u64::MAX, then 3600)",
        request(card(PAN)).varint(3, u64::MAX).varint(3, 3600),
        Code::Ok,
    )
    .check(move |bytes| {
        let info = pb::TokenizeResponse::decode(bytes).ok()?.info?;
        let ttl = info.expires_at_unix_ms - now_ms;
        (!(3_500_000..3_700_000).contains(&ttl)).then(|| format!("expires in {ttl} ms"))
    });
}

fn batch_rows(rows: &mut Rows, pans: &DuplicatePans) {
    let rpc = "TokenizeBatch";
    let invalid = Code::InvalidArgument;
    let batch = |cards: &[Wire]| {
        cards
            .iter()
            .fold(Wire::new(), |wire, card| wire.message(1, card.clone()))
    };
    let valid = |n: usize| -> Vec<Wire> {
        (0..n)
            .map(|i| card(&synthetic_pan("424242", 500_000 + i as u64, 16)))
            .collect()
    };
    rows.add(
        rpc,
        &format!("{} cards (max_batch_size + 1)", MAX_BATCH + 1),
        batch(&valid(MAX_BATCH + 1)),
        invalid,
    )
    .names("cards");
    // Far more entries than any batch may have, each an empty card (2 bytes on the
    // wire, 80 once decoded): refused by the codec before decoding.
    rows.add_bytes(
        rpc,
        "2 million empty cards (4 MiB)",
        [0x0a, 0x00].repeat(LIMIT / 2),
        invalid,
    )
    .names("cards");
    rows.add(
        rpc,
        &format!("{MAX_BATCH} cards failing Luhn (max_batch_size)"),
        batch(&vec![card("4242424242424241"); MAX_BATCH]),
        Code::Ok,
    )
    .check(|bytes| {
        let response = pb::TokenizeBatchResponse::decode(bytes).ok()?;
        let invalid = response
            .results
            .iter()
            .filter(|r| match &r.outcome {
                Some(pb::batch_item_result::Outcome::Invalid(v)) => {
                    v.field == "card.number" && v.rule == "luhn" && !v.description.contains("4242")
                }
                _ => false,
            })
            .count();
        (invalid != MAX_BATCH).then(|| format!("{invalid} items refused by the Luhn rule"))
    });
    rows.add(
        rpc,
        "card.number not UTF-8",
        batch(&[card(PAN), card("4242\u{0}").raw(&[0x0a, 0x02, 0xc3, 0x28])]),
        invalid,
    )
    .names("cards.number");
    rows.add(
        rpc,
        "ttl_secs u64::MAX",
        batch(&[card(PAN)]).varint(3, u64::MAX),
        invalid,
    )
    .names("ttl_secs");
    let body = sized(LIMIT, |n| batch(&[card(PAN).bytes(4, marked(n))]).build());
    rows.add_bytes(
        rpc,
        "card.cardholder_name fills the size limit",
        body,
        Code::Ok,
    )
    .check(|bytes| {
        let response = pb::TokenizeBatchResponse::decode(bytes).ok()?;
        match response.results.first().and_then(|r| r.outcome.clone()) {
            Some(pb::batch_item_result::Outcome::Invalid(v))
                if v.field == "card.cardholder_name" && v.rule == "too_long" =>
            {
                None
            }
            other => Some(format!("item answered {other:?}")),
        }
    });
    rows.add(
        rpc,
        "cards 10 MiB",
        batch(&[card(PAN).bytes(4, marked(HUGE))]),
        Code::OutOfRange,
    );
    // The same card twice in one batch with reuse_existing: one record, one token.
    let same = card(&pans.batch_twice);
    rows.add(
        rpc,
        "same card twice, reuse_existing",
        batch(&[same.clone(), same]).varint(2, 1),
        Code::Ok,
    )
    .check(|bytes| {
        let response = pb::TokenizeBatchResponse::decode(bytes).ok()?;
        let tokens: BTreeSet<String> = response
            .results
            .iter()
            .filter_map(|r| match &r.outcome {
                Some(pb::batch_item_result::Outcome::Stored(s)) => s.info.clone().map(|i| i.token),
                _ => None,
            })
            .collect();
        (tokens.len() != 1).then(|| format!("{} distinct tokens for one card", tokens.len()))
    });
}

/// Sealed cards that are not sealed cards, or too many of them. (Well-formed sealed
/// cards that fail a check are tried in tests/e2e/sealed.rs.)
fn sealed_rows(rows: &mut Rows) {
    let invalid = Code::InvalidArgument;
    let rpc = "TokenizeSealed";
    let sealed = |bytes: Vec<u8>| Wire::new().bytes(1, bytes);
    rows.add(rpc, "80 bytes (one short)", sealed(vec![1; 80]), invalid)
        .names("sealed_card");
    rows.add(rpc, "1106 bytes (one over)", sealed(vec![1; 1106]), invalid)
        .names("sealed_card");
    rows.add(rpc, "format byte 2", sealed(vec![2; 200]), invalid)
        .names("sealed_card");
    // Well-formed, under a key id the vault never had.
    rows.add(
        rpc,
        "format 1, unknown key id",
        sealed(vec![1; 200]),
        Code::FailedPrecondition,
    );
    let rpc = "TokenizeSealedBatch";
    // Far more entries than any batch may have, each empty (2 bytes on the wire, 24
    // once decoded): refused by the codec before decoding.
    rows.add_bytes(
        rpc,
        "2 million empty sealed cards (4 MiB)",
        [0x0a, 0x00].repeat(LIMIT / 2),
        invalid,
    )
    .names("sealed_cards");
    let batch = (0..=MAX_BATCH).fold(Wire::new(), |wire, _| wire.bytes(1, [1u8; 200]));
    rows.add(
        rpc,
        &format!("{} sealed cards (max_batch_size + 1)", MAX_BATCH + 1),
        batch,
        invalid,
    )
    .names("cards");
    rows.add(
        rpc,
        "one not a sealed card",
        Wire::new().bytes(1, [1u8; 10]),
        Code::Ok,
    )
    .check(|bytes| {
        let response = pb::TokenizeBatchResponse::decode(bytes).ok()?;
        let rules: Vec<String> = response
            .results
            .iter()
            .map(|r| match &r.outcome {
                Some(pb::batch_item_result::Outcome::Invalid(v)) => v.field.clone(),
                _ => "stored".into(),
            })
            .collect();
        (rules != ["sealed_card"]).then(|| format!("{rules:?}"))
    });
}

fn token_rows(rows: &mut Rows, fixtures: &Fixtures) {
    let invalid = Code::InvalidArgument;
    for rpc in ["GetTokenInfo", "DeleteToken"] {
        let token = |value: &[u8]| Wire::new().bytes(1, value);
        rows.add(rpc, "token not UTF-8", token(b"tok_\xff\xfe\xfd"), invalid)
            .names("token");
        rows.add(
            rpc,
            "token shape",
            token(format!("tok_{MARKER}!!!!!!!").as_bytes()),
            invalid,
        )
        .names("token");
        rows.add(
            rpc,
            "token with NUL bytes",
            token(b"tok_\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"),
            invalid,
        )
        .names("token");
        let body = sized(LIMIT, |n| token(&marked(n)).build());
        rows.add_bytes(rpc, "token fills the size limit", body, invalid)
            .names("token");
        rows.add(rpc, "token 10 MiB", token(&marked(HUGE)), Code::OutOfRange);
        rows.add(
            rpc,
            "token unknown (well-formed)",
            token(b"tok_Unknown000000000000001"),
            Code::NotFound,
        );
        rows.add(
            rpc,
            "token unknown (card-shaped, fails Luhn)",
            token(b"4242424242424241"),
            Code::NotFound,
        );
        rows.add(
            rpc,
            "token is a card number (passes Luhn)",
            token(PAN.as_bytes()),
            invalid,
        )
        .names("token");
        rows.add(
            rpc,
            "token as a varint (wrong wire type)",
            Wire::new().varint(1, 1),
            invalid,
        )
        .names("token");
        rows.add(
            rpc,
            "token twice (good, then bad)",
            token(fixtures.token.as_bytes()).bytes(1, MARKER),
            invalid,
        )
        .names("token");
    }
    rows.add(
        "GetTokenInfo",
        "token twice (bad, then good)",
        Wire::new().bytes(1, MARKER).bytes(1, &fixtures.token),
        Code::Ok,
    );
}

fn forward_rows(rows: &mut Rows, fixtures: &Fixtures) {
    let rpc = "Forward";
    let invalid = Code::InvalidArgument;
    let denied = Code::PermissionDenied;
    // processor, method, path, a content-type header, body, token: a forward that would
    // be sent. Each row spoils one part.
    let forward = |processor: &[u8], method: &str, path: &str, token: &str| {
        Wire::new()
            .bytes(1, processor)
            .bytes(2, method)
            .bytes(3, path)
            .message(
                4,
                Wire::new()
                    .bytes(1, "content-type")
                    .bytes(2, "application/json"),
            )
            .bytes(5, r#"{"number":"{{card.number}}"}"#)
            .bytes(6, token)
    };
    let token = fixtures.token.as_str();
    let good = || forward(b"sandbox", "POST", "/v1/charges", token);
    rows.add(
        rpc,
        "processor not UTF-8",
        forward(b"sand\xffbox", "POST", "/v1/charges", token),
        invalid,
    )
    .names("processor");
    rows.add(
        rpc,
        "processor unknown",
        forward(MARKER.as_bytes(), "POST", "/v1/charges", token),
        denied,
    );
    let body = sized(LIMIT, |n| {
        forward(&marked(n), "POST", "/v1/charges", token).build()
    });
    rows.add_bytes(rpc, "processor fills the size limit", body, denied);
    rows.add(
        rpc,
        "method missing",
        forward(b"sandbox", "", "/v1/charges", token),
        denied,
    );
    rows.add(
        rpc,
        "method unknown (BREW)",
        forward(b"sandbox", "BREW", "/v1/charges", token),
        denied,
    );
    rows.add(
        rpc,
        "path missing",
        forward(b"sandbox", "POST", "", token),
        denied,
    );
    rows.add(
        rpc,
        "path with dot segments",
        forward(b"sandbox", "POST", "/v1/../v1/charges", token),
        denied,
    );
    rows.add(
        rpc,
        "token missing",
        forward(b"sandbox", "POST", "/v1/charges", ""),
        invalid,
    )
    .names("token");
    rows.add(
        rpc,
        "token not UTF-8",
        good().bytes(6, b"tok_\xff"),
        invalid,
    )
    .names("token");
    rows.add(
        rpc,
        "token unknown (well-formed)",
        forward(
            b"sandbox",
            "POST",
            "/v1/charges",
            "tok_Unknown000000000000002",
        ),
        Code::NotFound,
    );
    rows.add(
        rpc,
        "body with unknown placeholder",
        good().bytes(5, format!("{{{{card.pin}}}} {MARKER}")),
        invalid,
    )
    .names("body");
    let body = sized(LIMIT, |n| {
        forward(b"sandbox", "POST", "/v1/charges", "")
            .bytes(5, fill(PAN, n))
            .build()
    });
    rows.add_bytes(rpc, "body fills the size limit, no token", body, invalid)
        .names("token");
    rows.add(
        rpc,
        "body 10 MiB",
        good().bytes(5, fill(PAN, HUGE)),
        Code::OutOfRange,
    );
    rows.add(
        rpc,
        "header name invalid",
        good().message(4, Wire::new().bytes(1, format!("x {MARKER}")).bytes(2, "1")),
        invalid,
    )
    .names("headers.name");
    rows.add(
        rpc,
        "header value with CR LF",
        good().message(
            4,
            Wire::new()
                .bytes(1, "x-note")
                .bytes(2, format!("{MARKER}\r\nx-injected: 1")),
        ),
        invalid,
    )
    .names("headers.value");
    rows.add(
        rpc,
        "content-type twice",
        good().message(
            4,
            Wire::new().bytes(1, "Content-Type").bytes(2, "text/plain"),
        ),
        invalid,
    )
    .names("headers");
    let many = (0..1001).fold(good(), |wire, i| {
        wire.message(4, Wire::new().bytes(1, format!("x-h{i}")).bytes(2, "1"))
    });
    rows.add(rpc, "1001 headers", many, invalid)
        .names("headers");
    rows.add(
        rpc,
        "idempotency_key 300 characters",
        good().bytes(7, marked(300)),
        invalid,
    )
    .names("idempotency_key");
    rows.add(
        rpc,
        "idempotency_key not ASCII",
        good().bytes(7, format!("{MARKER}\u{e9}")),
        invalid,
    )
    .names("idempotency_key");
    rows.add(
        rpc,
        "headers as a varint (wrong wire type)",
        good().varint(4, 1),
        invalid,
    )
    .names("headers");
}

fn backup_rows(rows: &mut Rows, fixtures: &Fixtures) {
    let invalid = Code::InvalidArgument;
    for rpc in ["CreateBackup", "VerifyBackup"] {
        let name = |value: &[u8]| Wire::new().bytes(1, value);
        rows.add(rpc, "name not UTF-8", name(b"b\xffackup"), invalid)
            .names("name");
        rows.add(
            rpc,
            "name leaves the directory",
            name(format!("../{MARKER}").as_bytes()),
            invalid,
        )
        .names("name");
        rows.add(
            rpc,
            "name hidden",
            name(format!(".{MARKER}").as_bytes()),
            invalid,
        )
        .names("name");
        let body = sized(LIMIT, |n| name(&fill(MARKER, n)).build());
        rows.add_bytes(rpc, "name fills the size limit", body, invalid)
            .names("name");
        rows.add(
            rpc,
            "name 10 MiB",
            name(&fill(MARKER, HUGE)),
            Code::OutOfRange,
        );
    }
    rows.add(
        "CreateBackup",
        "name exists",
        Wire::new().bytes(1, fixtures.backup),
        invalid,
    )
    .names("name");
    rows.add(
        "CreateBackup",
        "name twice (bad, then good)",
        Wire::new()
            .bytes(1, "../escape")
            .bytes(1, "bad-input-last-wins"),
        Code::Ok,
    )
    .check(|bytes| {
        let response = pb::CreateBackupResponse::decode(bytes).ok()?;
        (!response.path.ends_with("/backups/bad-input-last-wins"))
            .then(|| format!("backup made at {}", response.path))
    });
    rows.add(
        "VerifyBackup",
        "name unknown",
        Wire::new().bytes(1, MARKER),
        Code::NotFound,
    );
}

fn audit_rows(rows: &mut Rows) {
    let rpc = "ReadAudit";
    let events = |most: usize| {
        move |bytes: &[u8]| {
            let response = pb::ReadAuditResponse::decode(bytes).ok()?;
            (response.events.len() > most).then(|| format!("{} events", response.events.len()))
        }
    };
    rows.add(
        rpc,
        "limit 2^32+5 (truncated to 5)",
        Wire::new().varint(4, OVER_U32 + 5),
        Code::Ok,
    )
    .check(events(5));
    rows.add(
        rpc,
        "limit -1 (int64 on the wire: at most 1000)",
        Wire::new().varint(4, MINUS_ONE),
        Code::Ok,
    )
    .check(events(1000));
    rows.add(
        rpc,
        "limit twice (1000, then 2)",
        Wire::new().varint(4, 1000).varint(4, 2),
        Code::Ok,
    )
    .check(events(2));
    rows.add(
        rpc,
        "after_sequence u64::MAX",
        Wire::new().varint(1, u64::MAX),
        Code::Ok,
    )
    .check(events(0));
    rows.add(
        rpc,
        "since_unix_ms -1",
        Wire::new().varint(2, MINUS_ONE).varint(4, 3),
        Code::Ok,
    )
    .check(events(3));
    rows.add(
        rpc,
        "until_unix_ms -1",
        Wire::new().varint(3, MINUS_ONE),
        Code::Ok,
    )
    .check(events(0));
    rows.add(
        rpc,
        "since after until",
        Wire::new().varint(2, 2_000_000_000_000).varint(3, 1),
        Code::Ok,
    )
    .check(events(0));
    rows.add(
        rpc,
        "limit as bytes (wrong wire type)",
        Wire::new().bytes(4, MARKER),
        Code::InvalidArgument,
    )
    .names("limit");
}

fn block_rows(rows: &mut Rows) {
    let rpc = "LiftBlock";
    let invalid = Code::InvalidArgument;
    let lift = |kind: &[u8], subject: &[u8]| Wire::new().bytes(1, kind).bytes(2, subject);
    rows.add(
        rpc,
        "kind unknown value",
        lift(MARKER.as_bytes(), b"x"),
        invalid,
    )
    .names("kind");
    rows.add(rpc, "kind not UTF-8", lift(b"ident\xffity", b"x"), invalid)
        .names("kind");
    rows.add(rpc, "kind upper case", lift(b"IDENTITY", b"x"), invalid)
        .names("kind");
    rows.add(
        rpc,
        "subject missing",
        lift(b"identity", b""),
        Code::FailedPrecondition,
    );
    rows.add(
        rpc,
        "subject not UTF-8",
        lift(b"address", b"127.0.0.\xff"),
        invalid,
    )
    .names("subject");
    let body = sized(LIMIT, |n| lift(b"identity", &marked(n)).build());
    rows.add_bytes(
        rpc,
        "subject fills the size limit",
        body,
        Code::FailedPrecondition,
    );
    rows.add(
        rpc,
        "subject 10 MiB",
        lift(b"identity", &marked(HUGE)),
        Code::OutOfRange,
    );
    rows.add(
        rpc,
        "kind twice (bad, then good)",
        lift(MARKER.as_bytes(), b"x").bytes(1, "address"),
        Code::FailedPrecondition,
    );
}

fn subject_rows(rows: &mut Rows) {
    let invalid = Code::InvalidArgument;
    for rpc in ["FindSubject", "EraseSubject"] {
        let subject = |card: Wire| Wire::new().message(1, card);
        rows.add(
            rpc,
            "card.number missing",
            subject(Wire::new().varint(2, 12)),
            invalid,
        )
        .names("card.number");
        rows.add(
            rpc,
            "card.number not UTF-8",
            subject(card("4242\u{0}").bytes(1, b"42\xff42")),
            invalid,
        )
        .names("card.number");
        rows.add(
            rpc,
            "card.number fails Luhn",
            subject(card(&format!("4242{MARKER}"))),
            invalid,
        )
        .names("card.number");
        let body = sized(LIMIT, |n| {
            subject(Wire::new().bytes(1, fill(PAN, n))).build()
        });
        rows.add_bytes(rpc, "card.number fills the size limit", body, invalid)
            .names("card.number");
        rows.add(
            rpc,
            "card.number 10 MiB",
            subject(Wire::new().bytes(1, fill(PAN, HUGE))),
            Code::OutOfRange,
        );
        // Only the number counts: an unknown card has no tokens, expiry or not.
        let unknown = synthetic_pan("555555", 990_001, 16);
        rows.add(
            rpc,
            "card with number only, never tokenized",
            subject(Wire::new().bytes(1, &unknown).varint(2, MINUS_ONE)),
            Code::Ok,
        )
        .check(|bytes| {
            let response = pb::SubjectResponse::decode(bytes).ok()?;
            (!response.tokens.is_empty()).then(|| format!("{} tokens", response.tokens.len()))
        });
    }
}

/// Import jobs: ids that are no job's or could name a path, pieces past the bound, a
/// last piece without its format. Nothing proposed or uploaded stays.
fn import_rows(rows: &mut Rows) {
    let invalid = Code::InvalidArgument;
    let unknown = "p-000000000000";
    rows.add("GetImportKey", "the key", Wire::new(), Code::Ok)
        .check(|bytes| {
            let key = pb::ImportKey::decode(bytes).ok()?;
            (key.fingerprint.len() != 40
                || !key
                    .armored_public_key
                    .starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"))
            .then(|| format!("key {key:?}"))
        });
    rows.add(
        "GetImportKey",
        "algorithm unknown",
        Wire::new().varint(1, 99),
        invalid,
    )
    .names("algorithm");
    rows.add(
        "ProposeImport",
        "expected_rows -1",
        Wire::new().varint(1, MINUS_ONE),
        invalid,
    )
    .names("expected_rows");
    for (rpc, job_field) in [("ApproveImport", 1), ("ImportUpload", 1), ("ImportRows", 1)] {
        rows.add(
            rpc,
            "job_id marker",
            Wire::new().bytes(job_field, MARKER),
            invalid,
        )
        .names("job_id");
        rows.add(
            rpc,
            "job_id a path",
            Wire::new().bytes(job_field, "p-../../../etc"),
            invalid,
        )
        .names("job_id");
        rows.add(
            rpc,
            "job_id not UTF-8",
            Wire::new().bytes(job_field, b"p-00000000000\xff"),
            invalid,
        )
        .names("job_id");
        rows.add(
            rpc,
            "job nobody proposed",
            Wire::new().bytes(job_field, unknown),
            Code::NotFound,
        );
    }
    let upload = |job: &str| Wire::new().bytes(1, job);
    rows.add(
        "ImportUpload",
        "piece of 1 MiB + 1",
        upload(unknown).bytes(3, marked(1024 * 1024 + 1)),
        invalid,
    )
    .names("data");
    rows.add(
        "ImportUpload",
        "last piece without a format",
        upload(unknown).bytes(3, MARKER).varint(4, 1),
        invalid,
    )
    .names("format");
    rows.add(
        "ImportUpload",
        "last piece, format unknown",
        upload(unknown)
            .varint(4, 1)
            .message(5, Wire::new().varint(1, 7)),
        invalid,
    )
    .names("format.format");
    rows.add(
        "ImportUpload",
        "last piece, number field missing",
        upload(unknown)
            .varint(4, 1)
            .message(5, Wire::new().varint(1, 1).bytes(2, "id")),
        invalid,
    )
    .names("format.number_field");
    rows.add(
        "ImportUpload",
        "offset -1 of a job nobody proposed",
        upload(unknown).varint(2, MINUS_ONE).bytes(3, PAN),
        Code::NotFound,
    );
    rows.add(
        "ImportRows",
        "from_row -1 of a job nobody proposed",
        Wire::new()
            .bytes(1, unknown)
            .varint(2, MINUS_ONE)
            .varint(3, MINUS_ONE),
        Code::NotFound,
    );
}

/// Export jobs: processors that take no exports, malformed token lists, jobs nobody
/// proposed. Nothing is proposed or written.
fn export_rows(rows: &mut Rows) {
    let invalid = Code::InvalidArgument;
    let unknown = "p-000000000000";
    rows.add(
        "ProposeExport",
        "processor unknown",
        Wire::new().bytes(1, MARKER),
        Code::NotFound,
    )
    .names("processor");
    rows.add(
        "ProposeExport",
        "processor without an export key",
        Wire::new().bytes(1, "sandbox"),
        Code::NotFound,
    )
    .names("processor");
    for rpc in ["ProposeExport", "RunExport"] {
        let first = match rpc {
            "RunExport" => Wire::new().bytes(1, unknown),
            _ => Wire::new().bytes(1, "sandbox"),
        };
        rows.add(
            rpc,
            "a token that is a card number",
            first.bytes(2, PAN),
            invalid,
        )
        .names("tokens");
        let many = (0..=vault_proto::codec::MAX_EXPORT_TOKENS)
            .fold(Wire::new().bytes(1, unknown), |w, _| w.bytes(2, ""));
        rows.add(rpc, "100,001 tokens", many, invalid)
            .names("tokens");
    }
    for rpc in ["ApproveExport", "RunExport"] {
        rows.add(rpc, "job_id marker", Wire::new().bytes(1, MARKER), invalid)
            .names("job_id");
        rows.add(
            rpc,
            "job nobody proposed",
            Wire::new().bytes(1, unknown),
            Code::NotFound,
        );
    }
}

/// Cards that rows tokenize with a field repeated on the wire: each must end up stored
/// exactly once.
struct DuplicatePans {
    last_wins: String,
    merged: String,
    batch_twice: String,
}

/// Control: PCI-6.2.4 (docs/compliance.md).
/// Attack: a new RPC added without bad-input cases would be an untested entry point; this
/// fails until it has them.
#[test]
fn every_rpc_is_in_the_matrix() {
    let proto = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../proto/proto/tokenvault/vault/v1/vault.proto"
    ))
    .unwrap();
    let declared: BTreeSet<&str> = proto
        .lines()
        .filter_map(|line| line.trim().strip_prefix("rpc "))
        .filter_map(|rest| rest.split('(').next())
        .map(str::trim)
        .collect();
    let covered: BTreeSet<&str> = RPCS.iter().map(|(rpc, _, _)| *rpc).collect();
    assert_eq!(
        declared, covered,
        "add the new RPC to RPCS and give it rows"
    );
}

/// What a status message must never hold: anything the rows send.
fn echoes(message: &str) -> bool {
    message.contains(MARKER)
        || message.contains("Zq9")
        || message.contains("42424242")
        || message.contains('\u{fffd}')
        || message.contains("escape")
}

/// Control: PCI-6.2.4 (docs/compliance.md).
/// Attack: every RPC is sent each kind of bad field its messages can carry; each is refused
/// with a precise code naming the field, and the vault keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_matrix_every_rpc() {
    if integration_tests::rocksdb_only("its CreateBackup rows expect RocksDB backups") {
        return;
    }
    let mut stack = Stack::start().await;
    // The matrix makes dozens of refusals that count towards the lockout as ADMIN.
    stack.add_vault_config("[lockout]\nmax_failures = 100000\n");
    stack.restart_vault().await;
    let mut client = stack.client(ADMIN).await;
    let fixtures = Fixtures {
        token: client
            .tokenize(Card::new(PAN, 12, 2030), false)
            .await
            .unwrap()
            .token,
        backup: "bad-input-fixture",
    };
    client.create_backup(fixtures.backup).await.unwrap();
    let pans = DuplicatePans {
        last_wins: synthetic_pan("424242", 880_001, 16),
        merged: synthetic_pan("555555", 880_002, 16),
        batch_twice: synthetic_pan("424242", 880_003, 16),
    };

    let mut rows = Rows(Vec::new());
    common_rows(&mut rows);
    tokenize_rows(&mut rows, &pans);
    batch_rows(&mut rows, &pans);
    token_rows(&mut rows, &fixtures);
    forward_rows(&mut rows, &fixtures);
    backup_rows(&mut rows, &fixtures);
    audit_rows(&mut rows);
    block_rows(&mut rows);
    subject_rows(&mut rows);
    sealed_rows(&mut rows);
    import_rows(&mut rows);
    export_rows(&mut rows);
    // DeleteToken last of the token rows: the fixture token goes, once.
    rows.add(
        "DeleteToken",
        "token twice (same token)",
        Wire::new()
            .bytes(1, &fixtures.token)
            .bytes(1, &fixtures.token),
        Code::Ok,
    );
    rows.add(
        "DeleteToken",
        "the same again",
        Wire::new().bytes(1, &fixtures.token),
        Code::NotFound,
    );

    let channel = raw_channel(&stack.dir, ADMIN, stack.vault_addr)
        .await
        .unwrap();
    let mut failures = Vec::new();
    let mut table = String::new();
    for row in &rows.0 {
        let result = raw_call(&channel, row.rpc, row.body.clone()).await;
        let (code, message) = match &result {
            Ok(_) => (Code::Ok, String::new()),
            Err(status) => (status.code(), status.message().to_owned()),
        };
        table.push_str(&format!("{:<16} {:<48} {:?}\n", row.rpc, row.variant, code));
        let mut problems = Vec::new();
        if code != row.code {
            problems.push(format!("code {code:?}, expected {:?}", row.code));
        }
        if let Some(field) = row.names
            && code != Code::Ok
            && !message.contains(field)
        {
            problems.push(format!("the message does not name {field}"));
        }
        if echoes(&message) {
            problems.push("the message echoes the request".into());
        }
        if let (Some(check), Ok(bytes)) = (&row.check, &result)
            && let Some(problem) = check(bytes)
        {
            problems.push(problem);
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{} / {}: {} (message: {:.200})",
                row.rpc,
                row.variant,
                problems.join("; "),
                message
            ));
        }
    }

    // Transport-level variants, in raw HTTP/2.
    let transport = [
        // A message header that promises 100 bytes, then 10 and the end of the stream:
        // tonic's own INTERNAL ("Unexpected EOF decoding stream."), a broken stream
        // rather than a message that does not decode.
        (
            "Tokenize",
            "gRPC frame cut short",
            vec![frame_header(0, 100), vec![0x0a; 10].into()],
            &[][..],
            Code::Internal,
        ),
        // The compressed flag without a grpc-encoding: INTERNAL, as the gRPC spec says.
        (
            "Tokenize",
            "compressed flag, no grpc-encoding",
            vec![frame_header(1, 2), vec![0x0a, 0x00].into()],
            &[][..],
            Code::Internal,
        ),
        (
            "Tokenize",
            "grpc-encoding: gzip (not enabled)",
            vec![frame_header(1, 2), vec![0x0a, 0x00].into()],
            &[("grpc-encoding", "gzip")][..],
            Code::Unimplemented,
        ),
        (
            "NoSuchMethod",
            "unknown method",
            vec![frame_header(0, 0)],
            &[][..],
            Code::Unimplemented,
        ),
        // tonic answers a unary call without a message INTERNAL ("Missing request
        // message."), before any vault code runs. Recorded as it is; see the note on
        // issue 6: rewriting it needs a layer over tonic's unary handling.
        (
            "Tokenize",
            "no message at all",
            vec![],
            &[][..],
            Code::Internal,
        ),
        // The first message is taken (an empty one: no card).
        (
            "Tokenize",
            "two messages on a unary call",
            vec![frame_header(0, 0), frame_header(0, 0)],
            &[][..],
            Code::InvalidArgument,
        ),
    ];
    for (rpc, variant, pieces, headers, expected) in transport {
        let (tx, rx) = tokio::sync::mpsc::channel(pieces.len().max(1));
        for piece in pieces {
            tx.send(piece).await.unwrap();
        }
        drop(tx);
        let status = raw_http_call(&channel, rpc, headers, rx).await;
        table.push_str(&format!(
            "{:<16} {:<48} {:?}\n",
            rpc,
            variant,
            status.code()
        ));
        if status.code() != expected {
            failures.push(format!(
                "{rpc} / {variant}: {status:?}, expected {expected:?}"
            ));
        }
    }

    // Fields repeated on the wire stored nothing twice: each card has exactly one token.
    let mut raw = vault_proto::vault::v1::vault_client::VaultClient::new(channel.clone());
    for (what, pan) in [
        ("number twice", &pans.last_wins),
        ("card twice", &pans.merged),
        ("same card twice in a batch", &pans.batch_twice),
    ] {
        let tokens = raw
            .find_subject(pb::SubjectRequest {
                card: Some(pb::Card {
                    number: pan.clone(),
                    ..pb::Card::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .tokens;
        if tokens.len() != 1 {
            failures.push(format!(
                "{what}: {} tokens stored for one card",
                tokens.len()
            ));
        }
    }
    // The invalid PANs and the oversize batch stored nothing.
    let tokens = raw
        .find_subject(pb::SubjectRequest {
            card: Some(pb::Card {
                number: synthetic_pan("424242", 500_000, 16),
                ..pb::Card::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    if !tokens.is_empty() {
        failures.push("the refused oversize batch stored cards".into());
    }

    println!("bad-input matrix: {} rows\n{table}", table.lines().count());
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Still serving: a normal round trip.
    let mut client = stack.client(ADMIN).await;
    let info = client
        .tokenize(Card::new("5555555555554444", 12, 2030), false)
        .await
        .unwrap();
    let read = client.token_info(&info.token).await.unwrap();
    assert_eq!(read.last_four, "4444");
    stack.stop().await;
}
