//! A tenant's token and thinking policy, applied to a request body before
//! it is forwarded: caps on the output limit, on `reasoning_effort` and on
//! Gemini's `thinking_budget` (clamped or rejected, as the tenant chooses),
//! and defaults injected where the client set none. Only the members that
//! change are rewritten; everything else keeps its bytes.

use bytes::Bytes;
use serde_json::{Value, json};
use tollgate_openai::RequestPeek;
use tollgate_openai::rewrite::set_members;
use tollgate_store::{OverCap, ReasoningEffort, TenantPolicy};

use crate::error::GatewayError;

/// The result of applying a policy.
#[derive(Debug, Default)]
pub struct Applied {
    /// The rewritten body, when the policy changed anything.
    pub body: Option<Bytes>,
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

fn is_gemini(model: Option<&str>) -> bool {
    model.is_some_and(|m| m.rsplit('/').next().is_some_and(|bare| bare.starts_with("gemini")))
}

pub fn apply(
    policy: &TenantPolicy,
    endpoint: &str,
    body: &[u8],
    peek: &RequestPeek<'_>,
) -> Result<Applied, GatewayError> {
    let requested = peek.max_output();
    if !applies_to(endpoint) {
        return Ok(Applied { body: None, max_output: requested });
    }
    let reject = policy.over_cap == Some(OverCap::Reject);
    let mut edits: Vec<(&str, Option<Value>)> = Vec::new();
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

    // Reasoning effort.
    if let (Some(max), Some(asked)) = (policy.max_reasoning_effort, peek.reasoning_effort.as_deref())
        && ReasoningEffort::parse(asked).is_some_and(|a| a > max)
    {
        if reject {
            return Err(GatewayError::OverCap {
                param: "reasoning_effort",
                message: format!("`reasoning_effort` may be at most {}", max.as_str()),
            });
        }
        edits.push(("reasoning_effort", Some(json!(max.as_str()))));
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
        set_thinking_budget(body, peek, cap, &mut edits);
    }
    if budget.is_none()
        && peek.reasoning_effort.is_none()
        && is_gemini(peek.model.as_deref())
        && let Some(default) = policy.default_thinking_budget
    {
        set_thinking_budget(body, peek, default, &mut edits);
    }

    if edits.is_empty() {
        return Ok(Applied { body: None, max_output });
    }
    let rewritten = set_members(body, &edits).ok_or(GatewayError::Internal)?;
    Ok(Applied { body: Some(Bytes::from(rewritten)), max_output })
}

/// Sets `thinking_config.thinking_budget` where the client put its thinking
/// settings (a literal `extra_body`, else the top-level `google` member).
fn set_thinking_budget(body: &[u8], peek: &RequestPeek<'_>, budget: u64, edits: &mut Vec<(&str, Option<Value>)>) {
    let Ok(Value::Object(members)) = serde_json::from_slice::<Value>(body) else { return };
    let in_extra_body = peek.extra_body.and_then(|e| e.google).is_some();
    if in_extra_body {
        let mut extra = members.get("extra_body").cloned().unwrap_or_else(|| json!({}));
        extra["google"]["thinking_config"]["thinking_budget"] = json!(budget);
        edits.push(("extra_body", Some(extra)));
    } else {
        let mut google = members.get("google").cloned().filter(Value::is_object).unwrap_or_else(|| json!({}));
        if !google["thinking_config"].is_object() {
            google["thinking_config"] = json!({});
        }
        google["thinking_config"]["thinking_budget"] = json!(budget);
        edits.push(("google", Some(google)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: &TenantPolicy, endpoint: &str, body: &str) -> Result<(Option<Value>, Option<u64>), GatewayError> {
        let peek = RequestPeek::parse(body.as_bytes()).unwrap();
        let applied = apply(policy, endpoint, body.as_bytes(), &peek)?;
        Ok((applied.body.map(|b| serde_json::from_slice(&b).unwrap()), applied.max_output))
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
        assert_eq!(max, Some(100));
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
    fn embeddings_are_untouched() {
        let (body, _) = run(&capped(OverCap::Reject), "/v1/embeddings", r#"{"input":"x","max_tokens":99999}"#).unwrap();
        assert!(body.is_none());
    }
}
