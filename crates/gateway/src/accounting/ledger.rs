//! The background ledger writer: usage records leave the request path
//! through a channel and reach the database in batches (by size or by
//! interval, whichever comes first). When the database is slow or down,
//! batches go to the durable [`Spool`] and are replayed in order once it
//! answers again; while the spool holds anything, new batches queue behind
//! it so order is kept. On shutdown the writer drains the channel and writes
//! (or spools) everything before it returns.
//!
//! The request path never touches the disk: when the channel is full, a
//! record waits in a bounded overflow list that the writer takes next (past
//! that bound too, the gateway refuses new requests; a record is never
//! dropped).
//!
//! A batch the database refuses while it answers otherwise holds a record
//! it will never take: each record is then tried alone, and those refused
//! again are set aside in the spool's dead-letter file (logged, counted in
//! `tollgate_ledger_dead_letters_total`), so one bad record cannot stop
//! accounting for everyone.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tollgate_store::{Store, UsageEvent};

use super::spool::Spool;
use crate::background::gather;

/// Records waiting in memory before the writer takes them.
const CHANNEL_CAPACITY: usize = 100_000;
/// Records that may wait beside a full channel before new requests are
/// refused (records of requests already admitted are always kept).
const OVERFLOW_CAPACITY: usize = 100_000;
/// Spool bytes held with no record reaching the database for this long:
/// accounting is stuck (readiness says so).
const STUCK_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct LedgerSettings {
    pub batch_size: usize,
    pub flush_interval: Duration,
    /// How long one database write may take before its batch is spooled.
    pub write_timeout: Duration,
    /// How often a non-empty spool is retried.
    pub retry_interval: Duration,
}

/// The request path's handle: never blocks, never waits on the database.
#[derive(Debug, Clone)]
pub struct Ledger {
    tx: mpsc::Sender<UsageEvent>,
    spool: Arc<Spool>,
    queued: Arc<AtomicUsize>,
    write_failures: Arc<AtomicU64>,
    shared: Arc<LedgerState>,
}

/// What the request path and the writer both see.
#[derive(Debug, Default)]
struct LedgerState {
    /// Records that found the channel full; the writer takes them next.
    overflow: Mutex<Vec<UsageEvent>>,
    overflow_len: AtomicUsize,
    wake: tokio::sync::Notify,
    dead_letters: AtomicU64,
    /// When a record last reached the database (ms since the epoch); 0: not yet.
    last_written_ms: AtomicU64,
}

/// What one insert found.
enum Inserted {
    Yes,
    /// The database answered with an error.
    Refused,
    /// The database did not answer (in time).
    Unreachable,
}

/// How accounting is doing, for readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountingHealth {
    Ok,
    /// Records wait in the spool (the database is slow or away).
    Behind,
    /// Records have waited in the spool for a while with none written.
    Stuck,
    /// The spool is full: new requests are refused.
    Full,
}

impl AccountingHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Behind => "behind",
            Self::Stuck => "stuck",
            Self::Full => "full",
        }
    }
}

fn now_ms() -> u64 {
    u64::try_from(crate::clock::system_now_ms()).unwrap_or(0)
}

impl Ledger {
    pub fn new(spool: Arc<Spool>) -> (Self, mpsc::Receiver<UsageEvent>) {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let ledger = Self {
            tx,
            spool,
            queued: Arc::new(AtomicUsize::new(0)),
            write_failures: Arc::new(AtomicU64::new(0)),
            shared: Arc::new(LedgerState { last_written_ms: AtomicU64::new(now_ms()), ..LedgerState::default() }),
        };
        (ledger, rx)
    }

    pub fn record(&self, event: UsageEvent) {
        match self.tx.try_send(event) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
            // The writer is far behind: the record waits beside the channel
            // (memory only; nothing on the request path waits for a disk).
            Err(mpsc::error::TrySendError::Full(event)) => {
                self.shared.overflow.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(event);
                self.shared.overflow_len.fetch_add(1, Ordering::Relaxed);
                self.shared.wake.notify_one();
            }
            // The writer is gone (a stream aborted after the shutdown grace
            // period): the spool is the only place left.
            Err(mpsc::error::TrySendError::Closed(event)) => {
                if let Err(e) = self.spool.append(std::slice::from_ref(&event)) {
                    tracing::error!(error = %e, request_id = %event.request_id, "usage record lost: cannot spool it");
                }
            }
        }
    }

    /// Records set aside because the database refused them alone.
    pub fn dead_letters(&self) -> u64 {
        self.shared.dead_letters.load(Ordering::Relaxed)
    }

    /// How accounting is doing now.
    pub fn health(&self) -> AccountingHealth {
        if self.is_full() {
            return AccountingHealth::Full;
        }
        if self.spool.is_empty() {
            return AccountingHealth::Ok;
        }
        let since = now_ms().saturating_sub(self.shared.last_written_ms.load(Ordering::Relaxed));
        if since >= STUCK_AFTER.as_millis() as u64 { AccountingHealth::Stuck } else { AccountingHealth::Behind }
    }

    /// Records waiting in memory.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Database writes (batches) that failed or timed out since start.
    pub fn write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::Relaxed)
    }

    /// Whether the spool (or the overflow beside a full channel) has reached
    /// its bound: the gateway then refuses new requests instead of serving
    /// traffic it could not account for.
    pub fn is_full(&self) -> bool {
        self.spool.is_full() || self.shared.overflow_len.load(Ordering::Relaxed) >= OVERFLOW_CAPACITY
    }
}

pub struct Writer {
    store: Store,
    spool: Arc<Spool>,
    settings: LedgerSettings,
    queued: Arc<AtomicUsize>,
    write_failures: Arc<AtomicU64>,
    shared: Arc<LedgerState>,
}

impl Writer {
    pub fn new(ledger: &Ledger, store: Store, settings: LedgerSettings) -> Self {
        Self {
            store,
            spool: ledger.spool.clone(),
            settings,
            queued: ledger.queued.clone(),
            write_failures: ledger.write_failures.clone(),
            shared: ledger.shared.clone(),
        }
    }

    /// One segment replayed when the spool holds records and the last
    /// failure's wait is over; at once again after a success. `true`: a
    /// segment went to the database (there may be more).
    async fn replay_turn(&self, turn: &mut ReplayTurn) -> bool {
        if self.spool.is_empty() || Instant::now() < turn.next {
            return false;
        }
        let replayed = self.replay_segment().await;
        if replayed == Replayed::Failed {
            turn.next = Instant::now() + turn.backoff;
            turn.backoff = (turn.backoff * 2).min(MAX_REPLAY_BACKOFF.max(self.settings.retry_interval));
        } else {
            turn.next = Instant::now();
            turn.backoff = self.settings.retry_interval;
        }
        replayed == Replayed::Segment
    }

    /// Records that waited beside a full channel.
    fn take_overflow(&self, batch: &mut Vec<UsageEvent>) {
        if self.shared.overflow_len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let taken =
            std::mem::take(&mut *self.shared.overflow.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        self.shared.overflow_len.fetch_sub(taken.len(), Ordering::Relaxed);
        batch.extend(taken);
    }

    pub async fn run(self, mut rx: mpsc::Receiver<UsageEvent>, cancel: CancellationToken) {
        let mut batch = Vec::with_capacity(self.settings.batch_size);
        let mut retry = tokio::time::interval(self.settings.retry_interval);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Anything left from before a restart goes first.
        self.replay().await;
        // Under steady traffic the branch taking new records is ready at
        // every turn, so the retry's branch (reached only when no record
        // waits) would never replay, and every new batch would follow the
        // old ones into the spool. So each turn that finds the spool holding
        // records also replays a segment of it, here in the loop: the writer
        // appends nothing meanwhile, so the replay cannot chase new segments.
        let mut turn = ReplayTurn { next: Instant::now(), backoff: self.settings.retry_interval };
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                n = rx.recv_many(&mut batch, self.settings.batch_size) => if n == 0 { break },
                () = self.shared.wake.notified() => self.take_overflow(&mut batch),
                // No record waiting: the whole spool, unless the last replay
                // failed and its wait is not over.
                _ = retry.tick() => {
                    while self.replay_turn(&mut turn).await {}
                    continue;
                }
            }
            let deadline = Instant::now() + self.settings.flush_interval;
            gather(&mut rx, &mut batch, self.settings.batch_size, deadline, &cancel).await;
            self.write(&mut batch).await;
            let mut overflow = Vec::new();
            self.take_overflow(&mut overflow);
            self.write(&mut overflow).await;
            self.replay_turn(&mut turn).await;
        }
        // Shutdown: take everything still queued.
        rx.close();
        self.take_overflow(&mut batch);
        while let Some(event) = rx.recv().await {
            batch.push(event);
            if batch.len() >= self.settings.batch_size {
                self.write(&mut batch).await;
            }
        }
        self.write(&mut batch).await;
        if !self.spool.is_empty() {
            self.replay().await;
        }
        if !self.spool.is_empty() {
            tracing::warn!(
                bytes = self.spool.bytes(),
                "usage records left in the spool; they are replayed at next start"
            );
        }
    }

    async fn write(&self, batch: &mut Vec<UsageEvent>) {
        if batch.is_empty() {
            return;
        }
        self.queued.fetch_sub(batch.len().min(self.queued.load(Ordering::Relaxed)), Ordering::Relaxed);
        let events = std::mem::take(batch);
        if self.spool.is_empty() && self.store(&events).await {
            *batch = emptied_for_reuse(events, self.settings.batch_size);
            return;
        }
        let spool = self.spool.clone();
        let count = events.len();
        match tokio::task::spawn_blocking(move || spool.append(&events)).await {
            Ok(Ok(())) => tracing::debug!(count, "usage records spooled"),
            Ok(Err(e)) => tracing::error!(error = %e, count, "usage records lost: cannot spool them"),
            Err(e) => tracing::error!(error = %e, count, "usage records lost: the spool writer failed"),
        }
    }

    /// Puts `events` in the database, setting aside any record the database
    /// refuses on its own. `false`: the database is away or too slow; the
    /// caller spools (or keeps) the records.
    async fn store(&self, events: &[UsageEvent]) -> bool {
        match self.insert(events).await {
            Inserted::Yes => return true,
            Inserted::Unreachable => return false,
            Inserted::Refused => {}
        }
        // The database answered with an error: the batch holds a record it
        // will never take, unless it is on its way down; a ping tells.
        if !self.database_answers().await {
            return false;
        }
        let mut refused = Vec::new();
        for event in events {
            match tokio::time::timeout(
                self.settings.write_timeout,
                self.store.insert_usage(std::slice::from_ref(event)),
            )
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => refused.push((event, e.to_string())),
                Err(_) => return false,
            }
        }
        // A record refused during a blip is not a bad record: check again.
        if refused.is_empty() || !self.database_answers().await {
            return refused.is_empty();
        }
        self.mark_written();
        let count = refused.len();
        for (event, error) in &refused {
            tracing::error!(
                error = %error,
                request_id = %event.request_id,
                tenant_id = %event.tenant_id,
                "the database refuses this usage record; set aside in the spool's dead-letter file"
            );
        }
        let spool = self.spool.clone();
        let set_aside: Vec<UsageEvent> = refused.into_iter().map(|(e, _)| e.clone()).collect();
        match tokio::task::spawn_blocking(move || spool.set_aside(&set_aside)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, count, "usage records lost: cannot write the dead-letter file"),
            Err(e) => tracing::error!(error = %e, count, "usage records lost: the dead-letter writer failed"),
        }
        self.shared.dead_letters.fetch_add(count as u64, Ordering::Relaxed);
        true
    }

    async fn database_answers(&self) -> bool {
        matches!(tokio::time::timeout(self.settings.write_timeout, self.store.ping()).await, Ok(Ok(())))
    }

    fn mark_written(&self) {
        self.shared.last_written_ms.store(now_ms(), Ordering::Relaxed);
    }

    async fn insert(&self, events: &[UsageEvent]) -> Inserted {
        match tokio::time::timeout(self.settings.write_timeout, self.store.insert_usage(events)).await {
            Ok(Ok(_)) => {
                self.mark_written();
                Inserted::Yes
            }
            Ok(Err(e)) => {
                self.write_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, count = events.len(), "cannot write usage records");
                if e.is_refusal() { Inserted::Refused } else { Inserted::Unreachable }
            }
            Err(_) => {
                self.write_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(count = events.len(), "usage write timed out; spooling the records");
                Inserted::Unreachable
            }
        }
    }

    /// Moves spooled records into the database, oldest segment first, until
    /// the spool is empty or the database fails again.
    async fn replay(&self) {
        while self.replay_segment().await == Replayed::Segment {}
    }

    /// Moves the oldest spooled segment into the database.
    async fn replay_segment(&self) -> Replayed {
        let spool = self.spool.clone();
        let (path, events) = match tokio::task::spawn_blocking(move || spool.oldest()).await {
            Ok(Ok(Some(segment))) => segment,
            Ok(Ok(None)) => return Replayed::Empty,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the usage spool");
                return Replayed::Failed;
            }
            Err(_) => return Replayed::Failed,
        };
        for chunk in events.chunks(self.settings.batch_size.max(1)) {
            if !self.store(chunk).await {
                return Replayed::Failed;
            }
        }
        if let Err(e) = self.spool.remove(&path) {
            tracing::error!(error = %e, "cannot remove a replayed spool segment");
            return Replayed::Failed;
        }
        tracing::info!(records = events.len(), "replayed spooled usage records");
        Replayed::Segment
    }
}

/// What one replay step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replayed {
    /// A segment reached the database and left the spool.
    Segment,
    Empty,
    /// The database (or the spool) failed; the segment stays.
    Failed,
}

/// When the loop replays next, and how long it waits after a failure
/// (doubling up to [`MAX_REPLAY_BACKOFF`]).
struct ReplayTurn {
    next: Instant,
    backoff: Duration,
}

/// The longest the writer waits between replays that fail: each failed one
/// holds up new records for a write timeout while the database is away.
const MAX_REPLAY_BACKOFF: Duration = Duration::from_secs(30);

/// A written batch's allocation, emptied for the next batch to fill rather
/// than growing a new one record by record (each growth copies every
/// record). Not past the batch size: a batch that took in a burst of
/// overflow (up to [`OVERFLOW_CAPACITY`] records) must not keep that much
/// memory for good.
fn emptied_for_reuse<T>(mut events: Vec<T>, batch_size: usize) -> Vec<T> {
    if events.capacity() > batch_size.max(1) {
        return Vec::with_capacity(batch_size);
    }
    events.clear();
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records keep arriving at a steady rate the database takes easily
    /// but faster than one per write, so the writer finds some waiting after
    /// every write: what spooled during an outage must still reach the
    /// database while they come, not only once they stop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_spool_is_replayed_while_records_keep_arriving() {
        let db = tollgate_store::testing::TestDatabase::postgres().await;
        let store = Store::connect(&db.url, 4).await.unwrap();
        store.migrate().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), 1 << 30).unwrap());
        let (ledger, rx) = Ledger::new(spool.clone());
        let settings = LedgerSettings {
            batch_size: 5000,
            flush_interval: Duration::from_millis(20),
            write_timeout: Duration::from_secs(5),
            retry_interval: Duration::from_millis(50),
        };
        let cancel = CancellationToken::new();
        let writer = tokio::spawn(Writer::new(&ledger, store.clone(), settings).run(rx, cancel.clone()));
        let event = |id: String| {
            let mut event = crate::accounting::spool::tests::event(&id);
            event.at = i64::try_from(now_ms()).unwrap();
            event
        };
        // What an outage left behind.
        spool.append(&(0..100).map(|n| event(format!("spooled-{n}"))).collect::<Vec<_>>()).unwrap();

        let arriving = std::sync::atomic::AtomicBool::new(true);
        let feed = async {
            // 20 records a millisecond.
            let mut sent = 0;
            let mut every = tokio::time::interval(Duration::from_millis(1));
            while arriving.load(Ordering::Relaxed) {
                every.tick().await;
                for _ in 0..20 {
                    ledger.record(event(format!("new-{sent}")));
                    sent += 1;
                }
            }
            sent
        };
        let drained = async {
            let started = std::time::Instant::now();
            while !spool.is_empty() {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "the spool still holds {} bytes after 10 s of steady records",
                    spool.bytes()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            arriving.store(false, Ordering::Relaxed);
        };
        let (sent, ()) = tokio::join!(feed, drained);
        cancel.cancel();
        writer.await.unwrap();
        assert_eq!(store.count_usage_events().await.unwrap(), 100 + sent, "every record once");
    }

    #[test]
    fn a_batch_allocation_is_kept_up_to_the_batch_size() {
        let mut written = Vec::with_capacity(8);
        written.extend(0..8u64);
        let reused = emptied_for_reuse(written, 8);
        assert!(reused.is_empty());
        assert_eq!(reused.capacity(), 8, "the same allocation, emptied");

        let burst: Vec<u64> = (0..1_000).collect();
        let after_burst = emptied_for_reuse(burst, 8);
        assert!(after_burst.is_empty());
        assert_eq!(after_burst.capacity(), 8, "a burst's allocation is let go");
    }
}
