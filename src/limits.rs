//! Limits per target, beside the policy they extend: how many channels may be open to one
//! target at once (`[forward] max_connections_per_target`), and how many new connections to
//! it may start per second (`[forward] connect_rate_per_target`), so that a crawl that fans
//! out cannot overwhelm a fragile database. A target is the address and port the agent
//! connects to. Nothing else slows down: a request that waits for the rate waits alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::lock;

/// Why a request was refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitHit {
    /// `[forward] max_connections_per_target`: this many open already.
    Concurrent(usize),
    /// `[forward] connect_rate_per_target`: no turn within the request's connect timeout.
    Rate(u32),
}

impl LimitHit {
    /// The metric's label and the audit trail's rule.
    pub fn reason(&self) -> &'static str {
        match self {
            LimitHit::Concurrent(_) => "max_connections_per_target",
            LimitHit::Rate(_) => "connect_rate_per_target",
        }
    }
}

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitHit::Concurrent(n) => write!(
                f,
                "{n} channels to this target are open, [forward] max_connections_per_target is {n}"
            ),
            LimitHit::Rate(n) => write!(
                f,
                "no turn within the connect timeout: [forward] connect_rate_per_target is {n} per second"
            ),
        }
    }
}

#[derive(Default)]
struct Target {
    open: usize,
    /// When the next new connection may start (the rate's schedule).
    next_start: Option<Instant>,
}

/// Every target's open channels and rate schedule, across sessions and reloads.
#[derive(Default)]
pub struct TargetLimits {
    targets: Mutex<HashMap<SocketAddr, Target>>,
}

/// An open channel counted against its target, until dropped.
pub struct Permit {
    limits: Arc<TargetLimits>,
    target: SocketAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut targets = lock(&self.limits.targets);
        if let Some(t) = targets.get_mut(&self.target) {
            t.open = t.open.saturating_sub(1);
            let idle = t.next_start.is_none_or(|n| n <= Instant::now());
            if t.open == 0 && idle {
                targets.remove(&self.target);
            }
        }
    }
}

impl TargetLimits {
    /// Count a channel to `target` (`max`: the per-target bound, 0 for none), or refuse it.
    pub fn open(self: &Arc<Self>, target: SocketAddr, max: usize) -> Result<Permit, LimitHit> {
        let mut targets = lock(&self.targets);
        let t = targets.entry(target).or_default();
        if max > 0 && t.open >= max {
            return Err(LimitHit::Concurrent(max));
        }
        t.open += 1;
        Ok(Permit {
            limits: self.clone(),
            target,
        })
    }

    /// Wait for `target`'s next turn at `per_second` new connections (0: none), but not past
    /// `deadline`. Turns are handed out in order of asking, each `1 / per_second` after the
    /// one before; a request whose turn would come after its deadline is refused at once and
    /// takes no turn.
    pub async fn pace(
        &self,
        target: SocketAddr,
        per_second: u32,
        deadline: Instant,
    ) -> Result<(), LimitHit> {
        if per_second == 0 {
            return Ok(());
        }
        let gap = Duration::from_secs(1) / per_second;
        let turn = {
            let mut targets = lock(&self.targets);
            let t = targets.entry(target).or_default();
            let now = Instant::now();
            let turn = t.next_start.map_or(now, |n| n.max(now));
            if turn > deadline {
                return Err(LimitHit::Rate(per_second));
            }
            t.next_start = Some(turn + gap);
            turn
        };
        tokio::time::sleep_until(turn).await;
        Ok(())
    }

    /// Open channels to `target` now.
    #[cfg(test)]
    pub fn open_to(&self, target: SocketAddr) -> usize {
        lock(&self.targets).get(&target).map_or(0, |t| t.open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn the_per_target_bound_counts_open_channels_of_that_target_only() {
        let l = Arc::new(TargetLimits::default());
        let held: Vec<Permit> = (0..5).map(|_| l.open(addr(1), 5).unwrap()).collect();
        assert_eq!(l.open(addr(1), 5).err(), Some(LimitHit::Concurrent(5)));
        let other = l.open(addr(2), 5).unwrap();
        assert_eq!(l.open_to(addr(1)), 5);
        drop(held);
        assert_eq!(l.open_to(addr(1)), 0);
        assert!(l.open(addr(1), 5).is_ok());
        drop(other);
        // No bound: never refused.
        let many: Vec<Permit> = (0..100).map(|_| l.open(addr(3), 0).unwrap()).collect();
        assert_eq!(many.len(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_spaces_turns_and_refuses_those_past_their_deadline() {
        let l = TargetLimits::default();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(1);
        // 4 per second: turns at 0, 250, 500, 750 ms, then 1000 ms is past a 1 s deadline?
        for i in 0..4 {
            l.pace(addr(1), 4, deadline).await.unwrap();
            assert_eq!(start.elapsed(), Duration::from_millis(250 * i));
        }
        l.pace(addr(1), 4, deadline).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(1000));
        assert_eq!(
            l.pace(addr(1), 4, start + Duration::from_millis(1100))
                .await,
            Err(LimitHit::Rate(4))
        );
        // Another target is not held up.
        let before = Instant::now();
        l.pace(addr(2), 4, before).await.unwrap();
        assert_eq!(before.elapsed(), Duration::ZERO);
    }
}
