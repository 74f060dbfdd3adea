//! The checks that tell a real finding from a look-alike the pattern let
//! through. Each sees the whole text and the candidate's range, so it can
//! read the words just before it (context, as Presidio reads it).

use std::ops::Range;

use phonenumber::country::Id;

/// Every candidate is a finding.
pub fn always(_: &str, _: Range<usize>) -> bool {
    true
}

fn digits(text: &str) -> Vec<u32> {
    text.chars().filter_map(|c| c.to_digit(10)).collect()
}

/// How far before a candidate its context words are looked for, in bytes.
const CONTEXT_BYTES: usize = 48;

/// Whether one of `words` (lower case) is a word of the [`CONTEXT_BYTES`]
/// before `at` (`call` in "call me at", not in "recall" or "callback");
/// `close`: with no digit between it and `at` (not `Mobile/15E148
/// Safari/604.1`, a browser's name, before a byte count).
fn said_before(text: &str, at: usize, words: &[&str], close: bool) -> bool {
    let mut from = at.saturating_sub(CONTEXT_BYTES);
    while !text.is_char_boundary(from) {
        from += 1;
    }
    // `social_security_number`, `Soc. Sec.`: separators read as spaces.
    let window: String = text[from..at]
        .to_lowercase()
        .chars()
        .map(|c| if c == '_' || c == '-' { ' ' } else { c })
        .collect();
    words.iter().any(|word| {
        window.match_indices(word).any(|(i, _)| {
            let starts = window[..i]
                .chars()
                .next_back()
                .is_none_or(|c| !c.is_alphanumeric());
            // A word of a script without spaces (電話番号) ends anywhere.
            let ends = !word.is_ascii()
                || window[i + word.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| !c.is_alphabetic());
            starts && ends && !(close && window[i..].bytes().any(|b| b.is_ascii_digit()))
        })
    })
}

// ---- Payment cards -------------------------------------------------------

/// The Luhn checksum.
fn luhn(d: &[u32]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| match (i % 2 == 1, x * 2) {
            (true, double) if double > 9 => double - 9,
            (true, double) => double,
            (false, _) => x,
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Whether a card network issues numbers with this prefix and length
/// (the networks' published ranges: Visa, Mastercard, American Express,
/// Discover, JCB, Diners Club, UnionPay, Maestro).
fn issued(d: &[u32]) -> bool {
    let prefix = |n: usize| d.iter().take(n).fold(0u32, |acc, x| acc * 10 + x);
    let len = d.len();
    let (p2, p3, p4, p6) = (prefix(2), prefix(3), prefix(4), prefix(6));
    match d[0] {
        4 => matches!(len, 13 | 16 | 19),
        5 if (51..=55).contains(&p2) => len == 16,
        2 if (2221..=2720).contains(&p4) => len == 16,
        3 if p2 == 34 || p2 == 37 => len == 15,
        3 if (3528..=3589).contains(&p4) => (16..=19).contains(&len),
        3 if (300..=305).contains(&p3) || p2 == 36 || p2 == 38 || p2 == 39 => {
            (14..=19).contains(&len)
        }
        6 if p4 == 6011 || (644..=649).contains(&p3) || p2 == 65 => (16..=19).contains(&len),
        6 if p2 == 62 || (622_126..=622_925).contains(&p6) => (16..=19).contains(&len),
        5 | 6 if p2 == 50 || (56..=69).contains(&p2) => (12..=19).contains(&len),
        _ => false,
    }
}

/// Card numbers the networks and payment providers publish for testing
/// (Stripe, Braintree, Adyen, PayPal docs): quoted in documentation and
/// code, never a person's card.
const TEST_CARDS: [&str; 24] = [
    "4242424242424242",
    "4000056655665556",
    "4111111111111111",
    "4012888888881881",
    "4222222222222",
    "4000000000000002",
    "4000000000009995",
    "5555555555554444",
    "5200828282828210",
    "5105105105105100",
    "2223003122003222",
    "2223000048400011",
    "378282246310005",
    "371449635398431",
    "378734493671000",
    "6011111111111117",
    "6011000990139424",
    "6011000400000000",
    "3056930009020004",
    "30569309025904",
    "38520000023237",
    "3566002020360505",
    "3530111333300000",
    "6200000000000005",
];

/// Whether a number written in groups is grouped as cards are printed:
/// fours (the last one shorter), 4-6-5 and 4-6-4 (American Express,
/// Diners Club) or 4-4-5 (13-digit Visa). Ungrouped is fine too.
fn card_groups(candidate: &str) -> bool {
    let groups: Vec<usize> = candidate
        .split(|c: char| !c.is_ascii_digit())
        .map(str::len)
        .collect();
    match groups[..] {
        [_] | [4, 6, 5] | [4, 6, 4] | [4, 4, 5] => true,
        [.., last] => groups[..groups.len() - 1].iter().all(|g| *g == 4) && (1..=4).contains(&last),
        [] => false,
    }
}

/// A number a card network issues, grouped as cards are printed, with a
/// valid Luhn digit, that is not a published test card, one digit repeated
/// or a phone number's `+country` digits.
pub fn payment_card(text: &str, at: Range<usize>) -> bool {
    if text[..at.start].ends_with('+') || !card_groups(&text[at.clone()]) {
        return false;
    }
    let d = digits(&text[at]);
    if !(12..=19).contains(&d.len()) || d.iter().all(|&x| x == d[0]) {
        return false;
    }
    let compact: String = d.iter().filter_map(|x| char::from_digit(*x, 10)).collect();
    luhn(&d) && issued(&d) && !TEST_CARDS.contains(&compact.as_str())
}

// ---- IBANs ---------------------------------------------------------------

/// The IBAN check: move the first four characters to the end, letters to
/// numbers (A = 10), and the remainder mod 97 must be 1.
pub fn iban(text: &str, at: Range<usize>) -> bool {
    let compact: String = text[at].chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut remainder: u64 = 0;
    for c in tail.chars().chain(head.chars()) {
        let Some(value) = c.to_digit(36) else {
            return false;
        };
        let value = u64::from(value);
        remainder = if value >= 10 {
            (remainder * 100 + value) % 97
        } else {
            (remainder * 10 + value) % 97
        };
    }
    remainder == 1
}

// ---- US social security numbers -----------------------------------------

const SSN_WORDS: [&str; 9] = [
    "ssn",
    "ss#",
    "ss #",
    "social security",
    "social sec",
    "soc. sec",
    "taxpayer",
    "tin",
    "itin",
];

/// Not in the ranges the SSA never issues (area 000, 666, 900-999; group
/// 00; serial 0000); written `123-45-6789`, or `123 45 6789` and
/// `123456789` after a word that says what it is (SSN, social security,
/// taxpayer id).
pub fn us_ssn(text: &str, at: Range<usize>) -> bool {
    let candidate = &text[at.clone()];
    let d = digits(candidate);
    let area = d[0] * 100 + d[1] * 10 + d[2];
    let group = d[3] * 10 + d[4];
    let serial = d[5] * 1000 + d[6] * 100 + d[7] * 10 + d[8];
    let issued = area != 0 && area != 666 && area < 900 && group != 0 && serial != 0;
    let dashed =
        candidate.as_bytes().get(3) == Some(&b'-') && candidate.as_bytes().get(6) == Some(&b'-');
    let even = candidate.len() == 9 || candidate.as_bytes().get(3) == candidate.as_bytes().get(6);
    issued && even && (dashed || said_before(text, at.start, &SSN_WORDS, false))
}

// ---- Phone numbers -------------------------------------------------------

const PHONE_WORDS: [&str; 40] = [
    "phone",
    "tel",
    "mobile",
    "mob",
    "mobil",
    "cell",
    "cellphone",
    "call",
    "calling",
    "fax",
    "whatsapp",
    "sms",
    "text me",
    "reach me",
    "contact",
    "dial",
    "ring",
    "hotline",
    "telefon",
    "telefone",
    "handy",
    "tél",
    "téléphone",
    "telephone",
    "portable",
    "appelez",
    "numéro",
    "número",
    "celular",
    "móvil",
    "movil",
    "cellulare",
    "telefono",
    "teléfono",
    "tlf",
    "ph",
    "office",
    "電話",
    "携帯",
    "연락처",
];

/// Where a number written without its country code is looked for.
const REGIONS: [Id; 20] = [
    Id::US,
    Id::GB,
    Id::DE,
    Id::FR,
    Id::IN,
    Id::BR,
    Id::AU,
    Id::JP,
    Id::ES,
    Id::IT,
    Id::NL,
    Id::MX,
    Id::CH,
    Id::AT,
    Id::BE,
    Id::SE,
    Id::IE,
    Id::PL,
    Id::ZA,
    Id::SG,
];

/// A number libphonenumber (the `phonenumber` crate, its Rust port) calls
/// valid: with its country code (`+44 ...`, `0044 ...`) anywhere; without
/// one, only after a word that says it is a phone number (phone, tel,
/// mobile, call, Telefon, ...), and valid in one of [`REGIONS`].
pub fn phone(text: &str, at: Range<usize>) -> bool {
    let candidate = &text[at.clone()];
    let count = candidate.bytes().filter(u8::is_ascii_digit).count();
    if !(7..=15).contains(&count) {
        return false;
    }
    let context = || said_before(text, at.start, &PHONE_WORDS, true);
    if let Some(rest) = candidate.strip_prefix("00") {
        // `0044 20 7946 0958`; a run of digits that begins with 00 is an
        // id (a parcel's, say) unless a word says otherwise.
        let grouped = rest.contains([' ', '-', '.', '/']);
        return count >= 9 && (grouped || context()) && valid(None, &format!("+{rest}"));
    }
    if candidate.starts_with('+') {
        return valid(None, candidate);
    }
    context() && REGIONS.iter().any(|region| valid(Some(*region), candidate))
}

/// Valid as written, or with its separators taken out (the crate reads
/// `+8210-3051-3229` as country code 821; `+821030513229` it reads right).
/// Load the metadata (on its first use otherwise).
pub fn warm_up() {
    let _ = phonenumber::parse(None, "+14155552671");
}

fn valid(region: Option<Id>, number: &str) -> bool {
    let parses = |n: &str| phonenumber::parse(region, n).is_ok_and(|n| phonenumber::is_valid(&n));
    parses(number) || {
        let compact: String = number
            .chars()
            .filter(|c| c.is_ascii_digit() || *c == '+')
            .collect();
        compact != number && parses(&compact)
    }
}

// ---- Keys ----------------------------------------------------------------

/// Not the example key of AWS's documentation (`AKIAIOSFODNN7EXAMPLE`
/// and its kin end in `EXAMPLE`).
pub fn aws_access_key(text: &str, at: Range<usize>) -> bool {
    !text[at].ends_with("EXAMPLE")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(check: fn(&str, Range<usize>) -> bool, text: &str) -> bool {
        check(text, 0..text.len())
    }

    #[test]
    fn checksums_ranges_and_context() {
        assert!(whole(payment_card, "4539 1488 0343 6467"));
        assert!(!whole(payment_card, "4539 1488 0343 6468"), "Luhn");
        assert!(!whole(payment_card, "4111 1111 1111 1111"), "a test card");
        assert!(!whole(payment_card, "9999 9999 9999 9995"), "no network");
        assert!(whole(iban, "GB82 WEST 1234 5698 7654 32"));
        assert!(!whole(iban, "GB82 WEST 1234 5698 7654 33"));
        assert!(whole(us_ssn, "123-45-6789"));
        assert!(!whole(us_ssn, "666-45-6789") && !whole(us_ssn, "123-00-6789"));
        assert!(!whole(us_ssn, "123456789"), "no context");
        let text = "my SSN is 123456789";
        assert!(us_ssn(text, 10..19));
        assert!(whole(phone, "+44 20 7946 0958"));
        assert!(!whole(phone, "+99 1234 5678"), "no such country");
        let text = "Tel: 030 12345678";
        assert!(phone(text, 5..text.len()));
        assert!(!whole(phone, "030 12345678"), "no context");
        let text = "recall 030 12345678";
        assert!(!phone(text, 7..text.len()), "a word that only ends in call");
        let text = "callback 030 12345678";
        assert!(
            !phone(text, 9..text.len()),
            "a word that only begins with call"
        );
        assert!(!whole(aws_access_key, "AKIAIOSFODNN7EXAMPLE"));
    }
}
