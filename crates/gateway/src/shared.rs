//! Limits and budgets shared by every replica, in Redis.
//!
//! Each check is one Lua script: it reads every counter the request touches,
//! refuses if any would pass its limit, and otherwise increments them all,
//! atomically and in one round trip. Corrections (token settlement, in-flight
//! release, budget settlement) are queued to a background task, so the
//! request path never waits for them.
//!
//! When Redis cannot be reached, callers fall back to their local counters
//! (with limits divided by the replica count) and come back to Redis once it
//! answers again; see `Shared::available`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Script, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const ADMIT: &str = r"
for i = 1, #KEYS do
  local limit = tonumber(ARGV[(i - 1) * 3 + 1])
  local amount = tonumber(ARGV[(i - 1) * 3 + 2])
  local v = tonumber(redis.call('GET', KEYS[i]) or '0')
  if v + amount > limit then return {0, i, v} end
end
local out = {1}
for i = 1, #KEYS do
  local v = redis.call('INCRBY', KEYS[i], ARGV[(i - 1) * 3 + 2])
  redis.call('PEXPIRE', KEYS[i], ARGV[(i - 1) * 3 + 3])
  out[#out + 1] = v
end
return out
";

const RESERVE: &str = r"
for i = 1, #KEYS do
  local init, amount, worst, hard, ttl =
    ARGV[(i - 1) * 5 + 1], tonumber(ARGV[(i - 1) * 5 + 2]), tonumber(ARGV[(i - 1) * 5 + 3]), ARGV[(i - 1) * 5 + 4], ARGV[(i - 1) * 5 + 5]
  if ttl == '0' then
    redis.call('SET', KEYS[i], init, 'NX')
  else
    redis.call('SET', KEYS[i], init, 'NX', 'PX', ttl)
  end
  local c = tonumber(redis.call('GET', KEYS[i]))
  if hard == '1' and (c >= amount or c + worst > amount) then return {0, i, c} end
end
local out = {1}
for i = 1, #KEYS do
  out[#out + 1] = redis.call('INCRBY', KEYS[i], ARGV[(i - 1) * 5 + 3])
end
return out
";

/// How long Redis may take before a call counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failure, how long before Redis is tried again.
const RETRY_AFTER_MS: u64 = 1_000;

/// A counter change applied in the background.
#[derive(Debug)]
pub struct Adjustment {
    pub key: String,
    pub delta: i64,
}

/// Outcome of a shared check.
#[derive(Debug)]
pub enum Verdict {
    /// Admitted; the counters' new values, in key order.
    Admitted(Vec<i64>),
    /// Refused by the counter at this index, whose value was this.
    Refused { index: usize, value: i64 },
}

pub struct Shared {
    conn: ConnectionManager,
    /// Prepended to every key, so deployments (and tests) can share a Redis.
    prefix: String,
    admit: Script,
    reserve: Script,
    adjustments: mpsc::UnboundedSender<Adjustment>,
    down: AtomicBool,
    down_since_ms: AtomicU64,
    fallbacks: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("down", &self.down.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    chrono::Utc::now().timestamp_millis().max(0) as u64
}

impl Shared {
    /// Connects to Redis. The connection manager reconnects by itself.
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<(Arc<Self>, mpsc::UnboundedReceiver<Adjustment>)> {
        let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("bad Redis URL: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(CALL_TIMEOUT)
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(Duration::from_secs(5), ConnectionManager::new_with_config(client, config))
            .await
            .map_err(|_| anyhow::anyhow!("Redis did not answer"))?
            .map_err(|e| anyhow::anyhow!("cannot connect to Redis: {e}"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Self {
            conn,
            prefix: prefix.to_owned(),
            admit: Script::new(ADMIT),
            reserve: Script::new(RESERVE),
            adjustments: tx,
            down: AtomicBool::new(false),
            down_since_ms: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        });
        Ok((shared, rx))
    }

    /// Whether to try Redis now: it is up, or it has been down long enough
    /// to try again.
    pub fn available(&self) -> bool {
        !self.down.load(Ordering::Acquire) || now_ms() - self.down_since_ms.load(Ordering::Acquire) >= RETRY_AFTER_MS
    }

    /// Requests decided locally because Redis was unavailable.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    fn failed(&self, error: &str) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(error, "Redis unavailable; enforcing limits locally (divided by the replica count)");
        }
        self.down_since_ms.store(now_ms(), Ordering::Release);
    }

    fn succeeded(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("Redis is back; limits are shared again");
        }
    }

    async fn run(&self, script: &Script, keys: &[String], args: &[String]) -> Option<Verdict> {
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(format!("{}:{k}", self.prefix));
        }
        for a in args {
            invocation.arg(a);
        }
        let mut conn = self.conn.clone();
        let result: Result<Result<Value, redis::RedisError>, _> =
            tokio::time::timeout(CALL_TIMEOUT, invocation.invoke_async(&mut conn)).await;
        let value = match result {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                return None;
            }
            Err(_) => {
                self.failed("timed out");
                return None;
            }
        };
        self.succeeded();
        let numbers: Vec<i64> = match value {
            Value::Array(items) => items.iter().filter_map(|v| redis::from_redis_value::<i64>(v).ok()).collect(),
            _ => return None,
        };
        match numbers.first() {
            Some(1) => Some(Verdict::Admitted(numbers[1..].to_vec())),
            Some(0) if numbers.len() >= 3 => {
                Some(Verdict::Refused { index: (numbers[1] - 1).max(0) as usize, value: numbers[2] })
            }
            _ => None,
        }
    }

    /// Admits against `(key, limit, amount, ttl_ms)` counters, all or none.
    /// `None`: Redis is unavailable, decide locally.
    pub async fn admit(&self, counters: &[(String, u64, i64, u64)]) -> Option<Verdict> {
        let keys: Vec<String> = counters.iter().map(|c| c.0.clone()).collect();
        let args: Vec<String> = counters
            .iter()
            .flat_map(|(_, limit, amount, ttl)| [limit.to_string(), amount.to_string(), ttl.to_string()])
            .collect();
        self.run(&self.admit, &keys, &args).await
    }

    /// Reserves on budget counters `(key, initial value, amount, worst case,
    /// hard, ttl_ms)`, all or none.
    pub async fn reserve(&self, budgets: &[(String, i64, i64, i64, bool, u64)]) -> Option<Verdict> {
        let keys: Vec<String> = budgets.iter().map(|b| b.0.clone()).collect();
        let args: Vec<String> = budgets
            .iter()
            .flat_map(|(_, init, amount, worst, hard, ttl)| {
                [
                    init.to_string(),
                    amount.to_string(),
                    worst.to_string(),
                    if *hard { "1" } else { "0" }.to_owned(),
                    ttl.to_string(),
                ]
            })
            .collect();
        self.run(&self.reserve, &keys, &args).await
    }

    /// Queues a counter change (settlement, release).
    pub fn adjust(&self, key: String, delta: i64) {
        if delta != 0 {
            let _ = self.adjustments.send(Adjustment { key, delta });
        }
    }

    /// Applies queued adjustments until cancelled, then drains what is left.
    pub async fn apply_adjustments(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Adjustment>,
        cancel: CancellationToken,
    ) {
        loop {
            let adjustment = tokio::select! {
                biased;
                a = rx.recv() => match a { Some(a) => a, None => return },
                () = cancel.cancelled() => break,
            };
            self.apply(adjustment).await;
        }
        rx.close();
        while let Ok(a) = rx.try_recv() {
            self.apply(a).await;
        }
    }

    async fn apply(&self, a: Adjustment) {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("INCRBY");
        cmd.arg(format!("{}:{}", self.prefix, a.key)).arg(a.delta);
        match tokio::time::timeout(CALL_TIMEOUT, cmd.query_async::<i64>(&mut conn)).await {
            Ok(Ok(_)) => {}
            // A lost correction only skews one window or one in-flight count
            // until its key expires; the ledger stays exact.
            _ => tracing::debug!(key = %a.key, "cannot apply a shared counter correction"),
        }
    }
}
