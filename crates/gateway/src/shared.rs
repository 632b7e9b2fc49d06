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
//! paid twice by each; inside the call, each key is read and written once
//! however many checks touch it. Corrections (token settlement, in-flight
//! release, budget settlement) are added into a bounded table of pending
//! deltas, one entry per counter, which a background task sends through the
//! same script, one call per round trip; the request path never waits for
//! them. A correction wakes that task, which gathers for
//! `CORRECTIONS_GATHER` before it sends, except a budget's settled spend
//! ([`Shared::settle_spend`]): Redis reads it only to tell an exhausted
//! budget from a busy one, so it waits for the next correction that does
//! wake the task, or for the lease check every `lease::IDLE_MS / 4`. With
//! every other counter leased, that is what a busy replica's corrections
//! mostly are: they were a call every 10 ms, they are now a call every
//! 250 ms. A check Redis refuses on a counter whose release still waits
//! (a client's previous request has just ended; a small limit, checked in
//! Redis, has no lease to take it), and a reservation a small budget
//! answers busy for the same reason, has that release sent at once and is
//! asked again, once: otherwise a client keeping one request in flight,
//! one after another, would be refused for up to the gather. (Carrying
//! corrections in the next call with checks instead, which a
//! request waits for, raised the added p50 at 1,000 requests/s by about
//! 60 µs in side-by-side runs and gave no measurable throughput.) Deltas
//! for the same counter merge, so the table grows with the number of live
//! counters, not with traffic. When it holds `MAX_PENDING_COUNTERS` counters
//! already, a correction for yet another counter is dropped and counted
//! (`tollgate_shared_corrections_dropped_total`): that counter stays high
//! until its key expires (the end of its minute, or its budget period), and
//! the ledger, which budgets are rebuilt from, stays exact.
//!
//! Far from their limits, most requests never reach that queue: each
//! replica holds leases, blocks of a counter's allowance Redis has counted
//! already, and admits from them by itself (see [`lease`]); a check that a
//! lease cannot take asks for a block on its way, and a lease running low
//! is topped up in the background.
//!
//! When Redis cannot be reached, callers fall back to their local counters
//! (with limits divided by the replica count) and come back to Redis once it
//! answers again; see `Shared::available`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Cmd, ErrorKind, RedisResult, RedisWrite, Script, ToRedisArgs, Value};
use smallvec::SmallVec;
use tokio_util::sync::CancellationToken;

use crate::fast_hash::FastMap;

mod lease;
mod msgpack;

use lease::{Leases, TopUp, Want};

/// Applies a batch of corrections, then runs a queue of checks, in one
/// atomic call. Every key the batch touches is in KEYS once; the arguments
/// refer to keys by their index there. The arguments are integers, sent as
/// one MessagePack array in `ARGV[1]` (see [`msgpack::pack_integers`]): Redis
/// decodes that in one C call, where a number per `ARGV` entry went through
/// `tonumber` one by one and cost about half of the script's time. The
/// answers come back the same way, one array per check in one string
/// ([`msgpack::unpack_answers`]), read here without building a Redis value
/// per number. The arguments hold the number of corrections; when there
/// are any, the sender's key, the batch's number and the sender key's TTL
/// (see [`Sent`]), then each correction as (key, delta); then each check
/// as its kind (1: rate limits, 2: budgets), its number of counters, and
/// per counter:
///
/// - rate limit: (key, limit, amount, ttl, extra, room). Refused with
///   `{0, i, value}` when a counter would pass its limit; otherwise every
///   counter is incremented and the answer is `{1, values..., grants...}`.
///   A counter gets its TTL when created; a negative ttl (in-flight counts)
///   is set again on every admission, so a counter in use never expires
///   under its holders.
/// - budget: (committed key, settled key, initial, amount, worst case, hard,
///   ttl, extra, room). The committed counter is settled spend plus
///   reservations in flight; both start at `initial` (settled spend from the
///   ledger). The answer is `{1, committed..., grants...}`, or `{0, i, s}`
///   when settled spend plus the request's worst case passes a hard budget
///   (exhausted), or `{2, i, c}` when only reservations in flight are in the
///   way (busy).
///
/// An admitted counter also grants the replica a lease of `extra` more
/// (see [`lease`]) when that still leaves `room` below its limit; its grant
/// is 0 otherwise. A grant is counted as used like the amount itself.
///
/// A correction applies only to a counter that still exists: one that
/// expired must not come back without its TTL.
///
/// Redis runs this for every request the fleet admits, so its cost is kept
/// per key, not per request: each key is read at most once and written at
/// most once per call, however many checks and corrections touch it, and
/// the checks themselves are decided on values held in the script. A
/// budget's settled spend is read only when its committed counter alone
/// cannot admit: settled spend never exceeds the committed counter (both
/// start equal, and a settlement adds the cost to both and takes the
/// reservation back from the committed one only).
const CHECKS: &str = r"
local arg = cmsgpack.unpack(ARGV[1])
local val, add, fresh, ttls, renew, touched = {}, {}, {}, {}, {}, {}
local function load(i)
  local v = val[i]
  if v == nil then
    v = redis.call('GET', KEYS[i])
    if v then v = tonumber(v) end
    val[i] = v
  end
  return v
end
local function touch(i, delta)
  if add[i] == nil then
    add[i] = 0
    touched[#touched + 1] = i
  end
  add[i] = add[i] + delta
end
local function create(i, value, ttl)
  val[i], fresh[i], ttls[i] = value, true, ttl
  touch(i, 0)
end

local function admit(a, n)
  for c = 0, n - 1 do
    local at = a + c * 6
    local v = load(arg[at]) or 0
    if v + arg[at + 2] > arg[at + 1] then return {0, c + 1, v} end
  end
  local out, grants = {1}, {}
  for c = 0, n - 1 do
    local at = a + c * 6
    local i, limit, amount, ttl = arg[at], arg[at + 1], arg[at + 2], arg[at + 3]
    local extra, room = arg[at + 4], arg[at + 5]
    if load(i) == false then
      create(i, 0, math.abs(ttl))
    elseif ttl < 0 then
      renew[i] = -ttl
    end
    local grant = 0
    if extra > 0 and val[i] + amount + extra + room <= limit then grant = extra end
    val[i] = val[i] + amount + grant
    touch(i, amount + grant)
    out[#out + 1] = val[i]
    grants[c + 1] = grant
  end
  for c = 1, n do out[#out + 1] = grants[c] end
  return out
end

local function reserve(a, n)
  for b = 0, n - 1 do
    local at = a + b * 9
    local ci, si, init = arg[at], arg[at + 1], arg[at + 2]
    local amount, worst, hard, ttl =
      arg[at + 3], arg[at + 4], arg[at + 5], arg[at + 6]
    local c = load(ci)
    if c == false then
      create(ci, init, ttl)
      c = init
      if load(si) == false then create(si, init, ttl) end
    end
    if hard == 1 and (c + worst > amount or (worst <= 0 and c >= amount)) then
      local s = load(si) or init
      if s >= amount or s + worst > amount then return {0, b + 1, s} end
      if c + worst > amount then return {2, b + 1, c} end
    end
  end
  local out, grants = {1}, {}
  for b = 0, n - 1 do
    local at = a + b * 9
    local ci, amount, worst = arg[at], arg[at + 3], arg[at + 4]
    local extra, room = arg[at + 7], arg[at + 8]
    local grant = 0
    if extra > 0 and val[ci] + worst + extra + room <= amount then grant = extra end
    val[ci] = val[ci] + worst + grant
    touch(ci, worst + grant)
    out[#out + 1] = val[ci]
    grants[b + 1] = grant
  end
  for b = 1, n do out[#out + 1] = grants[b] end
  return out
end

local a, n = 2, arg[1]
if n > 0 then
  -- A batch of corrections is numbered by its sender: one sent again
  -- because its answer was lost is applied once.
  local sender, batch, ttl = arg[2], arg[3], arg[4]
  a = 5
  if batch <= tonumber(redis.call('GET', KEYS[sender]) or 0) then
    a, n = a + 2 * n, 0
  else
    redis.call('SET', KEYS[sender], batch, 'PX', ttl)
  end
end
for _ = 1, n do
  local i = arg[a]
  local v = load(i)
  if v then
    val[i] = v + arg[a + 1]
    touch(i, arg[a + 1])
  end
  a = a + 2
end
local out = {}
while a <= #arg do
  local kind, n = arg[a], arg[a + 1]
  a = a + 2
  if kind == 1 then
    out[#out + 1] = admit(a, n)
    a = a + n * 6
  else
    out[#out + 1] = reserve(a, n)
    a = a + n * 9
  end
end
for _, i in ipairs(touched) do
  if fresh[i] then
    if ttls[i] > 0 then
      redis.call('SET', KEYS[i], val[i], 'PX', ttls[i])
    else
      redis.call('SET', KEYS[i], val[i])
    end
  else
    if add[i] ~= 0 then redis.call('INCRBY', KEYS[i], add[i]) end
    if renew[i] then redis.call('PEXPIRE', KEYS[i], renew[i]) end
  end
end
return cmsgpack.pack(out)
";

/// The most counters with corrections waiting at once.
const MAX_PENDING_COUNTERS: usize = 100_000;
/// Corrections sent per script call.
const ADJUST_BATCH: usize = 1_000;
/// How long corrections gather before they are sent.
const CORRECTIONS_GATHER: Duration = Duration::from_millis(10);

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

/// A check this replica's leases could not decide: the block to ask Redis
/// for with it, per counter (0 where none is wanted). The leases asked are
/// marked as waiting for their blocks, so it must be sent.
#[derive(Debug)]
#[must_use = "the leases wait for the blocks it asks for"]
pub struct Asking(Vec<i64>);

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

/// One rate-limit counter an admission touches.
#[derive(Debug, Clone)]
pub struct LimitCounter {
    pub key: String,
    pub limit: u64,
    pub amount: i64,
    pub expiry: Expiry,
}

/// When a shared counter expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// This long after it was created (a window's counter: the window ends).
    Created(u64),
    /// This long after the last admission on it (an in-flight count: it
    /// lives while requests use it, and goes away when a replica that died
    /// holding some is no longer used).
    Renewed(u64),
}

impl Expiry {
    fn ms(self) -> u64 {
        match self {
            Self::Created(ms) | Self::Renewed(ms) => ms,
        }
    }
}

/// One budget counter a reservation touches.
#[derive(Debug, Clone)]
pub struct BudgetCounter {
    /// The committed counter's key; its settled spend is [`spent_key`].
    /// Shared: the budget builds it once per period, not per request.
    pub key: Arc<str>,
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

/// The keys of one script call, each once, in the order first seen; Lua
/// indexes KEYS from 1.
#[derive(Default)]
struct KeyIndex<'a> {
    order: Vec<&'a str>,
    index: FastMap<&'a str, i64>,
}

impl<'a> KeyIndex<'a> {
    fn index(&mut self, key: &'a str) -> i64 {
        let next = self.order.len() as i64 + 1;
        let index = *self.index.entry(key).or_insert(next);
        if index == next {
            self.order.push(key);
        }
        index
    }
}

/// Corrections waiting for the background task, merged per counter.
#[derive(Debug, Default)]
struct Pending {
    deltas: std::sync::Mutex<FastMap<String, i64>>,
    wake: tokio::sync::Notify,
    dropped: AtomicU64,
    /// A batch whose call failed: it may have been applied or not, so it
    /// is sent again, as it was, before anything newer.
    unsent: std::sync::Mutex<Option<Sent>>,
    /// Batches numbered so far.
    numbered: AtomicU64,
    /// Script calls sent with corrections only, since start.
    calls: AtomicU64,
    /// Asks the corrections task to send what waits at once, without
    /// gathering (see [`Shared::send_releases_first`]).
    hurry: tokio::sync::Notify,
    /// Rounds of sending begun (each takes every correction waiting) and
    /// rounds ended; told at the end of each.
    rounds_begun: AtomicU64,
    rounds_ended: AtomicU64,
    round_ended: tokio::sync::Notify,
}

impl Pending {
    /// Puts corrections taken for a call that was not made back with the
    /// waiting ones.
    fn merge_back(&self, deltas: impl Iterator<Item = (String, i64)>) {
        let mut waiting = lock(&self.deltas);
        for (key, delta) in deltas {
            let merged = waiting.entry(key).or_insert(0);
            *merged = merged.saturating_add(delta);
        }
    }

    /// When a release (a negative correction) of `key` waits to be sent:
    /// the round of sending that will carry it.
    fn release_round(&self, key: &str) -> Option<u64> {
        let deltas = lock(&self.deltas);
        // Under the lock the next round to begin takes this delta.
        deltas.get(key).is_some_and(|delta| *delta < 0).then(|| self.rounds_begun.load(Ordering::Acquire) + 1)
    }

    fn end_round(&self, round: u64) {
        self.rounds_ended.fetch_max(round, Ordering::AcqRel);
        self.round_ended.notify_waiters();
    }

    /// Counters with corrections not yet applied in Redis.
    fn waiting(&self) -> usize {
        lock(&self.deltas).len() + lock(&self.unsent).as_ref().map_or(0, |sent| sent.deltas.len())
    }
}

/// A batch of corrections as sent, numbered per sender. The script keeps
/// the number of the last batch it applied under the sender's key and
/// skips a batch numbered no higher: a call that failed after Redis ran it
/// (its answer lost, or late) can be sent again without being applied
/// twice, so no correction is lost to an outage or counted twice after it.
#[derive(Debug)]
struct Sent {
    number: u64,
    deltas: Vec<(String, i64)>,
}

/// How long Redis keeps a sender's last batch number after its last call:
/// a batch sent again after longer (Redis unreachable for a whole day,
/// just after applying it) could be applied twice.
const SENDER_TTL_MS: i64 = 24 * 60 * 60 * 1_000;

/// Which function of [`CHECKS`] a queued check calls.
#[derive(Debug, Clone, Copy)]
enum CheckKind {
    Admit,
    Reserve,
}

impl CheckKind {
    /// Arguments per counter, after its key (or a budget's two keys).
    const fn stride(self) -> usize {
        match self {
            Self::Admit => ADMIT_ARGS,
            Self::Reserve => RESERVE_ARGS,
        }
    }

    /// Where a counter's amount is among its arguments.
    const fn amount_at(self) -> usize {
        match self {
            Self::Admit => 1,
            Self::Reserve => 2,
        }
    }

    /// Where a counter's limit (a budget's amount) is among its arguments.
    const fn limit_at(self) -> usize {
        match self {
            Self::Admit => 0,
            Self::Reserve => 1,
        }
    }

    /// Keys per counter: a budget has its committed and settled ones.
    const fn keys_per_counter(self) -> usize {
        match self {
            Self::Admit => 1,
            Self::Reserve => 2,
        }
    }
}

/// A rate-limit counter's arguments: limit, amount, ttl, extra, room.
const ADMIT_ARGS: usize = 5;
/// A budget's arguments: initial, amount, worst case, hard, ttl, extra,
/// room.
const RESERVE_ARGS: usize = 7;

/// A check waiting for the next script call.
struct Queued {
    kind: CheckKind,
    /// Unprefixed, as `adjust` takes them.
    keys: Vec<String>,
    /// [`CheckKind::stride`] per counter; the last two ask for a lease.
    args: Vec<i64>,
    /// The check's answer, or `None` when Redis failed; no one waits for a
    /// lease's top-up.
    answer: Option<tokio::sync::oneshot::Sender<Option<Vec<i64>>>>,
    /// A top-up: every counter's lease takes the answer, granted or not.
    top_up: bool,
}

impl Queued {
    fn counters(&self) -> usize {
        self.keys.len() / self.kind.keys_per_counter()
    }

    /// Counter `i`'s key, as its lease is named.
    fn lease_key(&self, i: usize) -> &str {
        &self.keys[i * self.kind.keys_per_counter()]
    }

    fn arg(&self, i: usize, at: usize) -> i64 {
        self.args.get(i * self.kind.stride() + at).copied().unwrap_or(0)
    }

    /// Counter `i`'s limit (a budget's amount).
    fn limit(&self, i: usize) -> i64 {
        self.arg(i, self.kind.limit_at())
    }

    /// The block counter `i` asked for.
    fn extra(&self, i: usize) -> i64 {
        self.arg(i, self.kind.stride() - 2)
    }
}

/// Checks waiting for [`Shared::send_checks`].
#[derive(Default)]
struct Checks {
    queue: std::sync::Mutex<Vec<Queued>>,
    wake: tokio::sync::Notify,
    /// Set once the sender has stopped: checks are decided locally then.
    closed: AtomicBool,
    /// Told when `closed` is set.
    stopped: tokio::sync::Notify,
    /// Script calls sent with checks, since start.
    calls: AtomicU64,
}

/// Script calls a replica sent to Redis, by what they carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptCalls {
    /// Admissions and lease top-ups.
    pub checks: u64,
    /// Corrections only (settlements, releases, leases given back).
    pub corrections: u64,
}

pub struct Shared {
    client: redis::Client,
    /// Set once Redis has been reached and found able to run the script:
    /// at start, or later by [`Shared::keep_connecting`] when it was
    /// unreachable then. The connection manager reconnects by itself after.
    conn: std::sync::OnceLock<ConnectionManager>,
    /// Prepended to every key, so deployments (and tests) can share a Redis.
    prefix: String,
    checks_script: Script,
    checks: Checks,
    pending: Pending,
    /// This process's key for the number of its last batch of corrections
    /// (see [`Sent`]); random, so replicas and restarts never share one.
    sender_key: String,
    down: AtomicBool,
    down_since_ms: AtomicU64,
    fallbacks: AtomicU64,
    leases: Leases,
    /// Lease ages are counted from here (monotonic; paused in tests).
    epoch: tokio::time::Instant,
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
    /// Connects to Redis. Leases hold `lease_requests` requests' worth of a
    /// counter (0: every admission asks Redis).
    ///
    /// A bad URL, or a Redis that cannot run the script, is an error. A
    /// Redis that cannot be reached is not: the gateway starts on its local
    /// counters (limits divided by the replica count), as it does when
    /// Redis goes away later, and [`Shared::keep_connecting`] joins Redis
    /// once it answers. A fleet restarted during a Redis outage keeps
    /// serving.
    pub async fn connect(url: &str, prefix: &str, lease_requests: u64) -> anyhow::Result<Arc<Self>> {
        let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("bad Redis URL: {e}"))?;
        let shared = Arc::new(Self {
            client,
            conn: std::sync::OnceLock::new(),
            prefix: prefix.to_owned(),
            checks_script: Script::new(CHECKS),
            checks: Checks::default(),
            pending: Pending::default(),
            sender_key: format!("corrections:{:016x}", rand::random::<u64>()),
            down: AtomicBool::new(false),
            down_since_ms: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            leases: Leases::new(lease_requests),
            epoch: tokio::time::Instant::now(),
        });
        match shared.open().await {
            Ok(()) => {}
            Err(Unusable::Unfit(e)) => anyhow::bail!(e),
            Err(Unusable::Unreachable(e)) => {
                tracing::warn!(
                    error = %e,
                    "Redis unreachable at start; enforcing limits locally (divided by the replica count) until it answers"
                );
                shared.down.store(true, Ordering::Release);
                shared.down_since_ms.store(now_ms(), Ordering::Release);
            }
        }
        Ok(shared)
    }

    /// Reaches Redis and checks that it can run the script.
    async fn open(&self) -> Result<(), Unusable> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(CALL_TIMEOUT)
            .set_number_of_retries(1);
        let connecting = ConnectionManager::new_with_config(self.client.clone(), config);
        let conn = tokio::time::timeout(Duration::from_secs(5), connecting)
            .await
            .map_err(|_| Unusable::Unreachable("Redis did not answer".to_owned()))?
            .map_err(|e| Unusable::Unreachable(format!("cannot connect to Redis: {e}")))?;
        // A Redis-compatible server without what the script needs would fail
        // every call and leave limits local for good: say so at once.
        require_scripting(&mut conn.clone(), SCRIPTING_PROBE).await?;
        let _ = self.conn.set(conn);
        Ok(())
    }

    /// While Redis has not been reached since start, tries again every
    /// `RETRY_AFTER_MS`; returns once it has, or when cancelled.
    pub async fn keep_connecting(self: Arc<Self>, cancel: CancellationToken) {
        let mut said_unfit = false;
        while self.conn.get().is_none() {
            let opened = tokio::select! {
                () = cancel.cancelled() => return,
                opened = async {
                    tokio::time::sleep(Duration::from_millis(RETRY_AFTER_MS)).await;
                    self.open().await
                } => opened,
            };
            match opened {
                Ok(()) => self.succeeded(),
                Err(Unusable::Unreachable(_)) => {}
                Err(Unusable::Unfit(e)) if !said_unfit => {
                    said_unfit = true;
                    tracing::error!(error = %e, "limits stay local");
                }
                Err(Unusable::Unfit(_)) => {}
            }
        }
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

    /// Requests admitted from this replica's leases, without a round trip.
    pub fn lease_admissions(&self) -> u64 {
        self.leases.admitted()
    }

    /// Script calls sent since start: with checks (admissions and lease
    /// top-ups), and with corrections only.
    pub fn script_calls(&self) -> ScriptCalls {
        ScriptCalls {
            checks: self.checks.calls.load(Ordering::Relaxed),
            corrections: self.pending.calls.load(Ordering::Relaxed),
        }
    }

    fn lease_now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Counters with corrections not yet applied in Redis: those waiting
    /// for the next call, and those held while it cannot be reached.
    pub fn corrections_waiting(&self) -> usize {
        self.pending.waiting()
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
            queue.push(Queued { kind, keys, args, answer: Some(answer), top_up: false });
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

    /// Queues a lease's top-up for the next script call; nothing waits for
    /// it, the sender hands its answer to the lease.
    fn top_up(&self, kind: CheckKind, keys: Vec<String>, args: Vec<i64>) {
        let key = keys.first().cloned().unwrap_or_default();
        {
            let mut queue = lock(&self.checks.queue);
            if self.checks.closed.load(Ordering::Acquire) {
                drop(queue);
                self.leases.not_granted(&key);
                return;
            }
            queue.push(Queued { kind, keys, args, answer: None, top_up: true });
        }
        self.checks.wake.notify_one();
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
        drop(queue);
        self.checks.stopped.notify_waiters();
    }

    /// Returns once the checks sender has stopped (or after a bound, if it
    /// does not run): no grant can come back after that.
    async fn checks_stopped(&self) {
        let stopped = self.checks.stopped.notified();
        tokio::pin!(stopped);
        stopped.as_mut().enable();
        if self.checks.closed.load(Ordering::Acquire) {
            return;
        }
        let _ = tokio::time::timeout(CALL_TIMEOUT * 2, stopped).await;
    }

    /// One script call for `batch`; each check gets its own answer.
    async fn send_batch(&self, batch: Vec<Queued>) {
        self.checks.calls.fetch_add(1, Ordering::Relaxed);
        let call = self.call_checks(None, &batch);
        let result = tokio::time::timeout(CALL_TIMEOUT, call).await;
        let requests = batch.iter().filter(|q| q.answer.is_some()).count() as u64;
        let answers = match result {
            Ok(Ok(Value::BulkString(packed))) => match msgpack::unpack_answers(&packed) {
                Some(answers) if answers.len() == batch.len() => {
                    self.succeeded();
                    Some(answers)
                }
                _ => {
                    self.failed("unreadable answer to the checks script", requests);
                    None
                }
            },
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
        let now = self.lease_now();
        match answers {
            Some(answers) => {
                for (mut queued, numbers) in batch.into_iter().zip(answers) {
                    self.hand_to_leases(&queued, Some(&numbers), now);
                    let admitted = numbers.first() == Some(&1);
                    let Some(answer) = queued.answer.take() else { continue };
                    if answer.send(Some(numbers)).is_err() && admitted {
                        // Its request went away (the client disconnected)
                        // while the check was on its way: nobody will release
                        // what it took, so it is given back here.
                        self.give_back(&queued);
                    }
                }
            }
            None => {
                for queued in batch {
                    self.hand_to_leases(&queued, None, now);
                    if let Some(answer) = queued.answer {
                        let _ = answer.send(None);
                    }
                }
            }
        }
    }

    /// Gives each lease the check asked a block for what Redis granted it
    /// (`numbers`: the check's answer; `None`: Redis failed).
    fn hand_to_leases(&self, queued: &Queued, numbers: Option<&[i64]>, now: u64) {
        let n = queued.counters();
        let admitted = numbers.filter(|numbers| numbers.first() == Some(&1) && numbers.len() == 1 + 2 * n);
        for i in 0..n {
            if !(queued.top_up || queued.extra(i) > 0) {
                continue;
            }
            let key = queued.lease_key(i);
            match admitted {
                Some(numbers) => {
                    self.leases.granted(key, queued.extra(i), numbers[1 + n + i], numbers[1 + i], queued.limit(i), now);
                }
                None => self.leases.not_granted(key),
            }
        }
    }

    /// Undoes an admitted check: the amounts it added, as corrections.
    fn give_back(&self, queued: &Queued) {
        for i in 0..queued.counters() {
            let amount = queued.arg(i, queued.kind.amount_at());
            self.adjust(queued.lease_key(i), -amount);
        }
    }

    /// Admits against `counters`, all or none: from this replica's leases
    /// when they hold enough, else in Redis. `None`: Redis is unavailable,
    /// decide locally. (The request path takes the two steps itself, so as
    /// to await nothing when the leases decide.)
    #[cfg(test)]
    pub async fn admit(&self, counters: &[LimitCounter]) -> Option<Verdict> {
        match self.admit_leased(counters) {
            Ok(verdict) => Some(verdict),
            Err(asking) => self.admit_asking(counters, asking).await,
        }
    }

    /// Admits against `counters` from this replica's leases, without a
    /// round trip, when they hold enough for all of them (most requests).
    /// Else what to ask Redis for: hand it to [`Shared::admit_asking`],
    /// which must follow (the leases now wait for the blocks it asks).
    pub fn admit_leased(&self, counters: &[LimitCounter]) -> Result<Verdict, Asking> {
        let wants: SmallVec<[Want<'_>; 6]> =
            counters.iter().map(|c| Want { key: &c.key, amount: c.amount, limit: saturating(c.limit) }).collect();
        match self.leases.take(&wants, self.lease_now()) {
            lease::Taken::Leased { values, top_ups } => {
                for TopUp { index, extra } in top_ups {
                    let counter = &counters[index];
                    self.top_up(CheckKind::Admit, vec![counter.key.clone()], admit_args(counter, 0, extra).to_vec());
                }
                Ok(Verdict::Admitted(values))
            }
            lease::Taken::Ask { extras } => Err(Asking(extras)),
        }
    }

    /// Admits against `counters` in Redis, asking for the blocks
    /// [`Shared::admit_leased`] found wanting. `None`: Redis is
    /// unavailable, decide locally.
    pub async fn admit_asking(&self, counters: &[LimitCounter], Asking(extras): Asking) -> Option<Verdict> {
        let refusing = |verdict: &Verdict| match verdict {
            Verdict::Refused { index, .. } => counters.get(*index).map(|c| c.key.as_str()),
            Verdict::Admitted(_) => None,
        };
        let extras = extras.as_slice();
        self.past_waiting_releases(|| self.admit_in_redis(counters, extras), refusing).await
    }

    /// One check of `counters` in Redis.
    async fn admit_in_redis(&self, counters: &[LimitCounter], extras: &[i64]) -> Option<Verdict> {
        let keys: Vec<String> = counters.iter().map(|c| c.key.clone()).collect();
        let args: Vec<i64> = counters
            .iter()
            .zip(extras)
            .flat_map(|(counter, &extra)| admit_args(counter, counter.amount, extra))
            .collect();
        let numbers = self.check(CheckKind::Admit, keys, args).await?;
        let n = counters.len();
        match numbers.first() {
            Some(1) if numbers.len() == 1 + 2 * n => Some(Verdict::Admitted(numbers[1..=n].to_vec())),
            Some(0) if numbers.len() >= 3 => {
                Some(Verdict::Refused { index: (numbers[1] - 1).max(0) as usize, value: numbers[2] })
            }
            _ => None,
        }
    }

    /// Asks Redis with `ask`; when the answer was held back by a counter
    /// (`holding`) whose release still waits to be sent (a client's
    /// previous request just ended), sends that release first and asks
    /// again, once.
    async fn past_waiting_releases<'k, V, Asked>(
        &self,
        ask: impl Fn() -> Asked,
        holding: impl Fn(&V) -> Option<&'k str>,
    ) -> Option<V>
    where
        Asked: Future<Output = Option<V>>,
    {
        let verdict = ask().await?;
        match holding(&verdict).and_then(|key| self.pending.release_round(key)) {
            Some(round) => {
                self.send_releases_first(round).await;
                ask().await
            }
            None => Some(verdict),
        }
    }

    /// Has the corrections task send what waits now, and returns once
    /// `round` (see [`Pending::release_round`]) has ended, or after
    /// [`CALL_TIMEOUT`] (Redis failing: the check fails the same way).
    /// Corrections are sent by that task alone, so their numbered batches
    /// stay in order.
    async fn send_releases_first(&self, round: u64) {
        self.pending.hurry.notify_one();
        let ended = async {
            loop {
                let told = self.pending.round_ended.notified();
                tokio::pin!(told);
                told.as_mut().enable();
                if self.pending.rounds_ended.load(Ordering::Acquire) >= round {
                    return;
                }
                told.await;
            }
        };
        let _ = tokio::time::timeout(CALL_TIMEOUT, ended).await;
    }

    /// Reserves on budget counters, all or none: from this replica's
    /// leases when they hold enough, else in Redis. `None`: Redis is
    /// unavailable, decide locally. (The request path takes the two steps
    /// itself.)
    #[cfg(test)]
    pub async fn reserve(&self, budgets: &[BudgetCounter]) -> Option<ReserveVerdict> {
        match self.reserve_leased(budgets) {
            Ok(verdict) => Some(verdict),
            Err(asking) => self.reserve_asking(budgets, asking).await,
        }
    }

    /// Reserves on budget counters from this replica's leases when they
    /// hold enough for all of them; else what to ask Redis for, to hand to
    /// [`Shared::reserve_asking`], which must follow.
    pub fn reserve_leased(&self, budgets: &[BudgetCounter]) -> Result<ReserveVerdict, Asking> {
        let wants: SmallVec<[Want<'_>; 6]> =
            budgets.iter().map(|b| Want { key: &b.key, amount: b.worst_case, limit: b.amount }).collect();
        match self.leases.take(&wants, self.lease_now()) {
            lease::Taken::Leased { values, top_ups } => {
                for TopUp { index, extra } in top_ups {
                    let budget = &budgets[index];
                    let keys = vec![budget.key.to_string(), spent_key(&budget.key)];
                    self.top_up(CheckKind::Reserve, keys, reserve_args(budget, 0, extra).to_vec());
                }
                Ok(ReserveVerdict::Admitted(values))
            }
            lease::Taken::Ask { extras } => Err(Asking(extras)),
        }
    }

    /// Reserves on budget counters in Redis, asking for the blocks
    /// [`Shared::reserve_leased`] found wanting. `None`: Redis is
    /// unavailable, decide locally.
    pub async fn reserve_asking(&self, budgets: &[BudgetCounter], Asking(extras): Asking) -> Option<ReserveVerdict> {
        // Busy: held by reservations, one of which may have just settled
        // below its worst case. (Exhausted is settled spend: no release helps.)
        let holding = |verdict: &ReserveVerdict| match verdict {
            ReserveVerdict::Busy(index) => budgets.get(*index).map(|b| &*b.key),
            ReserveVerdict::Admitted(_) | ReserveVerdict::Exhausted(_) => None,
        };
        let extras = extras.as_slice();
        self.past_waiting_releases(|| self.reserve_in_redis(budgets, extras), holding).await
    }

    /// One reservation on `budgets` in Redis.
    async fn reserve_in_redis(&self, budgets: &[BudgetCounter], extras: &[i64]) -> Option<ReserveVerdict> {
        let keys: Vec<String> = budgets.iter().flat_map(|b| [b.key.to_string(), spent_key(&b.key)]).collect();
        let args: Vec<i64> = budgets
            .iter()
            .zip(extras)
            .flat_map(|(budget, &extra)| reserve_args(budget, budget.worst_case, extra))
            .collect();
        let numbers = self.check(CheckKind::Reserve, keys, args).await?;
        let n = budgets.len();
        let index = || numbers.get(1).map_or(0, |i| (*i - 1).max(0) as usize);
        match numbers.first() {
            Some(1) if numbers.len() == 1 + 2 * n => Some(ReserveVerdict::Admitted(numbers[1..=n].to_vec())),
            Some(0) => Some(ReserveVerdict::Exhausted(index())),
            Some(2) => Some(ReserveVerdict::Busy(index())),
            _ => None,
        }
    }

    /// Applies a counter change (settlement, release): to this replica's
    /// lease of the counter when it holds one, else queued for Redis. Never
    /// waits.
    pub fn adjust(&self, key: &str, delta: i64) {
        if delta == 0 {
            return;
        }
        match self.leases.absorb(key, delta) {
            None => self.correct(key, delta),
            Some(rest) => self.correct(key, rest),
        }
    }

    /// Adds settled spend to a budget's settled-spend counter
    /// ([`spent_key`]), in Redis, without hurrying: it is queued like any
    /// correction but sent with the next call that carries others, or at
    /// the next lease check (every `lease::IDLE_MS / 4`), not after
    /// [`CORRECTIONS_GATHER`]. Redis reads it only when a budget's committed
    /// counter cannot admit, to tell exhausted from busy, and a busy answer
    /// is asked again once reservations settle; the committed counter,
    /// which admits, is corrected as promptly as ever.
    pub fn settle_spend(&self, spent_key: &str, cost: i64) {
        self.queue_correction(spent_key, cost, false);
    }

    /// Queues a correction for Redis, to be sent after
    /// [`CORRECTIONS_GATHER`].
    fn correct(&self, key: &str, delta: i64) {
        self.queue_correction(key, delta, true);
    }

    /// Queues a correction for Redis; with `wake`, the sender is told to
    /// send it soon. The key is copied only for a counter with none waiting
    /// yet: under load, most merge into one that is.
    fn queue_correction(&self, key: &str, delta: i64, wake: bool) {
        if delta == 0 {
            return;
        }
        let mut deltas = lock(&self.pending.deltas);
        let room = deltas.len() < MAX_PENDING_COUNTERS;
        match deltas.get_mut(key) {
            Some(pending) => *pending = pending.saturating_add(delta),
            None if room => {
                deltas.insert(key.to_owned(), delta);
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
        if wake {
            self.pending.wake.notify_one();
        }
    }

    /// Sends queued corrections until cancelled, then gives back every
    /// lease and sends what is left. Idle leases are given back as they go
    /// idle, except while Redis is down: then they are kept, and admit
    /// again if their counters are used before it answers. Corrections
    /// that cannot reach Redis wait for it (see [`Shared::flush`]).
    pub async fn apply_adjustments(self: Arc<Self>, cancel: CancellationToken) {
        let mut retire = tokio::time::interval(Duration::from_millis(lease::IDLE_MS / 4));
        retire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                // A check waits for a release: no gathering.
                () = self.pending.hurry.notified() => {}
                () = self.pending.wake.notified() => {
                    // No request waits for a correction: gathering them a
                    // moment lets the requests that end meanwhile share one
                    // call instead of making one each.
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => {}
                        () = tokio::time::sleep(CORRECTIONS_GATHER) => {}
                    }
                }
                _ = retire.tick() => {
                    if !self.is_down() {
                        self.give_back_leases(false);
                    }
                }
            }
            self.flush().await;
        }
        // A block granted after the leases were given back would stay taken
        // until its counter expires: the checks sender, which hands grants
        // to the leases, stops first.
        self.checks_stopped().await;
        self.give_back_leases(true);
        // One last try even if Redis is down: what cannot reach it now is
        // lost with the process.
        self.send_waiting().await;
        let waiting = self.pending.waiting();
        if waiting > 0 {
            tracing::warn!(
                counters = waiting,
                "Redis unreachable at shutdown: corrections and unused leases not given back; \
                 those counters stay high until they expire"
            );
        }
    }

    /// Queues what idle leases (with `all`, every lease) hold unused, to be
    /// given back to Redis.
    fn give_back_leases(&self, all: bool) {
        for (key, delta) in self.leases.retire(self.lease_now(), all) {
            self.correct(&key, delta);
        }
    }

    /// Sends the waiting corrections, unless Redis is down and not yet due
    /// for another try: then they keep waiting, merged per counter as
    /// ever, and nothing is lost to the outage.
    async fn flush(&self) {
        if self.available() {
            self.send_waiting().await;
        }
    }

    /// Sends the waiting corrections, in batches of one script call each:
    /// first a batch whose call failed, as it was, then the rest. At the
    /// first failure, the failed batch and the rest are kept for the next
    /// try.
    async fn send_waiting(&self) {
        let unsent = lock(&self.pending.unsent).take();
        if let Some(sent) = unsent
            && !self.send_adjustments(&sent).await
        {
            *lock(&self.pending.unsent) = Some(sent);
            return;
        }
        let (taken, round) = {
            let mut deltas = lock(&self.pending.deltas);
            (std::mem::take(&mut *deltas), self.pending.rounds_begun.fetch_add(1, Ordering::AcqRel) + 1)
        };
        let mut rest = taken.into_iter().filter(|(_, delta)| *delta != 0);
        loop {
            let deltas: Vec<(String, i64)> = rest.by_ref().take(ADJUST_BATCH).collect();
            if deltas.is_empty() {
                break;
            }
            let sent = Sent { number: self.pending.numbered.fetch_add(1, Ordering::Relaxed) + 1, deltas };
            if !self.send_adjustments(&sent).await {
                *lock(&self.pending.unsent) = Some(sent);
                self.pending.merge_back(rest);
                break;
            }
        }
        self.pending.end_round(round);
    }

    /// One call with corrections only; whether Redis answered it.
    async fn send_adjustments(&self, sent: &Sent) -> bool {
        self.pending.calls.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(CALL_TIMEOUT, self.call_checks(Some(sent), &[])).await {
            Ok(Ok(_)) => {
                self.succeeded();
                true
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string(), 0);
                false
            }
            Err(_) => {
                self.failed("timed out", 0);
                false
            }
        }
    }

    /// One call of [`CHECKS`]: `corrections`, then `checks`. Each key is
    /// sent once, however many of them touch it, and referred to by index.
    async fn call_checks(&self, corrections: Option<&Sent>, checks: &[Queued]) -> RedisResult<Value> {
        let mut keys = KeyIndex::default();
        let corrections = corrections.filter(|sent| !sent.deltas.is_empty());
        let deltas = corrections.map_or(0, |sent| sent.deltas.len());
        let mut args: Vec<i64> = Vec::with_capacity(4 + deltas * 2 + checks.len() * 12);
        args.push(deltas as i64);
        if let Some(sent) = corrections {
            let number = i64::try_from(sent.number).unwrap_or(i64::MAX);
            args.extend([keys.index(&self.sender_key), number, SENDER_TTL_MS]);
            for (key, delta) in &sent.deltas {
                args.extend([keys.index(key), *delta]);
            }
        }
        for queued in checks {
            match queued.kind {
                CheckKind::Admit => {
                    args.extend([1, queued.keys.len() as i64]);
                    for (key, limit) in queued.keys.iter().zip(queued.args.chunks_exact(ADMIT_ARGS)) {
                        args.push(keys.index(key));
                        args.extend_from_slice(limit);
                    }
                }
                CheckKind::Reserve => {
                    args.extend([2, (queued.keys.len() / 2) as i64]);
                    for (pair, budget) in queued.keys.chunks_exact(2).zip(queued.args.chunks_exact(RESERVE_ARGS)) {
                        args.extend([keys.index(&pair[0]), keys.index(&pair[1])]);
                        args.extend_from_slice(budget);
                    }
                }
            }
        }
        let packed = msgpack::pack_integers(&args);
        self.run_script(&self.checks_script, keys.order.len(), |cmd| {
            for key in &keys.order {
                cmd.arg(self.prefixed(key));
            }
            cmd.arg(packed.as_slice());
        })
        .await
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
        let Some(conn) = self.conn.get() else {
            return Err((ErrorKind::IoError, "Redis has not been reached since start").into());
        };
        let mut conn = conn.clone();
        match cmd.query_async(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::NoScriptError => {
                script.load_async(&mut conn).await?;
                cmd.query_async(&mut conn).await
            }
            answered => answered,
        }
    }
}

/// What [`CHECKS`] needs beyond plain commands: Lua scripting and its
/// built-in `cmsgpack`.
const SCRIPTING_PROBE: &str = "return cmsgpack.pack({})";

/// Why Redis cannot be used.
#[derive(Debug)]
enum Unusable {
    /// Not reached, or it did not answer: tried again later.
    Unreachable(String),
    /// Reached, but it cannot run the script: a deployment to fix.
    Unfit(String),
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(e) | Self::Unfit(e) => f.write_str(e),
        }
    }
}

/// Runs `probe`, a script using what [`CHECKS`] needs; an error that names
/// what is missing when Redis cannot run it.
async fn require_scripting(conn: &mut ConnectionManager, probe: &str) -> Result<(), Unusable> {
    let answered =
        tokio::time::timeout(Duration::from_secs(5), redis::cmd("EVAL").arg(probe).arg(0).query_async::<Vec<u8>>(conn))
            .await
            .map_err(|_| Unusable::Unreachable("Redis did not answer".to_owned()))?;
    answered.map(drop).map_err(|e| {
        Unusable::Unfit(format!(
            "this Redis cannot run the shared-limits script, which needs Lua scripting with its built-in cmsgpack (as Redis and Valkey ship them): {e}"
        ))
    })
}

/// A rate-limit counter's arguments to [`CHECKS`], taking `amount` and
/// asking for a lease of `extra`.
fn admit_args(counter: &LimitCounter, amount: i64, extra: i64) -> [i64; ADMIT_ARGS] {
    let ttl = saturating(counter.expiry.ms());
    let ttl = if matches!(counter.expiry, Expiry::Renewed(_)) { -ttl } else { ttl };
    [saturating(counter.limit), amount, ttl, extra, extra.saturating_mul(lease::HEADROOM_BLOCKS)]
}

/// A budget's arguments to [`CHECKS`], reserving `worst_case` and asking
/// for a lease of `extra`.
fn reserve_args(budget: &BudgetCounter, worst_case: i64, extra: i64) -> [i64; RESERVE_ARGS] {
    [
        budget.initial,
        budget.amount,
        worst_case,
        i64::from(budget.hard),
        saturating(budget.ttl_ms),
        extra,
        extra.saturating_mul(lease::HEADROOM_BLOCKS),
    ]
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

    impl Shared {
        fn connection(&self) -> ConnectionManager {
            self.conn.get().cloned().expect("connected")
        }
    }

    /// A counter as Redis holds it under `prefix`: its value (`None` when it
    /// does not exist) and its TTL in milliseconds.
    async fn stored(conn: &mut ConnectionManager, prefix: &str, key: &str) -> (Option<i64>, i64) {
        let key = format!("{prefix}:{key}");
        let value: Option<i64> = redis::cmd("GET").arg(&key).query_async(conn).await.unwrap();
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(conn).await.unwrap();
        (value, ttl)
    }

    /// Connected under a prefix of its own, with the task sending checks
    /// running until the token is cancelled.
    async fn started() -> (String, Arc<Shared>, CancellationToken, tokio::task::JoinHandle<()>) {
        started_with_leases(0).await
    }

    /// As [`started`], with leases of `lease_requests` requests' worth.
    async fn started_with_leases(
        lease_requests: u64,
    ) -> (String, Arc<Shared>, CancellationToken, tokio::task::JoinHandle<()>) {
        let (prefix, shared) = connected(lease_requests).await;
        let cancel = CancellationToken::new();
        let sender = tokio::spawn(shared.clone().send_checks(cancel.clone()));
        (prefix, shared, cancel, sender)
    }

    /// Connected, with both of its tasks running: checks sent, corrections
    /// applied. `Running::stop` cancels them and waits for both.
    async fn running() -> (String, Arc<Shared>, Running) {
        let (prefix, shared, cancel, sender) = started().await;
        let corrections = tokio::spawn(shared.clone().apply_adjustments(cancel.clone()));
        (prefix, shared, Running { cancel, tasks: [sender, corrections] })
    }

    struct Running {
        cancel: CancellationToken,
        tasks: [tokio::task::JoinHandle<()>; 2],
    }

    impl Running {
        async fn stop(self) {
            self.cancel.cancel();
            for task in self.tasks {
                task.await.unwrap();
            }
        }
    }

    /// Connected under a prefix of its own, with no task sending checks yet.
    async fn connected(lease_requests: u64) -> (String, Arc<Shared>) {
        let prefix = format!("tollgate_test_{}", uuid::Uuid::now_v7().simple());
        let shared = Shared::connect(&redis_url(), &prefix, lease_requests).await.unwrap();
        assert!(shared.conn.get().is_some(), "Redis at {} did not answer", redis_url());
        (prefix, shared)
    }

    /// A Redis that lost its scripts (restarted, or `SCRIPT FLUSH`) is sent
    /// them again: checks and corrections keep working, with the keys under
    /// the deployment's prefix and the numbers as written.
    #[tokio::test]
    async fn scripts_redis_forgot_are_sent_again_and_keys_carry_the_prefix() {
        let (prefix, shared, cancel, sender) = started().await;
        let mut conn = shared.connection();
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut conn).await.unwrap();

        let counter =
            [LimitCounter { key: "rl:t:rpm@1".to_owned(), limit: 10, amount: 3, expiry: Expiry::Created(60_000) }];
        assert!(matches!(shared.admit(&counter).await, Some(Verdict::Admitted(v)) if v == [3]));
        let budget = BudgetCounter {
            key: "budget:b:20261201".into(),
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
        shared.adjust("rl:t:rpm@1", -2);
        shared.adjust(&spent_key(&budget.key), 40);
        shared.flush().await;
        let rpm = stored(&mut conn, &prefix, "rl:t:rpm@1").await.0;
        let spent = stored(&mut conn, &prefix, "budget:b:20261201:spent").await.0;
        let committed = stored(&mut conn, &prefix, "budget:b:20261201").await.0;
        assert_eq!((rpm, spent, committed), (Some(1), Some(140), Some(150)));
        assert_eq!(shared.fallbacks(), 0);
        cancel.cancel();
        sender.await.unwrap();
    }

    /// A refused admission leaves every counter as it was, including the
    /// ones before the refusing one; a window's counter keeps the TTL it got
    /// when created, and an in-flight count's is renewed on every admission.
    #[tokio::test]
    async fn a_refusal_changes_no_counter_and_each_counter_expires_as_its_kind_says() {
        let (prefix, shared, cancel, sender) = started().await;
        let mut conn = shared.connection();
        let counters = |rpm_limit: u64| {
            [
                LimitCounter { key: "inflight".to_owned(), limit: 5, amount: 1, expiry: Expiry::Renewed(600_000) },
                LimitCounter { key: "rpm@1".to_owned(), limit: rpm_limit, amount: 1, expiry: Expiry::Created(120_000) },
                LimitCounter { key: "tpm@1".to_owned(), limit: 1_000, amount: 400, expiry: Expiry::Created(120_000) },
            ]
        };
        assert!(matches!(shared.admit(&counters(10)).await, Some(Verdict::Admitted(v)) if v == [1, 1, 400]));
        assert!(matches!(shared.admit(&counters(10)).await, Some(Verdict::Admitted(v)) if v == [2, 2, 800]));
        // The token counter refuses: the two before it are taken back.
        assert!(matches!(shared.admit(&counters(10)).await, Some(Verdict::Refused { index: 2, value: 800 })));
        // The requests counter refuses: the in-flight one is taken back.
        assert!(matches!(shared.admit(&counters(2)).await, Some(Verdict::Refused { index: 1, value: 2 })));
        assert_eq!(stored(&mut conn, &prefix, "inflight").await.0, Some(2));
        assert_eq!(stored(&mut conn, &prefix, "rpm@1").await.0, Some(2));
        assert_eq!(stored(&mut conn, &prefix, "tpm@1").await.0, Some(800));

        // Shorten both TTLs; the next admission renews only the in-flight one.
        for key in ["inflight", "rpm@1"] {
            let _: () =
                redis::cmd("PEXPIRE").arg(format!("{prefix}:{key}")).arg(50_000).query_async(&mut conn).await.unwrap();
        }
        let small = [
            LimitCounter { key: "inflight".to_owned(), limit: 5, amount: 1, expiry: Expiry::Renewed(600_000) },
            LimitCounter { key: "rpm@1".to_owned(), limit: 10, amount: 1, expiry: Expiry::Created(120_000) },
        ];
        assert!(matches!(shared.admit(&small).await, Some(Verdict::Admitted(v)) if v == [3, 3]));
        let (_, inflight_ttl) = stored(&mut conn, &prefix, "inflight").await;
        let (_, rpm_ttl) = stored(&mut conn, &prefix, "rpm@1").await;
        assert!(inflight_ttl > 500_000, "renewed: {inflight_ttl} ms");
        assert!((1..=50_000).contains(&rpm_ttl), "kept from creation: {rpm_ttl} ms");
        cancel.cancel();
        sender.await.unwrap();
    }

    /// A hard budget refuses as exhausted what settled spend cannot cover,
    /// and as busy what only reservations in flight are in the way of; a
    /// request that fits is admitted up to the budget's last micro-dollar.
    #[tokio::test]
    async fn a_hard_budget_tells_exhausted_from_busy_and_admits_to_its_end() {
        let (prefix, shared, cancel, sender) = started().await;
        let budget = |worst_case: i64| BudgetCounter {
            key: "budget:b:1".into(),
            initial: 200,
            amount: 1_000,
            worst_case,
            hard: true,
            ttl_ms: 86_400_000,
        };
        let reserve = async |worst_case: i64| shared.reserve(&[budget(worst_case)]).await;
        // Settled 200: 500 fits (committed 700), then 300 more (1,000).
        assert!(matches!(reserve(500).await, Some(ReserveVerdict::Admitted(v)) if v == [700]));
        assert!(matches!(reserve(300).await, Some(ReserveVerdict::Admitted(v)) if v == [1_000]));
        // Full, but only in flight: busy. More than settled spend leaves: exhausted.
        assert!(matches!(reserve(1).await, Some(ReserveVerdict::Busy(0))));
        assert!(matches!(reserve(801).await, Some(ReserveVerdict::Exhausted(0))));
        // The first request settles at 100 and the second is released: 300 settled.
        shared.adjust(&spent_key("budget:b:1"), 100);
        shared.adjust("budget:b:1", 100 - 500 - 300);
        shared.flush().await;
        assert!(matches!(reserve(700).await, Some(ReserveVerdict::Admitted(v)) if v == [1_000]));
        assert!(matches!(reserve(0).await, Some(ReserveVerdict::Admitted(v)) if v == [1_000]), "nothing more to spend");
        let mut conn = shared.connection();
        assert_eq!(stored(&mut conn, &prefix, "budget:b:1:spent").await.0, Some(300));
        cancel.cancel();
        sender.await.unwrap();
    }

    /// A batch of corrections whose call failed after Redis ran it is sent
    /// again as it was, and Redis applies it once; the next batch applies.
    #[tokio::test]
    async fn a_batch_of_corrections_sent_again_is_applied_once() {
        let (prefix, shared) = connected(0).await;
        let mut conn = shared.connection();
        let _: () = redis::cmd("SET").arg(format!("{prefix}:rpm")).arg(100).query_async(&mut conn).await.unwrap();
        let first = Sent { number: 1, deltas: vec![("rpm".to_owned(), -10)] };
        assert!(shared.send_adjustments(&first).await);
        assert!(shared.send_adjustments(&first).await, "answered again");
        assert_eq!(stored(&mut conn, &prefix, "rpm").await.0, Some(90), "and applied once");
        assert!(shared.send_adjustments(&Sent { number: 2, deltas: vec![("rpm".to_owned(), 5)] }).await);
        assert_eq!(stored(&mut conn, &prefix, "rpm").await.0, Some(95));
        let (number, ttl) = stored(&mut conn, &prefix, &shared.sender_key).await;
        assert_eq!(number, Some(2), "the sender's last batch");
        assert!((1..=SENDER_TTL_MS).contains(&ttl), "kept for a day, not for ever: {ttl}");
    }

    /// Redis restarted without its data (the sender key gone with the
    /// counters), or restored from a snapshot older than the last batch
    /// (the sender key behind): the batches still to come apply, once each,
    /// and numbering goes on.
    #[tokio::test]
    async fn batches_after_a_redis_restart_or_an_older_snapshot_apply_once() {
        let (prefix, shared) = connected(0).await;
        let mut conn = shared.connection();
        let set = async |conn: &mut ConnectionManager, key: &str, value: i64| {
            let _: () = redis::cmd("SET").arg(format!("{prefix}:{key}")).arg(value).query_async(conn).await.unwrap();
        };
        set(&mut conn, "rpm", 100).await;
        for number in 1..=2 {
            assert!(shared.send_adjustments(&Sent { number, deltas: vec![("rpm".to_owned(), -10)] }).await);
        }
        assert_eq!(stored(&mut conn, &prefix, "rpm").await.0, Some(80));

        // Restarted empty; the counter made again by a new admission.
        let _: () = redis::cmd("DEL")
            .arg(format!("{prefix}:{}", shared.sender_key))
            .arg(format!("{prefix}:rpm"))
            .query_async(&mut conn)
            .await
            .unwrap();
        set(&mut conn, "rpm", 50).await;
        assert!(shared.send_adjustments(&Sent { number: 3, deltas: vec![("rpm".to_owned(), -5)] }).await);
        assert_eq!(stored(&mut conn, &prefix, "rpm").await.0, Some(45));
        assert_eq!(stored(&mut conn, &prefix, &shared.sender_key).await.0, Some(3));

        // Restored from a snapshot taken after the first batch.
        set(&mut conn, &shared.sender_key, 1).await;
        set(&mut conn, "rpm", 200).await;
        let fourth = Sent { number: 4, deltas: vec![("rpm".to_owned(), -5)] };
        assert!(shared.send_adjustments(&fourth).await);
        assert!(shared.send_adjustments(&fourth).await);
        assert_eq!(stored(&mut conn, &prefix, "rpm").await.0, Some(195), "applied, and once");
        let (number, ttl) = stored(&mut conn, &prefix, &shared.sender_key).await;
        assert_eq!(number, Some(4));
        assert!((1..=SENDER_TTL_MS).contains(&ttl), "the restored key gets its TTL back: {ttl}");
    }

    /// Corrections that cannot reach Redis wait, the failed batch and the
    /// ones after it, and are applied once it answers, each once.
    #[tokio::test]
    async fn corrections_wait_while_redis_cannot_be_reached_and_are_applied_once_it_answers() {
        let prefix = format!("tollgate_test_{}", uuid::Uuid::now_v7().simple());
        // A port just freed: nothing listens there, so the replica starts
        // without Redis.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let shared = Shared::connect(&format!("redis://{closed}"), &prefix, 0).await.unwrap();
        assert!(shared.is_down());
        shared.adjust("rpm", -10);
        shared.flush().await;
        assert_eq!(shared.corrections_waiting(), 1, "not tried while Redis is down");
        shared.send_waiting().await;
        assert!(lock(&shared.pending.unsent).is_some(), "the failed batch is kept as it was");
        shared.adjust("rpm", -5);
        shared.adjust("tpm", -300);
        assert_eq!(shared.corrections_waiting(), 3);

        // Redis answers again.
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = ConnectionManager::new(client).await.unwrap();
        let _: () = redis::cmd("SET").arg(format!("{prefix}:rpm")).arg(100).query_async(&mut conn).await.unwrap();
        let _: () = redis::cmd("SET").arg(format!("{prefix}:tpm")).arg(1_000).query_async(&mut conn).await.unwrap();
        assert!(shared.conn.set(conn.clone()).is_ok());
        shared.send_waiting().await;
        assert_eq!(shared.corrections_waiting(), 0);
        assert!(!shared.is_down());
        assert_eq!(stored(&mut conn, &prefix, "rpm").await.0, Some(85));
        assert_eq!(stored(&mut conn, &prefix, "tpm").await.0, Some(700));
    }

    /// Corrections for one counter merge into one delta, apply to counters
    /// that exist, and never bring back one that expired (it would come
    /// back without its TTL).
    #[tokio::test]
    async fn corrections_merge_per_counter_and_never_create_one() {
        let (prefix, shared, cancel, sender) = started().await;
        let one_in_flight =
            [LimitCounter { key: "inflight".to_owned(), limit: 1, amount: 1, expiry: Expiry::Renewed(60_000) }];
        assert!(matches!(shared.admit(&one_in_flight).await, Some(Verdict::Admitted(v)) if v == [1]));
        assert!(matches!(shared.admit(&one_in_flight).await, Some(Verdict::Refused { index: 0, value: 1 })));
        shared.adjust("inflight", -3);
        shared.adjust("inflight", 2);
        shared.adjust("expired", 5);
        assert_eq!(lock(&shared.pending.deltas).len(), 2, "one delta per counter");
        shared.flush().await;
        assert!(matches!(shared.admit(&one_in_flight).await, Some(Verdict::Admitted(v)) if v == [1]));
        let mut conn = shared.connection();
        assert_eq!(stored(&mut conn, &prefix, "expired").await, (None, -2), "no such key");
        cancel.cancel();
        sender.await.unwrap();
    }

    /// Settled spend waits for the next call that carries other
    /// corrections, or for the periodic lease check: queuing it does not
    /// wake the sender, where any other correction does. Sent, it merges
    /// with the rest and leaves Redis exact.
    #[tokio::test]
    async fn settled_spend_waits_for_the_next_call_and_other_corrections_wake_the_sender() {
        let (prefix, shared, cancel, sender) = started().await;
        let woken =
            async |shared: &Shared| tokio::time::timeout(Duration::ZERO, shared.pending.wake.notified()).await.is_ok();
        let budget = BudgetCounter {
            key: "budget:s:1".into(),
            initial: 1_000,
            amount: 1_000_000,
            worst_case: 500,
            hard: true,
            ttl_ms: 0,
        };
        assert!(matches!(shared.reserve(std::slice::from_ref(&budget)).await, Some(ReserveVerdict::Admitted(_))));
        assert!(!woken(&shared).await, "nothing queued yet");
        shared.settle_spend(&spent_key(&budget.key), 200);
        shared.settle_spend(&spent_key(&budget.key), 100);
        assert!(!woken(&shared).await, "settled spend alone does not wake the sender");
        assert_eq!(shared.corrections_waiting(), 1, "queued, merged");
        shared.adjust(&budget.key, 300 - 500);
        assert!(woken(&shared).await, "the committed counter's correction does");
        shared.flush().await;
        let mut conn = shared.connection();
        assert_eq!(stored(&mut conn, &prefix, "budget:s:1:spent").await.0, Some(1_000 + 300));
        assert_eq!(stored(&mut conn, &prefix, "budget:s:1").await.0, Some(1_000 + 300));
        assert_eq!(shared.corrections_waiting(), 0);
        // Alone, it reaches Redis with the periodic lease check.
        let adjuster = tokio::spawn(shared.clone().apply_adjustments(cancel.clone()));
        shared.settle_spend(&spent_key(&budget.key), 50);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while stored(&mut conn, &prefix, "budget:s:1:spent").await.0 != Some(1_000 + 350) {
            assert!(std::time::Instant::now() < deadline, "the settled spend never reached Redis on its own");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cancel.cancel();
        sender.await.unwrap();
        adjuster.await.unwrap();
    }

    /// A request refused by a counter whose release waits to be sent (the
    /// client's previous request just ended, its release still gathering)
    /// is asked again once that release is in Redis: one in flight at a
    /// time, one after another, is never refused. With nothing released,
    /// the refusal stands.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_waits_for_a_release_still_to_be_sent() {
        let (prefix, shared, running) = running().await;
        let one_in_flight =
            [LimitCounter { key: "inflight".to_owned(), limit: 1, amount: 1, expiry: Expiry::Renewed(60_000) }];
        for _ in 0..20 {
            assert!(matches!(shared.admit(&one_in_flight).await, Some(Verdict::Admitted(v)) if v == [1]));
            shared.adjust("inflight", -1);
        }
        assert!(matches!(shared.admit(&one_in_flight).await, Some(Verdict::Admitted(v)) if v == [1]));
        assert!(
            matches!(shared.admit(&one_in_flight).await, Some(Verdict::Refused { index: 0, value: 1 })),
            "one in flight and none released: refused"
        );
        let mut conn = shared.connection();
        assert_eq!(stored(&mut conn, &prefix, "inflight").await.0, Some(1));
        running.stop().await;
    }

    /// The same for a budget too small to lease: held by a reservation
    /// that has just settled below its worst case, whose release is still
    /// to be sent, a reservation is asked again once it is in Redis, and
    /// admitted; with nothing released, busy stands.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_budget_waits_for_a_release_still_to_be_sent() {
        let (prefix, shared, running) = running().await;
        let budget = BudgetCounter {
            key: "budget:small:1".into(),
            initial: 1_000,
            amount: 2_500,
            worst_case: 1_000,
            hard: true,
            ttl_ms: 0,
        };
        let reserve = async || shared.reserve(std::slice::from_ref(&budget)).await;
        assert!(matches!(reserve().await, Some(ReserveVerdict::Admitted(v)) if v == [2_000]));
        // It cost 100: settled spend and the reservation corrected, both
        // waiting to be sent.
        shared.settle_spend(&spent_key(&budget.key), 100);
        shared.adjust(&budget.key, 100 - 1_000);
        assert!(matches!(reserve().await, Some(ReserveVerdict::Admitted(v)) if v == [2_100]));
        assert!(matches!(reserve().await, Some(ReserveVerdict::Busy(0))), "2,100 held, 1,000 more do not fit");
        let mut conn = shared.connection();
        assert_eq!(stored(&mut conn, &prefix, "budget:small:1").await.0, Some(2_100));
        running.stop().await;
    }

    /// A server that cannot run what the script needs is refused with an
    /// error that says what is missing; this Redis can.
    #[tokio::test]
    async fn a_redis_that_cannot_run_the_script_is_refused_with_what_it_lacks() {
        let (_, shared, cancel, sender) = started().await;
        let mut conn = shared.connection();
        require_scripting(&mut conn, SCRIPTING_PROBE).await.unwrap();
        let missing = require_scripting(&mut conn, "return no_such_library.pack({})").await.unwrap_err().to_string();
        assert!(missing.contains("needs Lua scripting with its built-in cmsgpack"), "{missing}");
        assert!(missing.contains("no_such_library"), "Redis's own words follow: {missing}");
        cancel.cancel();
        sender.await.unwrap();
    }

    /// Every integer form the encoder writes (positive and negative fixint,
    /// 32 and 64 bits) and every array header reads back in Redis's Lua as
    /// the same number, and every form Lua writes them back in reads here.
    #[tokio::test]
    async fn integers_packed_for_the_scripts_read_back_the_same_in_redis() {
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let edges = [0, 1, 127, 128, -1, -32, -33, 255, 65_536, i64::from(i32::MAX), i64::from(i32::MIN)];
        let large = [i64::from(i32::MAX) + 1, i64::from(i32::MIN) - 1, 1_000_000_000_000_000, -(1 << 52)];
        for values in [
            Vec::new(),
            edges.to_vec(),
            [edges.as_slice(), large.as_slice()].concat(),
            (0..70_000).map(|i| i * 7 - 1_000).collect::<Vec<i64>>(),
        ] {
            let back: Vec<i64> = redis::cmd("EVAL")
                .arg("return cmsgpack.unpack(ARGV[1])")
                .arg(0)
                .arg(msgpack::pack_integers(&values))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(back, values);
            // And back the way answers come: packed by Lua, read here.
            let packed: Vec<u8> = redis::cmd("EVAL")
                .arg("return cmsgpack.pack({cmsgpack.unpack(ARGV[1]), {}, {1, -1}})")
                .arg(0)
                .arg(msgpack::pack_integers(&values))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(msgpack::unpack_answers(&packed), Some(vec![values.clone(), vec![], vec![1, -1]]));
        }
    }

    /// Checks made at once share script calls, and each is still decided on
    /// its own and atomically: a limit of 150 admits exactly 150 of 400, each
    /// seeing its own count.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_checks_share_script_calls_and_each_stays_atomic() {
        let (_, shared, cancel, sender) = started().await;
        let counter =
            vec![LimitCounter { key: "rpm:t".to_owned(), limit: 150, amount: 1, expiry: Expiry::Created(60_000) }];
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
        let (_, shared, cancel, sender) = started().await;
        let counter = vec![LimitCounter {
            key: "rpm:race".to_owned(),
            limit: 1_000_000,
            amount: 1,
            expiry: Expiry::Created(60_000),
        }];
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

    /// A request that goes away while its check is queued (a client
    /// disconnecting) leaves nothing taken behind once the check runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_check_whose_request_went_away_gives_back_what_it_took() {
        use futures_util::FutureExt;
        // No sender yet: the check stays queued until its request is gone.
        let (prefix, shared) = connected(0).await;
        let cancel = CancellationToken::new();
        let corrections = tokio::spawn(shared.clone().apply_adjustments(cancel.clone()));
        let counter =
            vec![LimitCounter { key: "inflight:t".to_owned(), limit: 10, amount: 1, expiry: Expiry::Renewed(60_000) }];
        let mut abandoned = Box::pin(shared.admit(&counter));
        assert!((&mut abandoned).now_or_never().is_none(), "queued, not answered yet");
        drop(abandoned);
        let sender = tokio::spawn(shared.clone().send_checks(cancel.clone()));
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

    /// Waits until `done` holds, for at most ten seconds.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Admission in two steps: the leases decide at once, or say what to
    /// ask Redis for; asked once, the block that comes back decides the
    /// next requests at once (no call, nothing awaited).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_the_leases_cannot_decide_is_asked_of_redis_once_then_decided_at_once() {
        let (prefix, shared, cancel, sender) = started_with_leases(64).await;
        let calls = || shared.checks.calls.load(Ordering::Relaxed);
        let rpm =
            [LimitCounter { key: "split@1".to_owned(), limit: 1_000_000, amount: 1, expiry: Expiry::Created(120_000) }];
        // No lease yet: nothing decided and nothing sent until asked.
        let Err(asking) = shared.admit_leased(&rpm) else { panic!("decided without a lease") };
        assert_eq!(calls(), 0);
        assert!(matches!(shared.admit_asking(&rpm, asking).await, Some(Verdict::Admitted(v)) if v == [65]));
        assert_eq!(calls(), 1, "one round trip, which brought a block");
        // The block decides the next requests at once.
        assert!(matches!(shared.admit_leased(&rpm), Ok(Verdict::Admitted(v)) if v == [2]));
        assert!(matches!(shared.admit_leased(&rpm), Ok(Verdict::Admitted(v)) if v == [3]));
        assert_eq!(calls(), 1);

        let budget = [BudgetCounter {
            key: "budget:split:1".into(),
            initial: 0,
            amount: 1_000_000_000,
            worst_case: 1_000,
            hard: true,
            ttl_ms: 86_400_000,
        }];
        let Err(asking) = shared.reserve_leased(&budget) else { panic!("reserved without a lease") };
        assert_eq!(calls(), 1);
        assert!(matches!(shared.reserve_asking(&budget, asking).await, Some(ReserveVerdict::Admitted(_))));
        assert_eq!(calls(), 2);
        assert!(matches!(shared.reserve_leased(&budget), Ok(ReserveVerdict::Admitted(_))));
        assert_eq!(calls(), 2, "reserved from the lease");
        assert_eq!(shared.lease_admissions(), 3);

        shared.give_back_leases(true);
        shared.flush().await;
        let mut conn = shared.connection();
        assert_eq!(stored(&mut conn, &prefix, "split@1").await.0, Some(3), "exactly the three admitted");
        assert_eq!(stored(&mut conn, &prefix, "budget:split:1").await.0, Some(2_000), "exactly the two reserved");
        cancel.cancel();
        sender.await.unwrap();
    }

    /// The first admission asks Redis and brings back a block; the next
    /// ones are admitted from it without a call, until it runs low and a
    /// top-up comes in the background. Given back, the block leaves Redis
    /// counting exactly what was admitted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_admits_without_a_round_trip_and_gives_back_what_it_did_not_use() {
        let (prefix, shared, cancel, sender) = started_with_leases(64).await;
        let mut conn = shared.connection();
        let rpm =
            [LimitCounter { key: "rpm@1".to_owned(), limit: 1_000_000, amount: 1, expiry: Expiry::Created(120_000) }];
        assert!(matches!(shared.admit(&rpm).await, Some(Verdict::Admitted(v)) if v == [65]));
        assert_eq!(stored(&mut conn, &prefix, "rpm@1").await.0, Some(65), "one admitted and a block of 64 held");
        assert_eq!(shared.checks.calls.load(Ordering::Relaxed), 1);
        for used in 2..=32 {
            let Some(Verdict::Admitted(values)) = shared.admit(&rpm).await else { panic!("refused") };
            assert_eq!(values, [used], "what Redis holds less what this replica holds unused");
        }
        assert_eq!(shared.checks.calls.load(Ordering::Relaxed), 1, "no round trip while the lease holds");
        assert_eq!(shared.lease_admissions(), 31);
        // Two more leave 31 of the block, below half of it: one top-up.
        assert!(matches!(shared.admit(&rpm).await, Some(Verdict::Admitted(_))));
        assert!(matches!(shared.admit(&rpm).await, Some(Verdict::Admitted(_))));
        until("the top-up is granted", || shared.leases.remaining("rpm@1") > Some(31)).await;
        assert_eq!(shared.checks.calls.load(Ordering::Relaxed), 2);
        // A block of 64, or twice that when the first ran low within
        // `lease::FAST_MS` of its grant (this test's pace is the machine's).
        let block = shared.leases.remaining("rpm@1").unwrap() - 31;
        assert!(block == 64 || block == 128, "a block of {block}");
        assert_eq!(stored(&mut conn, &prefix, "rpm@1").await.0, Some(65 + block));

        shared.give_back_leases(true);
        shared.flush().await;
        assert_eq!(stored(&mut conn, &prefix, "rpm@1").await.0, Some(34), "exactly the 34 admitted");
        assert_eq!(shared.leases.remaining("rpm@1"), None);
        cancel.cancel();
        sender.await.unwrap();
    }

    /// Releases and settlements of leased counters go into the lease, not
    /// to Redis; once the lease is given back, Redis holds what is really
    /// used: the requests still in flight, and a budget's settled costs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrections_of_leased_counters_stay_local_and_leave_redis_exact() {
        let (prefix, shared, cancel, sender) = started_with_leases(64).await;
        let mut conn = shared.connection();
        let inflight =
            [LimitCounter { key: "inflight".to_owned(), limit: 100_000, amount: 1, expiry: Expiry::Renewed(600_000) }];
        for _ in 0..10 {
            assert!(matches!(shared.admit(&inflight).await, Some(Verdict::Admitted(_))));
        }
        for _ in 0..7 {
            shared.adjust("inflight", -1);
        }
        let budget = BudgetCounter {
            key: "budget:b:1".into(),
            initial: 5_000,
            amount: 1_000_000_000,
            worst_case: 1_000,
            hard: true,
            ttl_ms: 0,
        };
        for _ in 0..4 {
            assert!(matches!(shared.reserve(std::slice::from_ref(&budget)).await, Some(ReserveVerdict::Admitted(_))));
        }
        // Three settle at 300 each; one costs 1,500, past its reservation.
        for cost in [300, 300, 300] {
            shared.adjust(&spent_key(&budget.key), cost);
            shared.adjust(&budget.key, cost - 1_000);
        }
        shared.adjust(&spent_key(&budget.key), 1_500);
        shared.adjust(&budget.key, 500);
        shared.flush().await;
        assert_eq!(shared.checks.calls.load(Ordering::Relaxed), 2, "one call each, for the first admission");
        assert_eq!(stored(&mut conn, &prefix, "inflight").await.0, Some(1 + 64));
        assert_eq!(stored(&mut conn, &prefix, "budget:b:1:spent").await.0, Some(5_000 + 2_400));

        shared.give_back_leases(true);
        shared.flush().await;
        assert_eq!(stored(&mut conn, &prefix, "inflight").await.0, Some(3), "the three still in flight");
        assert_eq!(stored(&mut conn, &prefix, "budget:b:1").await.0, Some(5_000 + 2_400), "settled spend only");
        cancel.cancel();
        sender.await.unwrap();
    }

    /// Two replicas leasing from one counter admit together exactly up to
    /// its limit and never past it; near the limit each is checked in Redis
    /// request by request, and what they gave back leaves Redis holding
    /// exactly what was admitted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_leasing_one_counter_never_admit_past_its_limit() {
        let (prefix, first, cancel, first_sender) = started_with_leases(64).await;
        let second = Shared::connect(&redis_url(), &prefix, 64).await.unwrap();
        let second_sender = tokio::spawn(second.clone().send_checks(cancel.clone()));
        let mut conn = first.connection();
        let hammer = |shared: Arc<Shared>| async move {
            let rpm =
                [LimitCounter { key: "rpm@1".to_owned(), limit: 6_400, amount: 1, expiry: Expiry::Created(120_000) }];
            let (mut admitted, mut attempts, mut slow) = (0_i64, 0, 0);
            while attempts < 5_000 {
                match shared.admit(&rpm).await {
                    Some(Verdict::Admitted(_)) => admitted += 1,
                    Some(Verdict::Refused { .. }) => {}
                    // Slower than the call timeout on a busy machine: what
                    // it took, if anything, is given back; try again.
                    None => {
                        slow += 1;
                        assert!(slow < 100, "Redis keeps failing");
                        continue;
                    }
                }
                attempts += 1;
            }
            admitted
        };
        let (a, b) = tokio::join!(tokio::spawn(hammer(first.clone())), tokio::spawn(hammer(second.clone())));
        let admitted = a.unwrap() + b.unwrap();
        assert!(admitted <= 6_400, "{admitted} admitted past the limit of 6,400");
        assert!(admitted > 6_400 - 2 * 96, "only what the replicas held at the end was left unused: {admitted}");
        assert!(first.lease_admissions() > 0 && second.lease_admissions() > 0);
        for shared in [&first, &second] {
            shared.give_back_leases(true);
            shared.flush().await;
        }
        assert_eq!(stored(&mut conn, &prefix, "rpm@1").await.0, Some(admitted));
        cancel.cancel();
        first_sender.await.unwrap();
        second_sender.await.unwrap();
    }

    /// At shutdown, a block granted to a check still on its way is given
    /// back too: the leases are given back only once the checks sender has
    /// stopped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_block_granted_during_shutdown_is_given_back() {
        let (prefix, shared) = connected(64).await;
        let cancel = CancellationToken::new();
        let corrections = tokio::spawn(shared.clone().apply_adjustments(cancel.clone()));
        let rpm =
            [LimitCounter { key: "rpm@1".to_owned(), limit: 1_000_000, amount: 1, expiry: Expiry::Created(120_000) }];
        let waiting = {
            let shared = shared.clone();
            tokio::spawn(async move { shared.admit(&rpm).await })
        };
        until("the check is queued", || lock(&shared.checks.queue).len() == 1).await;
        // Shutdown begins; the sender still sends what was queued.
        cancel.cancel();
        let sender = tokio::spawn(shared.clone().send_checks(cancel.clone()));
        assert!(matches!(waiting.await.unwrap(), Some(Verdict::Admitted(v)) if v == [65]), "admitted with a block");
        sender.await.unwrap();
        corrections.await.unwrap();
        let mut conn = shared.connection();
        assert_eq!(stored(&mut conn, &prefix, "rpm@1").await.0, Some(1), "the block was given back");
    }
}
