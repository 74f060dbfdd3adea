//! Lays out `bpe-openai`'s byte-pair encodings as tables that the counter
//! reads in place from the binary (`src/tokens/bpe.rs`).
//!
//! `bpe-openai` embeds each encoding serialized with three Aho-Corasick
//! automata and two hash tables, and deserializes it onto the heap: loaded,
//! o200k_base took 33 MB of heap plus 32 MB of embedded pages that stayed
//! resident. Its backtracking encoder reads only the leftmost-longest match
//! from the start of the text, the next shorter prefix of a token, a token's
//! split and the merge of two tokens. Here those become little-endian arrays
//! written to OUT_DIR: the tokens' bytes and starts, the splits, the next
//! prefixes, an open-addressing merge table with a tag byte per slot, a
//! breadth-first trie of the tokens with a two-byte jump table, and a
//! whole-token table for single-token pieces. Nothing is copied at run time,
//! and only the pages that text reaches become resident. The reference
//! vectors and the property tests check the result against OpenAI's ids and
//! against `bpe-openai` itself.

// A build script reports failure by panicking.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::de::IgnoredAny;
use serde::Deserialize;

#[path = "src/tokens/piece_hash.rs"]
mod piece_hash;

/// The merges: open-addressing slots of (left, right, merged) by
/// `piece_hash::pair_slot`, a power of two at a load under 1/2; an empty
/// slot has merged = u32::MAX.
/// Beside them, a byte per slot (`piece_hash::pair_tag`, 0 when empty)
/// answers most probes without reading the slot.
fn pairs(pair_lookup: &BTreeMap<(u32, u32), u32>) -> (Vec<u8>, Vec<u8>) {
    let size = (pair_lookup.len() * 2).next_power_of_two();
    let mut slots = vec![(0u32, 0u32, u32::MAX); size];
    let mut tags = vec![0u8; size];
    for (&(left, right), &merged) in pair_lookup {
        let mut i = piece_hash::pair_slot(left, right, size - 1);
        while slots[i].2 != u32::MAX {
            i = (i + 1) & (size - 1);
        }
        slots[i] = (left, right, merged);
        tags[i] = piece_hash::pair_tag(left, right);
    }
    (
        u32s(slots.into_iter().flat_map(|(l, r, m)| [l, r, m])),
        tags,
    )
}

/// The whole-token table: the longest token's length, then open-addressing
/// slots of token id + 1 (0: empty), a power of two at a load under 1/2.
fn vocab(all_tokens: &[u8], token_starts: &[u32]) -> Vec<u8> {
    let n = token_starts.len() - 1;
    let size = (n * 2).next_power_of_two();
    let mut slots = vec![0u32; size];
    let mut longest = 0;
    for (id, w) in token_starts.windows(2).enumerate() {
        let bytes = &all_tokens[w[0] as usize..w[1] as usize];
        longest = longest.max(bytes.len() as u32);
        let mut i = piece_hash::hash(bytes) as usize & (size - 1);
        while slots[i] != 0 {
            i = (i + 1) & (size - 1);
        }
        slots[i] = id as u32 + 1;
    }
    u32s(std::iter::once(longest).chain(slots))
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
    _longest_searcher: IgnoredAny,
    _overlapping_searcher: IgnoredAny,
    _overlapping_searcher_rev: IgnoredAny,
    next_prefix_match: Vec<u32>,
    _hash_factor: IgnoredAny,
}

/// Little-endian `u32`s.
fn u32s(values: impl IntoIterator<Item = u32>) -> Vec<u8> {
    values.into_iter().flat_map(u32::to_le_bytes).collect()
}

/// A trie of the tokens' bytes, its nodes numbered breadth first with
/// children in byte order, so that a node's children are the contiguous run
/// `first[node]..first[node + 1]` and can be searched by label.
struct Trie {
    first: Vec<u32>,
    label: Vec<u8>,
    token: Vec<u32>,
    /// The node of each two-byte prefix (`first byte * 256 + second`), or
    /// u32::MAX: the walk's first two steps in one read.
    depth2: Vec<u32>,
}

fn trie(all_tokens: &[u8], token_starts: &[u32]) -> Trie {
    // Build with maps, then renumber breadth first.
    let mut children: Vec<BTreeMap<u8, usize>> = vec![BTreeMap::new()];
    let mut token_of: Vec<u32> = vec![u32::MAX];
    for (id, w) in token_starts.windows(2).enumerate() {
        let mut node = 0;
        for &b in &all_tokens[w[0] as usize..w[1] as usize] {
            node = match children[node].get(&b) {
                Some(&child) => child,
                None => {
                    children.push(BTreeMap::new());
                    token_of.push(u32::MAX);
                    let child = children.len() - 1;
                    children[node].insert(b, child);
                    child
                }
            };
        }
        token_of[node] = id as u32;
    }
    let mut order = vec![(0usize, 0u8)];
    let mut i = 0;
    let mut first = Vec::with_capacity(children.len() + 1);
    while i < order.len() {
        let (node, _) = order[i];
        first.push(order.len() as u32);
        order.extend(children[node].iter().map(|(&b, &child)| (child, b)));
        i += 1;
    }
    first.push(order.len() as u32);
    let label: Vec<u8> = order.iter().map(|&(_, b)| b).collect();
    let mut depth2 = vec![u32::MAX; 65536];
    for b0 in 0..first[1] - first[0] {
        let node = (first[0] + b0) as usize;
        for child in first[node]..first[node + 1] {
            depth2[usize::from(label[node]) * 256 + usize::from(label[child as usize])] = child;
        }
    }
    Trie {
        first,
        label,
        token: order.iter().map(|&(node, _)| token_of[node]).collect(),
        depth2,
    }
}

fn trim(name: &str, tokenizer: &bpe_openai::Tokenizer, out: &std::path::Path) {
    let full = rmp_serde::to_vec(&tokenizer.bpe).expect("the encoding serializes");
    let full: Full = rmp_serde::from_slice(&full).expect("the encoding has bpe 0.2's layout");
    let (pairs, pair_tags) = pairs(&full.pair_lookup);
    let trie = trie(&full.all_tokens, &full.token_starts);
    let vocab = vocab(&full.all_tokens, &full.token_starts);
    let files: [(&str, Vec<u8>); 10] = [
        ("vocab", vocab),
        ("tokens", full.all_tokens),
        ("starts", u32s(full.token_starts)),
        (
            "split",
            u32s(full.split_table.iter().flat_map(|&(l, r)| [l, r])),
        ),
        ("prefix", u32s(full.next_prefix_match)),
        ("pairs", pairs),
        ("pair_tags", pair_tags),
        ("trie_depth2", u32s(trie.depth2)),
        (
            "trie_nodes",
            u32s(
                trie.first
                    .iter()
                    .zip(trie.token.iter().chain([&u32::MAX]))
                    .flat_map(|(&f, &t)| [f, t]),
            ),
        ),
        ("trie_label", trie.label),
    ];
    for (part, bytes) in files {
        std::fs::write(out.join(format!("{name}.{part}")), bytes).expect("OUT_DIR is writable");
    }
}

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    trim("o200k_base", bpe_openai::o200k_base(), &out);
    trim("cl100k_base", bpe_openai::cl100k_base(), &out);
    println!("cargo::rerun-if-changed=build.rs");
    // The tables' hashes are shared with the counter: a change there must
    // lay the tables out again.
    println!("cargo::rerun-if-changed=src/tokens/piece_hash.rs");
}
