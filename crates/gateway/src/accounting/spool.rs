//! The durable local spool: where usage records wait while the database is
//! slow or down.
//!
//! Records are appended as JSON lines to numbered segment files and fsync'd
//! once per batch. Replay reads segments oldest first and deletes each one
//! only after all its records are in the database; inserts are idempotent, so
//! a segment replayed twice (a crash between insert and delete) counts once.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tollgate_store::UsageEvent;

/// A segment is closed once it grows past this.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    bytes: AtomicU64,
    /// The segment being appended to: its number and size.
    current: Mutex<(u64, u64)>,
}

impl Spool {
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        let segments = list_segments(dir)?;
        let bytes = segments.iter().map(|(_, p)| fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
        let next = segments.last().map_or(0, |(n, _)| n + 1);
        Ok(Self { dir: dir.to_owned(), max_bytes, bytes: AtomicU64::new(bytes), current: Mutex::new((next, 0)) })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes() == 0
    }

    pub fn is_full(&self) -> bool {
        self.bytes() >= self.max_bytes
    }

    /// Appends records and fsyncs them before returning.
    pub fn append(&self, events: &[UsageEvent]) -> std::io::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(events.len() * 512);
        for e in events {
            serde_json::to_writer(&mut buf, e)?;
            buf.push(b'\n');
        }
        let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.1 >= SEGMENT_BYTES {
            *current = (current.0 + 1, 0);
        }
        let path = segment_path(&self.dir, current.0);
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        file.write_all(&buf)?;
        file.sync_data()?;
        current.1 += buf.len() as u64;
        let total = self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed) + buf.len() as u64;
        if total * 10 >= self.max_bytes * 8 {
            tracing::warn!(bytes = total, max_bytes = self.max_bytes, "usage spool is over 80% full");
        }
        Ok(())
    }

    /// The oldest segment and its records, or `None` when the spool is empty.
    /// Lines that do not parse (a torn write at a crash) are skipped.
    pub fn oldest(&self) -> std::io::Result<Option<(PathBuf, Vec<UsageEvent>)>> {
        // Close the current segment first so appends go to a new one while
        // this one is replayed.
        {
            let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let open_path = segment_path(&self.dir, current.0);
            if open_path.exists() {
                *current = (current.0 + 1, 0);
            }
        }
        let Some((_, path)) = list_segments(&self.dir)?.into_iter().next() else { return Ok(None) };
        let reader = BufReader::new(File::open(&path)?);
        let mut events = Vec::new();
        for line in reader.lines() {
            let line = line?;
            match serde_json::from_str::<UsageEvent>(&line) {
                Ok(e) => events.push(e),
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable spool line"),
            }
        }
        Ok(Some((path, events)))
    }

    /// Appends records the database refuses to the dead-letter file
    /// (`dead-letter.jsonl` beside the segments, never replayed), fsync'd.
    /// An operator can read, fix and re-import them.
    pub fn set_aside(&self, events: &[UsageEvent]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(events.len() * 512);
        for e in events {
            serde_json::to_writer(&mut buf, e)?;
            buf.push(b'\n');
        }
        let mut file = OpenOptions::new().create(true).append(true).open(self.dead_letter_path())?;
        file.write_all(&buf)?;
        file.sync_data()
    }

    pub fn dead_letter_path(&self) -> PathBuf {
        self.dir.join("dead-letter.jsonl")
    }

    /// Deletes a segment whose records are all in the database.
    pub fn remove(&self, path: &Path) -> std::io::Result<()> {
        let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        fs::remove_file(path)?;
        self.bytes.fetch_sub(len.min(self.bytes()), Ordering::Relaxed);
        Ok(())
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.jsonl"))
}

fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut segments: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let n = name.to_str()?.strip_suffix(".jsonl")?.parse::<u64>().ok()?;
            Some((n, entry.path()))
        })
        .collect();
    segments.sort();
    Ok(segments)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn event(id: &str) -> UsageEvent {
        UsageEvent {
            id: id.into(),
            at: 1,
            request_id: "r".into(),
            tenant_id: "t".into(),
            key_id: "k".into(),
            endpoint: "/v1/chat/completions".into(),
            requested_model: "m".into(),
            upstream_model: None,
            stream: false,
            prompt_tokens: 1,
            completion_tokens: 2,
            reasoning_tokens: 0,
            cached_tokens: 0,
            total_tokens: 3,
            billed_output_tokens: 2,
            cost_micros: 4,
            estimated: false,
            unpriced: false,
            modified: false,
            status: 200,
            error_class: None,
            latency_ms: 1,
            ttft_ms: None,
            route: None,
            target: None,
            upstream: None,
            attempts: 1,
            cache_write_tokens: 0,
            api: "openai".into(),
        }
    }

    #[test]
    fn records_come_back_in_order_across_reopen_and_segments_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        spool.append(&[event("a"), event("b")]).unwrap();
        spool.append(&[event("c")]).unwrap();
        assert!(!spool.is_empty());
        drop(spool);

        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        assert!(spool.bytes() > 0, "the size survives a restart");
        let (path, events) = spool.oldest().unwrap().unwrap();
        assert_eq!(events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        spool.append(&[event("d")]).unwrap();
        spool.remove(&path).unwrap();
        let (path, events) = spool.oldest().unwrap().unwrap();
        assert_eq!(events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["d"], "later appends in a later segment");
        spool.remove(&path).unwrap();
        assert!(spool.oldest().unwrap().is_none());
        assert!(spool.is_empty());
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        spool.append(&[event("a")]).unwrap();
        let path = segment_path(dir.path(), 0);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"id":"torn","at":"#).unwrap();
        let (_, events) = spool.oldest().unwrap().unwrap();
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn fullness_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 10).unwrap();
        assert!(!spool.is_full());
        spool.append(&[event("a")]).unwrap();
        assert!(spool.is_full());
    }
}
