//! Masks anything in a processor's answer that looks like a card number: a run of 12 to
//! 19 digits (single spaces or dashes between digits allowed) that passes the Luhn
//! check keeps its last four digits, the others become `*`. Longer digit runs are
//! searched for such a number inside them. Conservative on purpose: an order id of that
//! length that happens to pass Luhn is masked too.

use crate::card::luhn_valid;

/// The card values the vault put into a request: scrubbed from its answer by value,
/// whatever their shape there (a processor that echoes a field, or a caller that glued
/// a digit to the number so that the run fails Luhn).
#[derive(Clone, Copy)]
pub struct Injected<'a> {
    pub number: &'a str,
    pub cvc: Option<&'a str>,
    pub name: Option<&'a str>,
}

impl std::fmt::Debug for Injected<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Injected([REDACTED])")
    }
}

/// Everything the answer must not carry: the injected number (with any separators),
/// any other card-number-like run, the injected CVC as a digit run of its own, and the
/// injected name (raw, JSON-escaped or form-encoded). Replacements keep the length.
pub fn scrub(bytes: &mut [u8], injected: &Injected<'_>) {
    mask_exact_number(bytes, injected.number.as_bytes());
    mask_card_numbers(bytes);
    if let Some(cvc) = injected.cvc.filter(|c| !c.is_empty()) {
        mask_digit_run(bytes, cvc.as_bytes());
    }
    if let Some(name) = injected.name.filter(|n| n.len() >= 2) {
        // Sized for the worst case, so that no reallocation leaves a copy behind.
        let mut json = zeroize::Zeroizing::new(String::with_capacity(6 * name.len()));
        super::template::escape_json(&mut json, name);
        let form: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
        for form in [
            name,
            json.as_str(),
            form.as_str(),
            &name.replace(' ', "%20"),
        ] {
            mask_substring(bytes, form.as_bytes());
        }
    }
}

/// Masks each occurrence of `number`'s digits, separators (space, dash, dot) allowed
/// between them, keeping the last four.
fn mask_exact_number(bytes: &mut [u8], number: &[u8]) {
    if number.len() < 12 {
        return;
    }
    let mut positions = Vec::with_capacity(number.len());
    for start in 0..bytes.len() {
        if bytes[start] != number[0] {
            continue;
        }
        positions.clear();
        let mut j = start;
        while j < bytes.len() && positions.len() < number.len() {
            if bytes[j] == number[positions.len()] {
                positions.push(j);
            } else if positions.is_empty() || !matches!(bytes[j], b' ' | b'-' | b'.') {
                break;
            }
            j += 1;
        }
        if positions.len() == number.len() {
            for &p in &positions[..positions.len() - 4] {
                bytes[p] = b'*';
            }
        }
    }
}

/// Masks `run` where it stands as a digit run of its own.
fn mask_digit_run(bytes: &mut [u8], run: &[u8]) {
    for i in 0..bytes.len().saturating_sub(run.len() - 1) {
        if &bytes[i..i + run.len()] == run
            && (i == 0 || !bytes[i - 1].is_ascii_digit())
            && bytes.get(i + run.len()).is_none_or(|b| !b.is_ascii_digit())
        {
            bytes[i..i + run.len()].fill(b'*');
        }
    }
}

fn mask_substring(bytes: &mut [u8], needle: &[u8]) {
    if needle.is_empty() || needle.len() > bytes.len() {
        return;
    }
    for i in 0..=bytes.len() - needle.len() {
        if &bytes[i..i + needle.len()] == needle {
            bytes[i..i + needle.len()].fill(b'*');
        }
    }
}

/// Masks card-number-like runs in place.
pub fn mask_card_numbers(bytes: &mut [u8]) {
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        // Positions of the digits of this run.
        let mut digits = vec![i];
        let mut j = i + 1;
        while j < bytes.len() {
            if bytes[j].is_ascii_digit() {
                digits.push(j);
                j += 1;
            } else if matches!(bytes[j], b' ' | b'-')
                && j + 1 < bytes.len()
                && bytes[j + 1].is_ascii_digit()
            {
                j += 1;
            } else {
                break;
            }
        }
        mask_run(bytes, &digits);
        i = j;
    }
}

fn mask_run(bytes: &mut [u8], positions: &[usize]) {
    if positions.len() < 12 {
        return;
    }
    let values: Vec<u8> = positions.iter().map(|&p| bytes[p]).collect();
    let mut masked = vec![false; positions.len()];
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
                for m in &mut masked[start..start + len - 4] {
                    *m = true;
                }
            }
        }
    }
    for (k, &p) in positions.iter().enumerate() {
        if masked[k] {
            bytes[p] = b'*';
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
            },
        );
        String::from_utf8(bytes).unwrap()
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
            scrubbed(r#"{"cvc":"737","amount":7370}"#, Some("737"), None),
            r#"{"cvc":"***","amount":7370}"#
        );
        assert_eq!(
            scrubbed(
                r#"{"name":"Ada \"L\"","f":"Ada+%22L%22"}"#,
                None,
                Some("Ada \"L\"")
            ),
            r#"{"name":"*********","f":"***********"}"#
        );
    }

    #[test]
    fn leaves_other_numbers_alone() {
        assert_eq!(mask("4242424242424241"), "4242424242424241"); // fails Luhn
        assert_eq!(
            mask("amount 12345 id 987654321"),
            "amount 12345 id 987654321"
        );
        assert_eq!(mask("2030-12-01"), "2030-12-01");
    }
}
