//! Byte-pair encoding over OpenAI's vocabularies, exactly as `tiktoken`
//! merges, in a few megabytes.
//!
//! The vocabulary is OpenAI's own `.tiktoken` file (base64 token, rank per
//! line; `vocab/` holds the two, compressed), read once: the tokens' bytes
//! end to end, their offsets, and an open-addressing table from bytes to
//! rank ([`Vocab`]). A token's rank is its id and its merge priority.
//!
//! A piece is merged as `tiktoken`'s `byte_pair_merge` does: start from its
//! bytes, repeatedly join the adjacent pair whose joined bytes have the
//! lowest rank (the leftmost of equals), until no joined pair is a token.
//! Short pieces use that algorithm as written (a scan per merge); long ones
//! (a run of punctuation can be a megabyte) use the same choice order kept in
//! a heap with a linked list, so a piece costs O(n log n), never O(n²).
//!
//! The pre-tokenization regex for what the ASCII fast path does not decide
//! follows `bpe-openai` (MIT): `tiktoken`'s pattern, with its negative
//! look-ahead `\s+(?!\S)` rewritten as a pattern `\s+\s` whose last
//! character is dropped from the match.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Read;

use base64::Engine as _;
use regex_automata::meta::Regex;
use regex_automata::{Anchored, Input};

use super::vocab::Vocab;

/// A vocabulary: every token's bytes, by rank.
pub(crate) struct Bpe {
    bytes: Vec<u8>,
    /// `starts[r]..starts[r + 1]` are token `r`'s bytes.
    starts: Vec<u32>,
    vocab: Vocab,
}

/// Pieces longer than this merge through the heap.
const LONG: usize = 128;

impl Bpe {
    /// Read a gzipped `.tiktoken` file (`base64 rank` per line, ranks 0..n).
    pub(crate) fn from_tiktoken_gz(gz: &[u8]) -> Result<Bpe, String> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut text)
            .map_err(|e| format!("vocabulary: {e}"))?;
        let mut tokens: Vec<Option<Vec<u8>>> = Vec::with_capacity(200_064);
        for (n, line) in text.lines().enumerate() {
            let (token, rank) = line
                .split_once(' ')
                .ok_or_else(|| format!("vocabulary line {}: no rank", n + 1))?;
            let rank: usize = rank
                .trim()
                .parse()
                .map_err(|_| format!("vocabulary line {}: bad rank", n + 1))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(token)
                .map_err(|_| format!("vocabulary line {}: bad base64", n + 1))?;
            if tokens.len() <= rank {
                tokens.resize(rank + 1, None);
            }
            tokens[rank] = Some(bytes);
        }
        let mut bytes = Vec::with_capacity(tokens.iter().flatten().map(Vec::len).sum());
        let mut starts = Vec::with_capacity(tokens.len() + 1);
        for (rank, token) in tokens.iter().enumerate() {
            let token = token
                .as_ref()
                .ok_or_else(|| format!("vocabulary: no token of rank {rank}"))?;
            starts.push(bytes.len() as u32);
            bytes.extend_from_slice(token);
        }
        starts.push(bytes.len() as u32);
        let n = tokens.len();
        drop(tokens);
        let token_bytes =
            |r: u32| &bytes[starts[r as usize] as usize..starts[r as usize + 1] as usize];
        let vocab = Vocab::build(n, token_bytes);
        Ok(Bpe {
            bytes,
            starts,
            vocab,
        })
    }

    pub(crate) fn num_tokens(&self) -> usize {
        self.starts.len() - 1
    }

    #[inline]
    pub(crate) fn token_bytes(&self, rank: u32) -> &[u8] {
        let r = rank as usize;
        &self.bytes[self.starts[r] as usize..self.starts[r + 1] as usize]
    }

    /// The rank of the token whose bytes are exactly `bytes`.
    #[inline]
    pub(crate) fn rank(&self, bytes: &[u8]) -> Option<u32> {
        self.vocab.get(bytes, |r| self.token_bytes(r))
    }

    #[inline]
    fn rank_or_max(&self, bytes: &[u8]) -> u32 {
        self.rank(bytes).unwrap_or(u32::MAX)
    }

    /// The starts of `piece`'s tokens, and `piece.len()` last.
    fn boundaries(&self, piece: &[u8]) -> Vec<usize> {
        if piece.len() > LONG {
            return self.boundaries_long(piece);
        }
        // tiktoken's byte_pair_merge: (start, rank of this part joined with the next).
        let mut parts: Vec<(usize, u32)> = Vec::with_capacity(piece.len() + 1);
        let mut min = (u32::MAX, usize::MAX);
        for i in 0..piece.len().saturating_sub(1) {
            let rank = self.rank_or_max(&piece[i..i + 2]);
            if rank < min.0 {
                min = (rank, i);
            }
            parts.push((i, rank));
        }
        parts.push((piece.len().saturating_sub(1), u32::MAX));
        parts.push((piece.len(), u32::MAX));
        let rank_at = |parts: &[(usize, u32)], i: usize| {
            if i + 3 < parts.len() {
                self.rank_or_max(&piece[parts[i].0..parts[i + 3].0])
            } else {
                u32::MAX
            }
        };
        while min.0 != u32::MAX {
            let i = min.1;
            if i > 0 {
                parts[i - 1].1 = rank_at(&parts, i - 1);
            }
            parts[i].1 = rank_at(&parts, i);
            parts.remove(i + 1);
            min = (u32::MAX, usize::MAX);
            for (j, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < min.0 {
                    min = (rank, j);
                }
            }
        }
        parts.into_iter().map(|(start, _)| start).collect()
    }

    /// The same merges, chosen in the same order (lowest rank, then
    /// leftmost), from a heap of candidate pairs over a linked list of parts.
    fn boundaries_long(&self, piece: &[u8]) -> Vec<usize> {
        let n = piece.len();
        // Parts start at byte positions; next/prev link the live ones; n ends.
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        // (rank, left part's start, right part's end): valid while the left
        // part is alive and its next part still ends at `end`.
        let mut heap: BinaryHeap<Reverse<(u32, usize, usize)>> = BinaryHeap::with_capacity(n);
        for i in 0..n.saturating_sub(1) {
            let rank = self.rank_or_max(&piece[i..i + 2]);
            if rank != u32::MAX {
                heap.push(Reverse((rank, i, i + 2)));
            }
        }
        let end_of_pair = |next: &[usize], s: usize| -> Option<usize> {
            let m = next[s];
            if m >= n {
                return None;
            }
            Some(next[m])
        };
        while let Some(Reverse((_, s, end))) = heap.pop() {
            if !alive[s] || end_of_pair(&next, s) != Some(end) {
                continue;
            }
            let m = next[s];
            alive[m] = false;
            next[s] = next[m];
            if next[m] < n {
                prev[next[m]] = s;
            }
            if let Some(e) = end_of_pair(&next, s) {
                let rank = self.rank_or_max(&piece[s..e]);
                if rank != u32::MAX {
                    heap.push(Reverse((rank, s, e)));
                }
            }
            let p = prev[s];
            if p != usize::MAX {
                let e = next[s];
                let rank = self.rank_or_max(&piece[p..e]);
                if rank != u32::MAX {
                    heap.push(Reverse((rank, p, e)));
                }
            }
        }
        let mut out = Vec::new();
        let mut at = 0;
        while at < n {
            out.push(at);
            at = next[at];
        }
        out.push(n);
        out
    }

    /// The number of tokens of one pre-tokenized piece.
    pub(crate) fn count(&self, piece: &[u8]) -> usize {
        if piece.is_empty() {
            return 0;
        }
        if self.rank(piece).is_some() {
            return 1;
        }
        self.boundaries(piece).len() - 1
    }

    /// The token ids of one pre-tokenized piece.
    pub(crate) fn encode(&self, piece: &[u8], out: &mut Vec<u32>) {
        if piece.is_empty() {
            return;
        }
        if let Some(rank) = self.rank(piece) {
            out.push(rank);
            return;
        }
        for w in self.boundaries(piece).windows(2) {
            // Every part left by the merge is a token: single bytes are tokens,
            // and parts only ever join into tokens.
            out.push(self.rank_or_max(&piece[w[0]..w[1]]));
        }
    }

    pub(crate) fn decode(&self, ids: &[u32]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            if id as usize >= self.num_tokens() {
                return None;
            }
            out.extend_from_slice(self.token_bytes(id));
        }
        Some(out)
    }
}

/// `tiktoken`'s pre-tokenization regex, for the pieces that start outside ASCII.
pub(crate) struct Splitter {
    pattern: Regex,
    /// Per pattern: its last character is a look-ahead, dropped from the match.
    lookahead: Vec<bool>,
}

impl Splitter {
    pub(crate) fn new(patterns: &[(&str, bool)]) -> Result<Splitter, String> {
        let (patterns, lookahead): (Vec<&str>, Vec<bool>) = patterns.iter().copied().unzip();
        let pattern = Regex::new_many(&patterns).map_err(|e| e.to_string())?;
        Ok(Splitter { pattern, lookahead })
    }

    /// The length of the piece at the start of `text` (all of it when nothing matches).
    pub(crate) fn first(&self, text: &str) -> usize {
        let input = Input::new(text).anchored(Anchored::Yes);
        let Some(m) = self.pattern.find(input) else {
            return text.len();
        };
        let mut end = m.range().end;
        if self.lookahead[m.pattern().as_usize()] {
            if let Some(last) = text[..end].chars().next_back() {
                end -= last.len_utf8();
            }
        }
        if end == 0 {
            text.chars().next().map_or(text.len(), char::len_utf8)
        } else {
            end
        }
    }
}

/// o200k_base's pattern (gpt-4o and later).
pub(crate) fn o200k_splitter() -> Result<Splitter, String> {
    let main = [
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        "\\p{N}{1,3}",
        " ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*",
        "\\s*[\\r\\n]+",
        "\\s+$",
    ]
    .join("|");
    Splitter::new(&[(&main, false), ("\\s+\\s", true), ("\\s+", false)])
}

/// cl100k_base's pattern (gpt-4, gpt-3.5, text-embedding-3).
pub(crate) fn cl100k_splitter() -> Result<Splitter, String> {
    let main = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+$";
    Splitter::new(&[(main, false), ("\\s+\\s", true), ("\\s+", false)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn vocabularies_are_openais() {
        for (gz, lines, hash) in [
            (
                super::super::O200K_GZ,
                199_998,
                "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
            ),
            (
                super::super::CL100K_GZ,
                100_256,
                "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
            ),
        ] {
            let mut text = Vec::new();
            let read = flate2::read::GzDecoder::new(gz).read_to_end(&mut text);
            assert!(read.is_ok());
            let digest: String = Sha256::digest(&text)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(digest, hash);
            let bpe = Bpe::from_tiktoken_gz(gz).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(bpe.num_tokens(), lines);
        }
    }

    #[test]
    fn the_heap_merges_as_the_scan_does() {
        let bpe = Bpe::from_tiktoken_gz(super::super::O200K_GZ).unwrap_or_else(|e| panic!("{e}"));
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let alphabet = b"!!??..,,;;::--==++**//\\\\()[]{}<>''\"\"``~~##$$%%^^&&||@@ab1 ";
        for len in [2usize, 3, 7, 31, 64, 100, 127] {
            for _ in 0..40 {
                let piece: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        alphabet[(seed % alphabet.len() as u64) as usize]
                    })
                    .collect();
                assert_eq!(
                    bpe.boundaries(&piece),
                    bpe.boundaries_long(&piece),
                    "{:?}",
                    String::from_utf8_lossy(&piece)
                );
            }
        }
    }
}
