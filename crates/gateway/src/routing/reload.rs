//! The routes in force, replaced without a restart when their file changes.
//!
//! Routes come from the main configuration, or from `routing.routes_file`
//! (a file of `[[routes]]` only), which is checked every
//! `routing.reload_interval`. A changed file is parsed, validated against
//! the upstreams there are and built into a new table, which replaces the
//! old one atomically: a request already on its way keeps the table it
//! started with, the next one sees the new routes. A file with a mistake is
//! refused and logged; the routes in force stay. Targets keep their circuit
//! breakers across reloads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::breaker::Breaker;
use super::config::{RouteConfig, validate};
use super::table::{RouteTable, Upstreams};
use crate::metrics::Metrics;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    routes: Vec<RouteConfig>,
}

/// Why a routes file was refused.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
    #[error("`{key}` {problem}")]
    Invalid { key: String, problem: String },
}

/// Reads and checks a routes file.
pub fn read_routes(path: &Path, upstreams: &Upstreams) -> Result<Vec<RouteConfig>, RoutesError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RoutesError::File { path: path.to_owned(), problem: e.to_string() })?;
    let file: RoutesFile =
        toml::from_str(&text).map_err(|e| RoutesError::File { path: path.to_owned(), problem: e.to_string() })?;
    let names: Vec<(&str, &[tollgate_openai::Api])> = upstreams.iter().map(|(n, u)| (n, u.apis())).collect();
    validate(&file.routes, &names).map_err(|(key, problem)| RoutesError::Invalid { key, problem })?;
    Ok(file.routes)
}

/// The routes in force, and what rebuilding them needs.
#[derive(Debug)]
pub struct Routes {
    table: ArcSwap<RouteTable>,
    upstreams: Upstreams,
    breakers: Mutex<HashMap<String, Arc<Breaker>>>,
    file: Option<PathBuf>,
    metrics: Arc<Metrics>,
}

impl Routes {
    /// Builds the routes from `routes`, or from `file` when it is set.
    pub fn new(
        routes: &[RouteConfig],
        file: Option<PathBuf>,
        upstreams: Upstreams,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RoutesError> {
        let loaded;
        let routes = match &file {
            Some(path) => {
                loaded = read_routes(path, &upstreams)?;
                &loaded[..]
            }
            None => routes,
        };
        let mut breakers = HashMap::new();
        let table = RouteTable::build(routes, &upstreams, &mut breakers, &metrics)
            .map_err(|problem| RoutesError::Invalid { key: "routes".to_owned(), problem })?;
        Ok(Self { table: ArcSwap::from_pointee(table), upstreams, breakers: Mutex::new(breakers), file, metrics })
    }

    /// The upstreams routes can send to, by name.
    pub fn upstreams(&self) -> Vec<(String, Arc<crate::upstream::Upstream>)> {
        self.upstreams.iter().map(|(n, u)| (n.to_owned(), u.clone())).collect()
    }

    /// The table in force now.
    pub fn current(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Rereads the routes file and puts it in force.
    pub fn reload(&self) -> Result<usize, RoutesError> {
        let Some(path) = &self.file else { return Ok(0) };
        let routes = read_routes(path, &self.upstreams)?;
        let mut breakers = self.breakers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let table = RouteTable::build(&routes, &self.upstreams, &mut breakers, &self.metrics)
            .map_err(|problem| RoutesError::Invalid { key: "routes".to_owned(), problem })?;
        self.table.store(Arc::new(table));
        Ok(routes.len())
    }

    /// Reloads the routes file whenever it changes, until cancelled.
    pub async fn watch(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        let Some(path) = self.file.clone() else { return };
        let results = self.metrics.routes_reloads.clone();
        crate::file_watch::watch(&path, "routes", every, &results, cancel, || self.reload()).await;
    }
}
