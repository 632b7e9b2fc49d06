//! An upstream's API keys: used in turn, one the upstream refuses set aside,
//! and reread from their file when it changes, so a key rotates without a
//! restart.
//!
//! The key file holds one key per line (blank lines and `#` comments are
//! skipped). Requests take the keys round-robin. When the upstream answers
//! 401 or 403 to one key, that key is set aside (logged once, counted in
//! `tollgate_upstream_keys_set_aside_total`) for [`SET_ASIDE_FOR`] or until
//! the file changes, and the request is sent again with another key, if
//! there is one. While every key is set aside, they are used anyway: the
//! upstream's answer then reaches the operator as the gateway's 502.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::HeaderValue;

/// How long a refused key is left out.
pub const SET_ASIDE_FOR: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Key {
    header: HeaderValue,
    /// The key alone, for APIs that take it in their own header
    /// (`x-goog-api-key`, `x-api-key`).
    bare: HeaderValue,
    /// Monotonic milliseconds until which the key is set aside (0: in use).
    aside_until_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct KeySet {
    keys: Vec<Key>,
    next: AtomicUsize,
}

/// One key taken for one attempt.
#[derive(Debug, Clone)]
pub struct TakenKey {
    /// `Bearer <key>`.
    pub header: HeaderValue,
    /// `<key>`.
    pub bare: HeaderValue,
    index: usize,
    set: Arc<KeySet>,
}

#[derive(Debug)]
pub struct UpstreamKeys {
    set: ArcSwap<KeySet>,
    file: Option<PathBuf>,
    /// The file's last seen modification time and length.
    seen: std::sync::Mutex<Option<(SystemTime, u64)>>,
    set_aside: AtomicU64,
}

/// Builds the `authorization` header for one key.
fn header(key: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(&format!("Bearer {key}")).ok()?;
    // Keeps the key out of hpack tables and Debug output.
    value.set_sensitive(true);
    Some(value)
}

fn parse(text: &str) -> Result<Vec<Key>, KeyError> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|k| {
            let bare = HeaderValue::from_str(k).ok().map(|mut v| {
                v.set_sensitive(true);
                v
            });
            match (header(k), bare) {
                (Some(header), Some(bare)) => Ok(Key { header, bare, aside_until_ms: AtomicU64::new(0) }),
                _ => Err(KeyError::NotAHeader),
            }
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("an upstream key cannot be sent in an HTTP header")]
    NotAHeader,
    #[error("cannot read the upstream key file {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
}

impl UpstreamKeys {
    /// Keys from `file` (one per line), else the single `key` given.
    pub fn new(file: Option<&Path>, key: Option<&str>) -> Result<Self, KeyError> {
        let keys = match file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| KeyError::File { path: path.to_owned(), source })?;
                parse(&text)?
            }
            None => key.map(parse).transpose()?.unwrap_or_default(),
        };
        Ok(Self {
            set: ArcSwap::from_pointee(KeySet { keys, next: AtomicUsize::new(0) }),
            file: file.map(Path::to_owned),
            seen: std::sync::Mutex::new(file.and_then(crate::file_watch::stamp)),
            set_aside: AtomicU64::new(0),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.set.load().keys.is_empty()
    }

    /// Keys set aside since start.
    pub fn set_aside_count(&self) -> u64 {
        self.set_aside.load(Ordering::Relaxed)
    }

    /// The next key in turn that is not set aside (any key when all are),
    /// or `None` when there is no key.
    pub fn take(&self, now_ms: u64) -> Option<TakenKey> {
        self.take_other(now_ms, None)
    }

    /// Like [`take`](Self::take), avoiding the key `not` when another exists.
    pub fn take_other(&self, now_ms: u64, not: Option<&TakenKey>) -> Option<TakenKey> {
        let set = self.set.load_full();
        let n = set.keys.len();
        if n == 0 {
            return None;
        }
        let start = set.next.fetch_add(1, Ordering::Relaxed);
        let excluded = not.filter(|k| Arc::ptr_eq(&k.set, &set)).map(|k| k.index);
        let usable = |i: usize| set.keys[i].aside_until_ms.load(Ordering::Relaxed) <= now_ms && Some(i) != excluded;
        let index = (0..n).map(|o| (start + o) % n).find(|i| usable(*i)).or_else(|| {
            // Every other key is set aside: one not excluded, else any.
            (0..n).map(|o| (start + o) % n).find(|i| Some(*i) != excluded).or(Some(start % n))
        })?;
        Some(TakenKey { header: set.keys[index].header.clone(), bare: set.keys[index].bare.clone(), index, set })
    }

    /// Whether there is a key other than `key` that is not set aside.
    pub fn has_other(&self, key: &TakenKey, now_ms: u64) -> bool {
        let set = self.set.load();
        set.keys.iter().enumerate().any(|(i, k)| {
            (i != key.index || !Arc::ptr_eq(&key.set, &set)) && k.aside_until_ms.load(Ordering::Relaxed) <= now_ms
        })
    }

    /// The upstream refused `key`: leave it out for a while.
    pub fn set_aside(&self, key: &TakenKey, now_ms: u64) {
        let until = now_ms.saturating_add(u64::try_from(SET_ASIDE_FOR.as_millis()).unwrap_or(u64::MAX));
        if let Some(k) = key.set.keys.get(key.index)
            && k.aside_until_ms.swap(until, Ordering::Relaxed) <= now_ms
        {
            self.set_aside.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                key_number = key.index + 1,
                "the upstream refused one of its keys (401/403); it is set aside for ten minutes or until the key file changes"
            );
        }
    }

    /// Rereads the key file if it changed; `Ok(Some(n))` with the number of
    /// keys when it did. A file that cannot be read or parsed leaves the
    /// keys in force.
    pub fn reload_if_changed(&self) -> Result<Option<usize>, KeyError> {
        let Some(path) = &self.file else { return Ok(None) };
        let now = crate::file_watch::stamp(path);
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if now == *seen {
            return Ok(None);
        }
        *seen = now;
        drop(seen);
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::File { path: path.to_owned(), source })?;
        let keys = parse(&text)?;
        let n = keys.len();
        if n > 0 {
            self.set.store(Arc::new(KeySet { keys, next: AtomicUsize::new(0) }));
        }
        Ok(Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> UpstreamKeys {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, text).unwrap();
        UpstreamKeys::new(Some(&path), None).unwrap()
    }

    fn bearer(k: &TakenKey) -> String {
        k.header.to_str().unwrap().to_owned()
    }

    #[test]
    fn keys_are_used_in_turn_and_a_refused_one_is_set_aside() {
        let k = keys("# the pool\nsk-a\n\nsk-b\nsk-c\n");
        let taken: Vec<String> = (0..3).map(|_| bearer(&k.take(0).unwrap())).collect();
        assert_eq!(taken, ["Bearer sk-a", "Bearer sk-b", "Bearer sk-c"]);
        let b = k.take(0).unwrap();
        assert_eq!(bearer(&b), "Bearer sk-a");
        k.set_aside(&b, 1_000);
        for _ in 0..6 {
            assert_ne!(bearer(&k.take(1_000).unwrap()), "Bearer sk-a");
        }
        assert_eq!(k.set_aside_count(), 1);
        let after = 1_000 + SET_ASIDE_FOR.as_millis() as u64;
        assert!((0..3).any(|_| bearer(&k.take(after).unwrap()) == "Bearer sk-a"), "back after a while");
    }

    #[test]
    fn a_changed_file_is_reread_and_an_unreadable_one_keeps_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "sk-old\n").unwrap();
        let k = UpstreamKeys::new(Some(&path), None).unwrap();
        assert_eq!(k.reload_if_changed().unwrap(), None, "unchanged");
        std::fs::write(&path, "sk-new-1\nsk-new-2\n").unwrap();
        assert_eq!(k.reload_if_changed().unwrap(), Some(2));
        assert!(bearer(&k.take(0).unwrap()).starts_with("Bearer sk-new"));
        std::fs::remove_file(&path).unwrap();
        assert!(k.reload_if_changed().is_err());
        assert!(bearer(&k.take(0).unwrap()).starts_with("Bearer sk-new"), "the keys in force stay");
    }

    #[test]
    fn another_key_is_offered_for_a_retry() {
        let k = keys("sk-a\nsk-b\n");
        let first = k.take(0).unwrap();
        assert!(k.has_other(&first, 0));
        let other = k.take_other(0, Some(&first)).unwrap();
        assert_ne!(bearer(&other), bearer(&first));
        let single = keys("sk-only\n");
        let only = single.take(0).unwrap();
        assert!(!single.has_other(&only, 0));
    }
}
