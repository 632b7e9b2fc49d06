//! Limits and budgets shared by every replica, in Redis.
//!
//! Each check is one Lua script: it reads every counter the request touches,
//! refuses if any would pass its limit, and otherwise increments them all,
//! atomically and in one round trip. Corrections (token settlement, in-flight
//! release, budget settlement) are added into a bounded table of pending
//! deltas, one entry per counter, which a background task sends as one
//! script per round trip; the request path never waits for them. Deltas for
//! the same counter merge, so the table grows with the number of live
//! counters, not with traffic. When it holds `MAX_PENDING_COUNTERS` counters
//! already, a correction for yet another counter is dropped and counted
//! (`tollgate_shared_corrections_dropped_total`): that counter stays high
//! until its key expires (the end of its minute, or its budget period), and
//! the ledger, which budgets are rebuilt from, stays exact.
//!
//! When Redis cannot be reached, callers fall back to their local counters
//! (with limits divided by the replica count) and come back to Redis once it
//! answers again; see `Shared::available`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Script, Value};
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

/// Per budget: KEYS[2i-1] the committed counter (settled + in flight),
/// KEYS[2i] the settled spend. Returns `{1, committed...}`, or `{0, i, c}`
/// when settled spend plus the request's own worst case passes a hard
/// budget (exhausted), or `{2, i, c}` when only in-flight reservations are
/// in the way (busy).
const RESERVE: &str = r"
local n = #KEYS / 2
for i = 1, n do
  local init, amount, worst, hard, ttl =
    ARGV[(i - 1) * 5 + 1], tonumber(ARGV[(i - 1) * 5 + 2]), tonumber(ARGV[(i - 1) * 5 + 3]), ARGV[(i - 1) * 5 + 4], ARGV[(i - 1) * 5 + 5]
  local committed, spent = KEYS[2 * i - 1], KEYS[2 * i]
  if ttl == '0' then
    redis.call('SET', committed, init, 'NX')
    redis.call('SET', spent, init, 'NX')
  else
    redis.call('SET', committed, init, 'NX', 'PX', ttl)
    redis.call('SET', spent, init, 'NX', 'PX', ttl)
  end
  if hard == '1' then
    local c = tonumber(redis.call('GET', committed))
    local s = tonumber(redis.call('GET', spent))
    if s >= amount or s + worst > amount then return {0, i, s} end
    if c + worst > amount then return {2, i, c} end
  end
end
local out = {1}
for i = 1, n do
  out[#out + 1] = redis.call('INCRBY', KEYS[2 * i - 1], ARGV[(i - 1) * 5 + 3])
end
return out
";

/// Applies corrections: `INCRBY KEYS[i] ARGV[i]`, only to counters that
/// still exist (a counter that expired must not come back without its TTL).
const ADJUST: &str = r"
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], ARGV[i]) end
end
return #KEYS
";

/// The most counters with corrections waiting at once.
const MAX_PENDING_COUNTERS: usize = 100_000;
/// Corrections sent per script call.
const ADJUST_BATCH: usize = 1_000;

/// How long Redis may take before a call counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failure, how long before Redis is tried again.
const RETRY_AFTER_MS: u64 = 1_000;

/// Outcome of a shared check.
#[derive(Debug)]
pub enum Verdict {
    /// Admitted; the counters' new values, in key order.
    Admitted(Vec<i64>),
    /// Refused by the counter at this index, whose value was this.
    Refused { index: usize, value: i64 },
}

/// Outcome of a shared budget reservation.
#[derive(Debug)]
pub enum ReserveVerdict {
    /// Reserved; each budget's committed counter after it, in order.
    Admitted(Vec<i64>),
    /// The budget at this index is spent for this request.
    Exhausted(usize),
    /// The budget at this index is held by in-flight reservations.
    Busy(usize),
}

/// One budget counter a reservation touches.
#[derive(Debug, Clone)]
pub struct BudgetCounter {
    /// The committed counter's key; its settled spend is [`spent_key`].
    pub key: String,
    /// Both counters' value when they do not exist yet (settled spend from
    /// the ledger).
    pub initial: i64,
    pub amount: i64,
    pub worst_case: i64,
    pub hard: bool,
    pub ttl_ms: u64,
}

/// The key of a budget's settled-spend counter.
pub fn spent_key(committed_key: &str) -> String {
    format!("{committed_key}:spent")
}

/// Corrections waiting for the background task, merged per counter.
#[derive(Debug, Default)]
struct Pending {
    deltas: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    wake: tokio::sync::Notify,
    dropped: AtomicU64,
}

pub struct Shared {
    conn: ConnectionManager,
    /// Prepended to every key, so deployments (and tests) can share a Redis.
    prefix: String,
    admit: Script,
    reserve: Script,
    adjust: Script,
    pending: Pending,
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
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<Arc<Self>> {
        let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("bad Redis URL: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(CALL_TIMEOUT)
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(Duration::from_secs(5), ConnectionManager::new_with_config(client, config))
            .await
            .map_err(|_| anyhow::anyhow!("Redis did not answer"))?
            .map_err(|e| anyhow::anyhow!("cannot connect to Redis: {e}"))?;
        let shared = Arc::new(Self {
            conn,
            prefix: prefix.to_owned(),
            admit: Script::new(ADMIT),
            reserve: Script::new(RESERVE),
            adjust: Script::new(ADJUST),
            pending: Pending::default(),
            down: AtomicBool::new(false),
            down_since_ms: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        });
        Ok(shared)
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

    /// Corrections dropped because the table of pending ones was full.
    pub fn corrections_dropped(&self) -> u64 {
        self.pending.dropped.load(Ordering::Relaxed)
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

    /// Runs a script; its answer as numbers, or `None` when Redis failed.
    async fn call(&self, script: &Script, keys: &[String], args: &[String]) -> Option<Vec<i64>> {
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
        match value {
            Value::Array(items) => Some(items.iter().filter_map(|v| redis::from_redis_value::<i64>(v).ok()).collect()),
            Value::Int(n) => Some(vec![n]),
            _ => None,
        }
    }

    async fn run(&self, script: &Script, keys: &[String], args: &[String]) -> Option<Verdict> {
        let numbers = self.call(script, keys, args).await?;
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

    /// Reserves on budget counters, all or none. `None`: Redis is
    /// unavailable, decide locally.
    pub async fn reserve(&self, budgets: &[BudgetCounter]) -> Option<ReserveVerdict> {
        let keys: Vec<String> = budgets.iter().flat_map(|b| [b.key.clone(), spent_key(&b.key)]).collect();
        let args: Vec<String> = budgets
            .iter()
            .flat_map(|b| {
                [
                    b.initial.to_string(),
                    b.amount.to_string(),
                    b.worst_case.to_string(),
                    if b.hard { "1" } else { "0" }.to_owned(),
                    b.ttl_ms.to_string(),
                ]
            })
            .collect();
        let numbers = self.call(&self.reserve, &keys, &args).await?;
        let index = || numbers.get(1).map_or(0, |i| (*i - 1).max(0) as usize);
        match numbers.first() {
            Some(1) => Some(ReserveVerdict::Admitted(numbers[1..].to_vec())),
            Some(0) => Some(ReserveVerdict::Exhausted(index())),
            Some(2) => Some(ReserveVerdict::Busy(index())),
            _ => None,
        }
    }

    /// Queues a counter change (settlement, release); never waits.
    pub fn adjust(&self, key: String, delta: i64) {
        if delta == 0 {
            return;
        }
        let mut deltas = self.pending.deltas.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let room = deltas.len() < MAX_PENDING_COUNTERS;
        match deltas.get_mut(&key) {
            Some(pending) => *pending = pending.saturating_add(delta),
            None if room => {
                deltas.insert(key, delta);
            }
            None => {
                drop(deltas);
                if self.pending.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!("too many shared counter corrections waiting; dropping some");
                }
                return;
            }
        }
        drop(deltas);
        self.pending.wake.notify_one();
    }

    /// Sends queued corrections until cancelled, then sends what is left.
    pub async fn apply_adjustments(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                () = self.pending.wake.notified() => {}
            }
            self.flush().await;
        }
        self.flush().await;
    }

    /// Sends every pending correction, in batches of one script call each.
    async fn flush(&self) {
        let taken = std::mem::take(&mut *self.pending.deltas.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let taken: Vec<(String, i64)> = taken.into_iter().filter(|(_, d)| *d != 0).collect();
        for batch in taken.chunks(ADJUST_BATCH) {
            let keys: Vec<String> = batch.iter().map(|(k, _)| k.clone()).collect();
            let args: Vec<String> = batch.iter().map(|(_, d)| d.to_string()).collect();
            if self.call(&self.adjust, &keys, &args).await.is_none() {
                // A lost correction only skews one window, one in-flight
                // count or one budget's in-flight part until its key
                // expires; the ledger stays exact.
                tracing::debug!(count = batch.len(), "cannot apply shared counter corrections");
            }
        }
    }
}
