//! Trims `bpe-openai`'s byte-pair encodings to what tokenwarden's counter
//! reads, and embeds them compressed.
//!
//! `bpe-openai` embeds each encoding with three Aho-Corasick automata: one
//! for the leftmost-longest match, which the backtracking encoder walks, and
//! two for its appendable and prependable encoders, which tokenwarden never
//! calls, plus a hash table for its table encoder, also never called. Loaded,
//! o200k_base took 33 MB of heap plus 32 MB of embedded pages that stayed
//! resident. Here the two unused automata are replaced by a one-pattern
//! automaton and the unused table by an empty one, so the same encoder runs on
//! the same data, and the result is stored DEFLATE-compressed (decompressed as
//! it is read, once per process). `tokens::tests` checks the trimmed encoders
//! against OpenAI's reference token ids.

// A build script reports failure by panicking.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::PathBuf;

use serde::de::{Deserializer, IgnoredAny, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

/// A serialized automaton, kept as its bytes.
struct Automaton(Vec<u8>);

impl Serialize for Automaton {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Automaton {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl Visitor<'_> for Bytes {
            type Value = Automaton;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an automaton's bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Automaton, E> {
                Ok(Automaton(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Automaton, E> {
                Ok(Automaton(v))
            }
        }
        d.deserialize_bytes(Bytes)
    }
}

/// `bpe::byte_pair_encoding::BytePairEncoding`, field for field, as
/// `rmp-serde` writes it (a struct is an array, so the order is what counts).
#[derive(Deserialize)]
struct Full {
    all_tokens: Vec<u8>,
    token_starts: Vec<u32>,
    _bytes_hash_to_token: IgnoredAny,
    split_table: Vec<(u32, u32)>,
    pair_lookup: BTreeMap<(u32, u32), u32>,
    longest_searcher: Automaton,
    _overlapping_searcher: IgnoredAny,
    _overlapping_searcher_rev: IgnoredAny,
    next_prefix_match: Vec<u32>,
    hash_factor: u64,
}

#[derive(Serialize)]
struct Trimmed {
    all_tokens: Vec<u8>,
    token_starts: Vec<u32>,
    bytes_hash_to_token: BTreeMap<u32, u32>,
    split_table: Vec<(u32, u32)>,
    pair_lookup: BTreeMap<(u32, u32), u32>,
    longest_searcher: Automaton,
    overlapping_searcher: Automaton,
    overlapping_searcher_rev: Automaton,
    next_prefix_match: Vec<u32>,
    hash_factor: u64,
}

fn trim(name: &str, tokenizer: &bpe_openai::Tokenizer, out: &std::path::Path) {
    let full = rmp_serde::to_vec(&tokenizer.bpe).expect("the encoding serializes");
    let full: Full = rmp_serde::from_slice(&full).expect("the encoding has bpe 0.2's layout");
    let placeholder = aneubeck_daachorse::DoubleArrayAhoCorasick::<u32>::new([[0u8]])
        .expect("a one-pattern automaton builds")
        .serialize();
    let trimmed = Trimmed {
        all_tokens: full.all_tokens,
        token_starts: full.token_starts,
        bytes_hash_to_token: BTreeMap::new(),
        split_table: full.split_table,
        pair_lookup: full.pair_lookup,
        longest_searcher: full.longest_searcher,
        overlapping_searcher: Automaton(placeholder.clone()),
        overlapping_searcher_rev: Automaton(placeholder),
        next_prefix_match: full.next_prefix_match,
        hash_factor: full.hash_factor,
    };
    let bytes = rmp_serde::to_vec(&trimmed).expect("the trimmed encoding serializes");
    let file = std::fs::File::create(out.join(format!("{name}.bpe.deflate")))
        .expect("OUT_DIR is writable");
    let mut encoder = flate2::write::DeflateEncoder::new(file, flate2::Compression::best());
    encoder.write_all(&bytes).expect("OUT_DIR is writable");
    encoder.finish().expect("OUT_DIR is writable");
}

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    trim("o200k_base", bpe_openai::o200k_base(), &out);
    trim("cl100k_base", bpe_openai::cl100k_base(), &out);
    println!("cargo::rerun-if-changed=build.rs");
}
