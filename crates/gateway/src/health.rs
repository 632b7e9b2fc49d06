//! `GET /healthz` (the process is alive) and `GET /readyz` (it should get
//! traffic). Readiness turns false as soon as shutdown begins, so a load
//! balancer stops routing new requests while in-flight ones finish, and
//! while the usage spool is full (the gateway refuses requests it could not
//! account for). Its body says how accounting is doing: `ok`, `behind`
//! (records wait in the spool), `stuck` (they have waited a minute with none
//! written) or `full`, with the dead-letter count.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;

use crate::accounting::Ledger;
use crate::accounting::ledger::AccountingHealth;

#[derive(Debug, Clone, Default)]
pub struct Readiness {
    serving: Arc<AtomicBool>,
    ledger: Option<Ledger>,
}

impl Readiness {
    pub fn new(ledger: Ledger) -> Self {
        Self { serving: Arc::default(), ledger: Some(ledger) }
    }

    pub fn set(&self, ready: bool) {
        self.serving.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.serving.load(Ordering::Acquire) && self.accounting() != AccountingHealth::Full
    }

    fn accounting(&self) -> AccountingHealth {
        self.ledger.as_ref().map_or(AccountingHealth::Ok, Ledger::health)
    }
}

pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

pub async fn readyz(State(readiness): State<Readiness>) -> Response {
    let accounting = json!({
        "state": readiness.accounting().as_str(),
        "dead_letters": readiness.ledger.as_ref().map_or(0, Ledger::dead_letters),
    });
    if readiness.is_ready() {
        Json(json!({"status": "ready", "accounting": accounting})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not_ready", "accounting": accounting})))
            .into_response()
    }
}
