//! The byte-pair encoder, reading its tables in place from the binary.
//!
//! The algorithm is `bpe`'s backtracking encoder (github.com/github/rust-gems,
//! MIT): take the longest token at the current position; keep it if BPE
//! would not merge across its boundary with the previous token, else try the
//! next shorter token with the same start, and backtrack when none is left.
//! It is linear in time on any input and gives tiktoken's ids exactly.
//!
//! The tables are `bpe-openai`'s, laid out by `build.rs` as little-endian
//! arrays embedded with `include_bytes!` and read where they lie: nothing is
//! decompressed or copied to the heap, the pages are shared and clean, and
//! only the pages that text actually reaches become resident. The
//! leftmost-longest Aho-Corasick automaton of `bpe` is replaced by a trie
//! (the encoder only ever matches at the start of the text), and its merge
//! hash table by one laid out here.

/// `u32`s stored little-endian in embedded bytes.
#[derive(Clone, Copy)]
struct U32s(&'static [u8]);

impl U32s {
    #[inline(always)]
    fn get(self, i: usize) -> u32 {
        let at = i * 4;
        match self.0.get(at..at + 4) {
            Some(&[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]),
            _ => NONE,
        }
    }

    fn len(self) -> usize {
        self.0.len() / 4
    }
}

/// No token (and an out-of-range read, which the tables never cause).
const NONE: u32 = u32::MAX;

/// One encoding's tables (see `build.rs`).
pub(crate) struct Bpe {
    /// The tokens' bytes, concatenated.
    tokens: &'static [u8],
    /// Where each token starts in `tokens`; one more entry than tokens.
    starts: U32s,
    /// The two tokens each token was merged from (itself twice for a byte).
    split: U32s,
    /// The next shorter token that is a prefix of each token, or `NONE`.
    prefix: U32s,
    /// The merges: open-addressing slots of (left, right, merged) by
    /// `piece_hash::pair_slot`; merged is `NONE` in an empty slot.
    pairs: U32s,
    /// A byte per slot of `pairs` (`piece_hash::pair_tag`; 0: empty), so
    /// that most probes do not read the slot.
    pair_tags: &'static [u8],
    /// The tokens' trie, breadth first, two `u32`s a node: the first of its
    /// children (which run to the next node's first child), and the token
    /// it spells or `NONE`. `trie_label` holds each node's byte; a node's
    /// children are in byte order.
    trie_nodes: U32s,
    trie_label: &'static [u8],
    /// The trie node of each two-byte prefix, `NONE` if no token starts so.
    trie_depth2: U32s,
    /// The longest token's length, then an open-addressing table of token
    /// id + 1 (0: empty) by `piece_hash::hash` of the token's bytes.
    vocab: U32s,
}

/// One table of an encoding, as `build.rs` wrote it to OUT_DIR.
macro_rules! part {
    ($name:literal, $part:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".", $part))
    };
}

macro_rules! embedded {
    ($name:literal) => {
        Bpe {
            tokens: part!($name, "tokens"),
            starts: U32s(part!($name, "starts")),
            split: U32s(part!($name, "split")),
            prefix: U32s(part!($name, "prefix")),
            pairs: U32s(part!($name, "pairs")),
            pair_tags: part!($name, "pair_tags"),
            trie_nodes: U32s(part!($name, "trie_nodes")),
            trie_label: part!($name, "trie_label"),
            trie_depth2: U32s(part!($name, "trie_depth2")),
            vocab: U32s(part!($name, "vocab")),
        }
    };
}

pub(crate) static O200K_BASE: Bpe = embedded!("o200k_base");
pub(crate) static CL100K_BASE: Bpe = embedded!("cl100k_base");

impl Bpe {
    pub(crate) fn num_tokens(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    #[inline]
    fn token_len(&self, token: u32) -> usize {
        let t = token as usize;
        self.starts.get(t + 1).wrapping_sub(self.starts.get(t)) as usize
    }

    pub(crate) fn token_bytes(&self, token: u32) -> &'static [u8] {
        let t = token as usize;
        let (start, end) = (self.starts.get(t) as usize, self.starts.get(t + 1) as usize);
        self.tokens.get(start..end).unwrap_or_default()
    }

    /// The token whose bytes are all of `piece`, if there is one: most
    /// pre-tokenized pieces (a word with its leading space, a run of
    /// punctuation) are, and one hash probe answers them.
    #[inline]
    pub(crate) fn whole_token(&self, piece: &[u8]) -> Option<u32> {
        if piece.len() > self.vocab.get(0) as usize {
            return None;
        }
        let mask = self.vocab.len().wrapping_sub(2);
        let mut i = super::piece_hash::hash(piece) as usize & mask;
        loop {
            let slot = self.vocab.get(1 + i);
            if slot == 0 || slot == NONE {
                return None;
            }
            if self.token_bytes(slot - 1) == piece {
                return Some(slot - 1);
            }
            i = (i + 1) & mask;
        }
    }

    /// The longest token that `text` starts with (every byte is a token, so
    /// there is one unless `text` is empty).
    #[inline]
    pub(crate) fn longest_prefix(&self, text: &[u8]) -> Option<u32> {
        let (&b0, rest) = text.split_first()?;
        // The root's children are nodes 1..=256, one per byte in order.
        let first = self.trie_nodes.get(2 * (1 + b0 as usize) + 1);
        let mut best = (first != NONE).then_some(first);
        let Some((&b1, rest)) = rest.split_first() else {
            return best;
        };
        let mut node = self
            .trie_depth2
            .get(usize::from(b0) * 256 + usize::from(b1)) as usize;
        if node == NONE as usize {
            return best;
        }
        let mut rest = rest;
        loop {
            let token = self.trie_nodes.get(2 * node + 1);
            if token != NONE {
                best = Some(token);
            }
            let Some((&byte, tail)) = rest.split_first() else {
                return best;
            };
            let lo = self.trie_nodes.get(2 * node) as usize;
            let hi = self.trie_nodes.get(2 * node + 2) as usize;
            let Some(labels) = self.trie_label.get(lo..hi) else {
                return best;
            };
            match labels.binary_search(&byte) {
                Ok(i) => node = lo + i,
                Err(_) => return best,
            }
            rest = tail;
        }
    }

    /// The token merged from `left` and `right`, if BPE has that merge.
    #[inline]
    fn merged(&self, left: u32, right: u32) -> Option<u32> {
        let mask = self.pair_tags.len().wrapping_sub(1);
        let tag = super::piece_hash::pair_tag(left, right);
        let mut i = super::piece_hash::pair_slot(left, right, mask);
        loop {
            match self.pair_tags.get(i) {
                None | Some(0) => return None,
                Some(&t) if t == tag => {
                    if self.pairs.get(3 * i) == left && self.pairs.get(3 * i + 1) == right {
                        return Some(self.pairs.get(3 * i + 2));
                    }
                }
                Some(_) => {}
            }
            i = (i + 1) & mask;
        }
    }

    /// Whether BPE, encoding the bytes of `token1` followed by those of
    /// `token2`, keeps the boundary between them (`bpe`'s
    /// `is_valid_token_pair`): unmerge both towards the boundary and check
    /// that no merge across it has a lower rank than the merges on each side.
    fn is_valid_pair(&self, mut token1: u32, mut token2: u32) -> bool {
        let mut limit = u32::MAX;
        loop {
            if let Some(combined) = self.merged(token1, token2) {
                if combined < limit {
                    return false;
                }
            }
            if token1 > token2 {
                limit = token1;
                token1 = self.split.get(2 * token1 as usize + 1);
                if token1 == limit {
                    limit = token2 + 1;
                    token2 = self.split.get(2 * token2 as usize);
                    if token2 + 1 == limit {
                        return true;
                    }
                }
            } else {
                limit = token2 + 1;
                token2 = self.split.get(2 * token2 as usize);
                if token2 + 1 == limit {
                    limit = token1;
                    token1 = self.split.get(2 * token1 as usize + 1);
                    if token1 == limit {
                        return true;
                    }
                }
            }
        }
    }

    /// The tokens of `text`, appended to `out`.
    pub(crate) fn encode_into(&self, text: &[u8], out: &mut Vec<u32>) {
        let base = out.len();
        let mut reachable = BitField::new(text.len() + 1);
        let mut pos = 0;
        let mut next = self.longest_prefix(text);
        while let Some(mut token) = next {
            let last = if out.len() > base {
                out.last().copied()
            } else {
                None
            };
            loop {
                let end = pos + self.token_len(token);
                if reachable.is_set(end) && last.is_none_or(|l| self.is_valid_pair(l, token)) {
                    out.push(token);
                    pos = end;
                    next = self.longest_prefix(text.get(end..).unwrap_or_default());
                    break;
                }
                let shorter = self.prefix.get(token as usize);
                if shorter != NONE {
                    token = shorter;
                } else {
                    // No token at `pos` leads on: `pos` is unreachable, so
                    // drop the last token and try its shorter ones.
                    reachable.clear(pos);
                    if out.len() > base {
                        out.pop();
                    }
                    pos -= last.map_or(0, |t| self.token_len(t));
                    next = last;
                    break;
                }
            }
        }
    }

    /// How many tokens `text` encodes to.
    pub(crate) fn count(&self, text: &[u8]) -> usize {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, &mut out);
        out.len()
    }

    /// The bytes of `ids` (which must be in range).
    pub(crate) fn decode(&self, ids: &[u32]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.token_bytes(id));
        }
        bytes
    }
}

/// One bit per text position, all set at first: cleared when no encoding of
/// the text up to there can go on.
struct BitField(Vec<u64>);

impl BitField {
    fn new(bits: usize) -> Self {
        BitField(vec![u64::MAX; bits.div_ceil(64)])
    }

    #[inline]
    fn is_set(&self, bit: usize) -> bool {
        self.0
            .get(bit / 64)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }

    #[inline]
    fn clear(&mut self, bit: usize) {
        if let Some(w) = self.0.get_mut(bit / 64) {
            *w &= !(1 << (bit % 64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every token of both encodings is found by each table: the trie's
    /// longest match on a token's own bytes is that token, the whole-token
    /// probe finds it, and a merged token is the merge of its split.
    #[test]
    fn every_token_is_found_in_every_table() {
        for bpe in [&O200K_BASE, &CL100K_BASE] {
            // The root's children are the nodes 1..=256, bytes in order.
            assert_eq!(bpe.trie_nodes.get(0), 1);
            assert_eq!(bpe.trie_nodes.get(2), 257);
            for byte in 0..=255u8 {
                assert_eq!(bpe.trie_label.get(1 + usize::from(byte)), Some(&byte));
            }
            for t in 0..bpe.num_tokens() as u32 {
                let bytes = bpe.token_bytes(t);
                assert_eq!(bpe.longest_prefix(bytes), Some(t), "token {t}");
                assert_eq!(bpe.whole_token(bytes), Some(t), "token {t}");
                let (left, right) = (
                    bpe.split.get(2 * t as usize),
                    bpe.split.get(2 * t as usize + 1),
                );
                if left != t {
                    assert_eq!(bpe.merged(left, right), Some(t), "token {t}");
                    assert_eq!(bpe.token_len(left) + bpe.token_len(right), bytes.len());
                }
            }
            assert_eq!(bpe.longest_prefix(b""), None);
            assert_eq!(bpe.whole_token(&[b'x'; 300]), None);
        }
    }
}
