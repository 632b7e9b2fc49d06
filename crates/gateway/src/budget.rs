//! Hard and soft spending budgets, enforced before a request is forwarded.
//!
//! Each budget keeps, for its current calendar period, two counters: money
//! committed (spend already settled plus the worst-case cost of requests in
//! flight) and spend settled. A request reserves its worst case with a
//! compare-and-swap that fails if the committed sum would pass a hard
//! budget's amount, so concurrent requests can never overshoot it; when the
//! request ends, the reservation is replaced by the real cost. Counters
//! start from the ledger at start-up and when a period begins, so a restart
//! or a rollover never forgets spend.
//!
//! A refusal says which of two things happened. *Exhausted*: settled spend
//! plus this request's own worst case passes the amount, so the request
//! could not fit even with nothing else in flight; the client is told not
//! to retry. *Busy*: only other requests' reservations are in the way. The
//! request then waits, in a first-come first-served queue per budget, for
//! them to settle (woken by each local settlement, and polling for the
//! settlements of other replicas) for at most `limits.budget_wait`; if it
//! still does not fit it is throttled (429 `rate_limit_exceeded`, retryable).

use std::collections::HashMap;

use crate::fast_hash::FastMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use chrono::NaiveDate;
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;
use tollgate_store::{Budget, Store, StoreResult};

use crate::shared::{self, ReserveVerdict, Shared};

fn day_number(day: NaiveDate) -> i64 {
    i64::from(day.num_days_from_ce())
}

use chrono::Datelike;

#[derive(Debug)]
pub struct BudgetState {
    pub budget: Budget,
    /// First day of the period the counters describe (days from CE).
    period_start: AtomicI64,
    /// Settled spend plus in-flight reservations, in micro-dollars.
    committed: AtomicI64,
    /// Settled spend only.
    spent: AtomicI64,
    /// Requests waiting for in-flight reservations to settle take turns
    /// here, first come first served (tokio's mutex is fair).
    queue: Mutex<()>,
    /// Woken on every local settlement or cancellation.
    settled: Notify,
    /// The current period's counters in Redis, when it holds them.
    shared_counters: ArcSwapOption<SharedCounters>,
}

/// A budget's two counters in Redis for one period, and when that period
/// ends. Built at the period's first request and kept: naming them and
/// working out the period's end per request was a few hundred instructions
/// of every admission and settlement.
#[derive(Debug)]
pub struct SharedCounters {
    start: NaiveDate,
    /// `budget:<id>:<YYYYMMDD of the period's start>`: settled spend plus
    /// reservations in flight.
    committed: Arc<str>,
    /// Settled spend only ([`crate::shared::spent_key`]).
    spent: String,
    /// When the period ends (ms since the epoch); `None`: it never does.
    end_ms: Option<i64>,
}

impl SharedCounters {
    fn new(budget: &Budget, start: NaiveDate) -> Self {
        let committed: Arc<str> = shared_budget_key(&budget.id, start).into();
        let end_ms =
            budget.period.end(start).map(|end| end.and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp_millis()));
        Self { start, spent: crate::shared::spent_key(&committed), committed, end_ms }
    }

    /// How long Redis keeps the counters from now: a day past the period's
    /// end, so late settlements land; 0 (no expiry) for a period that never
    /// ends.
    fn ttl_ms(&self, now_ms: i64) -> u64 {
        self.end_ms.map_or(0, |end_ms| (end_ms - now_ms).max(0) as u64 + 86_400_000)
    }
}

impl BudgetState {
    fn new(budget: Budget, period_start: NaiveDate, spent: i64) -> Self {
        Self::with_counters(budget, day_number(period_start), spent, spent)
    }

    fn with_counters(budget: Budget, period_start: i64, committed: i64, spent: i64) -> Self {
        Self {
            budget,
            period_start: AtomicI64::new(period_start),
            committed: AtomicI64::new(committed),
            spent: AtomicI64::new(spent),
            queue: Mutex::new(()),
            settled: Notify::new(),
            shared_counters: ArcSwapOption::empty(),
        }
    }

    /// The budget's counters in Redis for the period starting on `start`.
    fn shared_counters(&self, start: NaiveDate) -> Arc<SharedCounters> {
        if let Some(current) = self.shared_counters.load_full().filter(|c| c.start == start) {
            return current;
        }
        let counters = Arc::new(SharedCounters::new(&self.budget, start));
        self.shared_counters.store(Some(counters.clone()));
        counters
    }

    /// Starts the period beginning on `start` when it is not the current
    /// one. Spend the ledger already has for the new period is loaded by the
    /// book's refresh; until then the new period starts from zero here.
    fn roll(&self, start: NaiveDate) -> i64 {
        let start = day_number(start);
        let current = self.period_start.load(Ordering::Acquire);
        if start != current
            && self.period_start.compare_exchange(current, start, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            self.committed.store(0, Ordering::Release);
            self.spent.store(0, Ordering::Release);
        }
        start
    }

    pub fn spent(&self) -> i64 {
        self.spent.load(Ordering::Acquire)
    }

    pub fn remaining(&self) -> i64 {
        self.budget.amount_micros - self.committed.load(Ordering::Acquire)
    }
}

/// A request's hold on one budget.
#[derive(Debug)]
pub struct Reservation {
    state: Arc<BudgetState>,
    period_start: i64,
    amount: i64,
    /// The shared counter the reservation was made on, when Redis holds it.
    shared: Option<(Arc<Shared>, Arc<SharedCounters>)>,
    /// What the shared counter held after this reservation.
    shared_committed: Option<i64>,
    /// Settled or cancelled already; else `Drop` cancels it, so a
    /// reservation dropped on any path (a request cancelled while admission
    /// was under way) never holds its budget.
    released: bool,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Settled spend plus this request's own worst case passes a hard
    /// budget: no retry this period can succeed.
    Exhausted { budget_id: String, period: &'static str },
    /// Other requests' reservations fill the budget for now; once they
    /// settle there may be room.
    Busy { budget_id: String, retry_after: Duration },
}

/// What one attempt to reserve found.
enum Attempt {
    Reserved(Vec<Reservation>),
    Exhausted(usize),
    /// Blocked by in-flight reservations on the budget at this index.
    Blocked(usize),
}

/// How requests wait for in-flight reservations to settle.
#[derive(Debug, Clone, Copy)]
pub struct Waiting {
    /// The longest a request waits before it is throttled (0: never waits).
    pub max_wait: Duration,
    /// How often the head of a queue looks again without a local wake-up
    /// (settlements of other replicas reach Redis, not this process).
    pub poll: Duration,
    /// What a throttled client is told to wait before retrying.
    pub retry_after: Duration,
}

impl Default for Waiting {
    fn default() -> Self {
        Self { max_wait: Duration::from_secs(2), poll: Duration::from_millis(20), retry_after: Duration::from_secs(1) }
    }
}

#[derive(Debug, Default)]
pub struct BudgetBook {
    by_tenant: ArcSwap<FastMap<String, Arc<Vec<Arc<BudgetState>>>>>,
}

impl BudgetBook {
    /// Loads every budget and its current spend from the ledger.
    pub async fn load(&self, store: &Store, today: NaiveDate) -> StoreResult<()> {
        let mut by_tenant: HashMap<String, Vec<Arc<BudgetState>>> = HashMap::new();
        for budget in store.all_budgets().await? {
            let state = Self::state_for(store, budget, today).await?;
            by_tenant.entry(state.budget.tenant_id.clone()).or_default().push(Arc::new(state));
        }
        self.by_tenant.store(Arc::new(by_tenant.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()));
        Ok(())
    }

    async fn state_for(store: &Store, budget: Budget, today: NaiveDate) -> StoreResult<BudgetState> {
        let start = budget.period.start(today);
        let spent = store.spend_since(&budget.tenant_id, budget.key_id.as_deref(), start).await?;
        Ok(BudgetState::new(budget, start, spent))
    }

    /// Reloads every tenant's budget definitions (the periodic safety net
    /// behind change notifications), keeping live counters.
    pub async fn reload_definitions(&self, store: &Store, today: NaiveDate) -> StoreResult<()> {
        let mut tenants: Vec<String> = store.all_budgets().await?.into_iter().map(|b| b.tenant_id).collect();
        tenants.extend(self.by_tenant.load().keys().cloned());
        tenants.sort();
        tenants.dedup();
        for tenant in tenants {
            self.reload_tenant(store, &tenant, today).await?;
        }
        Ok(())
    }

    /// Reloads one tenant's budgets after a change, keeping the counters of
    /// budgets that still exist (their in-flight reservations stay valid).
    pub async fn reload_tenant(&self, store: &Store, tenant_id: &str, today: NaiveDate) -> StoreResult<()> {
        let fresh = store.list_budgets(tenant_id).await?;
        let current = self.by_tenant.load().get(tenant_id).cloned().unwrap_or_default();
        let mut states = Vec::with_capacity(fresh.len());
        for budget in fresh {
            match current.iter().find(|s| s.budget.id == budget.id && s.budget.period == budget.period) {
                Some(existing) => {
                    let state = BudgetState::with_counters(
                        budget,
                        existing.period_start.load(Ordering::Acquire),
                        existing.committed.load(Ordering::Acquire),
                        existing.spent.load(Ordering::Acquire),
                    );
                    states.push(Arc::new(state));
                }
                None => states.push(Arc::new(Self::state_for(store, budget, today).await?)),
            }
        }
        self.by_tenant.rcu(|old| {
            let mut map = FastMap::clone(old);
            map.insert(tenant_id.to_owned(), Arc::new(states.clone()));
            map
        });
        Ok(())
    }

    /// The budgets that apply to a request by `key_id` of `tenant_id`.
    pub fn applicable(&self, tenant_id: &str, key_id: &str) -> Vec<Arc<BudgetState>> {
        self.by_tenant
            .load()
            .get(tenant_id)
            .map(|states| {
                states.iter().filter(|s| s.budget.key_id.as_deref().is_none_or(|k| k == key_id)).cloned().collect()
            })
            .unwrap_or_default()
    }

    pub fn all(&self) -> Vec<Arc<BudgetState>> {
        self.by_tenant.load().values().flat_map(|v| v.iter().cloned()).collect()
    }

    pub fn for_tenant(&self, tenant_id: &str) -> Vec<Arc<BudgetState>> {
        self.by_tenant.load().get(tenant_id).map(|s| s.to_vec()).unwrap_or_default()
    }
}

/// Reserves `worst_case` on every budget, or on none. When only other
/// requests' reservations are in the way, waits its turn (see the module
/// docs) for at most `waiting.max_wait`. (The request path takes the two
/// steps, [`admit_now`] and [`admit_pending`], itself.)
#[cfg(test)]
pub async fn admit(
    shared: Option<&Arc<Shared>>,
    states: &[Arc<BudgetState>],
    worst_case: i64,
    today: NaiveDate,
    waiting: Waiting,
) -> Result<Vec<Reservation>, Refusal> {
    match admit_now(shared, states, worst_case, today, waiting) {
        Ok(decided) => decided,
        Err(pending) => admit_pending(states, pending).await,
    }
}

/// What [`admit_now`] could not decide without waiting, with what it was
/// asked.
#[derive(Debug)]
pub struct Pending {
    worst_case: i64,
    today: NaiveDate,
    waiting: Waiting,
    left: Left,
}

#[derive(Debug)]
enum Left {
    /// The leases could not take it: Redis is to be asked.
    Asking(Asking),
    /// In-flight reservations on the budget at `index` are in the way: the
    /// request waits its turn (and tries Redis again, if it is configured).
    Blocked { shared: Option<Arc<Shared>>, index: usize },
}

/// Decides without waiting when it can: on local counters, or from this
/// replica's leases of the shared ones (most requests). Else what is left,
/// to hand to [`admit_pending`] with the same budgets; it must follow.
pub fn admit_now(
    shared: Option<&Arc<Shared>>,
    states: &[Arc<BudgetState>],
    worst_case: i64,
    today: NaiveDate,
    waiting: Waiting,
) -> Result<Result<Vec<Reservation>, Refusal>, Box<Pending>> {
    let left = match attempt_now(shared, states, worst_case, today) {
        Ok(Attempt::Reserved(held)) => return Ok(Ok(held)),
        Ok(Attempt::Exhausted(index)) => return Ok(Err(exhausted(&states[index]))),
        Ok(Attempt::Blocked(index)) if waiting.max_wait.is_zero() => return Ok(Err(busy(&states[index], waiting))),
        Ok(Attempt::Blocked(index)) => Left::Blocked { shared: shared.cloned(), index },
        Err(asking) => Left::Asking(asking),
    };
    // Boxed: rare, and the common answer stays small.
    Err(Box::new(Pending { worst_case, today, waiting, left }))
}

/// Finishes what [`admit_now`] left: asks Redis, and when only other
/// requests' reservations are in the way, waits its turn.
pub async fn admit_pending(states: &[Arc<BudgetState>], pending: Box<Pending>) -> Result<Vec<Reservation>, Refusal> {
    let Pending { worst_case, today, waiting, left } = *pending;
    let (shared, blocked_on) = match left {
        Left::Blocked { shared, index } => (shared, index),
        Left::Asking(asking) => {
            let shared = asking.shared.clone();
            match attempt_asking(states, worst_case, today, asking).await {
                Attempt::Reserved(held) => return Ok(held),
                Attempt::Exhausted(index) => return Err(exhausted(&states[index])),
                Attempt::Blocked(index) => (Some(shared), index),
            }
        }
    };
    let queue = &states[blocked_on];
    if waiting.max_wait.is_zero() {
        return Err(busy(queue, waiting));
    }
    let deadline = Instant::now() + waiting.max_wait;
    let Ok(_turn) = tokio::time::timeout_at(deadline, queue.queue.lock()).await else {
        return Err(busy(queue, waiting));
    };
    loop {
        // Registered before the attempt, so a settlement between the
        // attempt and the wait is not missed.
        let settled = queue.settled.notified();
        tokio::pin!(settled);
        settled.as_mut().enable();
        match attempt(shared.as_ref(), states, worst_case, today).await {
            Attempt::Reserved(held) => return Ok(held),
            Attempt::Exhausted(index) => return Err(exhausted(&states[index])),
            Attempt::Blocked(_) => {}
        }
        let next_look = (Instant::now() + waiting.poll).min(deadline);
        tokio::select! {
            () = settled => {}
            () = tokio::time::sleep_until(next_look) => {}
        }
        if Instant::now() >= deadline {
            return Err(busy(queue, waiting));
        }
    }
}

/// `budget:<id>:<YYYYMMDD of the period's start>`, the budget's counter in
/// Redis for that period. Written on every request: digits by `itoa`, not
/// by chrono's format-string interpreter.
fn shared_budget_key(id: &str, start: NaiveDate) -> String {
    use chrono::Datelike;
    let (year, month, day) = (start.year(), start.month(), start.day());
    if !(1000..=9999).contains(&year) {
        return format!("budget:{id}:{}", start.format("%Y%m%d"));
    }
    let ymd = year.unsigned_abs() * 10_000 + month * 100 + day;
    ["budget:", id, ":", itoa::Buffer::new().format(ymd)].concat()
}

fn exhausted(state: &BudgetState) -> Refusal {
    Refusal::Exhausted { budget_id: state.budget.id.clone(), period: state.budget.period.as_str() }
}

fn busy(state: &BudgetState, waiting: Waiting) -> Refusal {
    Refusal::Busy { budget_id: state.budget.id.clone(), retry_after: waiting.retry_after }
}

/// One try on the counters every replica shares when Redis is configured
/// and reachable, else on the local ones.
async fn attempt(
    shared: Option<&Arc<Shared>>,
    states: &[Arc<BudgetState>],
    worst_case: i64,
    today: NaiveDate,
) -> Attempt {
    match attempt_now(shared, states, worst_case, today) {
        Ok(attempt) => attempt,
        Err(asking) => attempt_asking(states, worst_case, today, asking).await,
    }
}

/// A reservation the leases could not take: the counters to ask Redis
/// about and the blocks to ask for with them.
#[derive(Debug)]
pub struct Asking {
    shared: Arc<Shared>,
    plan: Vec<crate::shared::BudgetCounter>,
    counters: Vec<Arc<SharedCounters>>,
    blocks: shared::Asking,
}

/// One try without waiting: on the local counters, or from this replica's
/// leases of the shared ones. Else the question for Redis.
fn attempt_now(
    shared: Option<&Arc<Shared>>,
    states: &[Arc<BudgetState>],
    worst_case: i64,
    today: NaiveDate,
) -> Result<Attempt, Asking> {
    let Some(shared) = shared.filter(|s| s.available()) else { return Ok(reserve(states, worst_case, today)) };
    let mut plan = Vec::with_capacity(states.len());
    let mut counters = Vec::with_capacity(states.len());
    let now_ms = chrono::Utc::now().timestamp_millis();
    for state in states {
        let start = state.budget.period.start(today);
        let shared_counters = state.shared_counters(start);
        state.roll(start);
        plan.push(crate::shared::BudgetCounter {
            key: shared_counters.committed.clone(),
            ttl_ms: shared_counters.ttl_ms(now_ms),
            initial: state.spent(),
            amount: state.budget.amount_micros,
            worst_case,
            hard: state.budget.hard,
        });
        counters.push(shared_counters);
    }
    match shared.reserve_leased(&plan) {
        Ok(verdict) => Ok(judge(shared, states, worst_case, counters, verdict)),
        Err(blocks) => Err(Asking { shared: shared.clone(), plan, counters, blocks }),
    }
}

/// Asks Redis what [`attempt_now`] could not decide; on the local counters
/// when Redis does not answer.
async fn attempt_asking(states: &[Arc<BudgetState>], worst_case: i64, today: NaiveDate, asking: Asking) -> Attempt {
    let Asking { shared, plan, counters, blocks } = asking;
    match shared.reserve_asking(&plan, blocks).await {
        None => reserve(states, worst_case, today),
        Some(verdict) => judge(&shared, states, worst_case, counters, verdict),
    }
}

/// The reservations or refusal a shared verdict makes.
fn judge(
    shared: &Arc<Shared>,
    states: &[Arc<BudgetState>],
    worst_case: i64,
    counters: Vec<Arc<SharedCounters>>,
    verdict: ReserveVerdict,
) -> Attempt {
    let last = states.len().saturating_sub(1);
    match verdict {
        ReserveVerdict::Exhausted(index) => Attempt::Exhausted(index.min(last)),
        ReserveVerdict::Busy(index) => Attempt::Blocked(index.min(last)),
        ReserveVerdict::Admitted(values) => Attempt::Reserved(
            states
                .iter()
                .zip(counters)
                .zip(values)
                .map(|((state, counters), committed)| Reservation {
                    state: state.clone(),
                    period_start: state.period_start.load(Ordering::Acquire),
                    amount: worst_case,
                    shared: Some((shared.clone(), counters)),
                    shared_committed: Some(committed),
                    released: false,
                })
                .collect(),
        ),
    }
}

/// Reserves `worst_case` on every local budget counter, or on none.
fn reserve(states: &[Arc<BudgetState>], worst_case: i64, today: NaiveDate) -> Attempt {
    let mut held: Vec<Reservation> = Vec::with_capacity(states.len());
    for (index, state) in states.iter().enumerate() {
        let period_start = state.roll(state.budget.period.start(today));
        if state.budget.hard {
            let amount = state.budget.amount_micros;
            let spent = state.spent();
            let refusal = if spent >= amount || spent.saturating_add(worst_case) > amount {
                Some(Attempt::Exhausted(index))
            } else {
                let mut current = state.committed.load(Ordering::Acquire);
                loop {
                    if current.saturating_add(worst_case) > amount {
                        break Some(Attempt::Blocked(index));
                    }
                    match state.committed.compare_exchange_weak(
                        current,
                        current + worst_case,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => break None,
                        Err(actual) => current = actual,
                    }
                }
            };
            if let Some(refusal) = refusal {
                for r in held.drain(..) {
                    r.cancel();
                }
                return refusal;
            }
        } else {
            state.committed.fetch_add(worst_case, Ordering::AcqRel);
        }
        held.push(Reservation {
            state: state.clone(),
            period_start,
            amount: worst_case,
            shared: None,
            shared_committed: None,
            released: false,
        });
    }
    Attempt::Reserved(held)
}

impl Reservation {
    /// Replaces the reservation with the real cost. Returns the budget's
    /// settled spend before and after, for threshold alerts.
    pub fn settle(mut self, cost: i64) -> (Arc<BudgetState>, i64, i64) {
        self.released = true;
        let state = self.state.clone();
        match self.shared.take() {
            // The shared counter is per period: the reservation is always
            // replaced on the counter it was made on.
            Some((shared, counters)) => {
                shared.settle_spend(&counters.spent, cost);
                shared.adjust(&counters.committed, cost - self.amount);
            }
            None => {
                let same_period = state.period_start.load(Ordering::Acquire) == self.period_start;
                let delta = if same_period { cost - self.amount } else { cost };
                state.committed.fetch_add(delta, Ordering::AcqRel);
            }
        }
        let before = state.spent.fetch_add(cost, Ordering::AcqRel);
        state.settled.notify_waiters();
        (state, before, before + cost)
    }

    /// Gives the reservation back unused.
    fn cancel(mut self) {
        self.release_unused();
    }

    fn release_unused(&mut self) {
        self.released = true;
        if let Some((shared, counters)) = self.shared.take() {
            shared.adjust(&counters.committed, -self.amount);
        } else if self.state.period_start.load(Ordering::Acquire) == self.period_start {
            self.state.committed.fetch_sub(self.amount, Ordering::AcqRel);
        }
        self.state.settled.notify_waiters();
    }

    /// The tightest remaining amount among hard budgets, after reservations.
    pub fn remaining(reservations: &[Reservation]) -> Option<i64> {
        reservations
            .iter()
            .filter(|r| r.state.budget.hard)
            .map(|r| match r.shared_committed {
                Some(committed) => r.state.budget.amount_micros - committed,
                None => r.state.remaining(),
            })
            .min()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.released {
            self.release_unused();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_store::Period;

    #[test]
    fn shared_budget_keys_name_the_budget_and_its_period_start() {
        let day = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).unwrap();
        assert_eq!(shared_budget_key("bud_1", day(2026, 12, 1)), "budget:bud_1:20261201");
        assert_eq!(shared_budget_key("b", day(2027, 1, 31)), "budget:b:20270131");
        for start in [day(2026, 3, 9), day(999, 1, 2), day(10_000, 5, 6)] {
            assert_eq!(shared_budget_key("x", start), format!("budget:x:{}", start.format("%Y%m%d")));
        }
    }

    /// The counters' names are built once per period and follow it.
    #[test]
    fn shared_counters_are_named_once_per_period_and_expire_a_day_after_it() {
        let day = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).unwrap();
        let state = state(1_000, true);
        let start_of = |today| state.budget.period.start(today);
        let first = state.shared_counters(start_of(day(2026, 12, 7)));
        assert_eq!(&*first.committed, format!("budget:{}:20261201", state.budget.id));
        assert_eq!(first.spent, format!("budget:{}:20261201:spent", state.budget.id));
        assert!(Arc::ptr_eq(&first, &state.shared_counters(start_of(day(2026, 12, 31)))), "the same period: kept");
        let next = state.shared_counters(start_of(day(2027, 1, 1)));
        assert_eq!(&*next.committed, format!("budget:{}:20270101", state.budget.id));
        // Expiry: a day past the period's end (2027-02-01), from now.
        let end_ms = day(2027, 2, 1).and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis();
        assert_eq!(next.ttl_ms(end_ms - 1_000), 1_000 + 86_400_000);
        assert_eq!(next.ttl_ms(end_ms + 5_000), 86_400_000, "late: never negative");
    }

    fn state(amount: i64, hard: bool) -> Arc<BudgetState> {
        let budget = Budget {
            id: "b".into(),
            tenant_id: "t".into(),
            key_id: None,
            period: Period::Monthly,
            amount_micros: amount,
            hard,
            thresholds: vec![50, 80, 100],
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        };
        Arc::new(BudgetState::new(budget, Period::Monthly.start(today()), 0))
    }

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 24).unwrap()
    }

    impl std::fmt::Debug for Attempt {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Self::Reserved(held) => write!(f, "Reserved({})", held.len()),
                Self::Exhausted(i) => write!(f, "Exhausted({i})"),
                Self::Blocked(i) => write!(f, "Blocked({i})"),
            }
        }
    }

    impl Attempt {
        fn unwrap(self) -> Vec<Reservation> {
            match self {
                Self::Reserved(held) => held,
                other => panic!("not reserved: {other:?}"),
            }
        }

        fn is_ok(&self) -> bool {
            matches!(self, Self::Reserved(_))
        }
    }

    #[test]
    fn hard_budgets_refuse_what_could_exceed_them_and_settle_to_real_cost() {
        let s = state(1000, true);
        let a = reserve(std::slice::from_ref(&s), 600, today()).unwrap();
        let second = reserve(std::slice::from_ref(&s), 600, today());
        assert!(
            matches!(second, Attempt::Blocked(0)),
            "600 + 600 > 1000 only while the first is in flight: {second:?}"
        );
        for r in a {
            r.settle(100);
        }
        assert_eq!((s.spent(), s.remaining()), (100, 900));
        assert!(reserve(std::slice::from_ref(&s), 600, today()).is_ok());
    }

    #[test]
    fn a_reservation_dropped_unsettled_gives_its_amount_back() {
        let s = state(1000, true);
        let held = reserve(std::slice::from_ref(&s), 900, today()).unwrap();
        assert_eq!(s.remaining(), 100);
        drop(held);
        assert_eq!(s.remaining(), 1000, "a request cancelled mid-admission holds nothing");
        let settled = reserve(std::slice::from_ref(&s), 900, today()).unwrap();
        for r in settled {
            r.settle(10);
        }
        assert_eq!((s.spent(), s.remaining()), (10, 990), "settled once, not also given back on drop");
    }

    #[test]
    fn soft_budgets_never_refuse() {
        let s = state(10, false);
        assert!(reserve(std::slice::from_ref(&s), 1000, today()).is_ok());
    }

    #[test]
    fn concurrent_reservations_never_overshoot() {
        let s = state(10_000, true);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut admitted = 0;
                    for _ in 0..1000 {
                        if let Attempt::Reserved(rs) = reserve(std::slice::from_ref(&s), 7, today()) {
                            admitted += 1;
                            for r in rs {
                                r.settle(7);
                            }
                        }
                    }
                    admitted
                })
            })
            .collect();
        let admitted: i64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted, 10_000 / 7);
        assert!(s.spent() <= 10_000);
    }

    #[test]
    fn only_settled_spend_plus_the_own_worst_case_exhausts_a_budget() {
        let s = state(1000, true);
        let spent = reserve(std::slice::from_ref(&s), 800, today()).unwrap();
        for r in spent {
            r.settle(800);
        }
        assert!(matches!(reserve(std::slice::from_ref(&s), 300, today()), Attempt::Exhausted(0)), "800 + 300 > 1000");
        let fits = reserve(std::slice::from_ref(&s), 200, today());
        assert!(fits.is_ok(), "800 + 200 fits: {fits:?}");
    }

    fn waiting(max_wait_ms: u64) -> Waiting {
        Waiting { max_wait: Duration::from_millis(max_wait_ms), ..Waiting::default() }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_blocked_by_reservations_waits_for_them_to_settle() {
        let s = state(1000, true);
        let held = reserve(std::slice::from_ref(&s), 900, today()).unwrap();
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { admit(None, &[s], 500, today(), waiting(2_000)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "still waiting while 900 is reserved");
        for r in held {
            r.settle(100);
        }
        let admitted = waiter.await.unwrap().expect("admitted once the reservation settled");
        assert_eq!(admitted.len(), 1);
        assert_eq!(s.remaining(), 1000 - 100 - 500);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_still_blocked_after_the_wait_is_busy_not_exhausted() {
        let s = state(1000, true);
        let _held = reserve(std::slice::from_ref(&s), 900, today()).unwrap();
        let started = Instant::now();
        let refusal = admit(None, std::slice::from_ref(&s), 500, today(), waiting(300)).await.unwrap_err();
        assert!(matches!(refusal, Refusal::Busy { .. }), "{refusal:?}");
        assert!(started.elapsed() >= Duration::from_millis(300), "waited the whole bound");
        assert!(started.elapsed() < Duration::from_millis(400), "and no longer");
        let no_wait = admit(None, std::slice::from_ref(&s), 500, today(), waiting(0)).await.unwrap_err();
        assert!(matches!(no_wait, Refusal::Busy { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_budget_refuses_at_once() {
        let s = state(1000, true);
        for r in reserve(std::slice::from_ref(&s), 950, today()).unwrap() {
            r.settle(950);
        }
        let started = Instant::now();
        let refusal = admit(None, std::slice::from_ref(&s), 100, today(), waiting(2_000)).await.unwrap_err();
        assert_eq!(refusal, Refusal::Exhausted { budget_id: "b".into(), period: "monthly" });
        assert_eq!(started.elapsed(), Duration::ZERO, "no waiting for what can never fit");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_admitted_in_arrival_order() {
        let s = state(1000, true);
        let held = reserve(std::slice::from_ref(&s), 1000, today()).unwrap();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (s, order) = (s.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let held = admit(None, &[s], 200, today(), waiting(5_000)).await.unwrap();
                order.lock().unwrap().push(i);
                // Each holds its reservation a while, so later ones must wait.
                tokio::time::sleep(Duration::from_millis(50)).await;
                for r in held {
                    r.settle(1);
                }
            }));
            // Let each one reach the queue before the next arrives.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for r in held {
            r.settle(0);
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_new_period_starts_fresh_and_old_reservations_do_not_leak_into_it() {
        let s = state(1000, true);
        let held = reserve(std::slice::from_ref(&s), 900, today()).unwrap();
        let next_month = NaiveDate::from_ymd_opt(2026, 12, 2).unwrap();
        let december = reserve(std::slice::from_ref(&s), 900, next_month);
        assert!(december.is_ok(), "December starts at zero");
        for r in held {
            r.settle(50);
        }
        // December holds its own 900 reservation plus the 50 settled now.
        assert_eq!(s.remaining(), 1000 - 900 - 50);
        drop(december);
    }
}
