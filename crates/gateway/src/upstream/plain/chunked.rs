//! The `chunked` transfer coding of a response body (RFC 9112 §7.1), read
//! from the connection's buffer in place: data is split off the buffer,
//! never copied, and the coding's own bytes (sizes, extensions, line ends,
//! trailers) are consumed and dropped.

use bytes::{Buf, Bytes, BytesMut};

/// A chunk-size line (size and extensions) or a trailer line longer than
/// this is refused: no upstream needs more, and the line is held whole.
const MAX_LINE: usize = 4096;
/// All trailer lines together, likewise.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes to go.
    Data(u64),
    /// After a chunk's data, at its line end.
    DataEnd,
    /// After the last chunk, at the trailer section; `seen` bytes of
    /// trailers so far.
    Trailers {
        seen: usize,
    },
    End,
}

/// What the buffer held.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Some of the body.
    Data(Bytes),
    /// Nothing more can be read from the buffer: read more into it.
    NeedMore,
    /// The body is complete; what follows in the buffer is not its.
    End,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkedError {
    #[error("the upstream sent an invalid chunk size")]
    InvalidSize,
    #[error("the upstream sent a chunk without its line end")]
    MissingLineEnd,
    #[error("the upstream sent a chunk-size or trailer line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("the upstream sent more than {MAX_TRAILERS} bytes of trailers")]
    TrailersTooLong,
}

#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self { state: State::Size }
    }
}

impl ChunkedDecoder {
    /// Reads as far as `buf` allows: the next piece of data, or that more
    /// must be read, or the end.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkedError> {
        loop {
            match self.state {
                State::End => return Ok(Decoded::End),
                State::Size => {
                    let Some(line) = take_line(buf)? else { return Ok(Decoded::NeedMore) };
                    let size = parse_size(&line)?;
                    self.state = if size == 0 { State::Trailers { seen: 0 } } else { State::Data(size) };
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.state = if left == 0 { State::DataEnd } else { State::Data(left) };
                    return Ok(Decoded::Data(data));
                }
                State::DataEnd => {
                    match buf.first() {
                        None => return Ok(Decoded::NeedMore),
                        Some(b'\r') => match buf.get(1) {
                            None => return Ok(Decoded::NeedMore),
                            Some(b'\n') => buf.advance(2),
                            Some(_) => return Err(ChunkedError::MissingLineEnd),
                        },
                        // A bare line feed, as lenient readers (hyper's among
                        // them) accept.
                        Some(b'\n') => buf.advance(1),
                        Some(_) => return Err(ChunkedError::MissingLineEnd),
                    }
                    self.state = State::Size;
                }
                State::Trailers { seen } => {
                    let Some(line) = take_line(buf)? else {
                        if seen + buf.len() > MAX_TRAILERS {
                            return Err(ChunkedError::TrailersTooLong);
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    // Trailers are not relayed (the gateway's relay skips
                    // them, as it did over hyper).
                    if line.is_empty() {
                        self.state = State::End;
                    } else {
                        let seen = seen + line.len() + 2;
                        if seen > MAX_TRAILERS {
                            return Err(ChunkedError::TrailersTooLong);
                        }
                        self.state = State::Trailers { seen };
                    }
                }
            }
        }
    }
}

/// The next line, without its line end (CRLF, or a bare LF), taken off the
/// buffer; `None` when the buffer does not hold a whole line yet.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, ChunkedError> {
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_LINE { Err(ChunkedError::LineTooLong) } else { Ok(None) };
    };
    if lf > MAX_LINE {
        return Err(ChunkedError::LineTooLong);
    }
    let mut line = buf.split_to(lf + 1);
    line.truncate(lf);
    if line.last() == Some(&b'\r') {
        line.truncate(lf - 1);
    }
    Ok(Some(line))
}

/// A chunk size: hexadecimal digits, then optional whitespace and
/// extensions (`;name=value`, ignored).
fn parse_size(line: &[u8]) -> Result<u64, ChunkedError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    // More than 16 hexadecimal digits cannot fit in 64 bits.
    if digits == 0 || digits > 16 {
        return Err(ChunkedError::InvalidSize);
    }
    let rest = &line[digits..];
    let rest_ok = match rest.iter().position(|b| !matches!(b, b' ' | b'\t')) {
        None => true,
        Some(at) => rest[at] == b';',
    };
    if !rest_ok {
        return Err(ChunkedError::InvalidSize);
    }
    let mut size = 0u64;
    for &b in &line[..digits] {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => b - b'A' + 10,
        };
        size = (size << 4) | u64::from(digit);
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` to a decoder in pieces of the given sizes (cycled), as
    /// reads from a socket would, and collects the body.
    fn decode_in_pieces(wire: &[u8], pieces: &[usize]) -> Result<(Vec<u8>, Vec<u8>), ChunkedError> {
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        let mut piece = pieces.iter().cycle();
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(data) => {
                    assert!(!data.is_empty(), "no empty data pieces");
                    body.extend_from_slice(&data);
                }
                Decoded::End => return Ok((body, buf.to_vec())),
                Decoded::NeedMore => {
                    assert!(fed < wire.len(), "the decoder wants more than the whole body");
                    let n = (*piece.next().unwrap()).min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    fn encode(chunks: &[&[u8]], trailers: &str) -> Vec<u8> {
        let mut wire = Vec::new();
        for chunk in chunks {
            wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            wire.extend_from_slice(chunk);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(format!("0\r\n{trailers}\r\n").as_bytes());
        wire
    }

    #[test]
    fn a_body_decodes_the_same_however_the_reads_split_it() {
        let chunks: Vec<Vec<u8>> =
            (0..40).map(|i| (0..(i * 37 % 300 + 1)).map(|j| (i * 7 + j) as u8).collect()).collect();
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let expected: Vec<u8> = chunks.concat();
        for trailers in ["", "x-checksum: abc\r\n", "a: 1\r\nb: 2\r\n"] {
            let wire = encode(&refs, trailers);
            for pieces in [&[1][..], &[2], &[3, 1, 7], &[4096], &[5, 300, 2]] {
                let (body, after) = decode_in_pieces(&wire, pieces).unwrap();
                assert_eq!(body, expected, "pieces {pieces:?}, trailers {trailers:?}");
                assert!(after.is_empty());
            }
        }
    }

    #[test]
    fn extensions_upper_case_sizes_and_bare_line_feeds_are_read() {
        let wire = b"A;name=value\r\n0123456789\nB \t; ext\n0123456789a\r\n0\n\n";
        let (body, _) = decode_in_pieces(wire, &[1]).unwrap();
        assert_eq!(body, b"01234567890123456789a");
    }

    #[test]
    fn what_follows_the_body_is_left_in_the_buffer() {
        let mut wire = encode(&[b"hello"], "");
        wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let (body, after) = decode_in_pieces(&wire, &[wire.len()]).unwrap();
        assert_eq!(body, b"hello");
        assert_eq!(after, b"HTTP/1.1 200 OK\r\n");
    }

    #[test]
    fn invalid_framing_is_an_error_not_a_guess() {
        let cases: &[(&[u8], ChunkedError)] = &[
            (b"zz\r\n", ChunkedError::InvalidSize),
            (b"\r\n", ChunkedError::InvalidSize),
            (b"-5\r\n", ChunkedError::InvalidSize),
            (b"5 x\r\n", ChunkedError::InvalidSize),
            (b"10000000000000000\r\n", ChunkedError::InvalidSize),
            (b"5\r\nhelloXX", ChunkedError::MissingLineEnd),
            (b"5\r\nhello\rX", ChunkedError::MissingLineEnd),
        ];
        for (wire, expected) in cases {
            let mut buf = BytesMut::from(&wire[..]);
            let mut decoder = ChunkedDecoder::default();
            let error = loop {
                match decoder.decode(&mut buf) {
                    Ok(Decoded::Data(_)) => {}
                    Ok(other) => panic!("{:?}: {other:?}", String::from_utf8_lossy(wire)),
                    Err(e) => break e,
                }
            };
            assert_eq!(&error, expected, "{:?}", String::from_utf8_lossy(wire));
        }
    }

    #[test]
    fn endless_lines_and_trailers_are_refused() {
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::from(&vec![b'1'; MAX_LINE + 1][..]);
        assert_eq!(decoder.decode(&mut buf), Err(ChunkedError::LineTooLong));

        let mut decoder = ChunkedDecoder::default();
        let mut wire = b"0\r\n".to_vec();
        for i in 0..2000 {
            wire.extend_from_slice(format!("x-trailer-{i}: yes\r\n").as_bytes());
        }
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(decoder.decode(&mut buf), Err(ChunkedError::TrailersTooLong));
    }

    #[test]
    fn a_huge_declared_chunk_is_read_as_it_comes() {
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::from(&b"ffffffffffffffff\r\nabc"[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::Data(Bytes::from_static(b"abc"))));
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::NeedMore));
    }
}
