//! Single-flight of fills in this process: one filler per key, the others share its result.
//!
//! Freshness rule: a reader may only share a flight whose observations (its database read, or
//! its cache reads while waiting for another filler) begin after the reader arrived. A flight is
//! sealed just before it observes anything; later readers start a new one. Otherwise a reader
//! arriving after a write's acknowledgement could be handed a row read before that write.

use super::types::{DbError, ReadOutcome};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

pub(crate) type FlightResult = Result<ReadOutcome, DbError>;

#[derive(Default)]
pub(crate) struct Flight {
    sealed: AtomicBool,
    pub(crate) result: OnceCell<FlightResult>,
}

impl Flight {
    pub(crate) fn seal(&self) {
        self.sealed.store(true, Ordering::SeqCst);
    }
}

#[derive(Default)]
pub(crate) struct Flights {
    by_key: Mutex<HashMap<String, Arc<Flight>>>,
    /// Recent database read time in microseconds, for early refresh (XFetch's delta).
    pub(crate) recompute_us: AtomicU64,
}

impl Flights {
    pub(crate) fn join_or_start(&self, key: &str) -> Arc<Flight> {
        let mut map = self.by_key.lock().unwrap();
        match map.get(key) {
            Some(f) if !f.sealed.load(Ordering::SeqCst) => Arc::clone(f),
            _ => {
                let f = Arc::new(Flight::default());
                map.insert(key.to_string(), Arc::clone(&f));
                f
            }
        }
    }

    pub(crate) fn finish(&self, key: &str, flight: &Arc<Flight>) {
        let mut map = self.by_key.lock().unwrap();
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
        }
    }

    pub(crate) fn in_flight(&self, key: &str) -> bool {
        self.by_key.lock().unwrap().contains_key(key)
    }
}
