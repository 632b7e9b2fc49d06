//! The gateway's own work (ledger batches, metric scrapes and the rest of
//! the admin listener, cache and route reloads, alert checks, trace export)
//! runs apart from the request workers: on one thread with its own runtime,
//! at a lower scheduling priority.
//!
//! On the request runtime, a ledger batch being encoded or a scrape being
//! rendered holds a worker for a millisecond or more, and whatever that
//! worker had queued (including a task it woke last, which no other worker
//! may steal) waits behind it: the tail of the request latency. Here such
//! work only competes for the CPU, where the kernel favours the request
//! workers.

use std::future::Future;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How much lower the background thread's priority is than the request
/// workers' (a Linux nice value). At 5 its share of a CPU the request
/// workers keep fully busy is about a quarter against one of them and a
/// seventh against two (weights 335 against 1024 each), more than it needs
/// then: under callgrind the ledger writer costs about 8,700 instructions
/// per record against about 116,000 for the request that made it. Below saturation it takes what it
/// needs, and a request waking a worker still preempts it.
const NICENESS: i32 = 5;

/// Tasks spawned on the background thread, tracked so shutdown can wait
/// for them.
#[derive(Clone)]
pub struct Background {
    tracker: TaskTracker,
    runtime: Handle,
}

impl Background {
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn_on(task, &self.runtime);
    }

    /// Tracked with the others but run on the caller's runtime: for a task
    /// requests wait on.
    pub fn spawn_here<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    pub fn spawn_blocking<F>(&self, job: F)
    where
        F: FnOnce() + Send + 'static,
    {
        self.tracker.spawn_blocking_on(job, &self.runtime);
    }

    /// The background runtime, for a listener served there.
    pub fn runtime(&self) -> &Handle {
        &self.runtime
    }

    /// No more tasks; `wait` then resolves once the last one ends.
    pub fn close(&self) {
        self.tracker.close();
    }

    pub async fn wait(&self) {
        self.tracker.wait().await;
    }
}

/// The background thread. It runs until this is dropped, which the
/// application does only after every background task has ended.
pub struct BackgroundThread {
    background: Background,
    stop: Option<oneshot::Sender<()>>,
}

impl BackgroundThread {
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new().name("tollgate-background".to_owned()).spawn(move || {
            lower_priority();
            // A current-thread runtime runs its tasks only inside `block_on`.
            runtime.block_on(async {
                let _ = stopped.await;
            });
            // Every tracked task has ended by now; what is left (a
            // connection's idle keep-alive timer, say) is dropped.
            runtime.shutdown_timeout(Duration::from_secs(1));
        })?;
        Ok(Self { background: Background { tracker: TaskTracker::new(), runtime: handle }, stop: Some(stop) })
    }

    pub fn background(&self) -> &Background {
        &self.background
    }
}

impl Drop for BackgroundThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// How often a gathering batch looks for new items, at most and at least.
/// Between the two, often enough that what arrives at the rate seen so far
/// fills at most a quarter of the room left (in the batch, or in the
/// channel if that is smaller) between looks: a slow flow is looked at a
/// few times per batch rather than a hundred times a second, a fast one
/// every 10 ms as before.
const GATHER_TICK_MIN: Duration = Duration::from_millis(10);
/// Short enough that a flow jumping from slow to full speed between two
/// looks cannot fill a trace queue of the default size (8,192 spans at
/// about 90,000 a second in the benchmark).
const GATHER_TICK_MAX: Duration = Duration::from_millis(50);

/// Fills `batch` from `items` until it holds `max`, `deadline` passes, the
/// channel is closed and empty, or `cancel` fires. It takes what the channel
/// holds every tick (see [`GATHER_TICK_MIN`]) instead of waiting on it: a
/// wait would have every item sent from the request runtime wake this
/// thread (a system call and a context switch each, several microseconds
/// per request), where polling wakes it at most a hundred times a second.
pub async fn gather<T>(
    items: &mut mpsc::Receiver<T>,
    batch: &mut Vec<T>,
    max: usize,
    deadline: Instant,
    cancel: &CancellationToken,
) {
    let started = Instant::now();
    let held_at_start = batch.len();
    while batch.len() < max {
        if !items.is_empty() {
            // Returns at once: items are waiting.
            items.recv_many(batch, max - batch.len()).await;
            continue;
        }
        let now = Instant::now();
        if items.is_closed() || now >= deadline || cancel.is_cancelled() {
            return;
        }
        let room = (max - batch.len()).min(items.capacity());
        let tick = next_tick(batch.len() - held_at_start, now - started, room);
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until((now + tick).min(deadline)) => {}
        }
    }
}

/// How long until the next look: `taken` items arrived in `elapsed`, and
/// `room` more can be held before something must give.
fn next_tick(taken: usize, elapsed: Duration, room: usize) -> Duration {
    if elapsed.is_zero() {
        // No rate yet: the items that started the batch came at once.
        return GATHER_TICK_MIN;
    }
    // None in `elapsed` bounds the rate as one would.
    let quarter_room = (room / 4).max(1) as f64;
    let per_item = elapsed.as_secs_f64() / taken.max(1) as f64;
    Duration::from_secs_f64(per_item * quarter_room).clamp(GATHER_TICK_MIN, GATHER_TICK_MAX)
}

/// Lowers the calling thread's priority: on Linux, `setpriority` for "the
/// calling process" applies to the calling thread only. Best effort: where
/// it fails, the background thread still keeps its work off the request
/// workers.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let lowered = rustix::process::getpriority_process(None)
            .and_then(|now| rustix::process::setpriority_process(None, now + NICENESS));
        if let Err(error) = lowered {
            tracing::debug!(%error, "cannot lower the background thread's priority");
        }
    }
}

#[cfg(test)]
#[cfg(target_os = "linux")]
mod tests {
    use super::*;

    fn own_niceness() -> i32 {
        rustix::process::getpriority_process(None).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_gathered_batch_ends_full_at_its_deadline_when_closed_or_when_cancelled() {
        let cancel = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel(100);
        for i in 0..10 {
            tx.send(i).await.unwrap();
        }
        // Full: the items waiting are enough, no time passes.
        let start = Instant::now();
        let mut batch = Vec::new();
        gather(&mut rx, &mut batch, 4, start + Duration::from_secs(1), &cancel).await;
        assert_eq!(batch, [0, 1, 2, 3]);
        assert_eq!(Instant::now(), start);

        // Items sent while it waits are taken at the next tick; it returns
        // at the deadline with what it has.
        let mut batch = Vec::new();
        let sender = tx.clone();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(55)).await;
            sender.send(10).await.unwrap();
        });
        gather(&mut rx, &mut batch, 100, start + Duration::from_millis(200), &cancel).await;
        late.await.unwrap();
        assert_eq!(batch, [4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(Instant::now(), start + Duration::from_millis(200));

        // Closed and empty: returns at once.
        drop(tx);
        let mut batch = Vec::new();
        let before = Instant::now();
        gather(&mut rx, &mut batch, 100, before + Duration::from_secs(1), &cancel).await;
        assert!(batch.is_empty());
        assert_eq!(Instant::now(), before);

        // Cancelled: returns at once, keeping what it took.
        let (tx, mut rx) = mpsc::channel(10);
        tx.send(1).await.unwrap();
        cancel.cancel();
        let mut batch = Vec::new();
        gather(&mut rx, &mut batch, 100, Instant::now() + Duration::from_secs(1), &cancel).await;
        assert_eq!(batch, [1]);
    }

    #[test]
    fn a_slow_flow_is_looked_at_rarely_and_a_fast_one_every_tick() {
        let ms = Duration::from_millis;
        assert_eq!(next_tick(6, Duration::ZERO, 100), GATHER_TICK_MIN, "no rate yet");
        // A ledger at 1,000 records a second, batches of 5,000: a look per
        // 50 ms instead of per 10.
        assert_eq!(next_tick(10, ms(10), 5_000), GATHER_TICK_MAX);
        // Spans at 4,000 a second into batches of 512: a quarter of the
        // room (128) arrives in 32 ms.
        assert_eq!(next_tick(40, ms(10), 512), ms(32));
        // At 88,000 a second the floor holds.
        assert_eq!(next_tick(880, ms(10), 512), GATHER_TICK_MIN);
        // The channel's room counts when it is the smaller.
        assert_eq!(next_tick(40, ms(10), 100), GATHER_TICK_MIN, "25 items arrive in 6 ms");
        // Nothing arrived: at most one item per the time waited so far.
        assert_eq!(next_tick(0, ms(20), 8), GATHER_TICK_MAX.min(ms(40)));
        assert_eq!(next_tick(0, ms(10), 4), GATHER_TICK_MIN);
    }

    #[test]
    fn tasks_run_on_the_background_thread_at_a_lower_priority_until_it_is_dropped() {
        let caller = own_niceness();
        let thread = BackgroundThread::start().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        thread.background().spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            tx.send((std::thread::current().name().map(str::to_owned), own_niceness())).unwrap();
        });
        let (name, nice) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(name.as_deref(), Some("tollgate-background"));
        assert_eq!(nice, (caller + NICENESS).min(19));
        assert_eq!(own_niceness(), caller, "the caller's priority is untouched");

        // Once dropped, the runtime is shut down: a task spawned on it is
        // cancelled instead of run.
        let runtime = thread.background().runtime().clone();
        drop(thread);
        let probe = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match probe.block_on(runtime.spawn(async {})) {
                Err(e) if e.is_cancelled() => break,
                _ => assert!(std::time::Instant::now() < deadline, "the background runtime still runs tasks"),
            }
        }
    }
}
