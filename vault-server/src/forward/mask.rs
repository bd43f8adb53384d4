//! Masks anything in a processor's answer that looks like a card number: a run of 12 to
//! 19 digits (single spaces or dashes between digits allowed) that passes the Luhn
//! check keeps its last four digits, the others become `*`. Longer digit runs are
//! searched for such a number inside them. Conservative on purpose: an order id of that
//! length that happens to pass Luhn is masked too.

use crate::card::luhn_valid;

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
