//! A borrowed look at a request body: the few fields the gateway routes on.
//!
//! Parsing into this struct validates the whole document as JSON (unknown
//! fields are skipped, not ignored), without building a `Value` tree, so the
//! gateway can reject malformed bodies and still forward the original bytes.

use std::borrow::Cow;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct RequestPeek<'a> {
    #[serde(borrow, default)]
    pub model: Option<Cow<'a, str>>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// `Some(None)`: the member is there but `null`.
    #[serde(default, deserialize_with = "present")]
    pub stream_options: Option<Option<StreamOptions>>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// The responses API's name for it.
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    #[serde(borrow, default)]
    pub reasoning_effort: Option<Cow<'a, str>>,
    /// The responses API's reasoning settings (`reasoning.effort`).
    #[serde(borrow, default)]
    pub reasoning: Option<ReasoningPeek<'a>>,
    /// Gemini thinking settings, as the OpenAI SDKs send `extra_body` (merged
    /// into the body) ...
    #[serde(default)]
    pub google: Option<GooglePeek>,
    /// ... or as clients that send a literal `extra_body` member do.
    #[serde(default)]
    pub extra_body: Option<ExtraBodyPeek>,
    #[serde(default)]
    pub n: Option<u64>,
    /// The end user, as the client names them (sticky routing reads it).
    #[serde(borrow, default)]
    pub user: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ReasoningPeek<'a> {
    #[serde(borrow, default)]
    pub effort: Option<Cow<'a, str>>,
}

/// Gemini settings under `google`: the OpenAI-compatible layers read the
/// snake_case names and, passing them on, the camelCase ones too, so both
/// are looked at.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub struct GooglePeek {
    #[serde(default)]
    pub thinking_config: Option<ThinkingPeek>,
    #[serde(default, rename = "thinkingConfig")]
    pub thinking_config_camel: Option<ThinkingPeek>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub struct ThinkingPeek {
    /// `-1` asks Gemini for a dynamic budget.
    #[serde(default)]
    pub thinking_budget: Option<i64>,
    #[serde(default, rename = "thinkingBudget")]
    pub thinking_budget_camel: Option<i64>,
}

impl GooglePeek {
    fn budgets(&self) -> impl Iterator<Item = i64> + '_ {
        [self.thinking_config, self.thinking_config_camel]
            .into_iter()
            .flatten()
            .flat_map(|t| [t.thinking_budget, t.thinking_budget_camel])
            .flatten()
    }
}

/// Deserializes a member that is present (even as `null`) to `Some`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub struct ExtraBodyPeek {
    #[serde(default)]
    pub google: Option<GooglePeek>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug)]
pub enum RequestPeekError {
    /// The body is not a JSON object at all.
    NotAnObject,
    /// The body is not valid JSON, or a known field has the wrong type.
    Invalid(serde_json::Error),
}

impl std::fmt::Display for RequestPeekError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotAnObject => f.write_str("the request body must be a JSON object"),
            Self::Invalid(e) => write!(f, "the request body is not valid JSON: {e}"),
        }
    }
}

impl std::error::Error for RequestPeekError {}

impl<'a> RequestPeek<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Self, RequestPeekError> {
        // serde accepts a JSON array for a struct (fields by position); an
        // OpenAI request is always an object, so check that first.
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Err(e) => Err(RequestPeekError::Invalid(e)),
                Ok(_) => Err(RequestPeekError::NotAnObject),
            };
        }
        serde_json::from_slice(body).map_err(RequestPeekError::Invalid)
    }

    /// The output limit the client set, under whichever name; the largest
    /// when it set several, since a provider may honour any one of them.
    pub fn max_output(&self) -> Option<u64> {
        [self.max_completion_tokens, self.max_tokens, self.max_output_tokens].into_iter().flatten().max()
    }

    /// Every Gemini thinking budget the client set, wherever it put it
    /// (`google` or `extra_body.google`, snake_case or camelCase): an
    /// upstream may read any of them.
    pub fn thinking_budgets(&self) -> impl Iterator<Item = i64> + '_ {
        let direct = self.google.iter().flat_map(GooglePeek::budgets);
        let extra = self.extra_body.and_then(|e| e.google);
        direct.chain(extra.into_iter().flat_map(|g| g.budgets().collect::<Vec<_>>()))
    }

    /// The thinking budget the upstream may use: the most permissive one set
    /// (`-1`, dynamic, above any number).
    pub fn thinking_budget(&self) -> Option<i64> {
        self.thinking_budgets().max_by_key(|b| if *b < 0 { u64::MAX } else { *b as u64 })
    }

    /// Every reasoning effort the client set (`reasoning_effort`, and the
    /// responses API's `reasoning.effort`).
    pub fn reasoning_efforts(&self) -> impl Iterator<Item = (&'static str, &str)> + '_ {
        let top = self.reasoning_effort.as_deref().map(|e| ("reasoning_effort", e));
        let nested = self.reasoning.as_ref().and_then(|r| r.effort.as_deref()).map(|e| ("reasoning.effort", e));
        top.into_iter().chain(nested)
    }

    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether the body has a `stream_options` member, even `null`.
    pub fn has_stream_options(&self) -> bool {
        self.stream_options.is_some()
    }

    pub fn client_asked_for_usage(&self) -> bool {
        self.stream_options.flatten().and_then(|o| o.include_usage).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_and_stream_flags_and_skips_unknown_fields() {
        let body = br#"{"model":"gemini-2.5-flash","messages":[{"role":"user","content":"hi"}],
            "stream":true,"stream_options":{"include_usage":true},
            "extra_body":{"google":{"thinking_config":{"thinking_budget":1024}}}}"#;
        let peek = RequestPeek::parse(body).unwrap();
        assert_eq!(peek.model.as_deref(), Some("gemini-2.5-flash"));
        assert!(peek.is_stream());
        assert!(peek.client_asked_for_usage());
    }

    #[test]
    fn output_limits_and_thinking_settings_are_read_from_either_place() {
        let p =
            RequestPeek::parse(br#"{"max_tokens":10,"google":{"thinking_config":{"thinking_budget":512}}}"#).unwrap();
        assert_eq!((p.max_output(), p.thinking_budget()), (Some(10), Some(512)));
        let p = RequestPeek::parse(
            br#"{"max_completion_tokens":7,"reasoning_effort":"low","extra_body":{"google":{"thinking_config":{"thinking_budget":-1}}}}"#,
        )
        .unwrap();
        assert_eq!((p.max_output(), p.thinking_budget()), (Some(7), Some(-1)));
        let both = RequestPeek::parse(br#"{"max_completion_tokens":1,"max_tokens":100000}"#).unwrap();
        assert_eq!(both.max_output(), Some(100_000), "the larger limit bounds what may be produced");
        assert_eq!(p.reasoning_effort.as_deref(), Some("low"));
    }

    #[test]
    fn every_thinking_budget_and_effort_is_seen_and_the_most_permissive_wins() {
        let p = RequestPeek::parse(
            br#"{"google":{"thinking_config":{"thinking_budget":100}},
                "extra_body":{"google":{"thinkingConfig":{"thinkingBudget":9000}}},
                "reasoning":{"effort":"high"}}"#,
        )
        .unwrap();
        assert_eq!(p.thinking_budgets().collect::<Vec<_>>(), [100, 9000]);
        assert_eq!(p.thinking_budget(), Some(9000));
        assert_eq!(p.reasoning_efforts().collect::<Vec<_>>(), [("reasoning.effort", "high")]);
        let dynamic =
            RequestPeek::parse(br#"{"google":{"thinking_config":{"thinking_budget":5,"thinkingBudget":-1}}}"#).unwrap();
        assert_eq!(dynamic.thinking_budget(), Some(-1));
    }

    #[test]
    fn a_null_stream_options_member_is_still_a_member() {
        let p = RequestPeek::parse(br#"{"stream":true,"stream_options":null}"#).unwrap();
        assert!(p.has_stream_options() && !p.client_asked_for_usage());
        assert!(!RequestPeek::parse(br#"{"stream":true}"#).unwrap().has_stream_options());
    }

    #[test]
    fn escaped_model_names_are_decoded() {
        let peek = RequestPeek::parse(br#"{"model":"a\/b"}"#).unwrap();
        assert_eq!(peek.model.as_deref(), Some("a/b"));
    }

    #[test]
    fn rejects_truncated_json() {
        let err = RequestPeek::parse(br#"{"model":"x","messages":["#).unwrap_err();
        assert!(matches!(err, RequestPeekError::Invalid(_)));
    }

    #[test]
    fn rejects_arrays_and_scalars() {
        assert!(matches!(RequestPeek::parse(br#"["gpt-4", true]"#), Err(RequestPeekError::NotAnObject)));
        assert!(matches!(RequestPeek::parse(b"42"), Err(RequestPeekError::NotAnObject)));
        assert!(matches!(RequestPeek::parse(b""), Err(RequestPeekError::Invalid(_))));
    }

    #[test]
    fn rejects_wrong_types_for_known_fields() {
        assert!(RequestPeek::parse(br#"{"model":1}"#).is_err());
        assert!(RequestPeek::parse(br#"{"stream":"yes"}"#).is_err());
    }

    #[test]
    fn invalid_json_in_unknown_fields_is_still_rejected() {
        assert!(RequestPeek::parse(br#"{"model":"x","foo":[1,2,}"#).is_err());
    }
}
