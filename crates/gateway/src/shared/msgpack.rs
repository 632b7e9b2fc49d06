//! The little MessagePack the shared-limits script speaks: its arguments go
//! as one array of integers, and its answers come back as one array of
//! arrays of integers. Redis's Lua reads and writes these in C
//! (`cmsgpack`); a number per argument or per reply element cost the script
//! a `tonumber` each and the client a parsed value each.

/// `values` as a MessagePack array of integers, each in its shortest form,
/// as the script's `cmsgpack.unpack` reads it. Lua holds numbers as doubles:
/// every value here (counts, micro-dollars, milliseconds) stays far below
/// 2^53, where they are exact.
pub fn pack_integers(values: &[i64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + values.len() * 5);
    let n = values.len();
    if n < 16 {
        out.push(0x90 | n as u8);
    } else if let Ok(n) = u16::try_from(n) {
        out.push(0xdc);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        // A call's arguments are bounded (checks and corrections per call)
        // far below this.
        out.push(0xdd);
        out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
    }
    for &value in values {
        match value {
            0..=127 => out.push(value as u8),
            -32..=-1 => out.push(value as i8 as u8),
            _ => match i32::try_from(value) {
                Ok(small) => {
                    out.push(0xd2);
                    out.extend_from_slice(&small.to_be_bytes());
                }
                Err(_) => {
                    out.push(0xd3);
                    out.extend_from_slice(&value.to_be_bytes());
                }
            },
        }
    }
    out
}

/// The script's answers, one array of integers per check, as
/// `cmsgpack.pack` writes them; `None` when `bytes` is anything else.
pub fn unpack_answers(bytes: &[u8]) -> Option<Vec<Vec<i64>>> {
    let mut reader = Reader { bytes, at: 0 };
    let checks = reader.array_len()?;
    let mut answers = Vec::with_capacity(checks.min(bytes.len()));
    for _ in 0..checks {
        let n = reader.array_len()?;
        let mut numbers = Vec::with_capacity(n.min(bytes.len()));
        for _ in 0..n {
            numbers.push(reader.integer()?);
        }
        answers.push(numbers);
    }
    (reader.at == bytes.len()).then_some(answers)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let end = self.at.checked_add(N)?;
        let taken = self.bytes.get(self.at..end)?.try_into().ok()?;
        self.at = end;
        Some(taken)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }

    fn array_len(&mut self) -> Option<usize> {
        match self.byte()? {
            b @ 0x90..=0x9f => Some(usize::from(b & 0x0f)),
            0xdc => Some(usize::from(u16::from_be_bytes(self.take()?))),
            0xdd => usize::try_from(u32::from_be_bytes(self.take()?)).ok(),
            _ => None,
        }
    }

    fn integer(&mut self) -> Option<i64> {
        match self.byte()? {
            b @ 0x00..=0x7f => Some(i64::from(b)),
            b @ 0xe0..=0xff => Some(i64::from(b as i8)),
            0xcc => Some(i64::from(self.byte()?)),
            0xcd => Some(i64::from(u16::from_be_bytes(self.take()?))),
            0xce => Some(i64::from(u32::from_be_bytes(self.take()?))),
            0xcf => i64::try_from(u64::from_be_bytes(self.take()?)).ok(),
            0xd0 => Some(i64::from(i8::from_be_bytes(self.take()?))),
            0xd1 => Some(i64::from(i16::from_be_bytes(self.take()?))),
            0xd2 => Some(i64::from(i32::from_be_bytes(self.take()?))),
            0xd3 => Some(i64::from_be_bytes(self.take()?)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_that_are_not_arrays_of_integers_are_refused() {
        assert_eq!(unpack_answers(&[0x92, 0x91, 0x01, 0x90]), Some(vec![vec![1], vec![]]));
        for bytes in [
            &[][..],
            &[0x91],                                                             // an answer missing
            &[0x91, 0x91],                                                       // a number missing
            &[0x91, 0x91, 0xd2, 0x00],                                           // a number cut short
            &[0x91, 0x91, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0],                         // a float
            &[0x91, 0x91, 0xa1, b'x'],                                           // a string
            &[0x91, 0x91, 0x01, 0x01],                                           // bytes after the end
            &[0x91, 0x91, 0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // past i64
        ] {
            assert_eq!(unpack_answers(bytes), None, "{bytes:?}");
        }
    }
}
