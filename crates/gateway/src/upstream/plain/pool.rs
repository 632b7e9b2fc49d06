//! Idle connections to one upstream, newest first, each checked before it
//! is handed out and dropped once it has idled past `pool_idle_timeout`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::proxy::forward::monotonic_ms;

/// How often idle connections are looked over, at most: one the upstream
/// closed is dropped within this, instead of lingering half-closed.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// And at least: a tiny `pool_idle_timeout` does not make the sweeper spin.
const SWEEP_AT_MOST_EVERY: Duration = Duration::from_millis(100);

pub struct Pool {
    /// Oldest first; connections are taken from the back.
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout_ms: u64,
    sweeping: AtomicBool,
}

struct Idle {
    stream: TcpStream,
    since_ms: u64,
}

impl Pool {
    /// Keeps at most `max_idle` connections for `idle_timeout` each; none
    /// when either is zero.
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            max_idle: if idle_timeout.is_zero() { 0 } else { max_idle },
            idle_timeout_ms: u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX),
            sweeping: AtomicBool::new(false),
        }
    }

    /// The most recently used idle connection that is still open.
    pub fn take(&self) -> Option<TcpStream> {
        let now = monotonic_ms();
        loop {
            let idle = self.lock().pop()?;
            if self.fresh(&idle, now) && is_open(&idle.stream) {
                return Some(idle.stream);
            }
            // Dropped here, outside the lock: closing is a system call.
        }
    }

    /// Keeps a connection whose last answer was read to its end, unless
    /// `pool_max_idle_per_host` are idle already.
    pub fn put(self: &Arc<Self>, stream: TcpStream) {
        if self.max_idle == 0 {
            return;
        }
        let refused = {
            let mut idle = self.lock();
            if idle.len() < self.max_idle {
                idle.push(Idle { stream, since_ms: monotonic_ms() });
                None
            } else {
                Some(stream)
            }
        };
        drop(refused);
        self.sweep_from_now_on();
    }

    /// Idle connections now.
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.lock().len()
    }

    fn fresh(&self, idle: &Idle, now: u64) -> bool {
        now.saturating_sub(idle.since_ms) < self.idle_timeout_ms
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // A panic elsewhere cannot leave the list half-changed: pushes and
        // pops are whole.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the connections that idled too long or that the upstream
    /// closed.
    fn sweep(&self) {
        let now = monotonic_ms();
        let gone: Vec<Idle> = {
            let mut idle = self.lock();
            let (keep, gone): (Vec<Idle>, Vec<Idle>) =
                std::mem::take(&mut *idle).into_iter().partition(|i| self.fresh(i, now) && is_open(&i.stream));
            *idle = keep;
            gone
        };
        drop(gone);
    }

    /// Starts the sweeper with the first idle connection. It holds the pool
    /// weakly and ends with it; it has nothing to finish at shutdown (the
    /// connections close as the pool is dropped), so it is not tracked.
    fn sweep_from_now_on(self: &Arc<Self>) {
        if self.sweeping.load(Ordering::Relaxed) || self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let pool: Weak<Self> = Arc::downgrade(self);
        let every = Duration::from_millis(self.idle_timeout_ms).clamp(SWEEP_AT_MOST_EVERY, SWEEP_EVERY);
        runtime.spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep();
            }
        });
    }
}

/// Whether an idle connection is still open: the upstream has neither
/// closed it nor sent anything unasked. Costs no system call unless the
/// connection became readable since it was last read.
fn is_open(stream: &TcpStream) -> bool {
    matches!(stream.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let address = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// Waits until `condition` holds, at most 10 s (also the client's tests').
    pub(in crate::upstream::plain) async fn wait_until(mut condition: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !condition() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("condition within 10 s");
    }

    #[tokio::test]
    async fn the_newest_open_connection_is_taken_and_closed_ones_are_skipped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Arc::new(Pool::new(8, Duration::from_secs(60)));
        let (first, _first_peer) = pair(&listener).await;
        let (second, second_peer) = pair(&listener).await;
        let first_port = first.local_addr().unwrap().port();
        pool.put(first);
        pool.put(second);
        // The upstream closes the newer one: the pool notices and hands
        // out the older, still open one.
        drop(second_peer);
        let taken = loop {
            let taken = pool.take().expect("an open connection");
            if taken.local_addr().unwrap().port() == first_port {
                break taken;
            }
            // Not yet seen as closed: put back and look again.
            pool.put(taken);
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert!(is_open(&taken));
        assert!(pool.take().is_none(), "the closed one was dropped");
    }

    #[tokio::test]
    async fn connections_past_their_idle_time_or_the_cap_are_not_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let capped = Arc::new(Pool::new(1, Duration::from_secs(60)));
        let (a, _pa) = pair(&listener).await;
        let (b, _pb) = pair(&listener).await;
        capped.put(a);
        capped.put(b);
        assert_eq!(capped.idle(), 1);

        let expired = Arc::new(Pool::new(8, Duration::from_millis(1)));
        let (c, _pc) = pair(&listener).await;
        expired.put(c);
        let since = monotonic_ms();
        wait_until(|| monotonic_ms() > since + 1).await;
        assert!(expired.take().is_none(), "idled past its time");

        let off = Arc::new(Pool::new(0, Duration::from_secs(60)));
        let (d, _pd) = pair(&listener).await;
        off.put(d);
        assert_eq!(off.idle(), 0, "pool_max_idle_per_host = 0 keeps none");
        let no_time = Arc::new(Pool::new(8, Duration::ZERO));
        let (e, _pe) = pair(&listener).await;
        no_time.put(e);
        assert_eq!(no_time.idle(), 0, "pool_idle_timeout = 0 keeps none");
    }

    #[tokio::test]
    async fn the_sweeper_drops_what_the_upstream_closed_or_wrote_to() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Arc::new(Pool::new(8, Duration::from_secs(60)));
        let (a, peer_a) = pair(&listener).await;
        let (b, mut peer_b) = pair(&listener).await;
        let (c, _peer_c) = pair(&listener).await;
        pool.put(a);
        pool.put(b);
        pool.put(c);
        drop(peer_a);
        peer_b.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n").await.unwrap();
        wait_until(|| pool.idle() == 1).await;
        assert!(pool.take().is_some());
    }
}
