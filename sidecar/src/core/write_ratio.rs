//! The write ratio over a sliding window: writes / all operations in the last
//! `sampler.write_ratio_window_seconds`, in one-second buckets. Recording is a few atomic
//! operations (no lock on the request path); a bucket is reset by the first operation of a new
//! second, and an operation racing that reset may be lost, which a ratio can afford.
//!
//! When the ratio stays above [`WARN_ABOVE`] for a whole window, write-through pays a cache step
//! for writes that are rarely read back: write-behind would serve better. A warning says so, at
//! most once per [`WARN_EVERY_SECONDS`].
//!
//! Times are whole seconds from an origin the caller chooses (the process start), so the logic is
//! tested with an injected clock.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// The seed's 20-30 % threshold, upper end.
pub const WARN_ABOVE: f64 = 0.3;
pub const WARN_EVERY_SECONDS: u64 = 60;

struct Bucket {
    /// The second this bucket counts, plus one (0: never used).
    second: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
}

pub struct WriteRatio {
    buckets: Vec<Bucket>,
    state: Mutex<WarnState>,
}

#[derive(Default)]
struct WarnState {
    /// Since when (second) the ratio has been above the threshold at every tick.
    above_since: Option<u64>,
    last_warning: Option<u64>,
}

impl WriteRatio {
    pub fn new(window_seconds: u64) -> Self {
        Self {
            buckets: (0..window_seconds.max(1))
                .map(|_| Bucket {
                    second: AtomicU64::new(0),
                    reads: AtomicU64::new(0),
                    writes: AtomicU64::new(0),
                })
                .collect(),
            state: Mutex::new(WarnState::default()),
        }
    }

    pub fn window_seconds(&self) -> u64 {
        self.buckets.len() as u64
    }

    /// One operation at second `now`.
    pub fn record(&self, now: u64, write: bool) {
        let b = &self.buckets[(now % self.window_seconds()) as usize];
        let tag = now + 1;
        let seen = b.second.load(Ordering::Acquire);
        if seen != tag
            && seen < tag
            && b.second
                .compare_exchange(seen, tag, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.reads.store(0, Ordering::Release);
            b.writes.store(0, Ordering::Release);
        }
        let counter = if write { &b.writes } else { &b.reads };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (reads, writes) in the window ending at second `now`.
    pub fn counts(&self, now: u64) -> (u64, u64) {
        let oldest = (now + 1).saturating_sub(self.window_seconds());
        self.buckets
            .iter()
            .filter(|b| {
                let tag = b.second.load(Ordering::Acquire);
                tag > oldest && tag <= now + 1
            })
            .fold((0, 0), |(r, w), b| {
                (
                    r + b.reads.load(Ordering::Relaxed),
                    w + b.writes.load(Ordering::Relaxed),
                )
            })
    }

    /// Writes / all operations in the window ending at `now` (0 without operations).
    pub fn ratio(&self, now: u64) -> f64 {
        match self.counts(now) {
            (0, 0) => 0.0,
            (r, w) => w as f64 / (r + w) as f64,
        }
    }

    /// Called about once a second: whether to warn now (the ratio has stayed above
    /// [`WARN_ABOVE`] for a whole window, and no warning in the last [`WARN_EVERY_SECONDS`]).
    pub fn tick(&self, now: u64) -> Option<f64> {
        let ratio = self.ratio(now);
        let mut s = self.state.lock().unwrap();
        if ratio <= WARN_ABOVE {
            s.above_since = None;
            return None;
        }
        let since = *s.above_since.get_or_insert(now);
        let whole_window = now.saturating_sub(since) + 1 >= self.window_seconds();
        let quiet = s
            .last_warning
            .is_none_or(|at| now.saturating_sub(at) >= WARN_EVERY_SECONDS);
        if whole_window && quiet {
            s.last_warning = Some(now);
            Some(ratio)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(w: &WriteRatio, now: u64, reads: u64, writes: u64) {
        (0..reads).for_each(|_| w.record(now, false));
        (0..writes).for_each(|_| w.record(now, true));
    }

    #[test]
    fn ratio_covers_only_the_window() {
        let w = WriteRatio::new(10);
        assert_eq!(w.ratio(0), 0.0);
        ops(&w, 0, 0, 10); // only writes at second 0
        assert_eq!(w.ratio(0), 1.0);
        ops(&w, 5, 10, 0);
        assert_eq!(w.counts(5), (10, 10));
        assert_eq!(w.ratio(9), 0.5);
        // Second 0 has left the window at second 10.
        assert_eq!(w.counts(10), (10, 0));
        assert_eq!(w.ratio(10), 0.0);
        // Second 15 reuses second 5's bucket: the old counts are gone.
        ops(&w, 15, 1, 3);
        assert_eq!(w.counts(15), (1, 3));
        assert_eq!(w.ratio(15), 0.75);
        // Nothing for a whole window: empty.
        assert_eq!(w.counts(40), (0, 0));
    }

    #[test]
    fn warns_only_after_a_whole_window_above_and_then_once_a_minute() {
        let w = WriteRatio::new(5);
        // 40 % writes from second 100 on.
        let mut warnings = vec![];
        for now in 100..300 {
            ops(&w, now, 6, 4);
            if let Some(r) = w.tick(now) {
                warnings.push((now, r));
            }
        }
        let at: Vec<u64> = warnings.iter().map(|(t, _)| *t).collect();
        assert_eq!(at, vec![104, 164, 224, 284]);
        assert!((warnings[0].1 - 0.4).abs() < 1e-9);

        // Dipping below the threshold restarts the count.
        let w = WriteRatio::new(5);
        for now in 0..4 {
            ops(&w, now, 1, 1);
            assert_eq!(w.tick(now), None);
        }
        ops(&w, 4, 100, 0); // the window's ratio drops to 4/108
        assert_eq!(w.tick(4), None);
        for now in 5..9 {
            ops(&w, now, 0, 50);
            assert_eq!(w.tick(now), None, "at {now}");
        }
        ops(&w, 9, 0, 50);
        assert!(w.tick(9).is_some());
    }

    #[test]
    fn low_ratio_never_warns() {
        let w = WriteRatio::new(3);
        for now in 0..200 {
            ops(&w, now, 8, 2);
            assert_eq!(w.tick(now), None);
        }
        assert!((w.ratio(199) - 0.2).abs() < 1e-9);
    }
}
