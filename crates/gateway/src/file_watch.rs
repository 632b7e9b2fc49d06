//! Reloading a file when it changes: the pricing file and the routes file
//! are checked every interval and put in force without a restart.

use std::path::Path;
use std::time::{Duration, SystemTime};

use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;

/// What a change is recognised by: the modification time and the size
/// (a rewrite within one timestamp tick still changes the size mostly).
pub fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Calls `reload` whenever `path` changes, checking every `every` until
/// cancelled, and counts each result (`applied` or `rejected`) in
/// `results`. A rejected file is logged; what was in force stays.
pub async fn watch<E: std::fmt::Display>(
    path: &Path,
    what: &'static str,
    every: Duration,
    results: &IntCounterVec,
    cancel: CancellationToken,
    mut reload: impl FnMut() -> Result<usize, E>,
) {
    let mut seen = stamp(path);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let now = stamp(path);
        if now == seen {
            continue;
        }
        seen = now;
        let result = match reload() {
            Ok(entries) => {
                tracing::info!(file = what, entries, "reloaded");
                "applied"
            }
            Err(e) => {
                tracing::error!(file = what, error = %e, "file refused; what was in force stays");
                "rejected"
            }
        };
        results.with_label_values(&[result]).inc();
    }
}
