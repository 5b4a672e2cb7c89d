//! Single-flight of fills in this process: one observer per key at a time, the others share its
//! result.
//!
//! Freshness rule: a reader may only share a flight whose observations (its database read, or
//! its cache reads while waiting for another filler) begin after the reader arrived. A flight is
//! sealed just before it observes anything; later readers join the next flight, which waits for
//! its key's turn (the observing flight to end) before it seals and observes in its turn.
//! Otherwise a reader arriving after a write's acknowledgement could be handed a row read before
//! that write.
//!
//! The turn keeps a herd cheap: readers arriving while a flight observes do not each take a
//! lease and poll for the fill; they wait together, and their flight then finds the value the
//! previous one filled (one cache read for all of them). At most two flights per key exist: the
//! observing one and the next.

use super::types::{DbError, ReadOutcome};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

pub(crate) type FlightResult = Result<ReadOutcome, DbError>;

pub(crate) struct Flight {
    sealed: AtomicBool,
    result: OnceCell<FlightResult>,
    /// Held by the flight of this key that observes; shared by its successive flights.
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Flight {
    fn new(turn: Arc<tokio::sync::Mutex<()>>) -> Self {
        Self {
            sealed: AtomicBool::new(false),
            result: OnceCell::new(),
            turn,
        }
    }
}

#[derive(Default)]
pub(crate) struct Flights {
    /// The newest flight of each key with readers.
    by_key: Mutex<HashMap<String, Arc<Flight>>>,
    /// Recent database read time in microseconds, for early refresh (XFetch's delta).
    pub(crate) recompute_us: AtomicU64,
}

impl Flights {
    /// Joins `key`'s open flight, or starts one, and returns its result: `observe` runs once per
    /// flight, in the key's turn, after the flight is sealed. Cancel-safe: a dropped observer
    /// gives its turn back, and another reader of the flight observes in its place.
    pub(crate) async fn share<F, Fut>(&self, key: &str, observe: F) -> FlightResult
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = FlightResult>,
    {
        let member = Member {
            flights: self,
            key,
            flight: Some(self.join_or_start(key)),
        };
        let flight = member.flight.as_deref().expect("a member has its flight");
        flight
            .result
            .get_or_init(|| async {
                let _turn = flight.turn.lock().await;
                flight.sealed.store(true, Ordering::SeqCst);
                observe().await
            })
            .await
            .clone()
    }

    fn join_or_start(&self, key: &str) -> Arc<Flight> {
        let mut map = self.by_key.lock().unwrap();
        let turn = match map.get(key) {
            Some(f) if !f.sealed.load(Ordering::SeqCst) => return Arc::clone(f),
            // Sealed: it observes (or is done); the next flight waits for its turn.
            Some(f) => Arc::clone(&f.turn),
            None => Arc::default(),
        };
        let f = Arc::new(Flight::new(turn));
        map.insert(key.to_string(), Arc::clone(&f));
        f
    }

    /// A reader leaves its flight (answered, or gone: its request was dropped). The key is
    /// forgotten when the last reader of its newest flight leaves, so readers that go away
    /// leave nothing behind. Every member's `Arc` is dropped here, under the lock, so that the
    /// count seen is exact.
    fn leave(&self, key: &str, flight: Arc<Flight>) {
        let mut map = self.by_key.lock().unwrap();
        let last = map.get(key).is_some_and(|f| Arc::ptr_eq(f, &flight))
            && Arc::strong_count(&flight) == 2;
        drop(flight);
        if last {
            map.remove(key);
        }
    }

    pub(crate) fn in_flight(&self, key: &str) -> bool {
        self.by_key.lock().unwrap().contains_key(key)
    }

    #[cfg(test)]
    pub(crate) fn keys(&self) -> usize {
        self.by_key.lock().unwrap().len()
    }
}

/// A reader's place in a flight, given up on drop.
struct Member<'a> {
    flights: &'a Flights,
    key: &'a str,
    flight: Option<Arc<Flight>>,
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.flight.take() {
            self.flights.leave(self.key, f);
        }
    }
}
