//! The tokio runtime the sidecar runs on, sized by the CPU it is given.
//!
//! Workers: `TOKIO_WORKER_THREADS` if set, else `std::thread::available_parallelism`, which on
//! Linux follows the container's CPU limit (the cgroup's `cpu.max` quota, rounded down, at least
//! one). The injected sidecar's default limit is one CPU, so in a pod this is usually one.
//!
//! One worker gets tokio's current-thread scheduler, not a multi-thread one with one worker.
//! The difference is the order tasks run in, and it decides how many Redis commands share a
//! write: a hit's task hands its `GET` to the Redis connection's task and waits. The
//! multi-thread scheduler runs the task just woken first (its LIFO slot), so the connection
//! sends each command alone, one `writev` and one Redis read per hit. The current-thread
//! scheduler queues it behind the other requests that were ready, so their commands go out in
//! one write and their replies come back in one read. Measured on 2 cores, 16 connections: Redis
//! CPU per hit about 1.1x the in-process library's instead of 1.8x, the sidecar's own CPU per
//! hit down a tenth, peak hits up a sixth, latency at fixed rates unchanged (docs/benchmarks.md,
//! "One worker: the current-thread scheduler", has the figures). With two or more workers the
//! multi-thread scheduler, and one Redis write per hit, come back.

use std::io;
use tokio::runtime::{Builder, Runtime};

/// How the runtime was built, for the startup log and `wtc_runtime_workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub workers: usize,
}

impl Shape {
    /// The shape for the CPU this process may use.
    pub fn for_this_process() -> Self {
        Self::of(workers_wanted())
    }

    fn of(workers: usize) -> Self {
        Self {
            workers: workers.max(1),
        }
    }

    /// One worker runs on the current-thread scheduler (the module's header says why).
    pub fn current_thread(self) -> bool {
        self.workers == 1
    }

    pub fn build(self) -> io::Result<Runtime> {
        let mut b = if self.current_thread() {
            Builder::new_current_thread()
        } else {
            let mut b = Builder::new_multi_thread();
            b.worker_threads(self.workers);
            b
        };
        b.enable_all().build()
    }
}

/// `TOKIO_WORKER_THREADS` as tokio reads it (a positive integer), else the CPUs available.
fn workers_wanted() -> usize {
    if let Ok(s) = std::env::var("TOKIO_WORKER_THREADS") {
        match s.trim().parse::<usize>() {
            Ok(n) if n > 0 => return n,
            _ => {
                tracing::warn!(value = %s, "TOKIO_WORKER_THREADS is not a positive integer; ignored")
            }
        }
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_is_the_current_thread_scheduler() {
        assert_eq!(Shape::of(1), Shape { workers: 1 });
        assert!(Shape::of(1).current_thread());
        assert_eq!(Shape::of(0).workers, 1);
        assert!(!Shape::of(2).current_thread());
        let rt = Shape::of(1).build().unwrap();
        assert_eq!(rt.metrics().num_workers(), 1);
        assert_eq!(
            rt.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread
        );
        let rt = Shape::of(3).build().unwrap();
        assert_eq!(rt.metrics().num_workers(), 3);
    }
}
