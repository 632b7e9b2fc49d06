//! Token estimates for when the upstream reports no usage (it omitted it,
//! the stream broke, the client went away), with tiktoken's `o200k_base`.
//! Records built from these are marked `estimated`.

use serde_json::Value;
use tollgate_openai::SseEvent;

use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use tokio_util::task::TaskTracker;

use super::tokens::count;

/// Where estimates run. Tokenizing up to megabytes of text, and building
/// the tokenizer the first time (tens of MB of tables, a large fraction of
/// a second), must not hold a request worker: jobs run on threads of their
/// own (`tollgate-estimate`). They are tracked, so shutdown waits for the
/// records they finish before it stops the ledger writer.
///
/// One thread per core, started with the gateway. Tokenizing is CPU work,
/// so more would not finish sooner; they would only take memory. A burst of
/// jobs (every stream of a busy replica cancelled at once) queues on them.
/// Why not the runtime's blocking pool behind a semaphore: a job that ends
/// hands its turn to the next before its thread is idle again, so the pool
/// starts a thread for nearly every queued job (24 to 60 threads when
/// 5,000 streams were cancelled, each leaving its stack and allocator cache
/// behind: about 10 MiB of resident memory that stayed after a burst).
#[derive(Debug, Clone)]
pub struct Estimates {
    tracker: TaskTracker,
    jobs: mpsc::Sender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

impl Default for Estimates {
    fn default() -> Self {
        Self::at_most(std::thread::available_parallelism().map_or(1, usize::from))
    }
}

thread_local! {
    /// Set while an estimate job runs: work it starts runs in place.
    static IN_ESTIMATE_JOB: Cell<bool> = const { Cell::new(false) };
}

impl Estimates {
    /// Estimates on `threads` threads of their own (at least one). The
    /// threads end once every clone of this is dropped and the queue is
    /// empty.
    pub fn at_most(threads: usize) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..threads.max(1) {
            let queue = queue.clone();
            if let Err(e) = std::thread::Builder::new().name("tollgate-estimate".into()).spawn(move || work(&queue)) {
                // With no thread at all, jobs run where they are started.
                tracing::warn!(error = %e, "cannot start a thread for token estimates");
            }
        }
        Self { tracker: TaskTracker::new(), jobs }
    }

    /// Whether this thread is running an estimate job now (so further
    /// estimates can run here instead of queueing another job).
    pub fn on_estimate_thread() -> bool {
        IN_ESTIMATE_JOB.get()
    }

    /// Runs `job` off the request workers without waiting for it. From an
    /// estimate job, or outside a runtime (a record closed by a `Drop` after
    /// its runtime ended), it runs here and now.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        if Self::on_estimate_thread() || tokio::runtime::Handle::try_current().is_err() {
            return job();
        }
        let token = self.tracker.token();
        let job: Job = Box::new(move || {
            let _running = token;
            job();
        });
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            job();
        }
    }

    /// Runs `count` off the request workers and waits for it; `None` if it
    /// panicked.
    pub async fn count<T: Send + 'static>(&self, count: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Some(count());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A caller that stops waiting (its client left) drops `rx`; the
        // count still runs and its result is dropped.
        self.spawn(move || {
            let _ = tx.send(count());
        });
        rx.await.ok()
    }

    /// Runs `work` as if in an estimate job: estimates it makes run here.
    pub fn run_here<T>(work: impl FnOnce() -> T) -> T {
        as_estimate_job(work)
    }

    /// Jobs queued or running now (`tollgate_estimates_pending`).
    pub fn pending(&self) -> usize {
        self.tracker.len()
    }

    /// Waits for the jobs started so far and any they start (shutdown).
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// An estimate thread: runs queued jobs one after another until the queue
/// is closed.
fn work(queue: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        // One thread waits for a job at a time; the others wait for the lock.
        let Ok(job) = queue.lock().unwrap_or_else(PoisonError::into_inner).recv() else { return };
        // A panicking job loses only its own estimate (and its record's
        // estimate falls back as when a count fails).
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| as_estimate_job(job)));
    }
}

fn as_estimate_job<T>(job: impl FnOnce() -> T) -> T {
    /// Clears the flag however the job ends (the threads are reused).
    struct Running;
    impl Drop for Running {
        fn drop(&mut self) {
            IN_ESTIMATE_JOB.set(false);
        }
    }
    IN_ESTIMATE_JOB.set(true);
    let _running = Running;
    job()
}

/// Builds the tokenizer ahead of the first estimate (it takes a moment).
pub fn warm_up() {
    super::tokens::warm_up();
}

/// The text of a message, prompt or answer: each string ends with a line
/// break, as the parts of a conversation are separate.
fn collect_text(value: &Value, out: &mut String) {
    collect(value, out, "\n");
}

/// The text of a stream's delta: pieces of one text, joined as they are.
/// (A line break after each would count about a token more per event: a
/// third to a half more than a chat stream's output.)
fn collect_piece(value: &Value, out: &mut String) {
    collect(value, out, "");
}

fn collect(value: &Value, out: &mut String, end: &str) {
    match value {
        Value::String(s) => {
            out.push_str(s);
            out.push_str(end);
        }
        Value::Array(items) => items.iter().for_each(|i| collect(i, out, end)),
        Value::Object(map) => {
            // Text-bearing fields of messages, prompts and inputs (OpenAI's,
            // Gemini's `contents`/`parts`/`systemInstruction`, Anthropic's
            // `system` and thinking blocks); image data and other payloads
            // are not text tokens.
            for key in [
                "content",
                "text",
                "prompt",
                "input",
                "instructions",
                "arguments",
                "name",
                "contents",
                "parts",
                "systemInstruction",
                "system",
                "thinking",
                "partial_json",
                "args",
            ] {
                if let Some(v) = map.get(key) {
                    collect(v, out, end);
                }
            }
            if let Some(messages) = map.get("messages") {
                collect(messages, out, end);
            }
            if let Some(tools) = map.get("tools") {
                out.push_str(&tools.to_string());
            }
        }
        _ => {}
    }
}

/// Prompt tokens of a request body.
pub fn prompt_tokens(request_body: &[u8]) -> u64 {
    let Ok(value) = serde_json::from_slice::<Value>(request_body) else { return 0 };
    let mut text = String::new();
    collect_text(&value, &mut text);
    count(&text)
}

/// Output tokens of a non-streamed response body.
pub fn response_tokens(body: &[u8]) -> u64 {
    let Ok(value) = serde_json::from_slice::<Value>(body) else { return 0 };
    let mut text = String::new();
    if let Some(choices) = value.get("choices").and_then(Value::as_array) {
        for choice in choices {
            collect_text(choice.get("message").unwrap_or(choice), &mut text);
        }
    }
    if let Some(output) = value.get("output") {
        collect_text(output, &mut text);
    }
    // Gemini's candidates; an Anthropic message's content blocks.
    if let Some(candidates) = value.get("candidates") {
        collect_text(candidates, &mut text);
    }
    if value.get("type").and_then(Value::as_str) == Some("message")
        && let Some(content) = value.get("content")
    {
        collect_text(content, &mut text);
    }
    count(&text)
}

/// Output tokens of the stream events received so far.
pub fn stream_tokens(events: &[SseEvent]) -> u64 {
    let mut text = String::new();
    for event in events {
        let Some(data) = event.data() else { continue };
        let Ok(value) = serde_json::from_slice::<Value>(&data) else { continue };
        if let Some(choices) = value.get("choices").and_then(Value::as_array) {
            for choice in choices {
                if let Some(delta) = choice.get("delta") {
                    collect_piece(delta, &mut text);
                } else if let Some(t) = choice.get("text") {
                    collect_piece(t, &mut text);
                }
            }
        }
        if let Some(candidates) = value.get("candidates") {
            collect_piece(candidates, &mut text);
        }
        let kind = value.get("type").and_then(Value::as_str);
        if matches!(kind, Some("response.output_text.delta" | "content_block_delta"))
            && let Some(delta) = value.get("delta")
        {
            collect_piece(delta, &mut text);
        }
    }
    count(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn estimate_jobs_run_off_the_calling_worker_and_shutdown_waits_for_them() {
        let estimates = Estimates::default();
        let caller = std::thread::current().id();
        let (tx, rx) = std::sync::mpsc::channel();
        let nested = estimates.clone();
        estimates.spawn(move || {
            let job_thread = std::thread::current().id();
            assert!(Estimates::on_estimate_thread());
            // Work started by a job runs in place, not as another job.
            let (inner_tx, inner_rx) = std::sync::mpsc::channel();
            nested.spawn(move || inner_tx.send(std::thread::current().id()).unwrap());
            assert_eq!(inner_rx.try_recv().unwrap(), job_thread, "a nested job runs at once, in place");
            tx.send((job_thread, prompt_tokens(br#"{"messages":[{"role":"user","content":"hello there"}]}"#))).unwrap();
        });
        estimates.wait().await;
        let (job_thread, tokens) = rx.try_recv().expect("wait returns only after the job ran");
        assert_ne!(job_thread, caller, "the job ran on another thread");
        assert!(tokens > 0);
        assert!(!Estimates::on_estimate_thread(), "the flag is set only inside jobs");

        let counted =
            Estimates::default().count(|| (std::thread::current().id(), Estimates::on_estimate_thread())).await;
        let (count_thread, flagged) = counted.unwrap();
        assert_ne!(count_thread, caller);
        assert!(flagged);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn pending_counts_the_jobs_queued_or_running_until_they_end() {
        let estimates = Estimates::at_most(1);
        assert_eq!(estimates.pending(), 0);
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Arc::new(Mutex::new(released));
        for _ in 0..3 {
            let released = released.clone();
            estimates.spawn(move || {
                let _ = released.lock().unwrap().recv();
            });
        }
        // One runs, two wait behind it on the one thread.
        assert_eq!(estimates.pending(), 3);
        release.send(()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while estimates.pending() != 2 {
            assert!(std::time::Instant::now() < deadline, "one job ended: {} pending", estimates.pending());
            tokio::task::yield_now().await;
        }
        drop(release);
        estimates.wait().await;
        assert_eq!(estimates.pending(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn no_more_jobs_run_at_once_than_allowed_and_the_rest_queue() {
        use std::sync::Mutex;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let estimates = Estimates::at_most(2);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let (go, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        for _ in 0..8 {
            let (running, most, done, gate) = (running.clone(), most.clone(), done.clone(), gate.clone());
            estimates.spawn(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                gate.lock().unwrap().recv().unwrap();
                running.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        // A counted estimate queues behind the jobs as well.
        let counted = {
            let estimates = estimates.clone();
            let (running, most) = (running.clone(), most.clone());
            tokio::spawn(async move {
                estimates
                    .count(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        running.fetch_sub(1, Ordering::SeqCst);
                        7
                    })
                    .await
            })
        };
        while running.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        for _ in 0..8 {
            go.send(()).unwrap();
        }
        assert_eq!(counted.await.unwrap(), Some(7));
        estimates.wait().await;
        assert_eq!(done.load(Ordering::SeqCst), 8, "every queued job ran");
        assert_eq!(most.load(Ordering::SeqCst), 2, "never more than two at once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_burst_of_jobs_runs_on_the_estimate_threads_alone_and_survives_a_panicking_one() {
        use std::collections::HashSet;
        let estimates = Estimates::at_most(2);
        let threads = Arc::new(Mutex::new(HashSet::new()));
        estimates.spawn(|| panic!("a job that fails"));
        for _ in 0..500 {
            let threads = threads.clone();
            estimates.spawn(move || {
                let thread = std::thread::current();
                threads.lock().unwrap().insert((thread.id(), thread.name().map(str::to_owned)));
            });
        }
        assert_eq!(estimates.count(|| 7).await, Some(7), "the queue still runs after a job panicked");
        assert_eq!(estimates.count(|| panic!("a count that fails")).await, None::<u32>);
        estimates.wait().await;
        let threads = threads.lock().unwrap();
        assert!(threads.len() <= 2, "500 jobs on {} threads", threads.len());
        assert!(threads.iter().all(|(_, name)| name.as_deref() == Some("tollgate-estimate")), "{threads:?}");
    }

    #[test]
    fn outside_a_runtime_jobs_run_in_place() {
        let (tx, rx) = std::sync::mpsc::channel();
        Estimates::default().spawn(move || tx.send(std::thread::current().id()).unwrap());
        assert_eq!(rx.try_recv().unwrap(), std::thread::current().id());
    }
    use bytes::Bytes;

    #[test]
    fn counts_message_text_not_json_syntax() {
        let body = br#"{"model":"x","messages":[{"role":"user","content":"Hello world"}]}"#;
        let n = prompt_tokens(body);
        assert!((2..=4).contains(&n), "{n}");
        assert_eq!(prompt_tokens(b"not json"), 0);
    }

    #[test]
    fn counts_gemini_and_anthropic_text() {
        let gemini = br#"{"contents":[{"role":"user","parts":[{"text":"hello there friend"}]}],"systemInstruction":{"parts":[{"text":"be brief"}]}}"#;
        assert!(prompt_tokens(gemini) >= 5);
        let anthropic = br#"{"model":"m","system":"be brief","messages":[{"role":"user","content":[{"type":"text","text":"hello there friend"}]}]}"#;
        assert!(prompt_tokens(anthropic) >= 5);
        let answer = br#"{"candidates":[{"content":{"parts":[{"text":"one two three"}]}}]}"#;
        assert!(response_tokens(answer) >= 3);
        let message = br#"{"type":"message","content":[{"type":"text","text":"one two three"}]}"#;
        assert!(response_tokens(message) >= 3);
        let mut scanner = tollgate_openai::SseScanner::new(1 << 20);
        let mut events = Vec::new();
        scanner
            .push(
                Bytes::from_static(
                    b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"one two\"}]}}]}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"three four\"}}\n\n",
                ),
                &mut events,
            )
            .unwrap();
        assert!(stream_tokens(&events) >= 4);
    }

    #[test]
    fn counts_streamed_deltas() {
        let mut scanner = tollgate_openai::SseScanner::new(1 << 20);
        let mut events = Vec::new();
        scanner
            .push(
                Bytes::from_static(
                    b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\" world\"}}]}\n\ndata: [DONE]\n\n",
                ),
                &mut events,
            )
            .unwrap();
        assert_eq!(stream_tokens(&events), count("Hello world"), "the pieces of one text, joined as they came");
        assert_eq!(stream_tokens(&[]), 0);
    }

    #[test]
    fn a_stream_of_one_token_pieces_counts_about_a_token_per_piece() {
        let mut scanner = tollgate_openai::SseScanner::new(1 << 20);
        let mut events = Vec::new();
        let pieces: Vec<String> = (0..200).map(|i| format!(" word{}", i % 7)).collect();
        let stream: String = pieces
            .iter()
            .map(|p| format!("data: {}\n\n", serde_json::json!({"choices": [{"delta": {"content": p}}]})))
            .collect();
        scanner.push(Bytes::from(stream), &mut events).unwrap();
        assert_eq!(stream_tokens(&events), count(&pieces.concat()));
    }
}
