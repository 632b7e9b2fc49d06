//! Connections to one upstream spread over lanes, so that HTTP/2 carries
//! thousands of concurrent requests on a few connections instead of queueing
//! them behind one.
//!
//! hyper-util's pool keeps a single HTTP/2 connection per host and sends
//! every request over it; past the server's `SETTINGS_MAX_CONCURRENT_STREAMS`
//! (100–250 on common servers) further requests wait inside the client until
//! a stream ends, which for long LLM streams means minutes. Each lane is its
//! own pooled client, hence its own HTTP/2 connection; a request takes the
//! first lane with fewer than `streams_per_connection` requests in flight and
//! holds its place there until its answer has been relayed. Over HTTP/1.1
//! (plain http, or an https upstream whose ALPN chose it) one lane is used:
//! its pool already opens a connection per concurrent request.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Lanes at most: with the default 100 streams per connection, 25,600
/// concurrent requests before lanes are shared past their size (the
/// least-loaded one then takes the request, and its server may queue it).
const MAX_LANES: usize = 256;

pub struct Lanes<C> {
    lanes: Box<[Lane<C>]>,
    streams_per_lane: usize,
    make: Box<dyn Fn() -> C + Send + Sync>,
}

struct Lane<C> {
    client: OnceLock<C>,
    in_flight: Arc<AtomicUsize>,
}

/// A request's place in its lane, given back when dropped.
#[derive(Debug)]
pub struct LanePlace(Arc<AtomicUsize>);

impl Drop for LanePlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<C> Lanes<C> {
    /// `multiplexed`: whether connections may be HTTP/2 (else one lane).
    /// Clients are made by `make` when a lane is first used.
    pub fn new(multiplexed: bool, streams_per_lane: usize, make: impl Fn() -> C + Send + Sync + 'static) -> Self {
        let count = if multiplexed { MAX_LANES } else { 1 };
        let lanes = (0..count).map(|_| Lane { client: OnceLock::new(), in_flight: Arc::default() }).collect();
        Self { lanes, streams_per_lane: streams_per_lane.max(1), make: Box::new(make) }
    }

    /// The client to send one request with, and the place it holds (none
    /// with a single lane: there is no choice to count for, and the
    /// HTTP/1.1 path stays free of the bookkeeping).
    pub fn take(&self) -> (&C, Option<LanePlace>) {
        let lane = self.choose();
        let client = lane.client.get_or_init(&self.make);
        if self.lanes.len() == 1 {
            return (client, None);
        }
        // Two requests may both see room in a lane and both take it: the
        // lane then carries one more than its size, which its connection's
        // server queues at worst; exactness is not worth a lock here.
        lane.in_flight.fetch_add(1, Ordering::AcqRel);
        (client, Some(LanePlace(lane.in_flight.clone())))
    }

    /// The first lane with room (packing requests onto as few connections
    /// as they fit), else the least loaded.
    fn choose(&self) -> &Lane<C> {
        if self.lanes.len() == 1 {
            return &self.lanes[0];
        }
        let mut least = &self.lanes[0];
        let mut least_load = usize::MAX;
        for lane in self.lanes.iter() {
            let load = lane.in_flight.load(Ordering::Acquire);
            if load < self.streams_per_lane {
                return lane;
            }
            if load < least_load {
                least = lane;
                least_load = load;
            }
        }
        least
    }

    /// Requests in flight per lane in use.
    #[cfg(test)]
    fn loads(&self) -> Vec<usize> {
        self.lanes
            .iter()
            .filter(|lane| lane.client.get().is_some())
            .map(|lane| lane.in_flight.load(Ordering::Acquire))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_fill_one_lane_before_the_next_and_give_their_places_back() {
        let lanes = Lanes::new(true, 2, || ());
        let mut places: Vec<_> = (0..5).map(|_| lanes.take().1).collect();
        assert_eq!(lanes.loads(), vec![2, 2, 1]);
        drop(places.remove(0));
        assert_eq!(lanes.loads(), vec![1, 2, 1]);
        let _again = lanes.take();
        assert_eq!(lanes.loads(), vec![2, 2, 1], "the freed place is reused first");
    }

    #[test]
    fn one_lane_without_multiplexing_and_the_least_loaded_when_all_are_full() {
        let single = Lanes::new(false, 2, || ());
        let places: Vec<_> = (0..5).map(|_| single.take().1).collect();
        assert!(places.iter().all(Option::is_none), "nothing to count with one lane");
        assert_eq!(single.loads(), vec![0]);
        let full = Lanes::new(true, 1, || ());
        let places: Vec<_> = (0..MAX_LANES).map(|_| full.take().1).collect();
        drop(places);
        let _held: Vec<_> = (0..MAX_LANES + 1).map(|_| full.take().1).collect();
        let loads = full.loads();
        assert_eq!(loads.iter().sum::<usize>(), MAX_LANES + 1);
        assert_eq!(loads.iter().max(), Some(&2), "overflow goes to a least-loaded lane");
    }
}
