//! Counts of open channels (all of them, and each session's own) that can be waited on until
//! they reach zero: a retiring session and the shutdown drain wait on them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// A count that can be waited on until it reaches zero (open channels, globally or per session).
#[derive(Default)]
pub struct OpenCount {
    count: AtomicUsize,
    zero: Notify,
}

impl OpenCount {
    pub fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub async fn wait_zero(&self) {
        loop {
            let notified = self.zero.notified();
            if self.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Holds one unit of each gauge while a channel is open.
pub struct OpenGuard(Vec<Arc<OpenCount>>);

impl OpenGuard {
    pub fn new(gauges: Vec<Arc<OpenCount>>) -> Self {
        for g in &gauges {
            g.count.fetch_add(1, Ordering::AcqRel);
        }
        OpenGuard(gauges)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        for g in &self.0 {
            if g.count.fetch_sub(1, Ordering::AcqRel) == 1 {
                g.zero.notify_waiters();
            }
        }
    }
}
