//! The background ledger writer: usage records leave the request path
//! through a channel and reach the database in batches (by size or by
//! interval, whichever comes first). When the database is slow or down,
//! batches go to the durable [`Spool`] and are replayed in order once it
//! answers again; while the spool holds anything, new batches queue behind
//! it so order is kept. On shutdown the writer drains the channel and writes
//! (or spools) everything before it returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tollgate_store::{Store, UsageEvent};

use super::spool::Spool;

/// Records waiting in memory before the writer takes them.
const CHANNEL_CAPACITY: usize = 100_000;

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
}

impl Ledger {
    pub fn new(spool: Arc<Spool>) -> (Self, mpsc::Receiver<UsageEvent>) {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        (Self { tx, spool, queued: Arc::new(AtomicUsize::new(0)), write_failures: Arc::new(AtomicU64::new(0)) }, rx)
    }

    pub fn record(&self, event: UsageEvent) {
        match self.tx.try_send(event) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
            // The writer is far behind (or gone at shutdown): write this one
            // straight to the spool rather than lose it.
            Err(mpsc::error::TrySendError::Full(event) | mpsc::error::TrySendError::Closed(event)) => {
                if let Err(e) = self.spool.append(std::slice::from_ref(&event)) {
                    tracing::error!(error = %e, request_id = %event.request_id, "usage record lost: cannot spool it");
                }
            }
        }
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

    /// Whether the spool has reached its bound: the gateway then refuses new
    /// requests instead of serving traffic it could not account for.
    pub fn is_full(&self) -> bool {
        self.spool.is_full()
    }
}

pub struct Writer {
    store: Store,
    spool: Arc<Spool>,
    settings: LedgerSettings,
    queued: Arc<AtomicUsize>,
    write_failures: Arc<AtomicU64>,
}

impl Writer {
    pub fn new(ledger: &Ledger, store: Store, settings: LedgerSettings) -> Self {
        Self {
            store,
            spool: ledger.spool.clone(),
            settings,
            queued: ledger.queued.clone(),
            write_failures: ledger.write_failures.clone(),
        }
    }

    pub async fn run(self, mut rx: mpsc::Receiver<UsageEvent>, cancel: CancellationToken) {
        let mut batch = Vec::with_capacity(self.settings.batch_size);
        let mut retry = tokio::time::interval(self.settings.retry_interval);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Anything left from before a restart goes first.
        self.replay().await;
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                n = rx.recv_many(&mut batch, self.settings.batch_size) => if n == 0 { break },
                _ = retry.tick() => {
                    if !self.spool.is_empty() {
                        self.replay().await;
                    }
                    continue;
                }
            }
            let deadline = Instant::now() + self.settings.flush_interval;
            while batch.len() < self.settings.batch_size {
                let room = self.settings.batch_size - batch.len();
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => break,
                    n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            self.write(&mut batch).await;
        }
        // Shutdown: take everything still queued.
        rx.close();
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
        if self.spool.is_empty() && self.insert(&events).await {
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

    async fn insert(&self, events: &[UsageEvent]) -> bool {
        match tokio::time::timeout(self.settings.write_timeout, self.store.insert_usage(events)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                self.write_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, count = events.len(), "cannot write usage records; spooling them");
                false
            }
            Err(_) => {
                self.write_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(count = events.len(), "usage write timed out; spooling the records");
                false
            }
        }
    }

    /// Moves spooled records into the database, oldest segment first, until
    /// the spool is empty or the database fails again.
    async fn replay(&self) {
        loop {
            let spool = self.spool.clone();
            let oldest = match tokio::task::spawn_blocking(move || spool.oldest()).await {
                Ok(Ok(Some(segment))) => segment,
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot read the usage spool");
                    return;
                }
                Err(_) => return,
            };
            let (path, events) = oldest;
            for chunk in events.chunks(self.settings.batch_size.max(1)) {
                if !self.insert(chunk).await {
                    return;
                }
            }
            if let Err(e) = self.spool.remove(&path) {
                tracing::error!(error = %e, "cannot remove a replayed spool segment");
                return;
            }
            tracing::info!(records = events.len(), "replayed spooled usage records");
        }
    }
}
