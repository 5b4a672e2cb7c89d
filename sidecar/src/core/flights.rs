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
//! observing one and the next. A key is remembered while any reader of any of its flights is
//! there (the observer is one), so its turn is never replaced under a flight that observes.

use super::types::{DbError, ReadOutcome};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

pub(crate) type FlightResult = Result<ReadOutcome, DbError>;

struct Flight {
    sealed: AtomicBool,
    result: OnceCell<FlightResult>,
    /// Held by the flight of this key that observes; shared by its successive flights.
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Flight {
    fn new(turn: Arc<tokio::sync::Mutex<()>>) -> Arc<Self> {
        Arc::new(Self {
            sealed: AtomicBool::new(false),
            result: OnceCell::new(),
            turn,
        })
    }
}

/// The flights of one key.
struct KeyFlights {
    newest: Arc<Flight>,
    /// Readers of all this key's flights.
    readers: usize,
}

impl KeyFlights {
    /// A first flight with its first reader.
    fn new() -> Self {
        Self {
            newest: Flight::new(Arc::default()),
            readers: 1,
        }
    }
}

#[derive(Default)]
pub(crate) struct Flights {
    by_key: Mutex<HashMap<String, KeyFlights>>,
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
        let flight = self.join(key);
        self.fly(key, &flight, observe).await
    }

    /// Starts a flight only if `key` has none (an early refresh: a flight in progress renews
    /// the entry anyway); `None` when it has one.
    pub(crate) async fn share_if_idle<F, Fut>(&self, key: &str, observe: F) -> Option<FlightResult>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = FlightResult>,
    {
        let flight = self.start_if_idle(key)?;
        Some(self.fly(key, &flight, observe).await)
    }

    /// A reader of `flight` (counted when it joined) until it returns or is dropped.
    async fn fly<F, Fut>(&self, key: &str, flight: &Flight, observe: F) -> FlightResult
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = FlightResult>,
    {
        let _member = Member { flights: self, key };
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

    /// A reader joins the key's open flight, or the next one (after a sealed flight), or starts
    /// the key's first.
    fn join(&self, key: &str) -> Arc<Flight> {
        let mut map = self.by_key.lock().unwrap();
        match map.entry(key.to_string()) {
            Entry::Vacant(v) => Arc::clone(&v.insert(KeyFlights::new()).newest),
            Entry::Occupied(mut o) => {
                let k = o.get_mut();
                k.readers += 1;
                if k.newest.sealed.load(Ordering::SeqCst) {
                    // It observes (or is done): the next flight waits for its turn.
                    k.newest = Flight::new(Arc::clone(&k.newest.turn));
                }
                Arc::clone(&k.newest)
            }
        }
    }

    /// The key's first flight, unless it has one.
    fn start_if_idle(&self, key: &str) -> Option<Arc<Flight>> {
        let mut map = self.by_key.lock().unwrap();
        match map.entry(key.to_string()) {
            Entry::Vacant(v) => Some(Arc::clone(&v.insert(KeyFlights::new()).newest)),
            Entry::Occupied(_) => None,
        }
    }

    /// A reader leaves (answered, or gone: its request was dropped); the key is forgotten with
    /// its last reader, so readers that go away leave nothing behind.
    fn leave(&self, key: &str) {
        let mut map = self.by_key.lock().unwrap();
        if let Some(k) = map.get_mut(key) {
            k.readers -= 1;
            if k.readers == 0 {
                map.remove(key);
            }
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

/// A reader's place among a key's readers, given up on drop.
struct Member<'a> {
    flights: &'a Flights,
    key: &'a str,
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        self.flights.leave(self.key);
    }
}
