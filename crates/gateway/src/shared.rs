//! Limits and budgets shared by every replica, in Redis.
//!
//! Each check is a Lua function: it reads every counter the request touches,
//! refuses if any would pass its limit, and otherwise increments them all,
//! atomically. Checks do not go to Redis one by one: they queue, and one
//! background task sends everything queued as one script call, with at most
//! `MAX_BATCHES_IN_FLIGHT` calls outstanding. An idle gateway sends each
//! request's checks (its limits and its budgets, together) at once in one
//! call; a busy one sends whole queues, so the script calls, their encoding
//! and the socket reads and writes are shared by many requests instead of
//! paid twice by each. Corrections (token settlement, in-flight
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
use redis::{Cmd, ErrorKind, RedisResult, RedisWrite, Script, ToRedisArgs, Value};
use tokio_util::sync::CancellationToken;

use crate::fast_hash::FastMap;

/// Runs a queue of checks. ARGV holds, for each check in order, its kind
/// (`a` rate limits, `r` budgets), how many of KEYS and of ARGV it takes,
/// then its own arguments; KEYS holds its keys in the same order. Returns
/// one answer per check, as `admit` or `reserve` below give it.
///
/// `admit`: per counter, ARGV (limit, amount, ttl); refuses with
/// `{0, i, value}` when a counter would pass its limit, else increments all
/// and returns `{1, values...}`.
///
/// `reserve`: per budget, KEYS (committed counter: settled + in flight,
/// settled spend) and ARGV (initial, amount, worst case, hard, ttl). Returns
/// `{1, committed...}`, or `{0, i, c}` when settled spend plus the request's
/// own worst case passes a hard budget (exhausted), or `{2, i, c}` when only
/// in-flight reservations are in the way (busy).
const CHECKS: &str = r"
local function admit(k, n, a)
  for i = 0, n - 1 do
    local limit = tonumber(ARGV[a + i * 3])
    local amount = tonumber(ARGV[a + i * 3 + 1])
    local v = tonumber(redis.call('GET', KEYS[k + i]) or '0')
    if v + amount > limit then return {0, i + 1, v} end
  end
  local out = {1}
  for i = 0, n - 1 do
    local v = redis.call('INCRBY', KEYS[k + i], ARGV[a + i * 3 + 1])
    redis.call('PEXPIRE', KEYS[k + i], ARGV[a + i * 3 + 2])
    out[#out + 1] = v
  end
  return out
end

local function reserve(k, n, a)
  for i = 0, n - 1 do
    local init, amount, worst, hard, ttl =
      ARGV[a + i * 5], tonumber(ARGV[a + i * 5 + 1]), tonumber(ARGV[a + i * 5 + 2]), ARGV[a + i * 5 + 3], ARGV[a + i * 5 + 4]
    local committed, spent = KEYS[k + 2 * i], KEYS[k + 2 * i + 1]
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
      if s >= amount or s + worst > amount then return {0, i + 1, s} end
      if c + worst > amount then return {2, i + 1, c} end
    end
  end
  local out = {1}
  for i = 0, n - 1 do
    out[#out + 1] = redis.call('INCRBY', KEYS[k + 2 * i], ARGV[a + i * 5 + 2])
  end
  return out
end

local out = {}
local k, a = 1, 1
while a <= #ARGV do
  local kind, nkeys, nargs = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  if kind == 'a' then
    out[#out + 1] = admit(k, nkeys, a)
  else
    out[#out + 1] = reserve(k, nkeys / 2, a)
  end
  k = k + nkeys
  a = a + nargs
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

/// Script calls with checks outstanding at once. More would only queue in
/// Redis (it runs one script at a time) and make the batches smaller.
const MAX_BATCHES_IN_FLIGHT: usize = 2;
/// The most checks one script call carries: Redis runs a script to its end
/// before anything else, so a burst is cut into calls of bounded length.
const MAX_CHECKS_PER_CALL: usize = 256;

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
    [committed_key, ":spent"].concat()
}

/// A key as Redis sees it, `<prefix>:<key>`, written straight into the
/// command's buffer: no string is built for it.
struct Prefixed<'a> {
    prefix: &'a str,
    key: &'a str,
}

impl ToRedisArgs for Prefixed<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        use std::io::Write as _;
        let mut arg = out.writer_for_next_arg();
        // Writes into the command's own buffer cannot fail.
        let _ = arg.write_all(self.prefix.as_bytes());
        let _ = arg.write_all(b":");
        let _ = arg.write_all(self.key.as_bytes());
    }
}

/// Corrections waiting for the background task, merged per counter.
#[derive(Debug, Default)]
struct Pending {
    deltas: std::sync::Mutex<FastMap<String, i64>>,
    wake: tokio::sync::Notify,
    dropped: AtomicU64,
}

/// Which function of [`CHECKS`] a queued check calls.
#[derive(Debug, Clone, Copy)]
enum CheckKind {
    Admit,
    Reserve,
}

/// A check waiting for the next script call.
struct Queued {
    kind: CheckKind,
    /// Unprefixed, as `adjust` takes them.
    keys: Vec<String>,
    args: Vec<i64>,
    /// The check's answer, or `None` when Redis failed.
    answer: tokio::sync::oneshot::Sender<Option<Vec<i64>>>,
}

/// Checks waiting for [`Shared::send_checks`].
#[derive(Default)]
struct Checks {
    queue: std::sync::Mutex<Vec<Queued>>,
    wake: tokio::sync::Notify,
    /// Set once the sender has stopped: checks are decided locally then.
    closed: AtomicBool,
    /// Script calls sent with checks, since start.
    calls: AtomicU64,
}

pub struct Shared {
    conn: ConnectionManager,
    /// Prepended to every key, so deployments (and tests) can share a Redis.
    prefix: String,
    checks_script: Script,
    adjust: Script,
    checks: Checks,
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
            checks_script: Script::new(CHECKS),
            adjust: Script::new(ADJUST),
            checks: Checks::default(),
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

    /// Redis failed a call on which `requests` requests waited: they are
    /// decided locally.
    fn failed(&self, error: &str, requests: u64) {
        self.fallbacks.fetch_add(requests, Ordering::Relaxed);
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

    /// Queues a check for the next script call and waits for its answer;
    /// `None` when Redis failed or did not answer in time.
    async fn check(&self, kind: CheckKind, keys: Vec<String>, args: Vec<i64>) -> Option<Vec<i64>> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        {
            // Checked under the queue's lock, which the sender holds while it
            // closes: a check is either queued before the sender's last
            // sweep (and answered) or sees it closed, never left waiting.
            let mut queue = lock(&self.checks.queue);
            if self.checks.closed.load(Ordering::Acquire) {
                drop(queue);
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            queue.push(Queued { kind, keys, args, answer });
        }
        self.checks.wake.notify_one();
        match tokio::time::timeout(CALL_TIMEOUT, answered).await {
            Ok(Ok(answer)) => answer,
            // The sender stopped (shutting down) before sending this one.
            Ok(Err(_)) => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(_) => {
                self.failed("timed out", 1);
                None
            }
        }
    }

    /// Sends queued checks, each call carrying every check queued since the
    /// last, until cancelled. Checks still queued then are decided locally.
    pub async fn send_checks(self: Arc<Self>, cancel: CancellationToken) {
        use futures_util::StreamExt;
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        loop {
            while in_flight.len() < MAX_BATCHES_IN_FLIGHT {
                let batch: Vec<Queued> = {
                    let mut queue = lock(&self.checks.queue);
                    let take = queue.len().min(MAX_CHECKS_PER_CALL);
                    queue.drain(..take).collect()
                };
                if batch.is_empty() {
                    break;
                }
                in_flight.push(self.send_batch(batch));
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                () = self.checks.wake.notified(), if in_flight.len() < MAX_BATCHES_IN_FLIGHT => {}
            }
        }
        while in_flight.next().await.is_some() {}
        let mut queue = lock(&self.checks.queue);
        self.checks.closed.store(true, Ordering::Release);
        // Dropping the senders answers the waiting checks: decided locally.
        queue.clear();
    }

    /// One script call for `batch`; each check gets its own answer.
    async fn send_batch(&self, batch: Vec<Queued>) {
        self.checks.calls.fetch_add(1, Ordering::Relaxed);
        let keys = batch.iter().map(|queued| queued.keys.len()).sum();
        let call = self.run_script(&self.checks_script, keys, |cmd| {
            for queued in &batch {
                for key in &queued.keys {
                    cmd.arg(self.prefixed(key));
                }
            }
            for queued in &batch {
                let kind = match queued.kind {
                    CheckKind::Admit => "a",
                    CheckKind::Reserve => "r",
                };
                cmd.arg(kind).arg(queued.keys.len()).arg(queued.args.len()).arg(queued.args.as_slice());
            }
        });
        let result = tokio::time::timeout(CALL_TIMEOUT, call).await;
        let requests = batch.len() as u64;
        let answers = match result {
            Ok(Ok(Value::Array(answers))) if answers.len() == batch.len() => {
                self.succeeded();
                Some(answers)
            }
            Ok(Ok(other)) => {
                self.failed(&format!("unexpected answer to the checks script: {other:?}"), requests);
                None
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string(), requests);
                None
            }
            Err(_) => {
                self.failed("timed out", requests);
                None
            }
        };
        match answers {
            Some(answers) => {
                for (queued, answer) in batch.into_iter().zip(answers) {
                    let numbers: Option<Vec<i64>> = match answer {
                        Value::Array(items) => {
                            Some(items.iter().filter_map(|v| redis::from_redis_value::<i64>(v).ok()).collect())
                        }
                        _ => None,
                    };
                    let admitted = numbers.as_ref().is_some_and(|n| n.first() == Some(&1));
                    if queued.answer.send(numbers).is_err() && admitted {
                        // Its request went away (the client disconnected)
                        // while the check was on its way: nobody will release
                        // what it took, so it is given back here.
                        self.give_back(queued.kind, &queued.keys, &queued.args);
                    }
                }
            }
            None => {
                for queued in batch {
                    let _ = queued.answer.send(None);
                }
            }
        }
    }

    /// Undoes an admitted check: the amounts it added, as corrections.
    fn give_back(&self, kind: CheckKind, keys: &[String], args: &[i64]) {
        let amount = |i: usize| args.get(i).copied().unwrap_or(0);
        match kind {
            CheckKind::Admit => {
                for (i, key) in keys.iter().enumerate() {
                    self.adjust(key.clone(), -amount(i * 3 + 1));
                }
            }
            CheckKind::Reserve => {
                for (i, committed) in keys.iter().step_by(2).enumerate() {
                    self.adjust(committed.clone(), -amount(i * 5 + 2));
                }
            }
        }
    }

    /// Admits against `(key, limit, amount, ttl_ms)` counters, all or none.
    /// `None`: Redis is unavailable, decide locally.
    pub async fn admit(&self, counters: &[(String, u64, i64, u64)]) -> Option<Verdict> {
        let keys: Vec<String> = counters.iter().map(|c| c.0.clone()).collect();
        let args: Vec<i64> =
            counters.iter().flat_map(|&(_, limit, amount, ttl)| [saturating(limit), amount, saturating(ttl)]).collect();
        let numbers = self.check(CheckKind::Admit, keys, args).await?;
        match numbers.first() {
            Some(1) => Some(Verdict::Admitted(numbers[1..].to_vec())),
            Some(0) if numbers.len() >= 3 => {
                Some(Verdict::Refused { index: (numbers[1] - 1).max(0) as usize, value: numbers[2] })
            }
            _ => None,
        }
    }

    /// Reserves on budget counters, all or none. `None`: Redis is
    /// unavailable, decide locally.
    pub async fn reserve(&self, budgets: &[BudgetCounter]) -> Option<ReserveVerdict> {
        let keys: Vec<String> = budgets.iter().flat_map(|b| [b.key.clone(), spent_key(&b.key)]).collect();
        let args: Vec<i64> = budgets
            .iter()
            .flat_map(|b| [b.initial, b.amount, b.worst_case, i64::from(b.hard), saturating(b.ttl_ms)])
            .collect();
        let numbers = self.check(CheckKind::Reserve, keys, args).await?;
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
            if self.send_adjustments(batch).await.is_none() {
                // A lost correction only skews one window, one in-flight
                // count or one budget's in-flight part until its key
                // expires; the ledger stays exact.
                tracing::debug!(count = batch.len(), "cannot apply shared counter corrections");
            }
        }
    }

    /// One call of the corrections script; `None` when Redis failed.
    async fn send_adjustments(&self, batch: &[(String, i64)]) -> Option<()> {
        let call = self.run_script(&self.adjust, batch.len(), |cmd| {
            for (key, _) in batch {
                cmd.arg(self.prefixed(key));
            }
            for (_, delta) in batch {
                cmd.arg(*delta);
            }
        });
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(_)) => {
                self.succeeded();
                Some(())
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string(), 0);
                None
            }
            Err(_) => {
                self.failed("timed out", 0);
                None
            }
        }
    }

    fn prefixed<'a>(&'a self, key: &'a str) -> Prefixed<'a> {
        Prefixed { prefix: &self.prefix, key }
    }

    /// `EVALSHA` of `script` with `keys` keys, the keys and arguments
    /// written by `write` straight into the command (a `ScriptInvocation`
    /// would hold each in an allocation of its own and copy them all again
    /// into the command). A Redis that does not know the script (restarted,
    /// or flushed) is sent it, and the call is made once more.
    async fn run_script(&self, script: &Script, keys: usize, write: impl FnOnce(&mut Cmd)) -> RedisResult<Value> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(keys);
        write(&mut cmd);
        let mut conn = self.conn.clone();
        match cmd.query_async(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::NoScriptError => {
                script.load_async(&mut conn).await?;
                cmd.query_async(&mut conn).await
            }
            answered => answered,
        }
    }
}

/// Counts and durations as the scripts take them (Lua numbers; none comes
/// near the bound).
fn saturating(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis_url() -> String {
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    /// A Redis that lost its scripts (restarted, or `SCRIPT FLUSH`) is sent
    /// them again: checks and corrections keep working, with the keys under
    /// the deployment's prefix and the numbers as written.
    #[tokio::test]
    async fn scripts_redis_forgot_are_sent_again_and_keys_carry_the_prefix() {
        let prefix = format!("tollgate_test_{}", uuid::Uuid::now_v7().simple());
        let shared = Shared::connect(&redis_url(), &prefix).await.unwrap();
        let cancel = CancellationToken::new();
        let sender = tokio::spawn(shared.clone().send_checks(cancel.clone()));
        let mut conn = shared.conn.clone();
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut conn).await.unwrap();

        let counter = [("rl:t:rpm@1".to_owned(), 10_u64, 3_i64, 60_000_u64)];
        assert!(matches!(shared.admit(&counter).await, Some(Verdict::Admitted(v)) if v == [3]));
        let budget = BudgetCounter {
            key: "budget:b:20261201".to_owned(),
            initial: 100,
            amount: 1_000,
            worst_case: 50,
            hard: true,
            ttl_ms: 0,
        };
        assert!(
            matches!(shared.reserve(std::slice::from_ref(&budget)).await, Some(ReserveVerdict::Admitted(v)) if v == [150])
        );

        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut conn).await.unwrap();
        shared.adjust("rl:t:rpm@1".to_owned(), -2);
        shared.adjust(spent_key(&budget.key), 40);
        shared.flush().await;
        let get = |key: &str| redis::cmd("GET").arg(format!("{prefix}:{key}")).clone();
        let rpm: i64 = get("rl:t:rpm@1").query_async(&mut conn).await.unwrap();
        let spent: i64 = get("budget:b:20261201:spent").query_async(&mut conn).await.unwrap();
        let committed: i64 = get("budget:b:20261201").query_async(&mut conn).await.unwrap();
        assert_eq!((rpm, spent, committed), (1, 140, 150));
        assert_eq!(shared.fallbacks(), 0);
        cancel.cancel();
        sender.await.unwrap();
    }

    /// Checks made at once share script calls, and each is still decided on
    /// its own and atomically: a limit of 150 admits exactly 150 of 400, each
    /// seeing its own count.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_checks_share_script_calls_and_each_stays_atomic() {
        let prefix = format!("tollgate_test_{}", uuid::Uuid::now_v7().simple());
        let shared = Shared::connect(&redis_url(), &prefix).await.unwrap();
        let cancel = CancellationToken::new();
        let sender = tokio::spawn(shared.clone().send_checks(cancel.clone()));
        let counter = vec![("rpm:t".to_owned(), 150_u64, 1_i64, 60_000_u64)];
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..400 {
            let (shared, counter) = (shared.clone(), counter.clone());
            tasks.spawn(async move { shared.admit(&counter).await });
        }
        let (mut admitted, mut refused) = (Vec::new(), 0);
        while let Some(verdict) = tasks.join_next().await {
            match verdict.unwrap() {
                Some(Verdict::Admitted(values)) => admitted.push(values[0]),
                Some(Verdict::Refused { index: 0, value: 150 }) => refused += 1,
                other => panic!("unexpected verdict {other:?}"),
            }
        }
        admitted.sort_unstable();
        assert_eq!(admitted, (1..=150).collect::<Vec<i64>>(), "each admitted check saw its own count");
        assert_eq!(refused, 250);
        let calls = shared.checks.calls.load(Ordering::Relaxed);
        assert!(calls < 400, "{calls} script calls for 400 checks");
        assert_eq!(shared.fallbacks(), 0);
        cancel.cancel();
        sender.await.unwrap();
        // Once the sender has stopped, checks are decided locally at once.
        assert!(shared.admit(&counter).await.is_none());
        assert_eq!(shared.fallbacks(), 1);
    }

    /// Checks racing the sender's shutdown are each either answered by Redis
    /// or decided locally at once: none waits out the call timeout, so none
    /// marks Redis as down.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checks_racing_the_shutdown_are_answered_or_fall_back_at_once() {
        let prefix = format!("tollgate_test_{}", uuid::Uuid::now_v7().simple());
        let shared = Shared::connect(&redis_url(), &prefix).await.unwrap();
        let cancel = CancellationToken::new();
        let sender = tokio::spawn(shared.clone().send_checks(cancel.clone()));
        let counter = vec![("rpm:race".to_owned(), 1_000_000_u64, 1_i64, 60_000_u64)];
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..2_000 {
            let (shared, counter) = (shared.clone(), counter.clone());
            tasks.spawn(async move {
                if i % 100 == 0 {
                    tokio::task::yield_now().await;
                }
                shared.admit(&counter).await
            });
            if i == 1_000 {
                cancel.cancel();
            }
        }
        let (mut answered, mut local) = (0_u64, 0_u64);
        while let Some(verdict) = tasks.join_next().await {
            match verdict.unwrap() {
                Some(_) => answered += 1,
                None => local += 1,
            }
        }
        sender.await.unwrap();
        assert_eq!(answered + local, 2_000);
        assert_eq!(shared.fallbacks(), local, "every check not answered was decided locally, counted once");
        assert!(!shared.is_down(), "no check waited out the timeout");
    }

    /// A request that goes away while its check is queued or on its way
    /// (a client disconnecting) leaves nothing taken behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_check_whose_request_went_away_gives_back_what_it_took() {
        use futures_util::FutureExt;
        let prefix = format!("tollgate_test_{}", uuid::Uuid::now_v7().simple());
        let shared = Shared::connect(&redis_url(), &prefix).await.unwrap();
        let cancel = CancellationToken::new();
        let sender = tokio::spawn(shared.clone().send_checks(cancel.clone()));
        let corrections = tokio::spawn(shared.clone().apply_adjustments(cancel.clone()));
        let counter = vec![("inflight:t".to_owned(), 10_u64, 1_i64, 60_000_u64)];
        let mut abandoned = Box::pin(shared.admit(&counter));
        assert!((&mut abandoned).now_or_never().is_none(), "queued, not answered yet");
        drop(abandoned);
        let mut redis = redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let key = format!("{prefix}:inflight:t");
        // The check ran (the counter exists) and was undone (back to 0).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let value: Option<i64> = redis::cmd("GET").arg(&key).query_async(&mut redis).await.unwrap();
            if value == Some(0) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the counter is {value:?}, not given back");
            tokio::task::yield_now().await;
        }
        cancel.cancel();
        sender.await.unwrap();
        corrections.await.unwrap();
    }
}
