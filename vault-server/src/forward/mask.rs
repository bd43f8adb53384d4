//! What a processor's answer must not carry back to the caller. The vault knows exactly
//! which card values it put into the request, so it masks them **by value** wherever
//! they turn up, then anything else shaped like a card number:
//!
//! - the injected number's digits in order, with up to twelve other characters
//!   between any two (separators, quotes, a JSON array's `","`, markup), inside longer
//!   digit runs too; all but the last four are masked; and any run of eight or more of
//!   its digits in order (an echo cut short);
//! - the injected CVC where it stands as a digit run of its own;
//! - each word of three or more letters of the injected name, case and accents
//!   folded, also transliterated (ß as ss, ü as ue or u, ø as o...), on word boundaries,
//!   with up to three non-alphanumeric characters between its letters (a processor
//!   that cuts the name over several headers);
//! - the route's secret header values (the processor's credentials);
//! - any run of 12 to 19 digits (single spaces or dashes between digits allowed) that
//!   passes the Luhn check, keeping its last four; a longer run is searched for such a
//!   number inside it. Conservative on purpose: an order id of that length that passes
//!   Luhn is masked too.
//!
//! All of it is matched on a normalised view of the answer (JSON `\uXXXX` and
//! backslash escapes, URL percent-encoding and `+`, HTML numeric and common named
//! references undone, every character in NFKC: fullwidth digits are digits), then on
//! the answer as it is. What matches is
//! masked in the original bytes, escape sequences whole, so the length stays the same.
//! Expiry is not masked: GetTokenInfo returns it anyway.
//!
//! A card-shaped token (`format = card`: the card's length and last four, maybe its
//! first six, failing Luhn by construction) is not a card number, and the shape rule
//! leaves it alone: a processor that echoes one (say, as a customer reference) returns
//! it whole. The by-value rules still apply to it like to any text, so a token that
//! repeats eight or more of the injected card's digits in a row (its first six and the
//! next two, one token in a hundred where the first six are kept) is masked there too:
//! the token is the caller's already, and erring towards the card costs nothing.

use unicode_normalization::UnicodeNormalization;

use crate::card::luhn_valid;

/// The card values the vault put into a request, and the route's secret header values
/// (the processor's credentials, which the caller must not see either).
#[derive(Clone, Copy)]
pub struct Injected<'a> {
    pub number: &'a str,
    pub cvc: Option<&'a str>,
    pub name: Option<&'a str>,
    pub secrets: &'a [String],
}

impl std::fmt::Debug for Injected<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Injected([REDACTED])")
    }
}

/// The most characters a view may hold per byte of the answer: NFKC turns some
/// characters into many (U+FDFA into 18), which would make masking slow.
const MAX_GROWTH: usize = 4;

/// Masks in place everything the answer must not carry (see the module's doc): on the
/// answer with its escapes undone, then on it as it is (an escape that is not one,
/// such as `%41` before a number in JSON, must not hide the digits it swallows).
/// Returns false, masking nothing, for an answer whose normalised view would be more
/// than [`MAX_GROWTH`] times its size: it is to be withheld.
pub fn scrub(bytes: &mut [u8], injected: &Injected<'_>) -> bool {
    let mut masked_any = false;
    for decode in [true, false] {
        // Without a byte that starts an escape the two views are the same, and if the
        // first pass masked nothing the bytes are too: the second would find nothing.
        if !decode && !masked_any && !has_escapes(bytes) {
            break;
        }
        let view = View::of(bytes, decode);
        if view.chars.len() > MAX_GROWTH * bytes.len().max(16) {
            return false;
        }
        let mut masked = vec![false; view.chars.len()];
        mask_number(&view, injected.number.as_bytes(), &mut masked);
        mask_number_pieces(&view, injected.number.as_bytes(), &mut masked);
        mask_card_like(&view, &mut masked);
        if let Some(cvc) = injected.cvc.filter(|c| !c.is_empty()) {
            mask_digit_run(&view, cvc.as_bytes(), &mut masked);
        }
        if let Some(name) = injected.name {
            mask_name(&view, name, &mut masked);
        }
        for secret in injected.secrets.iter().filter(|s| s.len() >= 4) {
            mask_text(&view, secret, &mut masked);
        }
        masked_any |= view.apply(bytes, &masked);
    }
    true
}

/// Whether `bytes` hold a byte that [`decode_one`] may read as the start of an escape.
fn has_escapes(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .any(|b| matches!(b, b'\\' | b'%' | b'+' | b'&'))
}

/// Masks card-number-like runs in place (the shape rule alone).
pub fn mask_card_numbers(bytes: &mut [u8]) {
    let mut masked_any = false;
    for decode in [true, false] {
        if !decode && !masked_any && !has_escapes(bytes) {
            break;
        }
        let view = View::of(bytes, decode);
        let mut masked = vec![false; view.chars.len()];
        mask_card_like(&view, &mut masked);
        masked_any |= view.apply(bytes, &masked);
    }
}

/// The answer as characters, each with the byte range of the original it came from.
struct View {
    chars: Vec<char>,
    spans: Vec<(usize, usize)>,
}

fn hex(bytes: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(bytes).ok()?;
    u32::from_str_radix(text, 16).ok()
}

impl View {
    /// The answer's characters, with escapes undone when `decode`.
    fn of(bytes: &[u8], decode: bool) -> Self {
        let mut view = View {
            chars: Vec::with_capacity(bytes.len()),
            spans: Vec::with_capacity(bytes.len()),
        };
        let mut i = 0;
        while i < bytes.len() {
            let (c, len) = match decode {
                true => decode_one(bytes, i),
                false => plain_one(&bytes[i..]),
            };
            // NFKC: a fullwidth digit is a digit, a ligature its letters. (Each
            // character on its own, so ASCII, which NFKC leaves as it is, skips it:
            // most answers are all ASCII.)
            if c.is_ascii() {
                view.chars.push(c);
                view.spans.push((i, i + len));
            } else {
                for normal in std::iter::once(c).nfkc() {
                    view.chars.push(normal);
                    view.spans.push((i, i + len));
                }
            }
            i += len;
        }
        view
    }

    /// Masks the bytes of the marked characters; returns whether any was marked.
    fn apply(&self, bytes: &mut [u8], masked: &[bool]) -> bool {
        let mut any = false;
        for (k, &(start, end)) in self.spans.iter().enumerate() {
            if masked[k] {
                bytes[start..end].fill(b'*');
                any = true;
            }
        }
        any
    }

    fn digit(&self, k: usize) -> Option<u8> {
        self.chars
            .get(k)
            .filter(|c| c.is_ascii_digit())
            .map(|c| *c as u8)
    }
}

/// The character at `i` and how many bytes it takes, escapes undone.
fn decode_one(bytes: &[u8], i: usize) -> (char, usize) {
    let rest = &bytes[i..];
    match rest {
        [b'\\', b'u', ..] if rest.len() >= 6 => {
            if let Some(unit) = hex(&rest[2..6]) {
                // A surrogate pair is one character.
                if (0xD800..0xDC00).contains(&unit)
                    && rest.len() >= 12
                    && rest[6] == b'\\'
                    && rest[7] == b'u'
                    && let Some(low) = hex(&rest[8..12]).filter(|l| (0xDC00..0xE000).contains(l))
                {
                    let c = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                    return (char::from_u32(c).unwrap_or('\u{FFFD}'), 12);
                }
                return (char::from_u32(unit).unwrap_or('\u{FFFD}'), 6);
            }
        }
        [b'\\', escaped, ..] => {
            let c = match escaped {
                b'"' => Some('"'),
                b'\\' => Some('\\'),
                b'/' => Some('/'),
                b'b' | b'f' | b'n' | b'r' | b't' => Some(' '),
                _ => None,
            };
            if let Some(c) = c {
                return (c, 2);
            }
        }
        [b'%', ..] if rest.len() >= 3 => {
            if let Some(first) = hex(&rest[1..3]) {
                // A multi-byte UTF-8 character is several %XX in a row.
                let width = match first {
                    0xC0..=0xDF => 2,
                    0xE0..=0xEF => 3,
                    0xF0..=0xF7 => 4,
                    _ => 1,
                };
                let mut utf8 = Vec::with_capacity(width);
                for k in 0..width {
                    let at = 3 * k;
                    match rest.get(at..at + 3) {
                        Some([b'%', h1, h2]) => match hex(&[*h1, *h2]) {
                            Some(byte) => utf8.push(byte as u8),
                            None => break,
                        },
                        _ => break,
                    }
                }
                if utf8.len() == width
                    && let Some(c) = std::str::from_utf8(&utf8)
                        .ok()
                        .and_then(|s| s.chars().next())
                {
                    return (c, 3 * width);
                }
                return (char::from(first as u8), 3);
            }
        }
        [b'+', ..] => return (' ', 1),
        // A named reference: an accented letter is its letter (`&eacute;` is e), the
        // XML five are their characters, any other (`&nbsp;`) stands between values.
        [b'&', first, ..] if first.is_ascii_alphabetic() => {
            let end = rest.iter().take(12).position(|&b| b == b';');
            if let Some(end) = end.filter(|&e| rest[1..e].iter().all(u8::is_ascii_alphanumeric)) {
                return (named_reference(&rest[1..end]), end + 1);
            }
        }
        [b'&', b'#', ..] => {
            let end = rest.iter().take(16).position(|&b| b == b';');
            if let Some(end) = end {
                let body = &rest[2..end];
                let code = match body {
                    [b'x' | b'X', digits @ ..] => hex(digits),
                    digits => std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| d.parse().ok()),
                };
                if let Some(c) = code.and_then(char::from_u32) {
                    return (c, end + 1);
                }
            }
        }
        _ => {}
    }
    plain_one(rest)
}

/// What a named HTML reference (without `&` and `;`) stands for, as the masker needs
/// it: an accented letter's base letter, the XML five, else a space.
fn named_reference(name: &[u8]) -> char {
    const ACCENTS: [&[u8]; 8] = [
        b"acute", b"grave", b"uml", b"circ", b"tilde", b"ring", b"cedil", b"slash",
    ];
    match name {
        b"amp" => '&',
        b"lt" => '<',
        b"gt" => '>',
        b"quot" => '"',
        b"apos" => '\'',
        b"szlig" => 's',
        [letter, accent @ ..] if letter.is_ascii_alphabetic() && ACCENTS.contains(&accent) => {
            char::from(*letter)
        }
        _ => ' ',
    }
}

/// The UTF-8 character at the start of `rest` and its width (an invalid byte stands
/// alone).
fn plain_one(rest: &[u8]) -> (char, usize) {
    let width = match rest[0] {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    };
    match rest
        .get(..width)
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| s.chars().next())
    {
        Some(c) => (c, width),
        None => ('\u{FFFD}', 1),
    }
}

/// Most characters between two digits of the injected number that still join them:
/// separators, quotes, markup (`</b> <b>`).
const MAX_GAP: usize = 12;
/// Most non-alphanumeric characters between two letters of a name word.
const MAX_NAME_GAP: usize = 3;
/// The shortest run of the injected number's digits masked on its own (a truncated
/// echo): with the last four known, 8 leading digits leave a guessable rest.
const MIN_PIECE: usize = 8;
// mask_number_pieces packs a piece into a u64.
const _: () = assert!(MIN_PIECE == 8);

/// Marks each occurrence of `number`'s digits in order (see the module's doc), all but
/// the last four.
fn mask_number(view: &View, number: &[u8], masked: &mut [bool]) {
    if number.len() < 12 {
        return;
    }
    let mut positions = Vec::with_capacity(number.len());
    for start in 0..view.chars.len() {
        if view.digit(start) != Some(number[0]) {
            continue;
        }
        positions.clear();
        positions.push(start);
        let mut k = start + 1;
        let mut gap = 0;
        while k < view.chars.len() && positions.len() < number.len() {
            match view.digit(k) {
                Some(d) if d == number[positions.len()] => {
                    positions.push(k);
                    gap = 0;
                }
                Some(_) => break,
                None if gap == MAX_GAP => break,
                None => gap += 1,
            }
            k += 1;
        }
        if positions.len() == number.len() {
            for &p in &positions[..positions.len() - 4] {
                masked[p] = true;
            }
        }
    }
}

/// Marks each run of contiguous digits holding [`MIN_PIECE`] or more of the injected
/// number's digits in order (but not the whole number, which [`mask_number`] masks
/// keeping the last four): a processor that echoes a field cut short.
fn mask_number_pieces(view: &View, number: &[u8], masked: &mut [bool]) {
    if number.len() < 12 {
        return;
    }
    // The number's MIN_PIECE-digit windows, each packed into one integer (at most 12
    // of them for 19 digits): a window of the answer is compared with each at once.
    let pack = |w: &[u8]| u64::from_le_bytes(w.try_into().unwrap_or_default());
    let pieces: Vec<u64> = number.windows(MIN_PIECE).map(pack).collect();
    let mut run: Vec<u8> = Vec::new();
    let mut k = 0;
    while k < view.chars.len() {
        if view.digit(k).is_none() {
            k += 1;
            continue;
        }
        let start = k;
        run.clear();
        while let Some(d) = view.digit(k) {
            run.push(d);
            k += 1;
        }
        if run.len() < MIN_PIECE || run.windows(number.len()).any(|w| w == number) {
            continue;
        }
        // Every MIN_PIECE-digit window of the run that is one of the number's: linear in
        // the run (a megabyte of digits stays cheap); overlapping windows cover a
        // longer piece whole.
        for (i, window) in run.windows(MIN_PIECE).enumerate() {
            if pieces.contains(&pack(window)) {
                masked[start + i..start + i + MIN_PIECE].fill(true);
            }
        }
    }
}

/// Marks each occurrence of `text`, character for character.
/// (A `+` matches a space too: the unescaped view reads a form's `+` as one.)
fn mask_text(view: &View, text: &str, masked: &mut [bool]) {
    let needle: Vec<char> = text.chars().collect();
    let n = needle.len();
    let same = |a: char, b: char| a == b || (b == '+' && a == ' ');
    for start in 0..view.chars.len().saturating_sub(n - 1) {
        if view.chars[start..start + n]
            .iter()
            .zip(&needle)
            .all(|(&a, &b)| same(a, b))
        {
            masked[start..start + n].fill(true);
        }
    }
}

/// A word's ASCII transliterations besides itself (`strauß`: `strauss`; `müller`:
/// `mueller` and `muller`), as processors often write names.
fn transliterations(word: &[char]) -> Vec<Vec<char>> {
    let map = |c: char, umlaut_e: bool| -> Option<&'static str> {
        Some(match c {
            'ß' => "ss",
            'æ' => "ae",
            'œ' => "oe",
            'ø' => "o",
            'ł' => "l",
            'đ' => "d",
            'þ' => "th",
            'ı' => "i",
            'ä' if umlaut_e => "ae",
            'ö' if umlaut_e => "oe",
            'ü' if umlaut_e => "ue",
            _ => return None,
        })
    };
    let mut variants = Vec::new();
    for umlaut_e in [false, true] {
        let variant: Vec<char> = word
            .iter()
            .flat_map(|&c| match map(c, umlaut_e) {
                Some(s) => s.chars().collect::<Vec<_>>(),
                None => vec![c],
            })
            .collect();
        if variant != word && !variants.contains(&variant) {
            variants.push(variant);
        }
    }
    variants
}

fn is_combining(c: char) -> bool {
    unicode_normalization::char::is_combining_mark(c)
}

/// A letter as names are compared: its base letter, lower case (`É` and `é` are `e`);
/// a combining mark is nothing (`\0`). One character for one, so positions hold.
fn fold(c: char) -> char {
    if c.is_ascii() {
        return c.to_ascii_lowercase();
    }
    if is_combining(c) {
        return '\0';
    }
    let mut base = '\0';
    unicode_normalization::char::decompose_canonical(c, |d| {
        if base == '\0' {
            base = d;
        }
    });
    base.to_lowercase().next().unwrap_or(base)
}

/// Marks `run` where it stands as a digit run of its own.
fn mask_digit_run(view: &View, run: &[u8], masked: &mut [bool]) {
    let n = run.len();
    for start in 0..view.chars.len().saturating_sub(n - 1) {
        let matches = (0..n).all(|k| view.digit(start + k) == Some(run[k]));
        let alone =
            (start == 0 || view.digit(start - 1).is_none()) && view.digit(start + n).is_none();
        if matches && alone {
            masked[start..start + n].fill(true);
        }
    }
}

/// Marks each word of three or more letters of `name`, case-insensitively, on word
/// boundaries.
fn mask_name(view: &View, name: &str, masked: &mut [bool]) {
    let lower: Vec<char> = view.chars.iter().map(|&c| fold(c)).collect();
    // The name's words in lower case, each folded and transliterated; once each, and
    // at most 32 (a name is at most 128 characters).
    let lowered: String = name.nfkc().flat_map(char::to_lowercase).collect();
    let mut words: Vec<Vec<char>> = Vec::new();
    for word in lowered.split(|c: char| !c.is_alphabetic() && !is_combining(c)) {
        let word: Vec<char> = word.chars().collect();
        let folded = |w: &[char]| -> Vec<char> {
            w.iter().map(|&c| fold(c)).filter(|&c| c != '\0').collect()
        };
        for candidate in
            std::iter::once(folded(&word)).chain(transliterations(&word).iter().map(|w| folded(w)))
        {
            if candidate.len() >= 3 && !words.contains(&candidate) && words.len() < 32 {
                words.push(candidate);
            }
        }
    }
    let mut positions = Vec::new();
    for word in &words {
        for start in 0..lower.len() {
            if lower[start] != word[0] || (start > 0 && lower[start - 1].is_alphabetic()) {
                continue;
            }
            positions.clear();
            positions.push(start);
            let (mut k, mut gap) = (start + 1, 0);
            while k < lower.len() && positions.len() < word.len() {
                let c = lower[k];
                if c == word[positions.len()] {
                    positions.push(k);
                    gap = 0;
                } else if c.is_alphanumeric() || gap == MAX_NAME_GAP {
                    break;
                } else {
                    gap += 1;
                }
                k += 1;
            }
            let end = positions.last().map_or(start, |p| p + 1);
            if positions.len() == word.len() && lower.get(end).is_none_or(|c| !c.is_alphabetic()) {
                for &p in &positions {
                    masked[p] = true;
                }
            }
        }
    }
}

/// Marks card-number-like runs (the shape rule).
fn mask_card_like(view: &View, masked: &mut [bool]) {
    let mut k = 0;
    while k < view.chars.len() {
        if view.digit(k).is_none() {
            k += 1;
            continue;
        }
        // Positions of the digits of this run.
        let mut digits = vec![k];
        let mut j = k + 1;
        while j < view.chars.len() {
            if view.digit(j).is_some() {
                digits.push(j);
                j += 1;
            } else if matches!(view.chars[j], ' ' | '-') && view.digit(j + 1).is_some() {
                j += 1;
            } else {
                break;
            }
        }
        mask_run(view, &digits, masked);
        k = j;
    }
}

fn mask_run(view: &View, positions: &[usize], masked: &mut [bool]) {
    if positions.len() < 12 {
        return;
    }
    let values: Vec<u8> = positions.iter().filter_map(|&p| view.digit(p)).collect();
    // A run of 12 to 19 digits is judged whole; only a longer run is searched for a
    // card number inside it (any 12-15 digit window passes Luhn one time in ten).
    let lengths = if values.len() <= 19 {
        values.len()..=values.len()
    } else {
        12..=19
    };
    for len in lengths {
        for start in 0..=values.len() - len {
            if luhn_valid(&values[start..start + len]) {
                for &p in &positions[start..start + len - 4] {
                    masked[p] = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(s: &str) -> String {
        let mut bytes = s.as_bytes().to_vec();
        mask_card_numbers(&mut bytes);
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn masks_card_numbers_keeping_last_four() {
        assert_eq!(
            mask(r#"{"n":"4242424242424242"}"#),
            r#"{"n":"************4242"}"#
        );
        assert_eq!(
            mask("card 4242 4242 4242 4242 ok"),
            "card **** **** **** 4242 ok"
        );
        assert_eq!(mask("amex 3782-822463-10005"), "amex ****-******-*0005");
        assert_eq!(mask("x04242424242424242x"), "x*************4242x");
    }

    fn scrubbed(s: &str, cvc: Option<&str>, name: Option<&str>) -> String {
        let mut bytes = s.as_bytes().to_vec();
        scrub(
            &mut bytes,
            &Injected {
                number: "4242424242424242",
                cvc,
                name,
                secrets: &[
                    "Bearer sk_live_abcdef".to_owned(),
                    "sk_live_abcdef".to_owned(),
                ],
            },
        );
        assert_eq!(bytes.len(), s.len());
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn card_shaped_tokens_are_not_card_numbers() {
        // Tokens of the injected card (first six and last four kept; last four only)
        // and of another card: all fail Luhn, none holds eight of the card's digits
        // in a row.
        let answer = r#"{"ref":"4242421234564242","t":"9301982645114242","o":"7301982645114444"}"#;
        for token in ["4242421234564242", "9301982645114242", "7301982645114444"] {
            assert!(!luhn_valid(token.as_bytes()), "{token}");
        }
        assert_eq!(scrubbed(answer, None, None), answer);
        assert_eq!(mask(answer), answer);
    }

    #[test]
    fn scrubs_the_injected_values_whatever_their_shape() {
        // A digit glued to the number makes the run fail Luhn; it is masked all the same.
        assert_eq!(
            scrubbed("x94242424242424242x", None, None),
            "x9************4242x"
        );
        assert_eq!(
            scrubbed("4242.4242.4242.4242 12/30", None, None),
            "****.****.****.4242 12/30"
        );
        assert_eq!(
            scrubbed(r#"["4242","4242","4242","4242"]"#, None, None),
            r#"["****","****","****","4242"]"#
        );
        assert_eq!(
            scrubbed(r#"{"cvc":"737","amount":7370}"#, Some("737"), None),
            r#"{"cvc":"***","amount":7370}"#
        );
        assert_eq!(
            scrubbed(
                r#"{"name":"Ada \"L\"","f":"Ada+%22L%22"}"#,
                None,
                Some("Ada \"L\"")
            ),
            r#"{"name":"*** \"L\"","f":"***+%22L%22"}"#
        );
    }

    #[test]
    fn escapes_and_look_alikes_are_unmasked_first() {
        // JSON \u escapes, percent-encoding, HTML references, fullwidth digits.
        let escaped = "\\u0034\\u0032\\u0034\\u0032424242424242";
        assert_eq!(
            scrubbed(escaped, None, None),
            format!("{}********4242", "*".repeat(24))
        );
        assert_eq!(
            scrubbed("%34%32%34%32424242424242", None, None),
            format!("{}********4242", "*".repeat(12))
        );
        assert_eq!(
            scrubbed("&#52;242424242424242", None, None),
            format!("{}***********4242", "*".repeat(5))
        );
        let fullwidth = "４２４２４２４２４２４２４２４２";
        let out = scrubbed(fullwidth, None, None);
        assert!(
            out.ends_with("４２４２") && out.starts_with(&"*".repeat(36)),
            "{out}"
        );
        // A CVC escaped is still a CVC.
        assert_eq!(
            scrubbed(r#"{"c":"\u0037\u00337"}"#, Some("737"), None),
            r#"{"c":"*************"}"#
        );
    }

    #[test]
    fn a_name_is_masked_word_by_word_whatever_its_case() {
        assert_eq!(
            scrubbed(
                "holder ADA LOVELACE; lovelace again; Adams stays",
                None,
                Some("Ada Lovelace")
            ),
            "holder *** ********; ******** again; Adams stays"
        );
        // Escaped letters too.
        assert_eq!(
            scrubbed(r#""\u004cOVELACE""#, None, Some("Ada Lovelace")),
            r#""*************""#
        );
        // Cut over several headers (joined with spaces), a word is still found.
        assert_eq!(
            scrubbed("Ada Love lace", None, Some("Ada Lovelace")),
            "*** **** ****"
        );
        // Words shorter than three letters stay (too common to mean anything).
        assert_eq!(scrubbed("Jo Li", None, Some("Jo Li")), "Jo Li");
    }

    #[test]
    fn what_an_attacker_tried_is_masked() {
        // One İ (two characters in lower case) once switched name masking off.
        assert_eq!(
            scrubbed("%C4%B0 Ada Lovelace", None, Some("Ada Lovelace")),
            "%C4%B0 *** ********"
        );
        // A % before the number, in JSON, swallowed two of its digits when decoded: the
        // rest is a piece of the number, and the raw pass finds no more (the two left are
        // of the first six, which may be shown).
        assert_eq!(
            scrubbed(r#"{"d":"%4242424242424242"}"#, Some("737"), None),
            r#"{"d":"%42**************"}"#
        );
        assert_eq!(
            scrubbed(r#"{"d":"%737"}"#, Some("737"), None),
            r#"{"d":"%***"}"#
        );
        // The route's credentials, echoed.
        assert_eq!(
            scrubbed(
                "auth: Bearer sk_live_abcdef; key sk_live_abcdef",
                None,
                None
            ),
            format!("auth: {}; key {}", "*".repeat(21), "*".repeat(14))
        );
        // Accents dropped, or decomposed.
        assert_eq!(
            scrubbed("JOSE MULLER / Jose\u{301}", None, Some("José Müller")),
            "**** ****** / ****\u{301}"
        );
        // A field cut short: 11 leading digits and the known last four rebuild it.
        assert_eq!(scrubbed("n=42424242424", None, None), "n=***********");
        // Markup and named references between the groups.
        assert_eq!(
            scrubbed("4242&nbsp;4242&nbsp;4242&nbsp;4242", None, None),
            "****&nbsp;****&nbsp;****&nbsp;4242"
        );
        assert_eq!(
            scrubbed(
                "<b>4242</b> <b>4242</b> <b>4242</b> <b>4242</b>",
                None,
                None
            ),
            "<b>****</b> <b>****</b> <b>****</b> <b>4242</b>"
        );
    }

    #[test]
    fn what_a_second_review_tried_is_masked() {
        assert_eq!(
            scrubbed("Jos&eacute; M&uuml;ller", None, Some("José Müller")),
            format!("{} {}", "*".repeat(11), "*".repeat(11))
        );
        assert_eq!(
            scrubbed("STRAUSS, MUELLER, MULLER", None, Some("Strauß Müller")),
            "*******, *******, ******"
        );
        let mut bytes = br#"{"auth":"Basic dXNl+cjpw\/YXNz"}"#.to_vec();
        let secrets = [
            "Basic dXNl+cjpw/YXNz".to_owned(),
            "dXNl+cjpw/YXNz".to_owned(),
        ];
        assert!(scrub(
            &mut bytes,
            &Injected {
                number: "4242424242424242",
                cvc: None,
                name: None,
                secrets: &secrets,
            }
        ));
        let text = String::from_utf8(bytes).unwrap();
        assert!(!text.contains("dXNl") && !text.contains("YXNz"), "{text}");
        // A character NFKC turns into 18: refused, not masked slowly.
        let mut expanding = "\u{FDFA}".repeat(1000).into_bytes();
        assert!(!scrub(
            &mut expanding,
            &Injected {
                number: "4242424242424242",
                cvc: None,
                name: None,
                secrets: &[],
            }
        ));
    }

    #[test]
    fn leaves_other_numbers_alone() {
        assert_eq!(mask("4242424242424241"), "4242424242424241"); // fails Luhn
        assert_eq!(
            mask("amount 12345 id 987654321"),
            "amount 12345 id 987654321"
        );
        assert_eq!(mask("2030-12-01"), "2030-12-01");
        assert_eq!(scrubbed("exp 12/2030", Some("737"), None), "exp 12/2030");
    }
}
