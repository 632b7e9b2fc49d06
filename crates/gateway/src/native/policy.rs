//! A tenant's token and thinking policy on the Gemini and Anthropic APIs:
//! the same caps and defaults as on OpenAI-shaped requests, where each API
//! reads them. Gemini: `generationConfig.maxOutputTokens` and
//! `generationConfig.thinkingConfig.thinkingBudget`; Anthropic:
//! `max_tokens` and `thinking.budget_tokens`. Only the member that changes
//! is rewritten (the whole `generationConfig` or `thinking` object, or
//! `max_tokens`).

use serde_json::{Value, json};
use tollgate_openai::{anthropic, gemini};
use tollgate_store::{OverCap, TenantPolicy};

use crate::error::GatewayError;
use crate::policy::Applied;

fn over(param: &'static str, cap: u64) -> GatewayError {
    GatewayError::OverCap { param, message: format!("`{param}` may be at most {cap}") }
}

/// A top-level object member, or an empty object when absent.
fn member(body: &[u8], name: &str) -> Result<Value, GatewayError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| GatewayError::PolicyUncheckable)?;
    Ok(value.get(name).filter(|v| v.is_object()).cloned().unwrap_or_else(|| json!({})))
}

/// Applies `policy` to a `generateContent` request. `takes_thinking`: the
/// model catalogue says the model has a thinking budget (a budget set on
/// one that has none would be refused upstream), for defaults.
pub fn apply_gemini(
    policy: &TenantPolicy,
    body: &[u8],
    peek: &gemini::RequestPeek,
    takes_thinking: bool,
) -> Result<Applied, GatewayError> {
    let reject = policy.over_cap == Some(OverCap::Reject);
    let mut max_output = peek.max_output_tokens;
    let mut set_output = None;
    if let Some(cap) = policy.max_output_tokens {
        if peek.max_output_tokens.is_some_and(|asked| asked > cap) {
            if reject {
                return Err(over("generationConfig.maxOutputTokens", cap));
            }
            set_output = Some(cap);
        }
        max_output = Some(peek.max_output_tokens.map_or(cap, |asked| asked.min(cap)));
    }
    if peek.max_output_tokens.is_none()
        && let Some(default) = policy.default_max_output_tokens.or(policy.max_output_tokens)
    {
        set_output = Some(default);
        max_output = Some(default);
    }
    let mut set_thinking = None;
    match (policy.max_thinking_budget, peek.thinking_budget) {
        // -1 asks for a dynamic budget: over any cap.
        (Some(cap), Some(asked)) if asked < 0 || asked as u64 > cap => {
            if reject {
                return Err(over("generationConfig.thinkingConfig.thinkingBudget", cap));
            }
            set_thinking = Some(cap);
        }
        // Left to the model, the budget is dynamic: the default, else the cap.
        (_, None) if takes_thinking => {
            set_thinking = policy.default_thinking_budget.or(policy.max_thinking_budget);
        }
        _ => {}
    }
    let mut edits = Vec::new();
    if set_output.is_some() || set_thinking.is_some() {
        let mut config = member(body, "generationConfig")?;
        if let Some(limit) = set_output {
            config["maxOutputTokens"] = json!(limit);
        }
        if let Some(budget) = set_thinking {
            if !config["thinkingConfig"].is_object() {
                config["thinkingConfig"] = json!({});
            }
            config["thinkingConfig"]["thinkingBudget"] = json!(budget);
        }
        edits.push(("generationConfig", Some(config)));
    }
    Ok(Applied { edits, max_output })
}

/// Applies `policy` to a Messages request. `max_tokens` is required by the
/// API, so there is no output limit to default; a thinking budget is only
/// capped (turning extended thinking on is the client's choice).
pub fn apply_anthropic(
    policy: &TenantPolicy,
    body: &[u8],
    peek: &anthropic::RequestPeek,
) -> Result<Applied, GatewayError> {
    let reject = policy.over_cap == Some(OverCap::Reject);
    let mut edits = Vec::new();
    let mut max_output = peek.max_tokens;
    if let Some(cap) = policy.max_output_tokens {
        if peek.max_tokens.is_some_and(|asked| asked > cap) {
            if reject {
                return Err(over("max_tokens", cap));
            }
            edits.push(("max_tokens", Some(json!(cap))));
        }
        max_output = Some(peek.max_tokens.map_or(cap, |asked| asked.min(cap)));
    }
    if let (Some(cap), Some(asked)) = (policy.max_thinking_budget, peek.thinking_budget)
        && (asked < 0 || asked as u64 > cap)
    {
        if reject {
            return Err(over("thinking.budget_tokens", cap));
        }
        let mut thinking = member(body, "thinking")?;
        thinking["budget_tokens"] = json!(cap);
        edits.push(("thinking", Some(thinking)));
    }
    Ok(Applied { edits, max_output })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_output: Option<u64>, max_thinking: Option<u64>, reject: bool) -> TenantPolicy {
        TenantPolicy {
            max_output_tokens: max_output,
            max_thinking_budget: max_thinking,
            over_cap: reject.then_some(OverCap::Reject),
            ..TenantPolicy::default()
        }
    }

    #[test]
    fn gemini_caps_clamp_inside_generation_config() {
        let body = br#"{"contents":[],"generationConfig":{"temperature":0.5,"maxOutputTokens":9000,"thinkingConfig":{"thinkingBudget":-1}}}"#;
        let peek = gemini::RequestPeek::parse(body).unwrap();
        let applied = apply_gemini(&policy(Some(1000), Some(512), false), body, &peek, true).unwrap();
        assert_eq!(applied.max_output, Some(1000));
        let config = applied.edits[0].1.as_ref().unwrap();
        assert_eq!(config["maxOutputTokens"], 1000);
        assert_eq!(config["thinkingConfig"]["thinkingBudget"], 512);
        assert_eq!(config["temperature"], 0.5, "the rest of the member is kept");
        let err = apply_gemini(&policy(Some(1000), None, true), body, &peek, true).unwrap_err();
        assert!(err.to_string().contains("maxOutputTokens"), "{err}");
    }

    #[test]
    fn gemini_defaults_fill_what_is_absent_and_nothing_changes_without_a_policy() {
        let body = br#"{"contents":[]}"#;
        let peek = gemini::RequestPeek::parse(body).unwrap();
        assert!(apply_gemini(&TenantPolicy::default(), body, &peek, true).unwrap().edits.is_empty());
        let defaults = TenantPolicy {
            default_max_output_tokens: Some(256),
            default_thinking_budget: Some(0),
            ..TenantPolicy::default()
        };
        let only_output = apply_gemini(&defaults, body, &peek, false).unwrap();
        assert!(
            only_output.edits[0].1.as_ref().unwrap().get("thinkingConfig").is_none(),
            "no budget for a model without one"
        );
        let applied = apply_gemini(&defaults, body, &peek, true).unwrap();
        assert_eq!(applied.max_output, Some(256));
        let config = applied.edits[0].1.as_ref().unwrap();
        assert_eq!(config["thinkingConfig"]["thinkingBudget"], 0);
    }

    #[test]
    fn anthropic_caps_max_tokens_and_the_thinking_budget() {
        let body =
            br#"{"model":"claude","max_tokens":8000,"thinking":{"type":"enabled","budget_tokens":6000},"messages":[]}"#;
        let peek = anthropic::RequestPeek::parse(body).unwrap();
        let applied = apply_anthropic(&policy(Some(4000), Some(2048), false), body, &peek).unwrap();
        assert_eq!(applied.max_output, Some(4000));
        let edits: std::collections::HashMap<_, _> = applied.edits.into_iter().collect();
        assert_eq!(edits["max_tokens"], Some(json!(4000)));
        assert_eq!(edits["thinking"], Some(json!({"type": "enabled", "budget_tokens": 2048})));
        assert!(apply_anthropic(&policy(Some(4000), None, true), body, &peek).is_err());
    }
}
