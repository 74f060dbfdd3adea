//! Token counting: text in OpenAI's encodings, and whole request bodies as the
//! API bills their prompts. Pure functions, no I/O.
//!
//! Text counts are exact: the same ids as OpenAI's `tiktoken`
//! (`encode_ordinary`), checked against reference vectors. They are built on
//! `bpe-openai`'s vocabularies and `bpe`'s backtracking encoder, which is
//! linear in time on any input (no quadratic blow-up on long runs without
//! spaces), over tables that `build.rs` lays out to be read in place from
//! the binary (`bpe`), and an ASCII pre-tokenizer of our own (`pretokenize`),
//! measured in `docs/benchmarks.md`.

use std::sync::LazyLock;

use bpe_openai::Tokenizer;
use serde::{Deserialize, Serialize};

mod bpe;
pub mod image;
mod piece_hash;
mod pretokenize;
pub mod request;

use bpe::Bpe;
use bpe_openai::byte_pair_encoding::BytePairEncoding;
use pretokenize::{Flavor, Pieces};

/// A byte-pair encoding of OpenAI's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1, o3, o4 families.
    O200kBase,
    /// gpt-4, gpt-3.5-turbo, text-embedding-3-*.
    Cl100kBase,
}

struct Engine {
    /// The vocabulary and the encoder, read in place from the binary.
    bpe: &'static Bpe,
    /// `bpe-openai`'s pre-tokenizer, which decides non-ASCII pieces (its
    /// encoding is a one-token placeholder: only its regex is used).
    regex: Tokenizer,
    flavor: Flavor,
}

/// OpenAI's pre-tokenization patterns, as `bpe-openai` writes them: its
/// regex engine has no look-ahead, so `\s+(?!\S)` becomes the second
/// pattern, whose last character is dropped from the match.
const O200K_PATTERN: &str = concat!(
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|\\p{N}{1,3}",
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*",
    "|\\s*[\\r\\n]+",
    "|\\s+$",
);
const CL100K_PATTERN: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+$";

impl Engine {
    #[allow(clippy::expect_used)] // the patterns are constants, tested
    fn new(bpe: &'static Bpe, pattern: &str, flavor: Flavor) -> Self {
        let placeholder = BytePairEncoding::from_dictionary([vec![0u8]], Some(1));
        let patterns = [(pattern, false), ("\\s+\\s", true), ("\\s+", false)];
        let regex = Tokenizer::new_lookahead(placeholder, &patterns, false).expect("valid regex");
        Engine { bpe, regex, flavor }
    }
}

static O200K: LazyLock<Engine> =
    LazyLock::new(|| Engine::new(&bpe::O200K_BASE, O200K_PATTERN, Flavor::O200k));
static CL100K: LazyLock<Engine> =
    LazyLock::new(|| Engine::new(&bpe::CL100K_BASE, CL100K_PATTERN, Flavor::Cl100k));

impl Encoding {
    pub const ALL: [Encoding; 2] = [Encoding::O200kBase, Encoding::Cl100kBase];

    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }

    fn engine(self) -> &'static Engine {
        match self {
            Encoding::O200kBase => &O200K,
            Encoding::Cl100kBase => &CL100K,
        }
    }

    /// Load the vocabulary now (tens of milliseconds), so that the first
    /// request does not pay for it.
    pub fn warm_up(self) {
        let _ = self.engine();
    }

    /// The number of tokens of `text`, as `tiktoken`'s `encode_ordinary` counts
    /// them (special tokens are ordinary text).
    pub fn count(self, text: &str) -> u64 {
        let engine = self.engine();
        let bpe = engine.bpe;
        let mut total = 0u64;
        for piece in Pieces::new(text, engine.flavor, &engine.regex) {
            let bytes = piece.as_bytes();
            total += match bpe.whole_token(bytes) {
                Some(_) => 1,
                None => bpe.count(bytes) as u64,
            };
        }
        total
    }

    /// The token ids of `text`, as `tiktoken`'s `encode_ordinary` gives them.
    pub fn encode(self, text: &str) -> Vec<u32> {
        let engine = self.engine();
        let mut ids = Vec::with_capacity(text.len() / 3);
        for piece in Pieces::new(text, engine.flavor, &engine.regex) {
            let bytes = piece.as_bytes();
            match engine.bpe.whole_token(bytes) {
                Some(id) => ids.push(id),
                None => engine.bpe.encode_into(bytes, &mut ids),
            }
        }
        ids
    }

    /// The text of `ids`, if they decode to UTF-8.
    pub fn decode(self, ids: &[u32]) -> Option<String> {
        let bpe = self.engine().bpe;
        if ids.iter().any(|&id| id as usize >= bpe.num_tokens()) {
            return None;
        }
        String::from_utf8(bpe.decode(ids)).ok()
    }
}

/// How far a count can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Exactness {
    /// What the API bills, token for token.
    Exact,
    /// At least what the API bills (an image whose size is unknown counted
    /// at its largest cost).
    UpperBound,
    /// OpenAI's documented formula, which it calls an estimate (tool
    /// definitions), or a part the body does not hold (`previous_response_id`).
    Estimate,
}

/// A token count and how far it can be trusted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Count {
    pub tokens: u64,
    pub exactness: Exactness,
    /// Why the count is not exact, one line per reason.
    pub notes: Vec<&'static str>,
}

impl Count {
    pub fn exact(tokens: u64) -> Self {
        Count {
            tokens,
            exactness: Exactness::Exact,
            notes: Vec::new(),
        }
    }

    pub fn add(&mut self, tokens: u64) {
        self.tokens = self.tokens.saturating_add(tokens);
    }

    /// Add tokens that are less trustworthy than exact, with the reason.
    pub fn add_inexact(&mut self, tokens: u64, exactness: Exactness, note: &'static str) {
        self.add(tokens);
        self.exactness = self.exactness.max(exactness);
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }

    pub fn merge(&mut self, other: Count) {
        self.add(other.tokens);
        self.exactness = self.exactness.max(other.exactness);
        for note in other.notes {
            if !self.notes.contains(&note) {
                self.notes.push(note);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_example() {
        assert_eq!(
            Encoding::O200kBase.count("You miss 100% of the shots you don't take"),
            11
        );
    }

    #[test]
    fn count_matches_encode_on_tricky_text() {
        for text in [
            "",
            " ",
            "  \n\n  x",
            "don't DON'T Don'T they'RE",
            "HELLOworld helloWorld ABCdefGHI",
            "1234567 12.5% 0xdeadbeef",
            "a//b\n//\r\n\t\tfoo",
            "naïve café 中文 🎉 'ſ x\u{a0}y",
        ] {
            for enc in Encoding::ALL {
                let ids = enc.encode(text);
                assert_eq!(enc.count(text), ids.len() as u64, "{enc:?} {text:?}");
                assert_eq!(enc.decode(&ids).as_deref(), Some(text));
            }
        }
    }
}
