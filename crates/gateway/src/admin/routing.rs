//! `/admin/v1/routes` and `/admin/v1/upstreams`: the routes in force and
//! the upstreams they send to, with each target's live health.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::AdminState;
use super::auth::Admin;
use super::error::AdminError;
use crate::routing::breaker::BreakerState;

#[derive(Debug, Serialize, ToSchema)]
pub struct TargetView {
    /// `route/group/index`, as in metrics and the ledger.
    pub label: String,
    pub upstream: String,
    /// The model sent there (absent: the client's).
    pub model: Option<String>,
    pub weight: u64,
    /// `closed`, `open` or `half_open`.
    pub breaker: String,
    /// The share of its weight the target gets now, per thousand (less than
    /// 1000 while its breaker is open or its traffic returns after one).
    pub weight_factor_per_mille: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RouteView {
    /// The model name (exact, glob or alias) clients send.
    pub model: String,
    /// Fallback groups, in the order they are tried.
    pub groups: Vec<Vec<TargetView>>,
    pub sticky: Option<String>,
    pub attempts_per_target: u32,
    pub deadline_ms: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RouteList {
    pub data: Vec<RouteView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UpstreamView {
    pub name: String,
    /// The API root requests go to (never a key).
    pub base_url: String,
    /// Route targets sending to it.
    pub targets: usize,
    /// Of those, the ones whose breaker is not closed.
    pub targets_not_closed: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UpstreamList {
    pub data: Vec<UpstreamView>,
}

#[utoipa::path(get, path = "/admin/v1/routes", tag = "routing", operation_id = "listRoutes",
    responses((status = 200, description = "The routes in force, with each target's breaker", body = RouteList)))]
pub async fn routes(State(state): State<AdminState>, _admin: Admin) -> Result<Json<RouteList>, AdminError> {
    let now = crate::proxy::forward::monotonic_ms();
    let table = state.routes.current();
    let mut data: Vec<RouteView> = table
        .routes()
        .map(|route| RouteView {
            model: route.name.clone(),
            groups: route
                .groups
                .iter()
                .map(|group| {
                    group
                        .targets
                        .iter()
                        .map(|t| TargetView {
                            label: t.label.clone(),
                            upstream: t.upstream_name.clone(),
                            model: t.model.clone(),
                            weight: t.weight,
                            breaker: t.breaker.state(now).as_str().to_owned(),
                            weight_factor_per_mille: t.breaker.weight_factor(now),
                        })
                        .collect()
                })
                .collect(),
            sticky: route.sticky.map(|s| format!("{s:?}").to_lowercase()),
            attempts_per_target: route.attempts_per_target,
            deadline_ms: u64::try_from(route.deadline.as_millis()).unwrap_or(u64::MAX),
        })
        .collect();
    data.sort_by(|a, b| a.model.cmp(&b.model));
    Ok(Json(RouteList { data }))
}

#[utoipa::path(get, path = "/admin/v1/upstreams", tag = "routing", operation_id = "listUpstreams",
    responses((status = 200, description = "The upstreams, with the health of the targets that use them", body = UpstreamList)))]
pub async fn upstreams(State(state): State<AdminState>, _admin: Admin) -> Result<Json<UpstreamList>, AdminError> {
    let now = crate::proxy::forward::monotonic_ms();
    let table = state.routes.current();
    let targets: Vec<_> = table.routes().flat_map(|r| r.groups.iter().flat_map(|g| g.targets.iter())).collect();
    let mut data: Vec<UpstreamView> = state
        .routes
        .upstreams()
        .iter()
        .map(|(name, upstream)| {
            let mine = targets.iter().filter(|t| &t.upstream_name == name);
            UpstreamView {
                name: name.clone(),
                base_url: upstream.base_url().to_owned(),
                targets: mine.clone().count(),
                targets_not_closed: mine.filter(|t| t.breaker.state(now) != BreakerState::Closed).count(),
            }
        })
        .collect();
    data.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(UpstreamList { data }))
}
