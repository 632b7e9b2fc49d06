//! Token usage as upstreams report it, found without parsing whole bodies.
//!
//! A JSON key can only appear unescaped outside string values, so the bytes
//! `"usage"` followed by `:` are a real `usage` key; only the value after it
//! is parsed. This keeps usage extraction cheap on large bodies (embeddings)
//! and lets the stream relay ignore every event that carries no usage.

mod object;

use std::sync::LazyLock;

use serde::Deserialize;

/// Token counts of one request. `completion` is what the upstream called
/// completion (or output) tokens; see [`Usage::billed_output`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
    /// Reasoning ("thinking") tokens, when the upstream details them.
    pub reasoning: u64,
    /// Prompt tokens served from the upstream's cache.
    pub cached: u64,
    /// Prompt tokens written to the upstream's cache (Anthropic's
    /// `cache_creation_input_tokens`), priced apart.
    pub cache_write: u64,
}

impl Usage {
    /// Output tokens to bill: `max(completion, total − prompt)`. Some Gemini
    /// OpenAI-compatible layers leave thinking tokens out of
    /// `completion_tokens` but count them in `total_tokens`.
    pub fn billed_output(&self) -> u64 {
        self.completion.max(self.total.saturating_sub(self.prompt))
    }

    pub fn add(&mut self, other: &Usage) {
        self.prompt = self.prompt.saturating_add(other.prompt);
        self.completion = self.completion.saturating_add(other.completion);
        self.total = self.total.saturating_add(other.total);
        self.reasoning = self.reasoning.saturating_add(other.reasoning);
        self.cached = self.cached.saturating_add(other.cached);
        self.cache_write = self.cache_write.saturating_add(other.cache_write);
    }
}

#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

/// Both vocabularies: chat/completions/embeddings (`prompt_tokens`, …) and
/// the responses API (`input_tokens`, …).
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    #[serde(default)]
    input_tokens_details: Option<Details>,
    #[serde(default)]
    completion_tokens_details: Option<Details>,
    #[serde(default)]
    output_tokens_details: Option<Details>,
}

impl From<RawUsage> for Usage {
    fn from(raw: RawUsage) -> Self {
        let prompt = raw.prompt_tokens.or(raw.input_tokens).unwrap_or(0);
        let completion = raw.completion_tokens.or(raw.output_tokens).unwrap_or(0);
        let input_details = raw.prompt_tokens_details.or(raw.input_tokens_details).unwrap_or_default();
        let output_details = raw.completion_tokens_details.or(raw.output_tokens_details).unwrap_or_default();
        Usage {
            prompt,
            completion,
            total: raw.total_tokens.unwrap_or(prompt.saturating_add(completion)),
            reasoning: output_details.reasoning_tokens.unwrap_or(0),
            cached: input_details.cached_tokens.unwrap_or(0),
            cache_write: 0,
        }
    }
}

/// A JSON object key searched for in bodies and events, with its searchers
/// built once: building a `memmem` searcher costs more than searching a
/// small body with it, and the stream relay searches every event.
pub(crate) struct JsonKey {
    quoted_len: usize,
    forward: memchr::memmem::Finder<'static>,
    reverse: memchr::memmem::FinderRev<'static>,
}

impl JsonKey {
    /// `quoted` is the key with its quotes, e.g. `"usage"`.
    pub(crate) fn new(quoted: &'static [u8]) -> Self {
        Self {
            quoted_len: quoted.len(),
            forward: memchr::memmem::Finder::new(quoted),
            reverse: memchr::memmem::FinderRev::new(quoted),
        }
    }
}

pub(crate) static USAGE_KEY: LazyLock<JsonKey> = LazyLock::new(|| JsonKey::new(b"\"usage\""));
static MODEL_KEY: LazyLock<JsonKey> = LazyLock::new(|| JsonKey::new(b"\"model\""));
static CHOICES_KEY: LazyLock<JsonKey> = LazyLock::new(|| JsonKey::new(b"\"choices\""));

/// Where a `"key":` value starts: the offset of the key's opening quote and
/// of the first byte of the value. `last` picks the last occurrence.
pub(crate) fn find_key(bytes: &[u8], key: &JsonKey, last: bool) -> Option<(usize, usize)> {
    if last {
        first_followed_by_colon(bytes, key.quoted_len, key.reverse.rfind_iter(bytes))
    } else {
        first_followed_by_colon(bytes, key.quoted_len, key.forward.find_iter(bytes))
    }
}

/// The first candidate that is a key (a colon follows it), with its value's
/// offset.
fn first_followed_by_colon(
    bytes: &[u8],
    quoted_len: usize,
    candidates: impl Iterator<Item = usize>,
) -> Option<(usize, usize)> {
    for start in candidates {
        let mut i = start + quoted_len;
        while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if bytes.get(i) != Some(&b':') {
            continue;
        }
        i += 1;
        while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        return Some((start, i));
    }
    None
}

/// What a `usage` key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageField {
    Absent,
    Null,
    /// A usage object, and the byte range of the whole `"usage": {…}` member.
    Present(Usage, usize, usize),
}

/// Finds the (last) `usage` member in a JSON document or SSE event.
pub fn find_usage(bytes: &[u8]) -> UsageField {
    let Some((key_start, value_start)) = find_key(bytes, &USAGE_KEY, true) else { return UsageField::Absent };
    let value = &bytes[value_start..];
    if value.starts_with(b"null") {
        return UsageField::Null;
    }
    match object::read(value).or_else(|| with_serde(value)) {
        Some((raw, len)) => UsageField::Present(raw.into(), key_start, value_start + len),
        None => UsageField::Absent,
    }
}

/// The usage object at the start of `value` as serde reads it, and the
/// offset just past it; `None` when it is not one.
fn with_serde(value: &[u8]) -> Option<(RawUsage, usize)> {
    let mut stream = serde_json::Deserializer::from_slice(value).into_iter::<RawUsage>();
    let raw = stream.next()?.ok()?;
    Some((raw, stream.byte_offset()))
}

/// The first `model` string in a JSON document (the upstream's model name).
pub fn find_model(bytes: &[u8]) -> Option<String> {
    let (_, value_start) = find_key(bytes, &MODEL_KEY, false)?;
    let mut stream = serde_json::Deserializer::from_slice(&bytes[value_start..]).into_iter::<String>();
    stream.next()?.ok()
}

/// `bytes` with the member at `start..end` (from [`find_usage`] or similar)
/// removed, along with one separating comma.
pub fn remove_member(bytes: &[u8], start: usize, end: usize) -> Vec<u8> {
    // Prefer the comma before the member; else the one after it.
    let before = bytes[..start].iter().rposition(|b| !b.is_ascii_whitespace());
    let (cut_start, cut_end) = match before {
        Some(p) if bytes[p] == b',' => (p, end),
        _ => {
            let after = bytes[end..].iter().position(|b| !b.is_ascii_whitespace()).map(|o| end + o);
            match after {
                Some(a) if bytes[a] == b',' => (start, a + 1),
                _ => (start, end),
            }
        }
    };
    let mut out = Vec::with_capacity(bytes.len() - (cut_end - cut_start));
    out.extend_from_slice(&bytes[..cut_start]);
    out.extend_from_slice(&bytes[cut_end..]);
    out
}

/// The end of a `"usage":null` member starting at the value offset.
pub fn null_usage_member(bytes: &[u8]) -> Option<(usize, usize)> {
    let (key_start, value_start) = find_key(bytes, &USAGE_KEY, true)?;
    bytes[value_start..].starts_with(b"null").then_some((key_start, value_start + 4))
}

/// Whether a chunk's `choices` array is empty (`"choices":[]`): the extra
/// usage-only chunk that `include_usage` adds at the end of a stream.
pub fn has_empty_choices(bytes: &[u8]) -> bool {
    let Some((_, value_start)) = find_key(bytes, &CHOICES_KEY, false) else { return false };
    let rest = &bytes[value_start..];
    rest.first() == Some(&b'[') && rest[1..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_usage_with_details() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"the \"usage\": trap"}}],
            "usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,
            "prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":2}}}"#;
        let UsageField::Present(u, start, end) = find_usage(body) else { panic!("usage not found") };
        assert_eq!(u, Usage { prompt: 10, completion: 5, total: 15, reasoning: 2, cached: 4, cache_write: 0 });
        assert!(body[start..end].starts_with(b"\"usage\""));
        assert!(body[start..end].ends_with(b"}}"));
    }

    #[test]
    fn responses_api_usage() {
        let body = br#"{"type":"response.completed","response":{"usage":{"input_tokens":7,
            "input_tokens_details":{"cached_tokens":1},"output_tokens":9,
            "output_tokens_details":{"reasoning_tokens":3},"total_tokens":16}}}"#;
        let UsageField::Present(u, ..) = find_usage(body) else { panic!() };
        assert_eq!(u, Usage { prompt: 7, completion: 9, total: 16, reasoning: 3, cached: 1, cache_write: 0 });
    }

    #[test]
    fn gemini_thinking_tokens_are_billed_from_the_total() {
        let u = Usage { prompt: 100, completion: 20, total: 620, reasoning: 0, cached: 0, cache_write: 0 };
        assert_eq!(u.billed_output(), 520);
        let openai = Usage { prompt: 100, completion: 520, total: 620, reasoning: 500, cached: 0, cache_write: 0 };
        assert_eq!(openai.billed_output(), 520);
    }

    #[test]
    fn null_and_absent_usage() {
        assert_eq!(find_usage(br#"{"usage":null,"choices":[]}"#), UsageField::Null);
        assert_eq!(find_usage(br#"{"usage" :  null}"#), UsageField::Null);
        assert_eq!(find_usage(br#"{"choices":[]}"#), UsageField::Absent);
        assert_eq!(find_usage(br#"{"usage":{"prompt_tok"#), UsageField::Absent, "truncated");
    }

    #[test]
    fn removing_members_keeps_valid_json() {
        for (input, expected) in [
            (r#"{"a":1,"usage":null}"#, r#"{"a":1}"#),
            (r#"{"usage":null,"a":1}"#, r#"{"a":1}"#),
            (r#"{"a":1, "usage" : null , "b":2}"#, r#"{"a":1 , "b":2}"#),
            (r#"{"usage":null}"#, r#"{}"#),
        ] {
            let (s, e) = null_usage_member(input.as_bytes()).unwrap();
            let out = String::from_utf8(remove_member(input.as_bytes(), s, e)).unwrap();
            assert_eq!(out, expected);
            serde_json::from_str::<serde_json::Value>(&out).unwrap();
        }
    }

    #[test]
    fn empty_choices_and_model() {
        assert!(has_empty_choices(br#"{"choices":[],"usage":{}}"#));
        assert!(has_empty_choices(br#"{"choices": [ ] }"#));
        assert!(!has_empty_choices(br#"{"choices":[{"index":0}]}"#));
        assert_eq!(
            find_model(br#"{"id":"x","model":"gemini-2.5-pro","choices":[]}"#).as_deref(),
            Some("gemini-2.5-pro")
        );
        assert_eq!(find_model(br#"{"id":"x"}"#), None);
    }
}
