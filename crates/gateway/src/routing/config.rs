//! Routes as written in the configuration file (`[[routes]]`).
//!
//! ```toml
//! [[routes]]
//! model = "chat-default"            # what clients send: exact, glob, or an alias
//! sticky = "user"                   # keep a caller on one variant: key, tenant or user
//! retry_on = ["connect", "timeout", "rate_limited", "server_error"]
//! attempts_per_target = 2
//! deadline = "60s"
//!
//! [[routes.groups]]                 # tried first
//! targets = [
//!   { upstream = "comet", model = "gemini-2.5-flash-lite", weight = 90, overrides = { thinking_budget = 0 } },
//!   { upstream = "comet", model = "gemini-2.5-flash-lite", weight = 10, overrides = { thinking_budget = 1024 } },
//! ]
//! [[routes.groups]]                 # the fallback
//! targets = [{ upstream = "comet", model = "gemini-2.5-pro" }]
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tollgate_openai::Api;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The model name clients send: an exact name, a glob (`gemini-*`), or
    /// an alias that exists only in the gateway.
    pub model: String,
    /// The API whose requests the route serves (`openai`, `gemini` or
    /// `anthropic`); every target's upstream must speak it.
    #[serde(default)]
    pub api: Api,
    /// Fallback groups, tried in order; each a weighted set of targets.
    pub groups: Vec<GroupConfig>,
    /// Keep one caller on one target of a weighted group.
    #[serde(default)]
    pub sticky: Option<Sticky>,
    /// Which failures are tried again (the same target, then the next one).
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<RetryOn>,
    /// Attempts on one target before moving on.
    #[serde(default = "default_attempts")]
    pub attempts_per_target: u32,
    /// The longest a request may spend on attempts and waits between them.
    #[serde(default = "default_deadline", with = "humantime_serde")]
    pub deadline: Duration,
    /// Each target's circuit breaker.
    #[serde(default)]
    pub breaker: BreakerConfig,
}

/// When a target's circuit breaker opens, and how it comes back.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// The sliding window failures are counted over.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Attempts needed in the window before the rate counts (never "one
    /// failure ejects").
    pub min_requests: u32,
    /// The failure share (0 to 1) that opens the breaker.
    pub failure_rate: f64,
    /// How long an open breaker keeps its target out.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Requests let through one at a time while half-open; all must succeed.
    pub probes: u32,
    /// How long a closed breaker takes to give its target its full weight.
    #[serde(with = "humantime_serde")]
    pub ramp: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(30),
            min_requests: 20,
            failure_rate: 0.5,
            cooldown: Duration::from_secs(30),
            probes: 3,
            ramp: Duration::from_secs(30),
        }
    }
}

impl BreakerConfig {
    pub fn settings(&self) -> super::breaker::BreakerSettings {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        super::breaker::BreakerSettings {
            window_ms: ms(self.window).max(10),
            min_requests: self.min_requests.max(1),
            failure_per_mille: (self.failure_rate.clamp(0.0, 1.0) * 1000.0).round() as u32,
            cooldown_ms: ms(self.cooldown),
            probes: self.probes.max(1),
            ramp_ms: ms(self.ramp),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub targets: Vec<TargetConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// An `[[upstreams]]` name (`default` is the `[upstream]` section).
    #[serde(default = "default_upstream")]
    pub upstream: String,
    /// The model name sent there (unset: the client's).
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub overrides: Overrides,
}

/// Settings a target sets on the request it forwards (a variant), within
/// the tenant's policy caps.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Gemini's `thinking_budget` (set where the client put its thinking
    /// settings, else under `google.thinking_config`).
    pub thinking_budget: Option<u64>,
    /// `reasoning_effort` (`none`, `minimal`, `low`, `medium`, `high`).
    pub reasoning_effort: Option<String>,
    /// The output limit, when the client set none.
    pub default_max_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Sticky {
    Key,
    Tenant,
    /// The request's `user` field (falls back to the key when absent).
    User,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// No connection could be made: the request never left.
    Connect,
    /// No answer in time.
    Timeout,
    /// 429 from the upstream.
    RateLimited,
    /// 5xx from the upstream, or the connection broke before an answer.
    ServerError,
    /// The upstream said the prompt is too long for the model: the next
    /// target (with a larger context) gets it.
    ContextLength,
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![RetryOn::Connect, RetryOn::Timeout, RetryOn::RateLimited, RetryOn::ServerError]
}

fn default_attempts() -> u32 {
    2
}

fn default_deadline() -> Duration {
    Duration::from_secs(120)
}

fn default_upstream() -> String {
    "default".to_owned()
}

fn default_weight() -> u32 {
    1
}

/// Checks routes against the upstreams there are; the error names the
/// offending key.
/// An upstream as routes see it: its name and the APIs it speaks.
pub type UpstreamApis<'a> = (&'a str, &'a [Api]);

pub fn validate(routes: &[RouteConfig], upstreams: &[UpstreamApis<'_>]) -> Result<(), (String, String)> {
    let mut seen = std::collections::HashSet::new();
    for (i, route) in routes.iter().enumerate() {
        let at = |what: &str| format!("routes[{i}].{what}");
        if route.model.is_empty() || route.model.len() > 256 || route.model.chars().any(char::is_whitespace) {
            return Err((at("model"), "must be a model name or glob without spaces".to_owned()));
        }
        if !seen.insert((route.api, route.model.as_str())) {
            return Err((at("model"), format!("{:?} has another {} route already", route.model, route.api)));
        }
        if route.groups.is_empty() {
            return Err((at("groups"), "needs at least one group of targets".to_owned()));
        }
        if !(route.breaker.failure_rate > 0.0 && route.breaker.failure_rate <= 1.0) {
            return Err((at("breaker.failure_rate"), "must be above 0 and at most 1".to_owned()));
        }
        if route.attempts_per_target == 0 {
            return Err((at("attempts_per_target"), "must be at least 1".to_owned()));
        }
        for (g, group) in route.groups.iter().enumerate() {
            if group.targets.is_empty() || group.targets.iter().all(|t| t.weight == 0) {
                return Err((at(&format!("groups[{g}].targets")), "needs a target with a weight above 0".to_owned()));
            }
            for (t, target) in group.targets.iter().enumerate() {
                let Some((_, apis)) = upstreams.iter().find(|(name, _)| *name == target.upstream) else {
                    return Err((
                        at(&format!("groups[{g}].targets[{t}].upstream")),
                        format!("no upstream is named {:?}", target.upstream),
                    ));
                };
                if !apis.contains(&route.api) {
                    return Err((
                        at(&format!("groups[{g}].targets[{t}].upstream")),
                        format!(
                            "{:?} does not speak the {} API this route serves (its `apis` setting)",
                            target.upstream, route.api
                        ),
                    ));
                }
                if let Some(effort) = &target.overrides.reasoning_effort
                    && tollgate_store::ReasoningEffort::parse(effort).is_none()
                {
                    return Err((
                        at(&format!("groups[{g}].targets[{t}].overrides.reasoning_effort")),
                        "must be none, minimal, low, medium or high".to_owned(),
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<RouteConfig> {
        #[derive(Deserialize)]
        struct File {
            routes: Vec<RouteConfig>,
        }
        toml::from_str::<File>(text).unwrap().routes
    }

    const EXAMPLE: &str = r#"
[[routes]]
model = "chat-default"
sticky = "user"
[[routes.groups]]
targets = [
  { upstream = "comet", model = "gemini-2.5-flash-lite", weight = 90, overrides = { thinking_budget = 0 } },
  { upstream = "comet", model = "gemini-2.5-flash-lite", weight = 10, overrides = { thinking_budget = 1024 } },
]
[[routes.groups]]
targets = [{ upstream = "backup", model = "gemini-2.5-pro" }]
"#;

    #[test]
    fn the_documented_example_parses_with_defaults() {
        let routes = parse(EXAMPLE);
        assert_eq!(routes.len(), 1);
        let route = &routes[0];
        assert_eq!(route.groups.len(), 2);
        assert_eq!(route.groups[0].targets[1].overrides.thinking_budget, Some(1024));
        assert_eq!(route.attempts_per_target, 2);
        assert_eq!(route.retry_on.len(), 4);
        assert_eq!(route.sticky, Some(Sticky::User));
        assert!(validate(&routes, &[("comet", &Api::ALL), ("backup", &Api::ALL)]).is_ok());
    }

    #[test]
    fn mistakes_are_named() {
        let routes = parse(EXAMPLE);
        let (key, problem) = validate(&routes, &[("comet", &Api::ALL)]).unwrap_err();
        assert_eq!(key, "routes[0].groups[1].targets[0].upstream");
        assert!(problem.contains("backup"));
        let zero = parse("[[routes]]\nmodel = \"m\"\n[[routes.groups]]\ntargets = [{ weight = 0 }]\n");
        assert_eq!(validate(&zero, &[("default", &Api::ALL)]).unwrap_err().0, "routes[0].groups[0].targets");
        let anthropic = parse(
            "[[routes]]\nmodel = \"m\"\napi = \"anthropic\"\n[[routes.groups]]\ntargets = [{ upstream = \"openai-only\" }]\n",
        );
        let (key, problem) = validate(&anthropic, &[("openai-only", &[Api::OpenAi])]).unwrap_err();
        assert_eq!(key, "routes[0].groups[0].targets[0].upstream");
        assert!(problem.contains("anthropic"), "{problem}");
        let twice = parse(
            "[[routes]]\nmodel = \"m\"\n[[routes.groups]]\ntargets = [{}]\n[[routes]]\nmodel = \"m\"\napi = \"gemini\"\n[[routes.groups]]\ntargets = [{}]\n",
        );
        assert!(validate(&twice, &[("default", &Api::ALL)]).is_ok(), "one model name may have a route per API");
    }
}
