//! A direct lookup from a piece's bytes to its token id.
//!
//! Most pre-tokenized pieces (a word with its leading space, a run of
//! punctuation) are a single token of the vocabulary. `bpe`'s encoder finds
//! that out only after allocating and walking its backtracking state, so one
//! hash probe here answers the common case and leaves the encoder the pieces
//! that really split. The table is an open-addressing array of token ids,
//! built once per encoding from the encoder's own token list, so it can never
//! disagree with it.

use bpe_openai::byte_pair_encoding::BytePairEncoding;

pub(crate) struct Vocab {
    /// Token id + 1 per slot; 0 marks an empty slot.
    slots: Vec<u32>,
    /// `slots.len() - 1`; the length is a power of two.
    mask: usize,
    /// Longer pieces cannot be a single token, so they skip the probe.
    longest: usize,
}

/// FxHash-style mixing, eight bytes at a time: fast on short keys, and the
/// keys are the vocabulary and user text, where a collision costs a probe,
/// never a wrong answer (every hit is compared byte for byte).
#[inline(always)]
fn hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = (bytes.len() as u64).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
    }
    h ^ (h >> 29)
}

impl Vocab {
    pub(crate) fn build(bpe: &BytePairEncoding) -> Self {
        let tokens = bpe.num_tokens();
        // A load factor under 1/2 keeps probe chains short (o200k_base:
        // 200k tokens in 512k slots, 2 MB).
        let size = (tokens * 2).next_power_of_two();
        let mask = size - 1;
        let mut slots = vec![0u32; size];
        let mut longest = 0;
        for id in 0..tokens as u32 {
            let bytes = bpe.token_bytes(id);
            longest = longest.max(bytes.len());
            let mut i = hash(bytes) as usize & mask;
            while slots[i] != 0 {
                i = (i + 1) & mask;
            }
            slots[i] = id + 1;
        }
        Self {
            slots,
            mask,
            longest,
        }
    }

    /// The token whose bytes are exactly `piece`, if there is one.
    #[inline]
    pub(crate) fn get(&self, bpe: &BytePairEncoding, piece: &[u8]) -> Option<u32> {
        if piece.len() > self.longest {
            return None;
        }
        let mut i = hash(piece) as usize & self.mask;
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return None;
            }
            if bpe.token_bytes(slot - 1) == piece {
                return Some(slot - 1);
            }
            i = (i + 1) & self.mask;
        }
    }
}
