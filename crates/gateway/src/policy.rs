//! A tenant's token and thinking policy, applied to a request body before
//! it is forwarded: caps on the output limit, on the reasoning effort and
//! on Gemini's thinking budget (clamped or rejected, as the tenant chooses),
//! and defaults injected where the client set none. Only the members that
//! change are rewritten; everything else keeps its bytes.
//!
//! A cap applies to every place a provider reads the setting: the output
//! limit under each of its names, `reasoning_effort` and the responses
//! API's `reasoning.effort`, and the thinking budget under `google` and
//! `extra_body.google`, in snake_case and camelCase. An effort the gateway
//! does not know is over any cap. A body whose members the gateway cannot
//! parse to rewrite them is refused, never forwarded unchecked.

use std::collections::HashMap;

use serde_json::value::RawValue;
use serde_json::{Value, json};
use tollgate_openai::RequestPeek;
use tollgate_store::{OverCap, ReasoningEffort, TenantPolicy};

use crate::accounting::pricing::ThinkingPlace;
use crate::error::GatewayError;

/// The result of applying a policy.
#[derive(Debug, Default)]
pub struct Applied {
    /// The top-level members to set (or, with `None`, remove); the request
    /// is forwarded unchanged when there are none.
    pub edits: Vec<(&'static str, Option<Value>)>,
    /// The output limit the upstream will see (after caps and defaults).
    pub max_output: Option<u64>,
}

/// The member that carries the output limit on each endpoint, when the
/// client set none.
fn output_member(endpoint: &str) -> &'static str {
    if endpoint == "/v1/responses" { "max_output_tokens" } else { "max_tokens" }
}

fn applies_to(endpoint: &str) -> bool {
    matches!(endpoint, "/v1/chat/completions" | "/v1/completions" | "/v1/responses")
}

/// Applies `policy` to a request for `endpoint`. `thinking` says where the
/// model takes a thinking budget (from the model catalogue), for defaults.
pub fn apply(
    policy: &TenantPolicy,
    endpoint: &str,
    body: &[u8],
    peek: &RequestPeek<'_>,
    thinking: Option<ThinkingPlace>,
) -> Result<Applied, GatewayError> {
    let requested = peek.max_output();
    if !applies_to(endpoint) {
        return Ok(Applied { edits: Vec::new(), max_output: requested });
    }
    let reject = policy.over_cap == Some(OverCap::Reject);
    let mut members = Members::new(body);
    let mut edits: Vec<(&'static str, Option<Value>)> = Vec::new();
    let mut max_output = requested;

    // Output limit: cap every name the client used; default when none.
    if let Some(cap) = policy.max_output_tokens {
        for (name, value) in [
            ("max_tokens", peek.max_tokens),
            ("max_completion_tokens", peek.max_completion_tokens),
            ("max_output_tokens", peek.max_output_tokens),
        ] {
            if value.is_some_and(|v| v > cap) {
                if reject {
                    return Err(GatewayError::OverCap {
                        param: name,
                        message: format!("`{name}` may be at most {cap}"),
                    });
                }
                edits.push((name, Some(json!(cap))));
            }
        }
        max_output = Some(requested.map_or(cap, |r| r.min(cap)));
    }
    if requested.is_none()
        && let Some(default) = policy.default_max_output_tokens.or(policy.max_output_tokens)
    {
        edits.push((output_member(endpoint), Some(json!(default))));
        max_output = Some(default);
    }

    // Reasoning effort, wherever it is set.
    if let Some(max) = policy.max_reasoning_effort {
        for (place, asked) in peek.reasoning_efforts() {
            if ReasoningEffort::parse(asked).is_some_and(|a| a <= max) {
                continue;
            }
            if reject {
                return Err(GatewayError::OverCap {
                    param: place,
                    message: format!("`{place}` may be at most {}", max.as_str()),
                });
            }
            match place {
                "reasoning_effort" => edits.push(("reasoning_effort", Some(json!(max.as_str())))),
                _ => {
                    let mut reasoning = members.get("reasoning")?.unwrap_or_else(|| json!({}));
                    reasoning["effort"] = json!(max.as_str());
                    edits.push(("reasoning", Some(reasoning)));
                }
            }
        }
    }

    // Gemini thinking budget (-1 asks for a dynamic budget: over any cap).
    let budget = peek.thinking_budget();
    if let (Some(cap), Some(asked)) = (policy.max_thinking_budget, budget)
        && (asked < 0 || asked as u64 > cap)
    {
        if reject {
            return Err(GatewayError::OverCap {
                param: "thinking_budget",
                message: format!("`thinking_config.thinking_budget` may be at most {cap}"),
            });
        }
        for name in ["google", "extra_body"] {
            if let Some(mut value) = members.get(name)? {
                let google = if name == "google" { Some(&mut value) } else { value.get_mut("google") };
                if let Some(google) = google
                    && clamp_thinking(google, cap)
                {
                    edits.push((name, Some(value)));
                }
            }
        }
    }
    if budget.is_none()
        && peek.reasoning_efforts().next().is_none()
        && thinking == Some(ThinkingPlace::Google)
        && let Some(default) = policy.default_thinking_budget
    {
        set_thinking_budget(&mut members, peek, default, &mut edits)?;
    }

    Ok(Applied { edits, max_output })
}

/// The body's top-level members, parsed the first time one is needed and
/// only once per request.
struct Members<'a> {
    body: &'a [u8],
    parsed: Option<HashMap<String, &'a RawValue>>,
}

impl<'a> Members<'a> {
    fn new(body: &'a [u8]) -> Self {
        Self { body, parsed: None }
    }

    /// A top-level member as a value; `None` when absent. A body the
    /// gateway cannot parse this far cannot be checked, so it is refused.
    fn get(&mut self, name: &str) -> Result<Option<Value>, GatewayError> {
        if self.parsed.is_none() {
            self.parsed = Some(serde_json::from_slice(self.body).map_err(|_| GatewayError::PolicyUncheckable)?);
        }
        match self.parsed.as_ref().and_then(|m| m.get(name)) {
            None => Ok(None),
            Some(raw) => serde_json::from_str(raw.get()).map(Some).map_err(|_| GatewayError::PolicyUncheckable),
        }
    }
}

/// Sets every thinking budget under a `google` object that passes `cap`
/// (or asks for a dynamic one) to `cap`; whether anything changed.
fn clamp_thinking(google: &mut Value, cap: u64) -> bool {
    let mut changed = false;
    for config in ["thinking_config", "thinkingConfig"] {
        for name in ["thinking_budget", "thinkingBudget"] {
            if let Some(budget) = google.get_mut(config).and_then(|c| c.get_mut(name))
                && budget.as_i64().is_none_or(|b| b < 0 || b as u64 > cap)
            {
                *budget = json!(cap);
                changed = true;
            }
        }
    }
    changed
}

/// Sets `thinking_config.thinking_budget` where the client put its thinking
/// settings (a literal `extra_body`, else the top-level `google` member).
fn set_thinking_budget(
    members: &mut Members<'_>,
    peek: &RequestPeek<'_>,
    budget: u64,
    edits: &mut Vec<(&'static str, Option<Value>)>,
) -> Result<(), GatewayError> {
    let in_extra_body = peek.extra_body.and_then(|e| e.google).is_some();
    if in_extra_body {
        let mut extra = members.get("extra_body")?.unwrap_or_else(|| json!({}));
        extra["google"]["thinking_config"]["thinking_budget"] = json!(budget);
        edits.push(("extra_body", Some(extra)));
    } else {
        let mut google = members.get("google")?.filter(Value::is_object).unwrap_or_else(|| json!({}));
        if !google["thinking_config"].is_object() {
            google["thinking_config"] = json!({});
        }
        google["thinking_config"]["thinking_budget"] = json!(budget);
        edits.push(("google", Some(google)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_openai::rewrite::set_members;

    fn run(policy: &TenantPolicy, endpoint: &str, body: &str) -> Result<(Option<Value>, Option<u64>), GatewayError> {
        let peek = RequestPeek::parse(body.as_bytes()).unwrap();
        let table = crate::accounting::pricing::PriceTable::parse(crate::accounting::pricing::DEFAULT_PRICING).unwrap();
        let thinking = peek.model.as_deref().and_then(|m| table.thinking_place(m));
        let applied = apply(policy, endpoint, body.as_bytes(), &peek, thinking)?;
        let rewritten = (!applied.edits.is_empty())
            .then(|| serde_json::from_slice(&set_members(body.as_bytes(), &applied.edits).unwrap()).unwrap());
        Ok((rewritten, applied.max_output))
    }

    fn capped(over_cap: OverCap) -> TenantPolicy {
        TenantPolicy {
            max_output_tokens: Some(4096),
            over_cap: Some(over_cap),
            max_reasoning_effort: Some(ReasoningEffort::Low),
            max_thinking_budget: Some(2048),
            ..TenantPolicy::default()
        }
    }

    #[test]
    fn an_empty_policy_changes_nothing() {
        let (body, max) = run(&TenantPolicy::default(), "/v1/chat/completions", r#"{"max_tokens":99999}"#).unwrap();
        assert_eq!((body, max), (None, Some(99999)));
    }

    #[test]
    fn caps_clamp() {
        let chat = r#"{"model":"gemini-2.5-pro","max_tokens":9000,"max_completion_tokens":100,"reasoning_effort":"high",
            "google":{"thinking_config":{"thinking_budget":8192,"include_thoughts":true}}}"#;
        let (body, max) = run(&capped(OverCap::Clamp), "/v1/chat/completions", chat).unwrap();
        let body = body.unwrap();
        assert_eq!(body["max_tokens"], 4096);
        assert_eq!(body["max_completion_tokens"], 100, "values under the cap stay");
        assert_eq!(body["reasoning_effort"], "low");
        assert_eq!(body["google"]["thinking_config"], json!({"thinking_budget": 2048, "include_thoughts": true}));
        assert_eq!(max, Some(4096), "the provider may honour either limit, so the larger bounds the output");
    }

    #[test]
    fn caps_reject_naming_the_field() {
        for (body, param) in [
            (r#"{"max_completion_tokens":5000}"#, "max_completion_tokens"),
            (r#"{"reasoning_effort":"medium"}"#, "reasoning_effort"),
            (r#"{"extra_body":{"google":{"thinking_config":{"thinking_budget":-1}}}}"#, "thinking_budget"),
        ] {
            match run(&capped(OverCap::Reject), "/v1/chat/completions", body) {
                Err(GatewayError::OverCap { param: p, .. }) => assert_eq!(p, param),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn defaults_are_injected_where_the_client_set_none() {
        let policy = TenantPolicy {
            default_max_output_tokens: Some(512),
            default_thinking_budget: Some(1024),
            ..TenantPolicy::default()
        };
        let (body, max) =
            run(&policy, "/v1/chat/completions", r#"{"model":"gemini-2.5-flash","messages":[]}"#).unwrap();
        let body = body.unwrap();
        assert_eq!(body["max_tokens"], 512);
        assert_eq!(body["google"]["thinking_config"]["thinking_budget"], 1024);
        assert_eq!(max, Some(512));
        let (body, _) = run(&policy, "/v1/responses", r#"{"model":"gpt-4.1","input":"x"}"#).unwrap();
        let body = body.unwrap();
        assert_eq!(body["max_output_tokens"], 512);
        assert!(body.get("google").is_none(), "thinking defaults only for Gemini models");
        let (body, _) = run(
            &policy,
            "/v1/chat/completions",
            r#"{"model":"gemini-2.5-flash","reasoning_effort":"low","max_tokens":5}"#,
        )
        .unwrap();
        assert!(body.is_none(), "an explicit reasoning_effort is the client's thinking choice");
    }

    #[test]
    fn caps_apply_to_every_place_a_provider_reads_the_setting() {
        let sneaky = r#"{"model":"gemini-2.5-pro","google":{"thinking_config":{"thinking_budget":100}},
            "extra_body":{"google":{"thinking_config":{"thinking_budget":24576},"thinkingConfig":{"thinkingBudget":-1}}}}"#;
        match run(&capped(OverCap::Reject), "/v1/chat/completions", sneaky) {
            Err(GatewayError::OverCap { param, .. }) => assert_eq!(param, "thinking_budget"),
            other => panic!("{other:?}"),
        }
        let (body, _) = run(&capped(OverCap::Clamp), "/v1/chat/completions", sneaky).unwrap();
        let body = body.unwrap();
        assert_eq!(body["google"]["thinking_config"]["thinking_budget"], 100, "compliant values stay");
        assert_eq!(body["extra_body"]["google"]["thinking_config"]["thinking_budget"], 2048);
        assert_eq!(body["extra_body"]["google"]["thinkingConfig"]["thinkingBudget"], 2048);

        let camel = r#"{"model":"gemini-2.5-pro","google":{"thinkingConfig":{"thinkingBudget":9000}}}"#;
        let (body, _) = run(&capped(OverCap::Clamp), "/v1/chat/completions", camel).unwrap();
        assert_eq!(body.unwrap()["google"]["thinkingConfig"]["thinkingBudget"], 2048);

        let responses = r#"{"model":"o3","input":"x","reasoning":{"effort":"high","summary":"auto"}}"#;
        match run(&capped(OverCap::Reject), "/v1/responses", responses) {
            Err(GatewayError::OverCap { param, .. }) => assert_eq!(param, "reasoning.effort"),
            other => panic!("{other:?}"),
        }
        let (body, _) = run(&capped(OverCap::Clamp), "/v1/responses", responses).unwrap();
        assert_eq!(body.unwrap()["reasoning"], json!({"effort": "low", "summary": "auto"}));

        let unknown = r#"{"model":"o3","reasoning_effort":"xhigh"}"#;
        assert!(run(&capped(OverCap::Reject), "/v1/chat/completions", unknown).is_err(), "unknown is over the cap");
    }

    #[test]
    fn members_no_value_can_hold_do_not_stop_a_clamp() {
        let deep =
            format!(r#"{{"x":{}1{},"model":"gemini-2.5-pro","max_tokens":99999}}"#, "[".repeat(130), "]".repeat(130));
        let huge = r#"{"x":1e999,"model":"gemini-2.5-pro","max_tokens":99999}"#;
        for body in [deep.as_str(), huge] {
            let peek = RequestPeek::parse(body.as_bytes()).expect("the peek skips members it does not read");
            match apply(&capped(OverCap::Clamp), "/v1/chat/completions", body.as_bytes(), &peek, None) {
                Err(GatewayError::PolicyUncheckable) => {}
                Ok(Applied { edits, .. }) if !edits.is_empty() => {
                    let rewritten = set_members(body.as_bytes(), &edits).expect("raw members are kept as they are");
                    let text = String::from_utf8(rewritten).unwrap();
                    assert!(text.contains(r#""max_tokens":4096"#), "{text}");
                    assert!(text.starts_with(r#"{"x":"#), "other members keep their bytes");
                }
                other => panic!("forwarded unchecked: {other:?}"),
            }
        }
    }

    #[test]
    fn a_thinking_setting_that_cannot_be_parsed_is_refused_not_forwarded_unchecked() {
        let body = format!(
            r#"{{"model":"gemini-2.5-pro","google":{{"thinking_config":{{"thinking_budget":9000}},"x":{}1{}}}}}"#,
            "[".repeat(130),
            "]".repeat(130)
        );
        let peek = RequestPeek::parse(body.as_bytes()).expect("the peek skips members it does not read");
        let result = apply(&capped(OverCap::Clamp), "/v1/chat/completions", body.as_bytes(), &peek, None);
        assert!(matches!(result, Err(GatewayError::PolicyUncheckable)), "{result:?}");
    }

    #[test]
    fn embeddings_are_untouched() {
        let (body, _) = run(&capped(OverCap::Reject), "/v1/embeddings", r#"{"input":"x","max_tokens":99999}"#).unwrap();
        assert!(body.is_none());
    }
}
