//! Where log lines go: appended to a shared buffer by whichever thread logs,
//! and written out in batches by the `tollgate-log` thread.
//!
//! A writer of its own rather than tracing-appender's non-blocking one:
//! that one copies every line into an allocation of its own and sends it
//! through a channel whose thread is woken for each line once it has caught
//! up. Below saturation that is a thread wake-up and a `write` system call
//! per request, about 20 µs of CPU per request at 1,000 requests/s (the
//! benchmark with the access log and without), on the same CPU the requests
//! need. Here a line is appended under a lock held for a copy; only the
//! first line into an empty buffer wakes the writer, which then gathers for
//! [`GATHER`] before writing everything queued with one call. Lines reach
//! stdout at most that much later.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer gathers lines after the first one before writing.
pub const GATHER: Duration = Duration::from_millis(50);
/// Bytes of lines held before further lines are dropped (and counted): a
/// stalled log collector must neither stall requests nor grow memory
/// without bound. About 100,000 access lines, several seconds at full load.
const MAX_QUEUED_BYTES: usize = 32 * 1024 * 1024;
/// A batch buffer larger than this after a burst is not kept.
const KEEP_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// How long dropping the guard waits for the queued lines to be written: a
/// stdout that never drains must not keep the process from exiting.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

struct Queue {
    lines: Vec<u8>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when the first line enters an empty queue, and at close.
    ready: Condvar,
    dropped: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves the bytes as they were: go on.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the log subscriber writes lines to.
#[derive(Clone)]
pub struct LineWriter {
    shared: Arc<Shared>,
}

impl LineWriter {
    /// Lines dropped so far because the queue was full or closed.
    pub fn dropped_lines(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    fn append(&self, line: &[u8]) {
        let mut queue = self.shared.lock();
        if queue.closed || queue.lines.len() + line.len() > MAX_QUEUED_BYTES {
            drop(queue);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = queue.lines.is_empty();
        queue.lines.extend_from_slice(line);
        drop(queue);
        if was_empty {
            self.shared.ready.notify_one();
        }
    }
}

impl io::Write for &LineWriter {
    /// One call per log line (the subscriber formats a whole line first),
    /// so lines never interleave.
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.append(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LineWriter {
    type Writer = &'a LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// Keeps the writer thread running; dropping it writes what is queued and
/// stops the thread. Lines logged afterwards are dropped and counted.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected once the thread has written everything and ended.
    finished: std::sync::mpsc::Receiver<()>,
    wait: Duration,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_one();
        // Past the wait (a stalled stdout), the thread is left behind and
        // the lines it still holds are lost with the process.
        if self.finished.recv_timeout(self.wait) == Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
            && let Some(thread) = self.thread.take()
        {
            // The thread only writes; a panic there has nothing left to tell.
            let _ = thread.join();
        }
    }
}

/// Starts the `tollgate-log` thread writing to `out`.
pub fn start<W: Write + Send + 'static>(out: W) -> io::Result<(LineWriter, LogGuard)> {
    start_with_wait(out, SHUTDOWN_WAIT)
}

fn start_with_wait<W: Write + Send + 'static>(out: W, wait: Duration) -> io::Result<(LineWriter, LogGuard)> {
    let (finishing, finished) = std::sync::mpsc::channel::<()>();
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue { lines: Vec::new(), closed: false }),
        ready: Condvar::new(),
        dropped: AtomicU64::new(0),
    });
    let thread = std::thread::Builder::new().name("tollgate-log".to_owned()).spawn({
        let shared = shared.clone();
        move || {
            write_batches(&shared, out);
            drop(finishing);
        }
    })?;
    Ok((LineWriter { shared: shared.clone() }, LogGuard { shared, thread: Some(thread), finished, wait }))
}

fn write_batches(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        {
            let mut queue = shared.lock();
            while queue.lines.is_empty() && !queue.closed {
                queue = shared.ready.wait(queue).unwrap_or_else(PoisonError::into_inner);
            }
            if queue.lines.is_empty() {
                break; // closed, and everything written
            }
            if !queue.closed {
                // Gather whatever else arrives meanwhile; a close cuts it short.
                queue = shared
                    .ready
                    .wait_timeout_while(queue, GATHER, |queue| !queue.closed)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            // The emptied batch buffer goes back as the queue's, capacity kept.
            std::mem::swap(&mut batch, &mut queue.lines);
        }
        // A failed write (stdout closed) loses these lines; there is nowhere
        // else to put them.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > KEEP_BATCH_BYTES {
            batch = Vec::new();
        }
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects what the writer thread writes, and how many writes it made.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            let mut sink = self.0.lock().unwrap();
            sink.0.extend_from_slice(data);
            sink.1 += 1;
            Ok(data.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_written_whole_in_order_in_few_writes_and_all_by_the_time_the_guard_is_dropped() {
        let sink = Sink::default();
        let (writer, guard) = start(sink.clone()).unwrap();
        for i in 0..1_000 {
            (&writer).write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let (text, writes) = sink.0.lock().unwrap().clone();
        let text = String::from_utf8(text).unwrap();
        let expected: String = (0..1_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
        assert!(writes < 100, "lines are written in batches, not one by one: {writes} writes");
        assert_eq!(writer.dropped_lines(), 0);
        (&writer).write_all(b"after close\n").unwrap();
        assert_eq!(writer.dropped_lines(), 1, "a line after the guard is gone is counted, not written");
    }

    #[test]
    fn a_line_reaches_the_output_without_waiting_for_more() {
        let sink = Sink::default();
        let (writer, _guard) = start(sink.clone()).unwrap();
        (&writer).write_all(b"alone\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.0.lock().unwrap().0.is_empty() {
            assert!(std::time::Instant::now() < deadline, "the line was never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sink.0.lock().unwrap().0, b"alone\n");
    }

    /// An output that blocks until told to go on, like a stalled pipe.
    #[derive(Default)]
    struct Gate {
        state: Mutex<(bool, bool)>, // (a write has started, the output is open)
        turn: Condvar,
    }

    struct Stalled(Arc<Gate>, Sink);

    impl Write for Stalled {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            let mut state = self.0.state.lock().unwrap();
            state.0 = true;
            self.0.turn.notify_all();
            while !state.1 {
                state = self.0.turn.wait(state).unwrap();
            }
            drop(state);
            self.1.write(data)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_drops_and_counts_lines_past_the_limit_without_blocking_the_loggers() {
        let gate = Arc::new(Gate::default());
        let sink = Sink::default();
        let (writer, guard) = start(Stalled(gate.clone(), sink.clone())).unwrap();
        // The first line takes the writer thread into the stalled write.
        (&writer).write_all(b"first\n").unwrap();
        let mut state = gate.state.lock().unwrap();
        while !state.0 {
            state = gate.turn.wait(state).unwrap();
        }
        drop(state);
        let line = vec![b'x'; 1024 * 1024];
        for _ in 0..40 {
            (&writer).write_all(&line).unwrap();
        }
        // Every call above returned although nothing could be written: the
        // queue took what fits and the rest was counted.
        let fits = MAX_QUEUED_BYTES / line.len();
        assert_eq!(writer.dropped_lines(), (40 - fits) as u64);
        gate.state.lock().unwrap().1 = true;
        gate.turn.notify_all();
        drop(guard);
        assert_eq!(sink.0.lock().unwrap().0.len(), 6 + fits * line.len());
    }

    #[test]
    fn an_output_that_never_drains_does_not_keep_the_guard_from_dropping() {
        let gate = Arc::new(Gate::default());
        let (writer, guard) =
            start_with_wait(Stalled(gate.clone(), Sink::default()), Duration::from_millis(50)).unwrap();
        (&writer).write_all(b"stuck\n").unwrap();
        let mut state = gate.state.lock().unwrap();
        while !state.0 {
            state = gate.turn.wait(state).unwrap();
        }
        drop(state);
        // Returns although the writer thread is still blocked in its write.
        drop(guard);
        assert!(!gate.state.lock().unwrap().1, "the output never opened");
        (&writer).write_all(b"after\n").unwrap();
        assert_eq!(writer.dropped_lines(), 1);
        // Let the abandoned thread finish.
        gate.state.lock().unwrap().1 = true;
        gate.turn.notify_all();
    }
}
