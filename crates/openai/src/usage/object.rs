//! A reader for the plain usage objects nearly every answer carries, without
//! going through serde: about a quarter of serde's instructions for the same
//! object, on every non-streamed answer.
//!
//! It takes only what it can read exactly as serde would: keys without
//! escapes, counts written as plain integers, unknown members whose values
//! are plain numbers, ASCII strings without escapes, literals, or objects and
//! arrays of those. Anything else (a duplicate member, an escape, a count
//! that is negative, fractional or too large, text that is not JSON) gives
//! `None`, and the caller reads the object with serde instead, which decides
//! what such an object means. So the two paths never disagree; the tests
//! compare them on generated objects.

use super::{Details, RawUsage};

/// How deep unknown members may nest before the reader leaves the object
/// to serde.
const MAX_DEPTH: usize = 8;

/// The usage object at the start of `value`, and the offset just past it.
pub(super) fn read(value: &[u8]) -> Option<(RawUsage, usize)> {
    let mut reader = Reader { bytes: value, at: 0 };
    let mut usage = RawUsage::default();
    let mut seen = [false; 9];
    reader.object(|reader, key| {
        let (slot, field) = match key {
            b"prompt_tokens" => (0, Field::Count(&mut usage.prompt_tokens)),
            b"completion_tokens" => (1, Field::Count(&mut usage.completion_tokens)),
            b"input_tokens" => (2, Field::Count(&mut usage.input_tokens)),
            b"output_tokens" => (3, Field::Count(&mut usage.output_tokens)),
            b"total_tokens" => (4, Field::Count(&mut usage.total_tokens)),
            b"prompt_tokens_details" => (5, Field::Details(&mut usage.prompt_tokens_details)),
            b"input_tokens_details" => (6, Field::Details(&mut usage.input_tokens_details)),
            b"completion_tokens_details" => (7, Field::Details(&mut usage.completion_tokens_details)),
            b"output_tokens_details" => (8, Field::Details(&mut usage.output_tokens_details)),
            _ => return reader.skip_value(0),
        };
        // A member given twice is an error to serde: leave it to serde.
        if std::mem::replace(&mut seen[slot], true) {
            return None;
        }
        match field {
            Field::Count(count) => *count = reader.count()?,
            Field::Details(details) => *details = reader.details()?,
        }
        Some(())
    })?;
    Some((usage, reader.at))
}

enum Field<'a> {
    Count(&'a mut Option<u64>),
    Details(&'a mut Option<Details>),
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// JSON's whitespace only (not, say, a form feed).
    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        self.skip_whitespace();
        (self.peek() == Some(byte)).then(|| self.at += 1)
    }

    /// `{`, each member through `member` (with the reader on its value),
    /// then `}`.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
        self.sequence(b'{', b'}', |reader| {
            let key = reader.plain_string()?;
            reader.expect(b':')?;
            reader.skip_whitespace();
            member(reader, key)
        })
    }

    /// `open`, items separated by commas, `close`; the reader is on each
    /// item's first byte when `item` is called.
    fn sequence(&mut self, open: u8, close: u8, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.expect(open)?;
        self.skip_whitespace();
        if self.peek() == Some(close) {
            self.at += 1;
            return Some(());
        }
        loop {
            self.skip_whitespace();
            item(self)?;
            self.skip_whitespace();
            match self.peek()? {
                b',' => self.at += 1,
                byte if byte == close => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A string of printable ASCII without escapes, its contents returned.
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        if self.peek() != Some(b'"') {
            return None;
        }
        let bytes = self.bytes;
        let start = self.at + 1;
        let len = memchr::memchr(b'"', &bytes[start..])?;
        let text = &bytes[start..start + len];
        // One pass without an early exit, which compiles to wide comparisons.
        if text.iter().fold(false, |odd, &b| odd | (b == b'\\') | !(0x20..0x7f).contains(&b)) {
            return None;
        }
        self.at = start + len + 1;
        Some(text)
    }

    /// `null`, or an integer in `u64` written without sign, fraction,
    /// exponent or leading zero.
    fn count(&mut self) -> Option<Option<u64>> {
        if self.literal(b"null") {
            return Some(None);
        }
        let digits = self.bytes[self.at..].iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || (digits > 1 && self.bytes[self.at] == b'0') {
            return None;
        }
        let mut value: u64 = 0;
        for &digit in &self.bytes[self.at..self.at + digits] {
            value = value.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
        }
        self.at += digits;
        // A fraction or an exponent makes it a float, which serde refuses
        // for a count.
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(Some(value))
    }

    fn details(&mut self) -> Option<Option<Details>> {
        if self.literal(b"null") {
            return Some(None);
        }
        let mut details = Details::default();
        let mut seen = [false; 2];
        self.object(|reader, key| {
            let (slot, count) = match key {
                b"cached_tokens" => (0, &mut details.cached_tokens),
                b"reasoning_tokens" => (1, &mut details.reasoning_tokens),
                _ => return reader.skip_value(1),
            };
            if std::mem::replace(&mut seen[slot], true) {
                return None;
            }
            *count = reader.count()?;
            Some(())
        })?;
        Some(Some(details))
    }

    fn literal(&mut self, word: &[u8]) -> bool {
        let found = self.bytes[self.at..].starts_with(word);
        if found {
            self.at += word.len();
        }
        found
    }

    /// Passes over one value of the kinds the module admits.
    fn skip_value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.plain_string().map(drop),
            b'{' => self.object(|reader, _| reader.skip_value(depth + 1)),
            b'[' => self.sequence(b'[', b']', |reader| reader.skip_value(depth + 1)),
            b'-' | b'0'..=b'9' => self.number(),
            b't' => self.literal(b"true").then_some(()),
            b'f' => self.literal(b"false").then_some(()),
            b'n' => self.literal(b"null").then_some(()),
            _ => None,
        }
    }

    /// A JSON number: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.required_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.required_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
    }

    fn required_digits(&mut self) -> Option<()> {
        let start = self.at;
        self.digits();
        (self.at > start).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so a failure repeats.
    struct Draw(u64);

    impl Draw {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[(self.next() % from.len() as u64) as usize]
        }

        fn chance(&mut self, in_ten: u64) -> bool {
            self.next() % 10 < in_ten
        }
    }

    const COUNT_KEYS: &[&str] =
        &["prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "total_tokens"];
    const DETAIL_KEYS: &[&str] =
        &["prompt_tokens_details", "input_tokens_details", "completion_tokens_details", "output_tokens_details"];
    const COUNTS: &[&str] = &[
        "0",
        "7",
        "1234",
        "18446744073709551615",
        "18446744073709551616",
        "-1",
        "-0",
        "1.0",
        "1e2",
        "01",
        "null",
        "true",
        r#""5""#,
        "12x",
        "",
    ];
    const DETAILS: &[&str] = &[
        "null",
        "{}",
        r#"{"cached_tokens":3}"#,
        r#"{"reasoning_tokens":2,"audio_tokens":0}"#,
        r#"{ "cached_tokens" : 1 , "cached_tokens" : 2 }"#,
        r#"{"accepted_prediction_tokens":0,"rejected_prediction_tokens":null,"reasoning_tokens":9}"#,
        r#"{"reasoning_tokens":1.5}"#,
        r#"{"x":{"y":[1,{"z":"w"}]},"cached_tokens":4}"#,
        "[]",
        r#""none""#,
    ];
    const OTHER_VALUES: &[&str] = &[
        "0.0012",
        "false",
        "true",
        "null",
        r#""text""#,
        r#""esc\"aped""#,
        r#""\u00e9""#,
        "\"\u{e9}\"",
        "1e400",
        "-0.5e-3",
        "01",
        "1.",
        "-",
        r#"{"a":[1,2,{"b":null}],"c":{}}"#,
        "[[[[[[[[[[[1]]]]]]]]]]]",
        r#"[1, "two", 3.0e+1, false]"#,
        "nul",
        "\"tab\there\"",
    ];
    const SPACES: &[&str] = &["", "", "", " ", "\n\t", "\r\n  ", "\u{c}"];

    fn member(draw: &mut Draw) -> String {
        let (key, value) = match draw.next() % 10 {
            0..=3 => (draw.pick(COUNT_KEYS).to_owned(), draw.pick(COUNTS).to_owned()),
            4..=6 => (draw.pick(DETAIL_KEYS).to_owned(), draw.pick(DETAILS).to_owned()),
            7 => (r"prompt\u005ftokens".to_owned(), "5".to_owned()),
            _ => (
                draw.pick(&["cost", "is_byok", "", "x", "models", "prompt_tokens "]).to_owned(),
                draw.pick(OTHER_VALUES).to_owned(),
            ),
        };
        let (a, b, c, d) = (draw.pick(SPACES), draw.pick(SPACES), draw.pick(SPACES), draw.pick(SPACES));
        format!("{a}\"{key}\"{b}:{c}{value}{d}")
    }

    fn object(draw: &mut Draw) -> String {
        let members: Vec<String> = (0..draw.next() % 7).map(|_| member(draw)).collect();
        let mut text = format!("{{{}}}", members.join(","));
        if draw.chance(1) {
            let cut = (draw.next() % (text.len() as u64 + 1)) as usize;
            text = String::from_utf8_lossy(&text.as_bytes()[..cut]).into_owned();
        }
        if draw.chance(5) {
            text.push_str(r#","id":"x"}"#);
        }
        text
    }

    #[test]
    fn reads_what_serde_reads_and_leaves_it_the_rest() {
        let mut draw = Draw(0x9e37_79b9_7f4a_7c15);
        let (mut read_here, mut left_to_serde) = (0, 0);
        for _ in 0..200_000 {
            let text = object(&mut draw);
            let serde = super::super::with_serde(text.as_bytes());
            match read(text.as_bytes()) {
                Some(here) => {
                    read_here += 1;
                    assert_eq!(Some(here), serde, "{text}");
                }
                None => left_to_serde += 1,
            }
        }
        // Both paths are exercised, and the plain objects are most of them.
        assert!(read_here > 20_000 && left_to_serde > 20_000, "{read_here} read here, {left_to_serde} left");
    }

    #[test]
    fn reads_the_objects_upstreams_send() {
        for (text, expected) in [
            (
                r#"{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":2,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#,
                (Some(10), Some(5), Some(15), Some(4), Some(2)),
            ),
            (
                r#"{ "input_tokens": 7, "input_tokens_details": { "cached_tokens": 1 }, "output_tokens": 9, "output_tokens_details": { "reasoning_tokens": 3 }, "total_tokens": 16 }"#,
                (Some(7), Some(9), Some(16), Some(1), Some(3)),
            ),
            (
                r#"{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"cost":0.00012,"is_byok":false,"cost_details":{"upstream_inference_cost":null}}"#,
                (Some(3), Some(4), Some(7), None, None),
            ),
        ] {
            let (raw, len) = read(text.as_bytes()).expect(text);
            assert_eq!(len, text.len());
            let prompt = raw.prompt_tokens.or(raw.input_tokens);
            let completion = raw.completion_tokens.or(raw.output_tokens);
            let cached = raw.prompt_tokens_details.or(raw.input_tokens_details).and_then(|d| d.cached_tokens);
            let reasoning =
                raw.completion_tokens_details.or(raw.output_tokens_details).and_then(|d| d.reasoning_tokens);
            assert_eq!((prompt, completion, raw.total_tokens, cached, reasoning), expected, "{text}");
        }
    }
}
