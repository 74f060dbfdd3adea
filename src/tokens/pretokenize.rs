//! Splitting text into the pieces that BPE then encodes one at a time.
//!
//! OpenAI's encodings first cut text with a regular expression (the
//! "pre-tokenization" pattern) and only then merge bytes within each piece.
//! `bpe-openai` runs that pattern with `regex-automata`, one anchored search per
//! piece, which costs about 10 ns a byte and was the largest single cost of
//! counting. Most text is ASCII, and on ASCII the pattern's seven alternatives
//! reduce to a handful of byte-class rules, so this module walks ASCII with a
//! lookup table and asks the regex only for a piece whose outcome depends on a
//! non-ASCII character (a Unicode letter, mark, digit or space could change
//! where the piece ends). The regex stays the reference: every decision here is
//! either the one the regex would make on the same bytes or a hand-off to it,
//! and the reference vectors check the result token by token.
//!
//! The o200k_base pattern, alternatives tried in order (leftmost-first):
//!
//! ```text
//! [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
//! [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
//! \p{N}{1,3}
//!  ?[^\s\p{L}\p{N}]+[\r\n/]*
//! \s*[\r\n]+
//! \s+(?!\S)
//! \s+
//! ```
//!
//! cl100k_base differs in three places: contractions are pieces of their own
//! and come first, a letter run is `\p{L}+` with no upper/lower split, and the
//! punctuation run is followed by `[\r\n]*` (no `/`).

use bpe_openai::Tokenizer;

/// Which pre-tokenization pattern the scanner follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavor {
    O200k,
    Cl100k,
}

const UPPER: u8 = 1;
const LOWER: u8 = 2;
const DIGIT: u8 = 4;
/// `\s` restricted to ASCII: tab, line feed, vertical tab, form feed, carriage return, space.
const SPACE: u8 = 8;
const NEWLINE: u8 = 16;
/// Not a letter, digit or space: `[^\s\p{L}\p{N}]` restricted to ASCII.
const PUNCT: u8 = 32;

const CLASS: [u8; 128] = {
    let mut table = [0u8; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        table[b] = if c.is_ascii_uppercase() {
            UPPER
        } else if c.is_ascii_lowercase() {
            LOWER
        } else if c.is_ascii_digit() {
            DIGIT
        } else if c == b'\r' || c == b'\n' {
            SPACE | NEWLINE
        } else if c == b' ' || c == b'\t' || c == 0x0b || c == 0x0c {
            SPACE
        } else {
            PUNCT
        };
        b += 1;
    }
    table
};

/// The class of the byte at `i`, `None` past the end, or `Err` for a
/// non-ASCII byte, whose class only the regex can tell.
#[inline(always)]
fn class_at(bytes: &[u8], i: usize) -> Result<Option<u8>, NonAscii> {
    match bytes.get(i) {
        None => Ok(None),
        Some(&b) if b < 0x80 => Ok(Some(CLASS[b as usize])),
        Some(_) => Err(NonAscii),
    }
}

/// Raised when a decision depends on a non-ASCII character.
struct NonAscii;

/// Advance past bytes whose class is in `mask`; stops at the end or at a byte
/// outside it, and reports a non-ASCII stop, which may or may not be in the class.
#[inline(always)]
fn run(bytes: &[u8], mut i: usize, mask: u8) -> Result<usize, NonAscii> {
    while let Some(&b) = bytes.get(i) {
        if b >= 0x80 {
            return Err(NonAscii);
        }
        if CLASS[b as usize] & mask == 0 {
            return Ok(i);
        }
        i += 1;
    }
    Ok(i)
}

/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)` at `i`: the end of the contraction, if one is there.
#[inline(always)]
fn contraction(bytes: &[u8], i: usize) -> Result<Option<usize>, NonAscii> {
    if bytes.get(i) != Some(&b'\'') {
        return Ok(None);
    }
    // Case-insensitive matching is Unicode-aware ('s also matches U+017F), so
    // any non-ASCII byte right after the apostrophe goes to the regex.
    let lower = |j: usize| -> Result<Option<u8>, NonAscii> {
        match bytes.get(j) {
            None => Ok(None),
            Some(&b) if b < 0x80 => Ok(Some(b.to_ascii_lowercase())),
            Some(_) => Err(NonAscii),
        }
    };
    Ok(match lower(i + 1)? {
        Some(b's' | b't' | b'm' | b'd') => Some(i + 2),
        Some(b'r') if lower(i + 2)? == Some(b'e') => Some(i + 3),
        Some(b'v') if lower(i + 2)? == Some(b'e') => Some(i + 3),
        Some(b'l') if lower(i + 2)? == Some(b'l') => Some(i + 3),
        _ => None,
    })
}

/// The end of the piece that starts at `p`, decided on ASCII alone.
fn ascii_piece(bytes: &[u8], p: usize, flavor: Flavor) -> Result<usize, NonAscii> {
    let c0 = class_at(bytes, p)?.unwrap_or(0);

    if flavor == Flavor::Cl100k {
        if let Some(end) = contraction(bytes, p)? {
            return Ok(end);
        }
    }

    // Letters, after at most one character that is not a line break, letter or digit.
    let letters = if c0 & (UPPER | LOWER) != 0 {
        Some(p)
    } else if c0 & (NEWLINE | DIGIT) == 0 {
        match class_at(bytes, p + 1)? {
            Some(c1) if c1 & (UPPER | LOWER) != 0 => Some(p + 1),
            _ => None,
        }
    } else {
        None
    };
    if let Some(start) = letters {
        return match flavor {
            Flavor::Cl100k => run(bytes, start, UPPER | LOWER),
            Flavor::O200k => {
                let upper_end = run(bytes, start, UPPER)?;
                let lower_end = run(bytes, upper_end, LOWER)?;
                // Upper* Lower+ when a lowercase letter follows, else Upper+.
                let end = if lower_end > upper_end {
                    lower_end
                } else {
                    upper_end
                };
                Ok(contraction(bytes, end)?.unwrap_or(end))
            }
        };
    }

    if c0 & DIGIT != 0 {
        let mut end = p + 1;
        while end < p + 3 {
            match class_at(bytes, end)? {
                Some(DIGIT) => end += 1,
                _ => break,
            }
        }
        return Ok(end);
    }

    // An optional space, then punctuation, then line breaks (and, in o200k, slashes).
    let punct = if c0 & PUNCT != 0 {
        Some(p)
    } else if bytes[p] == b' ' && class_at(bytes, p + 1)? == Some(PUNCT) {
        Some(p + 1)
    } else {
        None
    };
    if let Some(start) = punct {
        let mut end = run(bytes, start, PUNCT)?;
        while let Some(&b) = bytes.get(end) {
            if b == b'\r' || b == b'\n' || (flavor == Flavor::O200k && b == b'/') {
                end += 1;
            } else {
                break;
            }
        }
        return Ok(end);
    }

    // Only white space is left.
    let end = run(bytes, p, SPACE)?;
    if let Some(last_break) = bytes[p..end]
        .iter()
        .rposition(|&b| b == b'\r' || b == b'\n')
    {
        // \s*[\r\n]+ ends at the last line break of the run.
        return Ok(p + last_break + 1);
    }
    if end == bytes.len() || end - p == 1 {
        // \s+(?!\S) at the end of the text, or \s+ for a single space.
        Ok(end)
    } else {
        // \s+(?!\S): leave the last space to start the next piece.
        Ok(end - 1)
    }
}

/// The pieces of `text`, in order, covering it exactly.
pub(crate) struct Pieces<'a> {
    text: &'a str,
    pos: usize,
    flavor: Flavor,
    regex: &'a Tokenizer,
}

impl<'a> Pieces<'a> {
    pub(crate) fn new(text: &'a str, flavor: Flavor, regex: &'a Tokenizer) -> Self {
        Self {
            text,
            pos: 0,
            flavor,
            regex,
        }
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        let start = self.pos;
        if start >= self.text.len() {
            return None;
        }
        let end = match ascii_piece(self.text.as_bytes(), start, self.flavor) {
            Ok(end) => end,
            // The pattern has no look-behind and is anchored, so the piece at
            // `start` depends only on the text from `start` on.
            Err(NonAscii) => {
                let rest = self.text.get(start..)?;
                start + self.regex.split(rest).next().map_or(rest.len(), str::len)
            }
        };
        self.pos = end;
        self.text.get(start..end)
    }
}
