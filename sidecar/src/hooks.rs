//! Hold points: places in the read and write paths where a test can stop one request, do
//! something else (a write, an eviction), and let it go on. This is how the races of the design
//! are made to happen on purpose. Compiled only with the `test-hooks` feature; without it every
//! hold is an empty inline function.

/// After a filler read the database, before its fill reaches Redis.
pub const FILL_BEFORE_STORE: &str = "fill.before_store";
/// After a write committed, before its cache step.
pub const WRITE_BEFORE_CACHE_STEP: &str = "write.before_cache_step";

#[cfg(not(feature = "test-hooks"))]
#[derive(Default)]
pub struct Hooks {
    _none: (),
}

#[cfg(not(feature = "test-hooks"))]
impl Hooks {
    #[inline(always)]
    pub async fn hold(&self, _point: &'static str, _entity: &str, _key: &str) {}
}

#[cfg(feature = "test-hooks")]
pub use armed::Hooks;

#[cfg(feature = "test-hooks")]
mod armed {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::sync::watch;

    struct Hold {
        point: String,
        target: String,
        taken: bool,
        release_after: Option<std::time::Duration>,
        reached: watch::Sender<bool>,
        released: watch::Sender<bool>,
    }

    /// Armed holds, by id. Each one stops the first request that reaches its point for its key.
    #[derive(Default)]
    pub struct Hooks {
        next: AtomicU64,
        holds: Mutex<HashMap<u64, Hold>>,
    }

    impl Hooks {
        /// `release_after`: let the request go by itself after that long (for tests that cannot
        /// call back, e.g. once the server stopped accepting connections).
        pub fn arm(
            &self,
            point: &str,
            entity: &str,
            key: &str,
            release_after: Option<std::time::Duration>,
        ) -> u64 {
            let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
            let hold = Hold {
                point: point.to_string(),
                target: format!("{entity}/{key}"),
                taken: false,
                release_after,
                reached: watch::channel(false).0,
                released: watch::channel(false).0,
            };
            self.holds.lock().unwrap().insert(id, hold);
            id
        }

        pub async fn hold(&self, point: &'static str, entity: &str, key: &str) {
            let target = format!("{entity}/{key}");
            let (mut released, release_after) = {
                let mut holds = self.holds.lock().unwrap();
                let Some(h) = holds
                    .values_mut()
                    .find(|h| !h.taken && h.point == point && h.target == target)
                else {
                    return;
                };
                h.taken = true;
                h.reached.send_replace(true);
                (h.released.subscribe(), h.release_after)
            };
            match release_after {
                Some(after) => {
                    let _ = tokio::time::timeout(after, released.wait_for(|r| *r)).await;
                }
                None => {
                    let _ = released.wait_for(|r| *r).await;
                }
            }
        }

        /// Waits until a request is held at hold `id`; false after `timeout` or for an unknown id.
        pub async fn wait_reached(&self, id: u64, timeout: std::time::Duration) -> bool {
            let rx = self
                .holds
                .lock()
                .unwrap()
                .get(&id)
                .map(|h| h.reached.subscribe());
            let Some(mut rx) = rx else { return false };
            matches!(
                tokio::time::timeout(timeout, rx.wait_for(|r| *r)).await,
                Ok(Ok(_))
            )
        }

        pub fn release(&self, id: u64) -> bool {
            match self.holds.lock().unwrap().remove(&id) {
                Some(h) => {
                    h.released.send_replace(true);
                    true
                }
                None => false,
            }
        }
    }
}
