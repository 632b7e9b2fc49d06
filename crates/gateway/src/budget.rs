//! Hard and soft spending budgets, enforced before a request is forwarded.
//!
//! Each budget keeps, for its current calendar period, one counter of money
//! committed: spend already settled plus the worst-case cost of requests in
//! flight. A request reserves its worst case with a compare-and-swap that
//! fails if the sum would pass a hard budget's amount, so concurrent
//! requests can never overshoot it; when the request ends, the reservation
//! is replaced by the real cost. Counters start from the ledger at start-up
//! and when a period begins, so a restart or a rollover never forgets spend.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use arc_swap::ArcSwap;
use chrono::NaiveDate;
use tollgate_store::{Budget, Store, StoreResult};

use crate::shared::{Shared, Verdict};

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
}

impl BudgetState {
    fn new(budget: Budget, period_start: NaiveDate, spent: i64) -> Self {
        Self {
            budget,
            period_start: AtomicI64::new(day_number(period_start)),
            committed: AtomicI64::new(spent),
            spent: AtomicI64::new(spent),
        }
    }

    /// Starts a new period when `today` is past the current one. Spend the
    /// ledger already has for the new period is loaded by the book's
    /// refresh; until then the new period starts from zero here.
    fn roll(&self, today: NaiveDate) -> i64 {
        let start = day_number(self.budget.period.start(today));
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
    shared: Option<(Arc<Shared>, String)>,
    /// What the shared counter held after this reservation.
    shared_committed: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Exhausted {
    pub budget_id: String,
    pub period: &'static str,
}

#[derive(Debug, Default)]
pub struct BudgetBook {
    by_tenant: ArcSwap<HashMap<String, Arc<Vec<Arc<BudgetState>>>>>,
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
                    let state = BudgetState {
                        budget,
                        period_start: AtomicI64::new(existing.period_start.load(Ordering::Acquire)),
                        committed: AtomicI64::new(existing.committed.load(Ordering::Acquire)),
                        spent: AtomicI64::new(existing.spent.load(Ordering::Acquire)),
                    };
                    states.push(Arc::new(state));
                }
                None => states.push(Arc::new(Self::state_for(store, budget, today).await?)),
            }
        }
        self.by_tenant.rcu(|old| {
            let mut map = HashMap::clone(old);
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

/// Reserves `worst_case` on every budget, or on none, on the counters every
/// replica shares when Redis is configured and reachable, else locally.
pub async fn reserve_shared(
    shared: Option<&Arc<Shared>>,
    states: &[Arc<BudgetState>],
    worst_case: i64,
    today: NaiveDate,
) -> Result<Vec<Reservation>, Exhausted> {
    let Some(shared) = shared.filter(|s| s.available()) else { return reserve(states, worst_case, today) };
    let mut plan = Vec::with_capacity(states.len());
    for state in states {
        let start = state.budget.period.start(today);
        let key = format!("budget:{}:{}", state.budget.id, start.format("%Y%m%d"));
        let ttl_ms = state.budget.period.end(start).map_or(0, |end| {
            let end_ms = end.and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp_millis());
            (end_ms - chrono::Utc::now().timestamp_millis()).max(0) as u64 + 86_400_000
        });
        state.roll(today);
        plan.push((key, state.spent(), state.budget.amount_micros, worst_case, state.budget.hard, ttl_ms));
    }
    match shared.reserve(&plan).await {
        None => reserve(states, worst_case, today),
        Some(Verdict::Refused { index, .. }) => {
            let state = &states[index.min(states.len() - 1)];
            Err(Exhausted { budget_id: state.budget.id.clone(), period: state.budget.period.as_str() })
        }
        Some(Verdict::Admitted(values)) => Ok(states
            .iter()
            .zip(plan)
            .zip(values)
            .map(|((state, (key, ..)), committed)| Reservation {
                state: state.clone(),
                period_start: state.period_start.load(Ordering::Acquire),
                amount: worst_case,
                shared: Some((shared.clone(), key)),
                shared_committed: Some(committed),
            })
            .collect()),
    }
}

/// Reserves `worst_case` on every budget, or on none: a hard budget that it
/// would exceed refuses the request.
pub fn reserve(states: &[Arc<BudgetState>], worst_case: i64, today: NaiveDate) -> Result<Vec<Reservation>, Exhausted> {
    let mut held: Vec<Reservation> = Vec::with_capacity(states.len());
    for state in states {
        let period_start = state.roll(today);
        if state.budget.hard {
            let mut current = state.committed.load(Ordering::Acquire);
            loop {
                let exhausted = current >= state.budget.amount_micros;
                if exhausted || current.saturating_add(worst_case) > state.budget.amount_micros {
                    for r in held.drain(..) {
                        r.cancel();
                    }
                    return Err(Exhausted { budget_id: state.budget.id.clone(), period: state.budget.period.as_str() });
                }
                match state.committed.compare_exchange_weak(
                    current,
                    current + worst_case,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(actual) => current = actual,
                }
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
        });
    }
    Ok(held)
}

impl Reservation {
    /// Replaces the reservation with the real cost. Returns the budget's
    /// settled spend before and after, for threshold alerts.
    pub fn settle(self, cost: i64) -> (Arc<BudgetState>, i64, i64) {
        let state = self.state;
        match self.shared {
            // The shared counter is per period: the reservation is always
            // replaced on the counter it was made on.
            Some((shared, key)) => shared.adjust(key, cost - self.amount),
            None => {
                let same_period = state.period_start.load(Ordering::Acquire) == self.period_start;
                let delta = if same_period { cost - self.amount } else { cost };
                state.committed.fetch_add(delta, Ordering::AcqRel);
            }
        }
        let before = state.spent.fetch_add(cost, Ordering::AcqRel);
        (state, before, before + cost)
    }

    fn cancel(self) {
        if let Some((shared, key)) = self.shared {
            shared.adjust(key, -self.amount);
        } else if self.state.period_start.load(Ordering::Acquire) == self.period_start {
            self.state.committed.fetch_sub(self.amount, Ordering::AcqRel);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_store::Period;

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

    #[test]
    fn hard_budgets_refuse_what_could_exceed_them_and_settle_to_real_cost() {
        let s = state(1000, true);
        let a = reserve(std::slice::from_ref(&s), 600, today()).unwrap();
        assert!(reserve(std::slice::from_ref(&s), 600, today()).is_err(), "600 + 600 > 1000");
        for r in a {
            r.settle(100);
        }
        assert_eq!((s.spent(), s.remaining()), (100, 900));
        assert!(reserve(std::slice::from_ref(&s), 600, today()).is_ok());
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
                        if let Ok(rs) = reserve(std::slice::from_ref(&s), 7, today()) {
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
    fn a_new_period_starts_fresh_and_old_reservations_do_not_leak_into_it() {
        let s = state(1000, true);
        let held = reserve(std::slice::from_ref(&s), 900, today()).unwrap();
        let next_month = NaiveDate::from_ymd_opt(2026, 12, 2).unwrap();
        assert!(reserve(std::slice::from_ref(&s), 900, next_month).is_ok(), "December starts at zero");
        for r in held {
            r.settle(50);
        }
        // December holds its own 900 reservation plus the 50 settled now.
        assert_eq!(s.remaining(), 1000 - 900 - 50);
    }
}
