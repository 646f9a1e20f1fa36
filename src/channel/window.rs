//! A channel's receive window, re-opened as its target takes the data (SSH flow control as
//! RFC 4254 means it), not as the data arrives: a slow target then paces its own channel at
//! the server, and nothing else. russh does the latter by itself; the agent runs it with
//! `Config::manual_window_adjust` (vendor/russh.patch) and grants here.
//!
//! The window is what the server may have sent and we not yet delivered: data in flight on
//! the path, plus the channel's backlog here. As OpenSSH's client does, consumed bytes are
//! granted back once `GRANT_STEP` of them add up, or once less than half the window is left,
//! so the whole window stays in flight on a long path. The window starts at `SSH_WINDOW_SIZE`
//! (or `max_pending`, if smaller: see [`initial_window`]) and grows (doubling, up to the channel's `max_pending`) while it is what bounds the
//! channel, as Linux sizes a TCP receive buffer: in a round trip the target took at least
//! three quarters of the window and kept up (less than a quarter of it waiting: data arrives
//! in the transport's 256 KiB batches, so an eighth of a 2 MiB window was too tight and the
//! window grew in one 100 ms run and not in the next). On loopback a round trip never
//! carries that much, so the window stays OpenSSH's. A channel's backlog thus stays within
//! its window, and so within `max_pending`, in memory: a server that keeps to the windows
//! never fills a spill file (it remains for one that does not, and for channels whose
//! `max_pending` a reload lowered below their session's initial window).

use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::client::WindowAdjuster;
use russh::ChannelId;

use crate::constants::{GRANT_STEP, SSH_WINDOW_SIZE};
use crate::session::SessionShared;

/// The window a session's channels start with: OpenSSH's 2 MiB, or `max_pending` if smaller,
/// so that a channel's backlog never passes `max_pending`.
pub fn initial_window(max_pending: u64) -> u32 {
    u32::try_from(max_pending).map_or(SSH_WINDOW_SIZE, |m| m.min(SSH_WINDOW_SIZE))
}

/// A channel's window, re-opened through the session (see the module comment).
pub struct Window {
    adjuster: WindowAdjuster,
    id: ChannelId,
    grants: Grants,
    /// For the path's round trip as the session knows it now: its first estimate (the
    /// forward request's, often twice the path's) is refined by probes while channels run,
    /// and a window sized on a round trip twice too long grows twice too far.
    session: Arc<SessionShared>,
}

impl Window {
    /// `max`: the channel's `max_pending`; the session gives the initial window.
    pub fn new(
        adjuster: WindowAdjuster,
        id: ChannelId,
        session: Arc<SessionShared>,
        max: u64,
    ) -> Window {
        Window {
            adjuster,
            id,
            grants: Grants::new(session.initial_window, max),
            session,
        }
    }

    /// The target took `n` bytes; `backlog` still wait for it (memory and spill file).
    pub fn consumed(&mut self, n: u64, backlog: u64) {
        let flight = &self.session.flight;
        if let Some(grant) = self.grants.grant(n, backlog, || flight.rtt(), Instant::now) {
            // The session may be gone; its channels end with it.
            let _ = self
                .adjuster
                .adjust(self.id, u32::try_from(grant).unwrap_or(u32::MAX));
        }
    }
}

/// When to grant, and how much (see the module comment).
struct Grants {
    /// What the server may have sent and the target not yet taken, after the last grant.
    size: u64,
    /// `size` grows to this at most.
    max: u64,
    /// Consumed and not yet granted back.
    owed: u64,
    /// Bytes taken by the target since `since`.
    taken: u64,
    since: Instant,
}

impl Grants {
    fn new(initial: u32, max: u64) -> Grants {
        let size = u64::from(initial);
        Grants {
            size,
            max: max.max(size),
            owed: 0,
            taken: 0,
            since: Instant::now(),
        }
    }

    /// How much to grant now, if anything. The session's round trip (`rtt`: it is refined
    /// while channels run) and the clock are read only when a grant is due (this runs for
    /// every write to the target).
    fn grant(
        &mut self,
        n: u64,
        backlog: u64,
        rtt: impl FnOnce() -> Option<Duration>,
        now: impl FnOnce() -> Instant,
    ) -> Option<u64> {
        self.owed += n;
        self.taken += n;
        // What the server may still send or have in flight: the window less what waits here
        // and what the target took since the last grant.
        let left = self.size.saturating_sub(backlog + self.owed);
        if self.owed == 0 || (self.owed < GRANT_STEP && left >= self.size / 2) {
            return None;
        }
        let mut grant = std::mem::take(&mut self.owed);
        if let Some(rtt) = rtt().filter(|d| !d.is_zero()) {
            let now = now();
            let elapsed = now.saturating_duration_since(self.since);
            if elapsed >= rtt {
                let per_rtt = u128::from(self.taken) * rtt.as_nanos() / elapsed.as_nanos();
                let bound = per_rtt >= u128::from(self.size) * 3 / 4 && backlog < self.size / 4;
                if bound && self.size < self.max {
                    let more = self.size.min(self.max - self.size);
                    self.size += more;
                    grant += more;
                    log::debug!(
                        "a channel's window grows to {} KiB: a round trip of {rtt:?} carried {} KiB",
                        self.size >> 10,
                        per_rtt >> 10
                    );
                }
                self.since = now;
                self.taken = 0;
            }
        }
        Some(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(max: u64) -> Grants {
        Grants::new(initial_window(max), max)
    }

    #[test]
    fn the_initial_window_is_openssh_s_within_max_pending() {
        assert_eq!(initial_window(8 << 20), SSH_WINDOW_SIZE);
        assert_eq!(initial_window(64 << 10), 64 << 10);
        assert_eq!(initial_window(u64::MAX), SSH_WINDOW_SIZE);
    }

    #[test]
    fn consumed_bytes_are_granted_back_in_steps() {
        let mut w = window(8 << 20);
        let now = Instant::now();
        // A target that keeps up: nothing waits, grants come every GRANT_STEP.
        assert_eq!(w.grant(GRANT_STEP - 1, 0, || None, || now), None);
        assert_eq!(w.grant(1, 0, || None, || now), Some(GRANT_STEP));
        assert_eq!(w.grant(1000, 0, || None, || now), None);
    }

    #[test]
    fn a_window_half_used_up_is_granted_whatever_is_owed() {
        let mut w = window(8 << 20);
        let size = w.size;
        // Little consumed, but most of the window waits here: grant what was taken.
        assert_eq!(w.grant(100, size / 2 + 1, || None, Instant::now), Some(100));
    }

    #[test]
    fn a_slow_target_gets_no_more_than_it_takes() {
        let rtt = Duration::from_millis(40);
        let mut w = window(8 << 20);
        let size = w.size;
        let mut now = Instant::now();
        // The backlog is most of the window: grants equal consumption, the window never
        // grows, however fast the bytes go.
        for _ in 0..100 {
            now += rtt;
            assert_eq!(
                w.grant(size, size - GRANT_STEP, || Some(rtt), || now),
                Some(size)
            );
        }
        assert_eq!(w.size, size);
    }

    #[test]
    fn the_window_grows_while_it_bounds_a_long_path_up_to_the_bound() {
        let rtt = Duration::from_millis(40);
        let mut w = window(8 << 20);
        let size = w.size;
        let mut now = Instant::now();
        // Half a window per round trip: not what bounds the channel.
        now += rtt;
        assert_eq!(w.grant(size / 2, 0, || Some(rtt), || now), Some(size / 2));
        assert_eq!(w.size, size);
        // A whole window per round trip, nothing waiting: doubles, granting the growth too.
        now += rtt;
        assert_eq!(w.grant(size, 0, || Some(rtt), || now), Some(2 * size));
        assert_eq!(w.size, 2 * size);
        for _ in 0..10 {
            now += rtt;
            let s = w.size;
            w.grant(s, 0, || Some(rtt), || now);
        }
        assert_eq!(w.size, 8 << 20);
        // No round trip known (or loopback, where a round trip never carries a window):
        // never grows.
        let mut short = window(8 << 20);
        short.grant(size, 0, || None, || now + rtt);
        assert_eq!(short.size, size);
    }
}
