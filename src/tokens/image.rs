//! Image inputs as prompt tokens (OpenAI's vision guide, "Calculating costs").
//!
//! Two methods, chosen per model family by the catalog:
//! - tiles: fit the image in 2048x2048, scale its shortest side down to 768,
//!   then `base + per_tile * (512px tiles)`; `detail: low` is `base` alone;
//! - patches: 32px patches, at most 1,536 (the image is scaled down until it
//!   fits), times a per-model multiplier; `detail` does not change it.
//!
//! An inline (base64 data URL) image's size is read from its header; an image
//! by URL or file id is not fetched, so it is counted at its largest cost and
//! the count says it is an upper bound.

use base64::Engine as _;

use crate::catalog::ImageCost;
use crate::tokens::Exactness;

/// The `detail` an image part asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    Low,
    High,
    /// The model chooses low or high; counted as high.
    Auto,
}

impl Detail {
    /// `None` for a value the API does not accept.
    pub fn parse(value: Option<&str>) -> Option<Detail> {
        match value {
            None | Some("auto") => Some(Detail::Auto),
            Some("low") => Some(Detail::Low),
            // "original" (newer models) keeps more of the image than high;
            // the tile formula caps at the same largest cost either way.
            Some("high" | "original") => Some(Detail::High),
            Some(_) => None,
        }
    }
}

/// The most 32px patches an image may cost before it is scaled down.
const PATCH_BUDGET: u64 = 1536;
/// The most tiles an image can cost: 768 x 2048 after scaling is 2 x 4 tiles.
const MAX_TILES: u64 = 8;

/// Tokens for one image, and whether that is exact or an upper bound.
pub fn image_tokens(cost: ImageCost, detail: Detail, size: Option<(u32, u32)>) -> (u64, Exactness) {
    let auto = if detail == Detail::Auto {
        Exactness::UpperBound
    } else {
        Exactness::Exact
    };
    match (cost, size) {
        (ImageCost::Tiles { base, .. }, _) if detail == Detail::Low => (base, Exactness::Exact),
        (ImageCost::Tiles { base, per_tile }, Some((w, h))) => {
            (base + per_tile * tiles(w, h), auto)
        }
        (ImageCost::Tiles { base, per_tile }, None) => {
            (base + per_tile * MAX_TILES, Exactness::UpperBound)
        }
        (ImageCost::Patches { multiplier_milli }, Some((w, h))) => (
            scale_milli(patches(w, h), multiplier_milli),
            Exactness::Exact,
        ),
        (ImageCost::Patches { multiplier_milli }, None) => (
            scale_milli(PATCH_BUDGET, multiplier_milli),
            Exactness::UpperBound,
        ),
    }
}

/// `count * multiplier_milli / 1000`, rounded up.
fn scale_milli(count: u64, multiplier_milli: u64) -> u64 {
    (count * multiplier_milli).div_ceil(1000)
}

/// 512px tiles after scaling, in exact rational arithmetic: after the first
/// step both sides share the denominator `max(w, h)` (or 1), and the second
/// step's factor cancels it, so only whole numbers are ever divided.
pub fn tiles(w: u32, h: u32) -> u64 {
    if w == 0 || h == 0 {
        return 0;
    }
    let (w, h) = (u128::from(w), u128::from(h));
    // Step 1: fit in 2048x2048. Sides are num / den.
    let (wn, hn, den) = if w.max(h) > 2048 {
        (w * 2048, h * 2048, w.max(h))
    } else {
        (w, h, 1)
    };
    // Step 2: shortest side down to 768 (never up).
    let short = wn.min(hn);
    let (wn, hn, den) = if short > 768 * den {
        (wn * 768, hn * 768, short)
    } else {
        (wn, hn, den)
    };
    let ceil_tiles = |n: u128| n.div_ceil(512 * den) as u64;
    ceil_tiles(wn) * ceil_tiles(hn)
}

/// 32px patches, scaled down to fit the budget as the guide prescribes. The
/// guide's scale factor is a square root, so this step is in floating point;
/// the result is a whole number of patches.
pub fn patches(w: u32, h: u32) -> u64 {
    let (wu, hu) = (u64::from(w), u64::from(h));
    let count = wu.div_ceil(32) * hu.div_ceil(32);
    if count <= PATCH_BUDGET {
        return count;
    }
    let (wf, hf) = (f64::from(w), f64::from(h));
    let shrink = ((32.0 * 32.0 * PATCH_BUDGET as f64) / (wf * hf)).sqrt();
    let fit = |side: f64| {
        let patches = side * shrink / 32.0;
        patches.floor() / patches
    };
    let adjusted = shrink * fit(wf).min(fit(hf));
    let rw = (wf * adjusted) as u64;
    let rh = (hf * adjusted) as u64;
    (rw.div_ceil(32) * rh.div_ceil(32)).min(PATCH_BUDGET)
}

/// The pixel size of an image given as a `data:` URL, read from its header.
pub fn data_url_size(url: &str) -> Option<(u32, u32)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, payload) = rest.split_once(',')?;
    if !meta.ends_with(";base64") {
        return None;
    }
    let payload = payload.trim();
    // A header sits in the first few bytes (PNG, GIF, WebP) or after the
    // metadata segments (JPEG): try a prefix first, then the whole image.
    let prefix_len = payload.len().min(64 * 1024) / 4 * 4;
    let engine = base64::engine::general_purpose::STANDARD;
    let prefix = payload.get(..prefix_len)?;
    if let Some(size) = engine.decode(prefix).ok().as_deref().and_then(header_size) {
        return Some(size);
    }
    engine.decode(payload).ok().as_deref().and_then(header_size)
}

/// Width and height from a PNG, JPEG, GIF or WebP header.
pub fn header_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let be16 = |i: usize| {
        Some(u32::from(u16::from_be_bytes([
            *bytes.get(i)?,
            *bytes.get(i + 1)?,
        ])))
    };
    let le16 = |i: usize| {
        Some(u32::from(u16::from_le_bytes([
            *bytes.get(i)?,
            *bytes.get(i + 1)?,
        ])))
    };
    let le24 = |i: usize| {
        Some(u32::from_le_bytes([
            *bytes.get(i)?,
            *bytes.get(i + 1)?,
            *bytes.get(i + 2)?,
            0,
        ]))
    };
    let be32 = |i: usize| Some(u32::from_be_bytes(bytes.get(i..i + 4)?.try_into().ok()?));
    let size = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.get(12..16) == Some(b"IHDR") {
        (be32(16)?, be32(20)?)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        (le16(6)?, le16(8)?)
    } else if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
        match bytes.get(12..16)? {
            b"VP8 " => (le16(26)? & 0x3fff, le16(28)? & 0x3fff),
            b"VP8L" => {
                let b = bytes.get(21..25)?;
                let (b0, b1, b2, b3) = (
                    u32::from(b[0]),
                    u32::from(b[1]),
                    u32::from(b[2]),
                    u32::from(b[3]),
                );
                (
                    1 + (b0 | (b1 & 0x3f) << 8),
                    1 + ((b1 >> 6) | b2 << 2 | (b3 & 0x0f) << 10),
                )
            }
            b"VP8X" => (1 + le24(24)?, 1 + le24(27)?),
            _ => return None,
        }
    } else if bytes.starts_with(&[0xff, 0xd8]) {
        jpeg_size(bytes, be16)?
    } else {
        return None;
    };
    (size.0 > 0 && size.1 > 0).then_some(size)
}

fn jpeg_size(bytes: &[u8], be16: impl Fn(usize) -> Option<u32>) -> Option<(u32, u32)> {
    let mut i = 2;
    loop {
        // Markers start with 0xff, possibly padded with more 0xff bytes.
        if *bytes.get(i)? != 0xff {
            return None;
        }
        while *bytes.get(i)? == 0xff {
            i += 1;
        }
        let marker = *bytes.get(i)?;
        i += 1;
        match marker {
            // Markers without a length: TEM, RSTn, SOI.
            0x01 | 0xd0..=0xd8 => continue,
            0xd9 => return None,
            _ => {}
        }
        let length = be16(i)? as usize;
        let is_frame = matches!(marker, 0xc0..=0xcf) && !matches!(marker, 0xc4 | 0xc8 | 0xcc);
        if is_frame {
            return Some((be16(i + 5)?, be16(i + 3)?));
        }
        if length < 2 {
            return None;
        }
        i += length;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPT_4O: ImageCost = ImageCost::Tiles {
        base: 85,
        per_tile: 170,
    };

    #[test]
    fn openai_documented_figures() {
        assert_eq!(
            image_tokens(GPT_4O, Detail::High, Some((1024, 1024))),
            (765, Exactness::Exact)
        );
        assert_eq!(
            image_tokens(GPT_4O, Detail::High, Some((2048, 4096))),
            (1105, Exactness::Exact)
        );
        assert_eq!(
            image_tokens(GPT_4O, Detail::Low, Some((4096, 8192))),
            (85, Exactness::Exact)
        );
        assert_eq!(
            image_tokens(GPT_4O, Detail::Low, None),
            (85, Exactness::Exact)
        );
        // Small images are not scaled up: one tile.
        assert_eq!(tiles(128, 64), 1);
        // The patch guide's examples: 1024x1024 is 1024 patches; 1800x2400 is 1452.
        assert_eq!(patches(1024, 1024), 1024);
        assert_eq!(patches(1800, 2400), 1452);
    }

    #[test]
    fn unknown_size_is_the_largest_cost() {
        assert_eq!(
            image_tokens(GPT_4O, Detail::High, None),
            (85 + 170 * 8, Exactness::UpperBound)
        );
        let mut worst = 0;
        for w in (64..6000).step_by(97) {
            for h in (64..6000).step_by(89) {
                worst = worst.max(tiles(w, h));
                assert!(patches(w, h) <= PATCH_BUDGET);
            }
        }
        assert_eq!(worst, MAX_TILES);
        let mini = ImageCost::Patches {
            multiplier_milli: 1620,
        };
        assert_eq!(
            image_tokens(mini, Detail::Low, None),
            (2489, Exactness::UpperBound)
        );
        assert_eq!(
            image_tokens(mini, Detail::High, Some((1024, 1024))),
            (1659, Exactness::Exact)
        );
    }

    #[test]
    fn reads_headers() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend_from_slice(&1024u32.to_be_bytes());
        png.extend_from_slice(&768u32.to_be_bytes());
        assert_eq!(header_size(&png), Some((1024, 768)));
        let gif = b"GIF89a\x40\x01\xf0\x00";
        assert_eq!(header_size(gif), Some((320, 240)));
        // JPEG: SOI, an APP0 segment, then SOF0 with height 600 and width 800.
        let jpeg = [
            0xff, 0xd8, 0xff, 0xe0, 0x00, 0x04, 0x00, 0x00, 0xff, 0xc0, 0x00, 0x11, 0x08, 0x02,
            0x58, 0x03, 0x20,
        ];
        assert_eq!(header_size(&jpeg), Some((800, 600)));
        let mut webp = b"RIFF\0\0\0\0WEBPVP8X\0\0\0\0\0\0\0\0".to_vec();
        webp.extend_from_slice(&[0xff, 0x03, 0x00, 0x57, 0x02, 0x00]);
        assert_eq!(header_size(&webp), Some((1024, 600)));
        assert_eq!(header_size(b"not an image"), None);
        assert_eq!(header_size(&[0xff, 0xd8, 0xff]), None);
        let url = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&png)
        );
        assert_eq!(data_url_size(&url), Some((1024, 768)));
        assert_eq!(data_url_size("data:image/png;base64,!!!"), None);
        assert_eq!(data_url_size("https://example.com/cat.png"), None);
    }
}
