//! Load shedding: at most `limits.max_in_flight` requests are served at once; a request waits
//! for a slot at most `limits.max_queue_wait_ms`, and at most `max_in_flight` requests wait, so
//! an overload costs bounded memory and is answered `503 overloaded` within milliseconds.

use crate::core::Metrics;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Admission {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    max_wait: Duration,
}

/// Counts a waiting request, also when its client hangs up while it waits.
struct Waiting<'a>(&'a Admission, &'a Metrics);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.1.requests_waiting.dec();
    }
}

impl Admission {
    pub fn new(max_in_flight: usize, max_wait: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_in_flight)),
            waiting: AtomicUsize::new(0),
            max_waiting: max_in_flight,
            max_wait,
        }
    }

    /// A slot, held until the permit is dropped; `None`: shed the request.
    pub async fn admit(&self, metrics: &Metrics) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = Arc::clone(&self.slots).try_acquire_owned() {
            return Some(p);
        }
        let permit = match self.enqueue(metrics) {
            Some(_waiting) => {
                tokio::time::timeout(self.max_wait, Arc::clone(&self.slots).acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            None => None,
        };
        if permit.is_none() {
            metrics.requests_shed.inc();
        }
        permit
    }

    /// A place in the queue, if waiting is allowed and the queue is not full.
    fn enqueue<'a>(&'a self, metrics: &'a Metrics) -> Option<Waiting<'a>> {
        if self.max_wait.is_zero() {
            return None;
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        metrics.requests_waiting.inc();
        Some(Waiting(self, metrics))
    }
}
