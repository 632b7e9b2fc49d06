//! The routes in force: which targets a client's model name may go to, in
//! which order, and the live state (circuit breakers) of each target.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tollgate_openai::Api;
use wildmatch::WildMatch;

use super::backoff::Backoff;
use super::breaker::Breaker;
use super::config::{Overrides, RetryOn, RouteConfig, Sticky};
use crate::upstream::Upstream;

/// One place a request can go: an upstream and the model to ask there.
#[derive(Debug)]
pub struct Target {
    pub upstream_name: String,
    pub upstream: Arc<Upstream>,
    /// The model sent there; `None`: the client's.
    pub model: Option<String>,
    pub weight: u64,
    pub overrides: Overrides,
    /// `route/group/index`, for metrics and the ledger.
    pub label: String,
    pub breaker: Arc<Breaker>,
    /// This target's `ok` attempts counter, resolved once (a label lookup
    /// per request costs more than the rest of the routing decision).
    pub ok_attempts: prometheus::IntCounter,
    /// `x-tollgate-upstream` and `x-tollgate-model` for its answers.
    pub upstream_header: http::HeaderValue,
    pub model_header: Option<http::HeaderValue>,
}

impl Target {
    /// The model this target asks for, given the client's.
    pub fn model_for<'a>(&'a self, requested: &'a str) -> &'a str {
        self.model.as_deref().unwrap_or(requested)
    }
}

#[derive(Debug)]
pub struct Group {
    pub targets: Vec<Target>,
}

#[derive(Debug)]
pub struct Route {
    /// The `model` the route was written for.
    pub name: String,
    /// The API whose requests it serves.
    pub api: Api,
    pub groups: Vec<Group>,
    pub sticky: Option<Sticky>,
    pub retry_on: Vec<RetryOn>,
    pub attempts_per_target: u32,
    pub deadline: Duration,
    pub backoff: Backoff,
}

impl Route {
    /// Every model the route may send (for allow-lists and the worst case).
    pub fn models<'a>(&'a self, requested: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.groups.iter().flat_map(|g| g.targets.iter()).map(move |t| t.model_for(requested))
    }

    pub fn retries(&self, on: RetryOn) -> bool {
        self.retry_on.contains(&on)
    }
}

/// The upstreams by name; `default` is the `[upstream]` section.
#[derive(Debug, Clone)]
pub struct Upstreams {
    by_name: HashMap<String, Arc<Upstream>>,
}

impl Upstreams {
    pub fn new(by_name: HashMap<String, Arc<Upstream>>) -> Self {
        Self { by_name }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<Upstream>)> {
        self.by_name.iter().map(|(n, u)| (n.as_str(), u))
    }
}

/// The routes of one API.
#[derive(Debug, Default)]
struct ApiRoutes {
    exact: HashMap<String, Arc<Route>>,
    globs: Vec<(WildMatch, Arc<Route>)>,
}

/// The routes in force, per API: a model name routes only requests of the
/// route's own API.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_api: [ApiRoutes; 3],
}

fn api_index(api: Api) -> usize {
    match api {
        Api::OpenAi => 0,
        Api::Gemini => 1,
        Api::Anthropic => 2,
    }
}

impl RouteTable {
    /// Builds the routes; targets keep the breaker of the same
    /// `upstream/model` across rebuilds.
    pub fn build(
        routes: &[RouteConfig],
        upstreams: &Upstreams,
        breakers: &mut HashMap<String, Arc<Breaker>>,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Self, String> {
        let mut table = Self::default();
        for config in routes {
            let mut groups = Vec::with_capacity(config.groups.len());
            for (g, group) in config.groups.iter().enumerate() {
                let mut targets = Vec::with_capacity(group.targets.len());
                for (t, target) in group.targets.iter().enumerate() {
                    let upstream = upstreams
                        .get(&target.upstream)
                        .ok_or_else(|| format!("no upstream is named {:?}", target.upstream))?
                        .clone();
                    // One breaker per route target: the same upstream and
                    // model in two routes are judged apart (their settings
                    // may differ), and a rebuild keeps each one's state.
                    // OpenAI routes keep their historical names (labels,
                    // ledger `target`); other APIs' are prefixed by theirs.
                    let name = match config.api {
                        Api::OpenAi => config.model.clone(),
                        api => format!("{api}:{}", config.model),
                    };
                    let breaker_key = format!("{name}/{g}/{t}");
                    let breaker = breakers
                        .entry(breaker_key)
                        .or_insert_with(|| Arc::new(Breaker::new(config.breaker.settings())))
                        .clone();
                    let label = format!("{name}/{g}/{t}");
                    targets.push(Target {
                        ok_attempts: metrics.upstream_attempts.with_label_values(&[&target.upstream, &label, "ok"]),
                        upstream_header: http::HeaderValue::from_str(&target.upstream)
                            .map_err(|_| format!("{:?} cannot be a header value", target.upstream))?,
                        model_header: target.model.as_deref().and_then(|m| http::HeaderValue::from_str(m).ok()),
                        upstream_name: target.upstream.clone(),
                        upstream,
                        model: target.model.clone(),
                        weight: u64::from(target.weight),
                        overrides: target.overrides.clone(),
                        label,
                        breaker,
                    });
                }
                groups.push(Group { targets });
            }
            let route = Arc::new(Route {
                name: config.model.clone(),
                api: config.api,
                groups,
                sticky: config.sticky,
                retry_on: config.retry_on.clone(),
                attempts_per_target: config.attempts_per_target,
                deadline: config.deadline,
                backoff: Backoff::default(),
            });
            let routes = &mut table.by_api[api_index(config.api)];
            if config.model.contains(['*', '?']) {
                routes.globs.push((WildMatch::new(&config.model), route));
            } else {
                routes.exact.insert(config.model.clone(), route);
            }
        }
        Ok(table)
    }

    /// The route for a client's model: an exact name or alias first, then
    /// the first glob (in file order) that matches.
    pub fn resolve(&self, api: Api, model: &str) -> Option<Arc<Route>> {
        let routes = &self.by_api[api_index(api)];
        routes
            .exact
            .get(model)
            .or_else(|| routes.globs.iter().find(|(glob, _)| glob.matches(model)).map(|(_, route)| route))
            .cloned()
    }

    /// Every route, each API's exact names first.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_api.iter().flat_map(|r| r.exact.values().chain(r.globs.iter().map(|(_, r)| r)))
    }

    /// Targets whose breaker is not closed now.
    pub fn breakers_not_closed(&self, now_ms: u64) -> usize {
        self.routes()
            .flat_map(|r| r.groups.iter().flat_map(|g| g.targets.iter()))
            .filter(|t| t.breaker.state(now_ms) != super::breaker::BreakerState::Closed)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.by_api.iter().all(|r| r.exact.is_empty() && r.globs.is_empty())
    }
}
