//! `last_used_at` without a write per request: the auth layer queues a key
//! id at most once a minute per key; a background task writes the queue in
//! one transaction.

use std::sync::Mutex;

/// Ids queued past this are dropped (last-use times are informational).
const MAX_PENDING: usize = 100_000;

#[derive(Debug, Default)]
pub struct Touches {
    pending: Mutex<Vec<String>>,
}

impl Touches {
    pub fn push(&self, id: String) {
        let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.len() < MAX_PENDING {
            pending.push(id);
        }
    }

    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Puts back ids whose write failed, to retry with the next batch.
    pub fn restore(&self, ids: Vec<String>) {
        let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let room = MAX_PENDING.saturating_sub(pending.len());
        pending.extend(ids.into_iter().take(room));
    }
}
