//! Allowance a replica holds from Redis and admits from by itself.
//!
//! A lease is a block of one shared counter's allowance (a slice of a
//! window's requests or tokens, of the in-flight slots, or of a budget)
//! that Redis has already counted as used: the script grants it only
//! together with an admission or a top-up, atomically, and only while the
//! counter keeps room for [`HEADROOM_BLOCKS`] more blocks after it. Requests
//! that fit in the leases of all their counters are admitted here without a
//! round trip; the rest go to Redis as before, asking for a block on the
//! way. So the fleet never admits past a limit (every unit admitted was
//! counted in Redis first), and what it can leave unused is at most the
//! blocks the replicas hold, each at most a 64th of the limit.
//!
//! Redis's value for a leased counter is therefore the usage it was told of
//! plus every replica's unused remainder. That is why a correction for a
//! leased counter (a released in-flight slot, a settled token count, a
//! settled budget reservation) can go into the lease instead of to Redis:
//! moving a unit between "used" and "held" leaves Redis's value right, and
//! the remainder goes back when the lease is retired.
//!
//! Leases are retired (their remainder given back to Redis) once idle for
//! [`IDLE_MS`], so a quiet replica does not sit on allowance others need,
//! and at shutdown. One in use is renewed every [`RENEW_MS`] by a top-up in
//! the background, which also renews an in-flight count's TTL in Redis.
//! Small limits never lease: a block must hold at least two requests'
//! worth, so a limit of 10 requests a minute or 2 in flight is checked in
//! Redis request by request, as exactly as before.
//!
//! A block starts at `redis.lease_requests` requests' worth and follows the
//! replica's own pace: a lease that ran low within [`FAST_MS`] of its last
//! block asks for twice as much next time, one that took longer than
//! [`SLOW_MS`] for half as much (never below the configured size, never
//! above a 64th of the limit). So a busy replica tops up a counter a few
//! dozen times a second instead of once per 64 requests (at 20,000
//! requests a second, about 300 script calls a second per counter; Redis
//! runs every replica's calls one at a time), and what a replica can hold
//! back from the others stays at about [`SLOW_MS`] of its own traffic, or a
//! 64th of the limit when that is less.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use smallvec::SmallVec;

use crate::fast_hash::FastMap;

/// The largest share of a limit one block may be.
const BLOCK_SHARE_OF_LIMIT: i64 = 64;
/// Blocks of room a counter must keep after a grant: near its limit a
/// counter is checked in Redis request by request, and the blocks already
/// out drain or come back.
pub const HEADROOM_BLOCKS: i64 = 2;
/// A lease holds at most this many of its largest block.
const MOST_BLOCKS: i64 = 2;
/// A lease unused this long is given back.
pub const IDLE_MS: u64 = 1_000;
/// A lease in use is topped up (and its counter's TTL renewed) this often.
const RENEW_MS: u64 = 5_000;
/// A lease that runs low sooner than this after its last block asks for
/// blocks twice as large.
pub const FAST_MS: u64 = 50;
/// A lease that runs low later than this after its last block asks for
/// blocks half as large.
pub const SLOW_MS: u64 = 400;
/// The most a block grows: this many times the configured size (and never
/// past a 64th of the limit).
const MOST_SCALE: i64 = 256;

/// One counter's lease.
#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Allowance held and not yet used; below zero only until the deficit
    /// is sent to Redis (see [`Leases::absorb`]).
    remaining: i64,
    /// The counter's value in Redis after the last grant.
    seen: i64,
    /// The limit the last grant was made under: once the limit is changed
    /// (lowered, say), the lease admits nothing more until Redis grants
    /// under the new one.
    limit: i64,
    renewed_ms: u64,
    used_ms: u64,
    /// A top-up is on its way: no other is asked for.
    topping_up: bool,
    /// The most it may hold: [`MOST_BLOCKS`] of the largest block granted.
    most: i64,
    /// Its blocks, in configured blocks: 1, or grown by the pace of use.
    scale: i64,
    /// When its last block was granted.
    block_ms: u64,
}

impl Lease {
    fn empty(seen: i64, limit: i64, now_ms: u64) -> Self {
        Self {
            remaining: 0,
            seen,
            limit,
            renewed_ms: now_ms,
            used_ms: now_ms,
            topping_up: false,
            most: 0,
            scale: 1,
            block_ms: now_ms,
        }
    }

    /// Follows the pace the last block was used at, as it runs low at
    /// `now_ms`: twice the blocks when it lasted under [`FAST_MS`], half
    /// when it lasted over [`SLOW_MS`].
    fn pace(&mut self, now_ms: u64) {
        let lasted = now_ms.saturating_sub(self.block_ms);
        if lasted < FAST_MS {
            self.scale = (self.scale * 2).min(MOST_SCALE);
        } else if lasted > SLOW_MS {
            self.scale = (self.scale / 2).max(1);
        }
    }
}

/// A top-up to ask for in the background: counter `index` of the request
/// wants `extra` more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopUp {
    pub index: usize,
    pub extra: i64,
}

/// One counter a request wants: its key, its amount and its limit.
#[derive(Debug, Clone, Copy)]
pub struct Want<'a> {
    pub key: &'a str,
    pub amount: i64,
    pub limit: i64,
}

/// What [`Leases::take`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Admitted from the leases: each counter's estimated value in Redis
    /// (its last seen value less what is held unused here), and the
    /// top-ups to send.
    Leased { values: Vec<i64>, top_ups: Vec<TopUp> },
    /// Not every counter's lease could take it: ask Redis, with these
    /// blocks to grant (0 where none is wanted).
    Ask { extras: Vec<i64> },
}

/// The leases, in a slab the key index points into: a request finds each
/// of its counters' leases once, checks them all, then takes from them by
/// position (a map of leases would be searched twice per counter, once to
/// check and once to take).
#[derive(Debug, Default)]
struct Table {
    slots: Vec<Lease>,
    index: FastMap<String, usize>,
}

impl Table {
    fn find(&self, key: &str) -> Option<usize> {
        self.index.get(key).copied()
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Lease> {
        let at = self.find(key)?;
        self.slots.get_mut(at)
    }

    /// The lease of `key`, added as `lease` if there is none.
    fn entry(&mut self, key: &str, lease: impl FnOnce() -> Lease) -> &mut Lease {
        let at = match self.find(key) {
            Some(at) => at,
            None => {
                self.slots.push(lease());
                self.index.insert(key.to_owned(), self.slots.len() - 1);
                self.slots.len() - 1
            }
        };
        &mut self.slots[at]
    }
}

#[derive(Debug, Default)]
pub struct Leases {
    table: Mutex<Table>,
    /// Requests' worth in a block; 0: no leases.
    requests_per_block: i64,
    admitted: AtomicU64,
}

impl Leases {
    pub fn new(requests_per_block: u64) -> Self {
        Self { requests_per_block: i64::try_from(requests_per_block).unwrap_or(i64::MAX), ..Self::default() }
    }

    /// Requests admitted from leases, since start.
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    /// The block to lease of a counter with this limit, for requests of
    /// this amount; 0 where leasing is off or the limit is too small for a
    /// block to hold two requests.
    pub fn block(&self, limit: i64, amount: i64) -> i64 {
        self.scaled_block(limit, amount, 1)
    }

    /// [`Leases::block`], `scale` times over (still at most a 64th of the
    /// limit).
    fn scaled_block(&self, limit: i64, amount: i64, scale: i64) -> i64 {
        let unit = amount.max(1);
        let block =
            unit.saturating_mul(self.requests_per_block).saturating_mul(scale).min(limit / BLOCK_SHARE_OF_LIMIT);
        if block >= unit.saturating_mul(2) { block } else { 0 }
    }

    /// Takes every counter's amount from its lease, or none: all must hold
    /// a lease with room for it.
    pub fn take(&self, wants: &[Want<'_>], now_ms: u64) -> Taken {
        let mut table = lock(&self.table);
        // Where each counter's lease is; a request has a handful of counters.
        let mut found: SmallVec<[usize; 6]> = SmallVec::new();
        for want in wants {
            match table.find(want.key) {
                Some(at) if table.slots[at].limit == want.limit && table.slots[at].remaining >= want.amount => {
                    found.push(at);
                }
                _ => return Taken::Ask { extras: self.ask(&mut table, wants, now_ms) },
            }
        }
        let mut values = Vec::with_capacity(wants.len());
        let mut top_ups = Vec::new();
        for (index, (want, &at)) in wants.iter().zip(&found).enumerate() {
            let lease = &mut table.slots[at];
            lease.remaining -= want.amount;
            lease.used_ms = now_ms;
            values.push(lease.seen - lease.remaining);
            if lease.topping_up {
                continue;
            }
            let low = lease.remaining < self.scaled_block(want.limit, want.amount, lease.scale) / 2;
            if low {
                lease.pace(now_ms);
            }
            if low || now_ms.saturating_sub(lease.renewed_ms) >= RENEW_MS {
                lease.topping_up = true;
                let extra = if low { self.scaled_block(want.limit, want.amount, lease.scale) } else { 0 };
                top_ups.push(TopUp { index, extra });
            }
        }
        drop(table);
        self.admitted.fetch_add(1, Ordering::Relaxed);
        Taken::Leased { values, top_ups }
    }

    /// The blocks a request its leases could not take asks Redis for, per
    /// counter (0 where none is wanted).
    fn ask(&self, table: &mut Table, wants: &[Want<'_>], now_ms: u64) -> Vec<i64> {
        wants
            .iter()
            .map(|w| {
                if self.block(w.limit, w.amount) == 0 {
                    return 0;
                }
                let lease = table.entry(w.key, || Lease::empty(0, w.limit, now_ms));
                lease.used_ms = now_ms;
                let block = self.scaled_block(w.limit, w.amount, lease.scale);
                // A block is on its way already, or this lease still has
                // half of one.
                if lease.topping_up || (lease.limit == w.limit && lease.remaining >= block / 2 + w.amount) {
                    return 0;
                }
                lease.topping_up = true;
                block
            })
            .collect()
    }

    /// Applies a correction to `key`'s lease, if this replica holds one.
    /// `None`: it holds none, send the correction to Redis. `Some(rest)`:
    /// applied, and `rest` still goes to Redis now: above zero, usage past
    /// what the lease held (so Redis never counts less than is used); below
    /// zero, what would take the lease past [`MOST_BLOCKS`] blocks (releases
    /// of requests admitted outside the lease, which a busy replica, never
    /// idle, would otherwise keep from the others).
    pub fn absorb(&self, key: &str, delta: i64) -> Option<i64> {
        let mut table = lock(&self.table);
        let lease = table.get_mut(key)?;
        lease.remaining -= delta;
        let owed = (-lease.remaining).max(0);
        let excess = (lease.remaining - lease.most).max(0);
        lease.remaining += owed - excess;
        lease.seen += owed - excess;
        Some(owed - excess)
    }

    /// Redis granted `grant` more of `key` (0: renewed only, or the block
    /// `asked` for refused) under `limit`, leaving the counter at `value`.
    pub fn granted(&self, key: &str, asked: i64, grant: i64, value: i64, limit: i64, now_ms: u64) {
        let mut table = lock(&self.table);
        let lease = table.entry(key, || Lease::empty(value, limit, now_ms));
        lease.remaining += grant;
        lease.seen = value;
        lease.limit = limit;
        lease.most = lease.most.max(grant.saturating_mul(MOST_BLOCKS));
        lease.renewed_ms = now_ms;
        if grant > 0 {
            lease.block_ms = now_ms;
        } else if asked > 0 {
            // Near its limit (a block refused): smaller blocks may still
            // be granted, down to the last few.
            lease.scale = 1;
        }
        lease.topping_up = false;
    }

    /// A top-up for `key` was refused or failed: another may be asked for.
    pub fn not_granted(&self, key: &str) {
        if let Some(lease) = lock(&self.table).get_mut(key) {
            lease.topping_up = false;
        }
    }

    /// Removes the leases idle since `IDLE_MS` before `now_ms` (all of them
    /// with `all`), and returns what each held unused, as the corrections
    /// that give it back.
    pub fn retire(&self, now_ms: u64, all: bool) -> Vec<(String, i64)> {
        let mut given_back = Vec::new();
        let mut table = lock(&self.table);
        let Table { slots, index } = &mut *table;
        let mut kept = Vec::with_capacity(if all { 0 } else { slots.len() });
        index.retain(|key, at| {
            let Some(&lease) = slots.get(*at) else { return false };
            let idle = now_ms.saturating_sub(lease.used_ms) >= IDLE_MS;
            if !(all || idle) {
                *at = kept.len();
                kept.push(lease);
                return true;
            }
            if lease.remaining != 0 {
                given_back.push((key.clone(), -lease.remaining));
            }
            false
        });
        *slots = kept;
        given_back
    }

    #[cfg(test)]
    pub fn remaining(&self, key: &str) -> Option<i64> {
        let table = lock(&self.table);
        table.find(key).map(|at| table.slots[at].remaining)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: i64 = 1_000_000_000;

    fn want(key: &str, amount: i64, limit: i64) -> Want<'_> {
        Want { key, amount, limit }
    }

    #[test]
    fn blocks_hold_two_requests_at_least_and_a_64th_of_the_limit_at_most() {
        let leases = Leases::new(64);
        assert_eq!(leases.block(100_000_000, 1), 64);
        assert_eq!(leases.block(1_000, 1), 15, "a 64th of the limit");
        assert_eq!(leases.block(10, 1), 0, "rpm 10: checked request by request");
        assert_eq!(leases.block(2, 1), 0, "2 in flight: checked request by request");
        assert_eq!(leases.block(1_000, 400), 0, "a block cannot hold two such requests");
        assert_eq!(leases.block(1_000_000, 300), 15_625);
        assert_eq!(Leases::new(0).block(100_000_000, 1), 0, "leases off");
    }

    #[test]
    fn a_request_is_taken_from_every_lease_or_from_none() {
        let leases = Leases::new(64);
        let wants = [want("rpm", 1, LIMIT), want("tpm", 100, LIMIT)];
        // No leases yet: ask Redis, with a block for each.
        assert_eq!(leases.take(&wants, 0), Taken::Ask { extras: vec![64, 6_400] });
        // Asked already: the next request asks for none while they come.
        assert_eq!(leases.take(&wants, 0), Taken::Ask { extras: vec![0, 0] });
        leases.granted("rpm", 64, 64, 65, LIMIT, 0);
        leases.granted("tpm", 50, 50, 150, LIMIT, 0);
        // The token lease holds 50, less than 100: nothing is taken.
        assert!(matches!(leases.take(&wants, 1), Taken::Ask { .. }));
        assert_eq!((leases.remaining("rpm"), leases.remaining("tpm")), (Some(64), Some(50)));
        leases.granted("tpm", 6_400, 6_400, 6_550, LIMIT, 1);
        let Taken::Leased { values, top_ups } = leases.take(&wants, 2) else { panic!("not leased") };
        assert_eq!(values, [65 - 63, 6_550 - 6_350]);
        assert!(top_ups.is_empty(), "both hold more than half a block");
        assert_eq!(leases.admitted(), 1);
    }

    #[test]
    fn a_lease_below_half_a_block_asks_for_one_and_one_in_use_is_renewed() {
        let leases = Leases::new(64);
        let wants = [want("rpm", 1, LIMIT)];
        leases.granted("rpm", 40, 40, 40, LIMIT, 0);
        // Used at a pace the configured block suits: it neither grows nor shrinks.
        let now = FAST_MS + 1;
        for _ in 0..8 {
            assert!(matches!(leases.take(&wants, now), Taken::Leased { ref top_ups, .. } if top_ups.is_empty()));
        }
        let Taken::Leased { top_ups, .. } = leases.take(&wants, now) else { panic!() };
        assert_eq!(top_ups, [TopUp { index: 0, extra: 64 }], "31 left: below half a block");
        let Taken::Leased { top_ups, .. } = leases.take(&wants, now) else { panic!() };
        assert!(top_ups.is_empty(), "one top-up at a time");
        leases.granted("rpm", 64, 64, 104, LIMIT, 2);
        let Taken::Leased { top_ups, .. } = leases.take(&wants, RENEW_MS + 2) else { panic!() };
        assert_eq!(top_ups, [TopUp { index: 0, extra: 0 }], "renewed only");
        leases.not_granted("rpm");
        assert!(matches!(leases.take(&wants, RENEW_MS + 3), Taken::Leased { ref top_ups, .. } if top_ups.len() == 1));
    }

    #[test]
    fn corrections_go_into_a_held_lease_and_usage_past_it_is_owed_to_redis() {
        let leases = Leases::new(64);
        assert_eq!(leases.absorb("tpm", -5), None, "no lease: Redis takes it");
        leases.granted("tpm", 100, 100, 100, LIMIT, 0);
        assert_eq!(leases.absorb("tpm", -30), Some(0), "a reservation settled lower");
        assert_eq!(leases.remaining("tpm"), Some(130));
        assert_eq!(leases.absorb("tpm", 200), Some(70), "settled 200 higher: 70 past the lease");
        assert_eq!(leases.remaining("tpm"), Some(0));
        // Releases of requests admitted outside the lease fill it to two
        // blocks; the rest goes back to Redis.
        assert_eq!(leases.absorb("tpm", -150), Some(0));
        assert_eq!(leases.absorb("tpm", -100), Some(-50), "200 at most");
        assert_eq!(leases.remaining("tpm"), Some(200));
    }

    #[test]
    fn idle_leases_give_back_what_they_hold_and_shutdown_gives_back_all() {
        let leases = Leases::new(64);
        leases.granted("a", 64, 64, 64, LIMIT, 0);
        leases.granted("b", 64, 64, 64, LIMIT, 0);
        leases.granted("c", 0, 0, 10, LIMIT, 0);
        assert!(matches!(leases.take(&[want("b", 1, LIMIT)], IDLE_MS - 1), Taken::Leased { .. }));
        let mut idle = leases.retire(IDLE_MS, false);
        idle.sort();
        assert_eq!(idle, [("a".to_owned(), -64)], "c held nothing; b is in use");
        assert_eq!(leases.retire(IDLE_MS, true), [("b".to_owned(), -63)]);
        assert_eq!(leases.remaining("b"), None);
    }

    #[test]
    fn leases_kept_by_a_retirement_still_take_from_their_own_counters() {
        let leases = Leases::new(64);
        for (key, grant) in [("a", 64), ("b", 100), ("c", 200), ("d", 300)] {
            leases.granted(key, grant, grant, grant, LIMIT, 0);
        }
        // b and d stay in use; a and c go idle and are given back, which
        // moves the kept leases within the table.
        for key in ["b", "d"] {
            assert!(matches!(leases.take(&[want(key, 1, LIMIT)], IDLE_MS - 1), Taken::Leased { .. }));
        }
        let mut idle = leases.retire(IDLE_MS, false);
        idle.sort();
        assert_eq!(idle, [("a".to_owned(), -64), ("c".to_owned(), -200)]);
        let Taken::Leased { values, .. } = leases.take(&[want("d", 10, LIMIT), want("b", 5, LIMIT)], IDLE_MS + 1)
        else {
            panic!("not leased")
        };
        assert_eq!(values, [300 - 289, 100 - 94]);
        assert_eq!((leases.remaining("b"), leases.remaining("d")), (Some(94), Some(289)));
        // A counter given back starts a new lease.
        assert_eq!(leases.take(&[want("a", 1, LIMIT)], IDLE_MS + 1), Taken::Ask { extras: vec![64] });
        leases.granted("a", 64, 64, 500, LIMIT, IDLE_MS + 1);
        assert_eq!(leases.remaining("a"), Some(64));
        assert_eq!(leases.remaining("d"), Some(289), "untouched by the new one");
    }

    #[test]
    fn a_lease_granted_under_another_limit_admits_nothing_more() {
        let leases = Leases::new(64);
        leases.granted("rpm", 64, 64, 64, LIMIT, 0);
        // The limit was lowered: Redis decides, and grants nothing this
        // close to the new limit.
        let lowered = [want("rpm", 1, 100)];
        assert_eq!(leases.take(&lowered, 1), Taken::Ask { extras: vec![0] });
        assert_eq!(leases.remaining("rpm"), Some(64), "kept to be given back");
        // Raised: Redis grants under the new limit, and the lease admits again.
        let raised = [want("rpm", 1, 2 * LIMIT)];
        assert_eq!(leases.take(&raised, 1), Taken::Ask { extras: vec![64] });
        leases.granted("rpm", 64, 64, 200, 2 * LIMIT, 1);
        assert!(matches!(leases.take(&raised, 2), Taken::Leased { .. }));
    }

    /// Takes from `key`'s lease at `now` until it asks for a top-up, and
    /// returns the block it asks for.
    fn next_block(leases: &Leases, key: &str, limit: i64, now: u64) -> i64 {
        let wants = [want(key, 1, limit)];
        loop {
            match leases.take(&wants, now) {
                Taken::Leased { top_ups, .. } if top_ups.is_empty() => {}
                Taken::Leased { top_ups, .. } => return top_ups[0].extra,
                Taken::Ask { .. } => panic!("the lease ran dry before asking for a top-up"),
            }
        }
    }

    #[test]
    fn blocks_grow_with_a_fast_pace_up_to_a_64th_of_the_limit_and_shrink_when_it_slows() {
        let leases = Leases::new(64);
        let limit = 64 * 64 * 64 * 8;
        let mut now = 0;
        leases.granted("rpm", 64, 64, 64, limit, now);
        // Each block runs low 10 ms after it came: twice the block each time.
        let mut asked = Vec::new();
        for _ in 0..9 {
            now += 10;
            let block = next_block(&leases, "rpm", limit, now);
            asked.push(block);
            leases.granted("rpm", block, block, 0, limit, now);
        }
        assert_eq!(asked, [128, 256, 512, 1_024, 2_048, 4_096, 8_192, 16_384, 16_384], "a 64th of the limit at most");
        // Run low 100 ms after the last block: kept as it is.
        now += 100;
        assert_eq!(next_block(&leases, "rpm", limit, now), 16_384);
        leases.granted("rpm", 16_384, 16_384, 0, limit, now);
        // The pace slows (a block lasts a second): half each time, down
        // to the configured block.
        let mut asked = Vec::new();
        for _ in 0..10 {
            now += 1_000;
            let block = next_block(&leases, "rpm", limit, now);
            asked.push(block);
            leases.granted("rpm", block, block, 0, limit, now);
        }
        assert_eq!(asked, [8_192, 4_096, 2_048, 1_024, 512, 256, 128, 64, 64, 64]);
    }

    #[test]
    fn blocks_grow_at_most_256_fold_and_start_over_when_one_is_refused() {
        let leases = Leases::new(64);
        let mut now = 0;
        leases.granted("rpm", 64, 64, 64, LIMIT, now);
        let mut block = 64;
        for _ in 0..12 {
            now += 1;
            block = next_block(&leases, "rpm", LIMIT, now);
            leases.granted("rpm", block, block, 0, LIMIT, now);
        }
        assert_eq!(block, 64 * 256);
        // Near the limit Redis refuses a block that large: the next ask is
        // for the configured block again.
        now += 1;
        let asked = next_block(&leases, "rpm", LIMIT, now);
        assert_eq!(asked, 64 * 256);
        leases.granted("rpm", asked, 0, LIMIT - 10, LIMIT, now);
        now += 100;
        assert_eq!(next_block(&leases, "rpm", LIMIT, now), 64);
        // A lease asked for anew (Ask) asks for its own scale too.
        leases.granted("tpm", 0, 0, 0, LIMIT, now);
        assert_eq!(leases.take(&[want("tpm", 1, LIMIT)], now), Taken::Ask { extras: vec![64] });
    }
}
