//! The hashes of the vocabulary and merge tables (`bpe::Bpe`), shared with
//! `build.rs`, which lays the tables out: both must hash alike.

/// FxHash-style mixing, eight bytes at a time: fast on short keys, and the
/// keys are the vocabulary and user text, where a collision costs a probe,
/// never a wrong answer (every hit is compared byte for byte).
#[inline(always)]
pub(crate) fn hash(bytes: &[u8]) -> u64 {
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

/// The first slot to probe for the merge of `left` and `right`, in a table
/// of `mask + 1` slots.
#[inline(always)]
pub(crate) fn pair_slot(left: u32, right: u32, mask: usize) -> usize {
    let key = (u64::from(left) << 32) | u64::from(right);
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & mask
}

/// The byte kept beside a merge's slot: never 0, which marks an empty slot.
#[inline(always)]
pub(crate) fn pair_tag(left: u32, right: u32) -> u8 {
    let key = (u64::from(left) << 32) | u64::from(right);
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 57) as u8 | 0x80
}
