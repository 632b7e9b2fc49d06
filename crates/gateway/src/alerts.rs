//! Budget alerts: find crossed thresholds and month-end overruns from the
//! ledger, queue each once per period in the database outbox, and deliver
//! the outbox at least once to the configured webhooks, with retries.
//!
//! Spend is read from the ledger's rollups rather than from any replica's
//! counters, so every replica sees the same figures; the outbox's unique key
//! makes an alert fire once however many replicas check.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Timelike, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tollgate_store::{Budget, BudgetAlert, Period, Store, StoreResult};

use crate::accounting::format_usd;
use crate::clock::Clock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// A JSON document signed with HMAC-SHA256.
    Generic,
    /// A Slack incoming-webhook message.
    Slack,
}

/// A webhook to deliver alerts to, with its signing secret when generic.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: String,
    pub format: WebhookFormat,
    pub secret: Option<SecretString>,
}

/// Header carrying `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub const SIGNATURE_HEADER: &str = "x-tollgate-signature";

pub fn sign(secret: &SecretString, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.expose_secret().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={timestamp},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The alerts a budget's spend calls for now.
pub fn due_alerts(budget: &Budget, spent: i64, today: NaiveDate, now_fraction_of_day: f64) -> Vec<(String, i32)> {
    let mut due = Vec::new();
    if budget.amount_micros <= 0 {
        return due;
    }
    let percent = i128::from(spent) * 100 / i128::from(budget.amount_micros);
    for t in &budget.thresholds {
        if percent >= i128::from(*t) {
            due.push(("threshold".to_owned(), *t as i32));
        }
    }
    // Forecast: at this month's run rate, spend passes the budget by month end.
    if budget.period == Period::Monthly
        && spent < budget.amount_micros
        && forecast_micros(budget.period, spent, today, now_fraction_of_day).is_some_and(|f| f > budget.amount_micros)
    {
        due.push(("forecast".to_owned(), 0));
    }
    due
}

/// Spend at the end of the period if it goes on at the rate seen so far.
/// `None` for lifetime budgets and too early in a period to tell (less than
/// a day of a week or month, less than an hour of a day).
pub fn forecast_micros(period: Period, spent: i64, today: NaiveDate, now_fraction_of_day: f64) -> Option<i64> {
    let start = period.start(today);
    let length = (period.end(start)? - start).num_days() as f64;
    let elapsed = (today - start).num_days() as f64 + now_fraction_of_day;
    let enough = if period == Period::Daily { 1.0 / 24.0 } else { 1.0 };
    // Float only for the projection, never for money that is billed.
    (elapsed >= enough).then(|| (spent as f64 / elapsed * length).round() as i64)
}

/// One budget's spend as the ledger has it, for the metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetReading {
    pub tenant_id: String,
    pub budget_id: String,
    pub spent_micros: i64,
    pub amount_micros: i64,
    pub forecast_micros: Option<i64>,
}

impl BudgetReading {
    pub fn percent(&self, micros: i64) -> i64 {
        i64::try_from(i128::from(micros) * 100 / i128::from(self.amount_micros.max(1))).unwrap_or(i64::MAX)
    }
}

/// The latest readings of every budget, replaced whole at each check.
pub type BudgetReadings = Arc<arc_swap::ArcSwap<Vec<BudgetReading>>>;

/// Checks every budget against the ledger every `every`, queuing due alerts
/// and publishing the readings for the metrics. `clock` decides the current
/// period, as it does for the budget counters.
pub async fn watch_budgets(
    store: Store,
    every: Duration,
    readings: BudgetReadings,
    clock: Clock,
    cancel: CancellationToken,
) {
    loop {
        match check_budgets(&store, clock.now()).await {
            Ok(fresh) => readings.store(Arc::new(fresh)),
            Err(e) => tracing::warn!(error = %e, "budget alert check failed"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

pub async fn check_budgets(store: &Store, now: DateTime<Utc>) -> StoreResult<Vec<BudgetReading>> {
    let today = now.date_naive();
    let fraction = f64::from(now.num_seconds_from_midnight()) / 86_400.0;
    let mut readings = Vec::new();
    for budget in store.all_budgets().await? {
        let start = budget.period.start(today);
        let spent = store.spend_since(&budget.tenant_id, budget.key_id.as_deref(), start).await?;
        readings.push(BudgetReading {
            tenant_id: budget.tenant_id.clone(),
            budget_id: budget.id.clone(),
            spent_micros: spent,
            amount_micros: budget.amount_micros,
            forecast_micros: forecast_micros(budget.period, spent, today, fraction),
        });
        for (kind, threshold) in due_alerts(&budget, spent, today, fraction) {
            let alert = BudgetAlert {
                id: format!("alr_{}", uuid::Uuid::now_v7().simple()),
                budget_id: budget.id.clone(),
                tenant_id: budget.tenant_id.clone(),
                period_start: start.format("%Y-%m-%d").to_string(),
                kind,
                threshold,
                spent_micros: spent,
                amount_micros: budget.amount_micros,
                created_at: now,
                delivered_at: None,
                attempts: 0,
                last_error: None,
            };
            if store.fire_alert(&alert).await? {
                tracing::info!(budget = %alert.budget_id, tenant = %alert.tenant_id, kind = %alert.kind,
                    threshold = alert.threshold, "budget alert queued");
            }
        }
    }
    Ok(readings)
}

fn generic_body(a: &BudgetAlert) -> serde_json::Value {
    json!({
        "type": format!("budget.{}", a.kind),
        "alert_id": a.id,
        "tenant_id": a.tenant_id,
        "budget_id": a.budget_id,
        "period_start": a.period_start,
        "threshold_percent": a.threshold,
        "spent_usd": format_usd(a.spent_micros),
        "amount_usd": format_usd(a.amount_micros),
        "created_at": a.created_at,
    })
}

fn slack_body(a: &BudgetAlert) -> serde_json::Value {
    let text = if a.kind == "forecast" {
        format!(
            ":chart_with_upwards_trend: Tenant *{}* is on track to exceed budget {}: ${} spent of ${} this month.",
            a.tenant_id,
            a.budget_id,
            format_usd(a.spent_micros),
            format_usd(a.amount_micros)
        )
    } else {
        format!(
            ":warning: Tenant *{}* reached {}% of budget {}: ${} spent of ${} (period from {}).",
            a.tenant_id,
            a.threshold,
            a.budget_id,
            format_usd(a.spent_micros),
            format_usd(a.amount_micros),
            a.period_start
        )
    };
    json!({ "text": text })
}

/// Delivers due alerts every `every`; failures are retried with
/// exponential backoff (`retry_base`, twice that, … up to 10 minutes).
pub async fn deliver_alerts(
    store: Store,
    webhooks: Arc<Vec<Webhook>>,
    every: Duration,
    retry_base: Duration,
    cancel: CancellationToken,
) {
    if webhooks.is_empty() {
        return;
    }
    crate::upstream::install_crypto_provider();
    let Ok(http) = reqwest::Client::builder().timeout(Duration::from_secs(10)).build() else { return };
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let due = match store.claim_due_alerts(50, 60_000).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the alert outbox");
                continue;
            }
        };
        for alert in due {
            let outcome = send(&http, &webhooks, &alert).await;
            let result = match outcome {
                Ok(()) => store.mark_alert_delivered(&alert.id).await,
                Err(error) => {
                    let base = i64::try_from(retry_base.as_millis()).unwrap_or(2_000);
                    let backoff = base.saturating_mul(1 << alert.attempts.clamp(0, 10)).min(600_000);
                    tracing::warn!(alert = %alert.id, %error, "alert delivery failed; will retry");
                    store.mark_alert_failed(&alert.id, &error, Utc::now().timestamp_millis() + backoff).await
                }
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "cannot update the alert outbox");
            }
        }
    }
}

async fn send(http: &reqwest::Client, webhooks: &[Webhook], alert: &BudgetAlert) -> Result<(), String> {
    let mut failures = Vec::new();
    for hook in webhooks {
        let body = match hook.format {
            WebhookFormat::Generic => generic_body(alert),
            WebhookFormat::Slack => slack_body(alert),
        };
        let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        let mut request = http.post(&hook.url).header("content-type", "application/json");
        if let Some(secret) = &hook.secret {
            request = request.header(SIGNATURE_HEADER, sign(secret, Utc::now().timestamp(), &bytes));
        }
        match request.body(bytes).send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => failures.push(format!("{} answered {}", hook.url, r.status())),
            Err(e) => failures.push(format!("{}: {}", hook.url, e.without_url())),
        }
    }
    if failures.is_empty() { Ok(()) } else { Err(failures.join("; ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(amount: i64, period: Period) -> Budget {
        Budget {
            id: "b".into(),
            tenant_id: "t".into(),
            key_id: None,
            period,
            amount_micros: amount,
            hard: true,
            thresholds: vec![50, 80, 100],
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn thresholds_fire_at_their_percentages() {
        let today = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        let due = |spent| due_alerts(&budget(1000, Period::Daily), spent, today, 0.5);
        assert!(due(499).is_empty());
        assert_eq!(due(500), [("threshold".to_owned(), 50)]);
        assert_eq!(due(1000).len(), 3);
    }

    #[test]
    fn the_forecast_fires_when_the_run_rate_overshoots_the_month() {
        let b = budget(30_000, Period::Monthly);
        let day10 = NaiveDate::from_ymd_opt(2026, 11, 10).unwrap();
        // 9.5 days in, 12,000 spent: 30 days at that rate ≈ 37,900 > 30,000.
        assert!(due_alerts(&b, 12_000, day10, 0.5).contains(&("forecast".to_owned(), 0)));
        assert!(!due_alerts(&b, 5_000, day10, 0.5).iter().any(|(k, _)| k == "forecast"));
    }

    #[test]
    fn forecasts_project_the_run_rate_to_the_period_end() {
        let day10 = NaiveDate::from_ymd_opt(2026, 11, 10).unwrap();
        // November: 30 days; 9.5 days in at 950 a day.
        assert_eq!(forecast_micros(Period::Monthly, 9_025, day10, 0.5), Some(28_500));
        assert_eq!(forecast_micros(Period::Daily, 100, day10, 0.5), Some(200));
        assert_eq!(forecast_micros(Period::Daily, 100, day10, 0.01), None, "too early in the day");
        let first = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        assert_eq!(forecast_micros(Period::Monthly, 100, first, 0.5), None, "too early in the month");
        assert_eq!(forecast_micros(Period::Lifetime, 100, day10, 0.5), None);
    }

    #[test]
    fn signatures_cover_timestamp_and_body() {
        let secret = SecretString::from("s");
        let a = sign(&secret, 1, b"{}");
        assert!(a.starts_with("t=1,v1="));
        assert_ne!(a, sign(&secret, 2, b"{}"));
        assert_ne!(a, sign(&secret, 1, b"{ }"));
    }
}
