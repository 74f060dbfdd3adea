//! HTTP/1.1 pieces of the upstream client ([`super::upstream`]'s `h1`)
//! that need no connection: body framing and its decoder, header tokens,
//! and writing header lines. Kept apart so they are tested on their own.

use std::io;

use axum::http::{HeaderName, HeaderValue};
use bytes::{Buf, Bytes, BytesMut};

/// The most a chunk-size line or a trailer line may take.
const MAX_LINE_BYTES: usize = 4096;

/// Where a body's reading stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes are left (`Content-Length`).
    Length(u64),
    /// Until the connection ends.
    Eof,
    /// Chunked: a chunk-size line is next.
    ChunkSize,
    /// Chunked: this many bytes of the chunk are left.
    ChunkData(u64),
    /// Chunked: the CRLF after a chunk's data is next.
    ChunkEnd,
    /// Chunked: trailer lines, up to an empty one.
    Trailers,
    /// The whole body has been read.
    Done,
}

/// What [`decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The next piece of the body.
    Data(Bytes),
    /// Nothing yet: read more into the buffer (at the connection's end,
    /// only a body framed by it is complete, by [`Framing::Eof`]).
    More,
    /// The body is complete; what is left in the buffer follows it.
    End,
}

fn invalid(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// The end of the first line in `buf` (the index of its CR), if it has one.
fn line_end(buf: &[u8]) -> io::Result<Option<usize>> {
    match memchr::memmem::find(buf, b"\r\n") {
        Some(at) => Ok(Some(at)),
        None if buf.len() > MAX_LINE_BYTES => Err(invalid("a chunk line is too long")),
        None => Ok(None),
    }
}

/// Take the next piece of a body out of `buf`, framed as `framing` says.
/// Data is split off the buffer, not copied.
pub fn decode(framing: &mut Framing, buf: &mut BytesMut) -> io::Result<Decoded> {
    loop {
        match *framing {
            Framing::Done => return Ok(Decoded::End),
            Framing::Length(0) => *framing = Framing::Done,
            Framing::Length(left) | Framing::ChunkData(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let rest = left - n as u64;
                *framing = match (*framing, rest) {
                    (Framing::ChunkData(_), 0) => Framing::ChunkEnd,
                    (Framing::ChunkData(_), _) => Framing::ChunkData(rest),
                    _ => Framing::Length(rest),
                };
                return Ok(Decoded::Data(buf.split_to(n).freeze()));
            }
            Framing::Eof if buf.is_empty() => return Ok(Decoded::More),
            Framing::Eof => return Ok(Decoded::Data(buf.split().freeze())),
            Framing::ChunkSize => {
                let Some(at) = line_end(buf)? else {
                    return Ok(Decoded::More);
                };
                let digits = buf[..at]
                    .split(|&b| b == b';')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                let size = std::str::from_utf8(digits)
                    .ok()
                    .filter(|d| !d.is_empty() && d.len() <= 15)
                    .and_then(|d| u64::from_str_radix(d, 16).ok())
                    .ok_or_else(|| invalid("a bad chunk size"))?;
                buf.advance(at + 2);
                *framing = if size == 0 {
                    Framing::Trailers
                } else {
                    Framing::ChunkData(size)
                };
            }
            Framing::ChunkEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(invalid("a chunk without its CRLF"));
                }
                buf.advance(2);
                *framing = Framing::ChunkSize;
            }
            Framing::Trailers => {
                let Some(at) = line_end(buf)? else {
                    return Ok(Decoded::More);
                };
                buf.advance(at + 2);
                if at == 0 {
                    *framing = Framing::Done;
                }
            }
        }
    }
}

/// A `Content-Length` value.
pub fn content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Whether a `Transfer-Encoding` value's last coding (the one that frames
/// the body) is `chunked`.
pub fn last_coding_is_chunked(value: &[u8]) -> bool {
    let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
    last.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// Whether a comma-separated header value has `token` (any case).
pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Add a header line to a head.
pub fn put_header(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Decode `wire` fed in pieces of `step` bytes; the body and what is
    /// left after it.
    fn decode_in_steps(
        framing: Framing,
        wire: &[u8],
        step: usize,
    ) -> io::Result<(Vec<u8>, Vec<u8>)> {
        let mut framing = framing;
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut pieces = wire.chunks(step);
        loop {
            match decode(&mut framing, &mut buf)? {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::End => return Ok((body, buf.to_vec())),
                Decoded::More => match pieces.next() {
                    Some(piece) => buf.extend_from_slice(piece),
                    None => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "cut")),
                },
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_pieces() {
        let wire =
            b"5;name=value\r\nhello\r\n1 \r\n,\r\nA\r\n world!!!!\r\n0\r\ntrailer: x\r\n\r\nNEXT";
        for step in 1..=wire.len() {
            let (body, rest) = decode_in_steps(Framing::ChunkSize, wire, step).unwrap();
            assert_eq!(body, b"hello, world!!!!", "step {step}");
            // What follows the body stays for the next message.
            assert!(b"NEXT".starts_with(&rest), "step {step}: {rest:?}");
        }
    }

    #[test]
    fn lengths_stop_at_the_length() {
        for step in 1..8 {
            let (body, _) = decode_in_steps(Framing::Length(5), b"hello", step).unwrap();
            assert_eq!(body, b"hello");
        }
        let mut framing = Framing::Length(5);
        let mut buf = BytesMut::from(&b"helloGET / HTTP/1.1"[..]);
        assert_eq!(
            decode(&mut framing, &mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"hello"))
        );
        assert_eq!(decode(&mut framing, &mut buf).unwrap(), Decoded::End);
        assert_eq!(&buf[..], b"GET / HTTP/1.1");
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for wire in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"\r\nhello\r\n0\r\n\r\n",
            b"2\r\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"-5\r\nhello\r\n",
        ] {
            let e = decode_in_steps(Framing::ChunkSize, wire, wire.len()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{wire:?}");
        }
        let long = vec![b'1'; MAX_LINE_BYTES + 1];
        let e = decode_in_steps(Framing::ChunkSize, &long, long.len()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn header_values() {
        assert_eq!(content_length(b" 42 "), Some(42));
        for bad in [
            &b""[..],
            b"+4",
            b"-1",
            b"4 2",
            b"0x10",
            b"99999999999999999999999",
        ] {
            assert_eq!(content_length(bad), None, "{bad:?}");
        }
        assert!(last_coding_is_chunked(b"gzip, Chunked"));
        assert!(!last_coding_is_chunked(b"chunked, gzip"));
        assert!(has_token(b"keep-alive, Close", b"close"));
        assert!(!has_token(b"closed", b"close"));
    }
}
