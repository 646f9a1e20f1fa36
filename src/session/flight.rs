//! Data sent towards the server that the server has not yet passed on ("in flight"), and a
//! budget for it while small exchanges are under way, so that bulk data never queues far
//! ahead of a small reply.
//!
//! The server re-opens a channel's window (SSH_MSG_CHANNEL_WINDOW_ADJUST) as it writes the
//! channel's data out to its client, so the initial window less the remaining one is what the
//! channel has in flight: in russh's queue, our transport, the kernel's buffers, the network
//! and the server's receive queue. All of it is one byte stream, so a reply on one channel
//! waits behind everything in flight on all the others. Left to the windows alone, two bulk
//! channels keep up to two 2 MiB windows in flight, and a ping beside them waited 2-3 ms
//! (docs/performance.md).
//!
//! A lone bulk channel needs about 1 MiB in flight here to run at full speed, more than a
//! reply should wait behind. So the budget applies only while small exchanges are under way
//! (a reply shorter than `SMALL_READ` went to the server within `FLIGHT_INTERACTIVE_HOLD`),
//! as OpenSSH marks interactive traffic apart from bulk: then all channels together keep at
//! most what one round trip carries at `FLIGHT_RATE`, but at least `FLIGHT_BUDGET_MIN`, in
//! flight. The round trip keeps the budget from slowing a long path (2 ms or more: the whole
//! window). A channel with less than `FLIGHT_FREE` in flight may always send, so a reply
//! never waits for the budget and every channel keeps moving; one at or above it waits for
//! the server to pass some of its own data on. So a reply waits behind at most the budget,
//! `FLIGHT_FREE` and a packet per channel.
//!
//! russh tells a channel neither its initial window nor how much each adjustment added, only
//! the remaining window after it (`Handler::window_adjusted`). The session takes the largest
//! remaining window any channel reported as the initial one; that is never more than the true
//! one, so the estimate errs towards letting data go. Before its first adjustment everything a
//! channel sent is in flight. A server that adjusts late (some adjust only once half the
//! window is used) would leave a waiting channel without an adjustment: a channel that waits
//! `FLIGHT_ACK_WAIT` without one doubles what it may always have in flight (a client that
//! reads slowly looks the same, and its data waits in the server's channel buffer, not in
//! front of anyone's reply).

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

use crate::constants::{
    FLIGHT_ACK_WAIT, FLIGHT_BUDGET_MIN, FLIGHT_FREE, FLIGHT_INTERACTIVE_HOLD, FLIGHT_RATE,
    SSH_HANDLING_SLACK,
};

/// A session's account of its channels' data in flight (see the module comment).
pub struct FlightControl {
    /// The shortest round trip to the server the SSH session itself measured, in microseconds.
    round_trip_us: AtomicU64,
    /// The kernel's latest minimum round trip of the session's TCP connection (see `rtt`).
    kernel_us: AtomicU64,
    /// The largest remaining window the server reported for any channel.
    window: AtomicU32,
    /// The sum of the channels' [`Acks::counted`].
    in_flight: AtomicI64,
    /// The same, agent-wide (the `in_flight_bytes` metric).
    gauge: Gauge,
    /// When a small reply last went to the server, in microseconds since `epoch` (0: never).
    small_at: AtomicU64,
    epoch: Instant,
}

impl Default for FlightControl {
    fn default() -> Self {
        FlightControl {
            round_trip_us: AtomicU64::new(u64::MAX),
            kernel_us: AtomicU64::new(u64::MAX),
            window: AtomicU32::new(0),
            in_flight: AtomicI64::new(0),
            gauge: Gauge::default(),
            small_at: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl FlightControl {
    /// Counted in `gauge` too (with every other session's).
    pub fn new(gauge: Gauge) -> Self {
        FlightControl {
            gauge,
            ..FlightControl::default()
        }
    }

    fn add(&self, n: i64) {
        self.in_flight.fetch_add(n, Ordering::AcqRel);
        self.gauge.inc_by(n);
    }

    /// A round trip to the server (an SSH request and its answer) took `d`; the shortest
    /// counts.
    pub fn round_trip(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX - 1);
        self.round_trip_us.fetch_min(us, Ordering::Relaxed);
    }

    /// The kernel's minimum round trip of the session's TCP connection is now `d`.
    pub fn kernel_round_trip(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX - 1);
        self.kernel_us.store(us, Ordering::Relaxed);
    }

    /// The path's round trip, if any was measured. The SSH session's own samples cover the
    /// whole path to the server, through any hop that terminates TCP, but each also holds
    /// the server's handling and, under load, a queue (a probe behind a window of data): a
    /// few milliseconds long, which is enough to grow a window one step too far (a round trip
    /// of 43 ms "carried" the 3 MiB that needs 40), and on loopback sshd's handling (0.3 ms)
    /// is thirty times the path (9 us). The kernel times the connection's own segments,
    /// exactly, but only to the far end of the TCP connection: a hop's, if there is one. So
    /// the kernel's is taken where it is at least three quarters of the session's, or within
    /// `SSH_HANDLING_SLACK` of it (the same path, measured better), and the session's
    /// otherwise (a hop in between, more than a millisecond short of the server).
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt_us().map(Duration::from_micros)
    }

    fn rtt_us(&self) -> Option<u64> {
        let ssh = self.round_trip_us.load(Ordering::Relaxed);
        if ssh == u64::MAX {
            return None;
        }
        let kernel = self.kernel_us.load(Ordering::Relaxed);
        let slack = SSH_HANDLING_SLACK.as_micros() as u64;
        let same_path = kernel.saturating_mul(4) >= ssh.saturating_mul(3)
            || ssh.saturating_sub(kernel) <= slack;
        Some(if kernel != u64::MAX && same_path {
            kernel.min(ssh)
        } else {
            ssh
        })
    }

    /// The server adjusted a channel's window, leaving `remaining`.
    pub fn adjusted(&self, acks: &Acks, remaining: u32) {
        let initial = self
            .window
            .fetch_max(remaining, Ordering::Relaxed)
            .max(remaining);
        let now = u64::from(initial - remaining);
        let Ok(old) = acks
            .counted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                (old & CLOSED == 0).then_some(now)
            })
        else {
            return;
        };
        self.add(now as i64 - old as i64);
        acks.arrived.notify_one();
    }

    fn small_sent(&self) {
        let us = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.small_at.store(us.max(1), Ordering::Relaxed);
    }

    /// What all channels together may keep in flight now; `None`: no limit (no small
    /// exchange lately, or no round trip measured yet).
    pub fn budget(&self) -> Option<u64> {
        let small = self.small_at.load(Ordering::Relaxed);
        if small == 0 {
            return None;
        }
        let us = self.rtt_us()?;
        // The clock only while replies have been seen: bulk alone reads it never.
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        if now.saturating_sub(small) > FLIGHT_INTERACTIVE_HOLD.as_micros() as u64 {
            return None;
        }
        let per_trip = u128::from(us) * u128::from(FLIGHT_RATE) / 1_000_000;
        Some(
            u64::try_from(per_trip)
                .unwrap_or(u64::MAX)
                .max(FLIGHT_BUDGET_MIN),
        )
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire).max(0) as u64
    }
}

/// Set in a channel's `counted` once its task has ended: adjustments no longer count.
const CLOSED: u64 = 1 << 63;

/// One channel's data in flight, kept by the session's handler (adjustments) and the
/// channel's task (sends) together.
#[derive(Default)]
pub struct Acks {
    /// This channel's part of [`FlightControl::in_flight`].
    counted: AtomicU64,
    arrived: Notify,
}

/// A channel task's side of its [`Acks`].
pub(crate) struct Flight<'a> {
    acks: &'a Acks,
    control: &'a FlightControl,
    /// What this channel may always have in flight: `FLIGHT_FREE`, doubled each time the
    /// server did not adjust the window in time.
    free: u64,
}

impl<'a> Flight<'a> {
    pub(crate) fn new(acks: &'a Acks, control: &'a FlightControl) -> Self {
        Flight {
            acks,
            control,
            free: FLIGHT_FREE,
        }
    }

    /// `n` bytes went to the session; `short`: the read emptied the target's socket. A short
    /// read on a channel with little in flight is a reply; on a busy channel it is bulk data
    /// that came a little slower than we read it.
    pub(crate) fn sent(&mut self, n: usize, short: bool) {
        let before = self.acks.counted.fetch_add(n as u64, Ordering::AcqRel) & !CLOSED;
        self.control.add(n as i64);
        if short && before < FLIGHT_FREE {
            self.control.small_sent();
        }
    }

    fn own(&self) -> u64 {
        self.acks.counted.load(Ordering::Acquire) & !CLOSED
    }

    /// Wait until this channel may send (see the module comment).
    pub(crate) async fn room(&mut self) {
        loop {
            let arrived = self.acks.arrived.notified();
            let Some(budget) = self.control.budget() else {
                return;
            };
            let own = self.own();
            if own < self.free || self.control.in_flight() < budget {
                return;
            }
            if tokio::time::timeout(FLIGHT_ACK_WAIT, arrived)
                .await
                .is_err()
            {
                self.free = own.max(self.free).saturating_mul(2);
                log::debug!(
                    "no window adjustment from the server within {FLIGHT_ACK_WAIT:?} with {own} bytes of this channel in flight: it may now always have {} in flight",
                    self.free
                );
                return;
            }
        }
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let old = self.acks.counted.swap(CLOSED, Ordering::AcqRel) & !CLOSED;
        self.control.add(-(old as i64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session with a short path and a small exchange just now: the budget applies.
    fn interactive(round_trip: Duration) -> FlightControl {
        let c = FlightControl::default();
        c.round_trip(round_trip);
        c.small_sent();
        c
    }

    #[test]
    fn the_budget_is_a_round_trip_at_the_rate_with_a_floor() {
        assert_eq!(FlightControl::default().budget(), None);
        let short = interactive(Duration::from_micros(50));
        assert_eq!(short.budget(), Some(FLIGHT_BUDGET_MIN));
        let long = interactive(Duration::from_millis(20));
        assert_eq!(long.budget(), Some(FLIGHT_RATE / 50));
        // The shortest round trip counts: one taken under load does not raise it.
        long.round_trip(Duration::from_millis(200));
        assert_eq!(long.rtt(), Some(Duration::from_millis(20)));
        long.round_trip(Duration::from_millis(10));
        assert_eq!(long.rtt(), Some(Duration::from_millis(10)));
        assert_eq!(long.budget(), Some(FLIGHT_RATE / 100));
    }

    #[test]
    fn the_kernels_round_trip_counts_only_where_it_agrees_with_the_sessions() {
        let c = FlightControl::default();
        c.kernel_round_trip(Duration::from_millis(40));
        assert_eq!(c.rtt(), None, "nothing measured by the session yet");
        // The session's sample holds the server's handling: the kernel's is the exact one.
        c.round_trip(Duration::from_millis(43));
        assert_eq!(c.rtt(), Some(Duration::from_millis(40)));
        // A hop that terminates TCP next to the agent: the kernel sees only the hop.
        c.kernel_round_trip(Duration::from_micros(50));
        assert_eq!(c.rtt(), Some(Duration::from_millis(43)));
        // Never longer than the session's own.
        c.kernel_round_trip(Duration::from_millis(60));
        assert_eq!(c.rtt(), Some(Duration::from_millis(43)));
        // Loopback: sshd's handling is most of the session's round trip.
        let l = FlightControl::default();
        l.round_trip(Duration::from_micros(300));
        l.kernel_round_trip(Duration::from_micros(9));
        assert_eq!(l.rtt(), Some(Duration::from_micros(9)));
    }

    #[test]
    fn without_small_exchanges_there_is_no_budget() {
        let c = FlightControl::default();
        c.round_trip(Duration::from_micros(50));
        assert_eq!(c.budget(), None);
        c.small_sent();
        assert!(c.budget().is_some());
        // As if the last small reply went out longer ago than the hold.
        let long_ago = FLIGHT_INTERACTIVE_HOLD + Duration::from_millis(1);
        let c = FlightControl {
            epoch: Instant::now() - long_ago,
            ..FlightControl::default()
        };
        c.round_trip(Duration::from_micros(50));
        c.small_at.store(1, Ordering::Relaxed);
        assert_eq!(c.budget(), None);
    }

    #[test]
    fn in_flight_follows_sends_adjustments_and_ends() {
        let c = interactive(Duration::from_micros(50));
        // Another channel with nothing in flight tells the session the initial window.
        c.adjusted(&Acks::default(), 2 << 20);
        let (a, b) = (Acks::default(), Acks::default());
        let (mut fa, mut fb) = (Flight::new(&a, &c), Flight::new(&b, &c));
        fa.sent(100_000, false);
        fb.sent(50_000, false);
        assert_eq!(c.in_flight(), 150_000, "before any adjustment, all of it");
        // A 2 MiB window with 120,000 bytes of a's not yet passed on.
        c.adjusted(&a, (2 << 20) - 120_000);
        assert_eq!(fa.own(), 120_000);
        assert_eq!(c.in_flight(), 170_000);
        fa.sent(32_768, false);
        assert_eq!(c.in_flight(), 202_768);
        c.adjusted(&b, 2 << 20);
        assert_eq!(c.in_flight(), 152_768);
        drop(fa);
        assert_eq!(c.in_flight(), 0);
        // An adjustment for a channel that has ended counts for nothing.
        c.adjusted(&a, 0);
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn an_unknown_initial_window_is_never_overestimated() {
        let c = interactive(Duration::from_micros(50));
        let a = Acks::default();
        let mut f = Flight::new(&a, &c);
        f.sent(300_000, false);
        // The first report is taken as the initial window: what was in flight at that
        // moment is not counted (too little, never too much).
        c.adjusted(&a, 1_000_000);
        assert_eq!(c.in_flight(), 0);
        f.sent(10, false);
        assert_eq!(c.in_flight(), 10);
        // A larger window reported later counts from the next adjustment.
        c.adjusted(&Acks::default(), 1_200_000);
        c.adjusted(&a, 1_000_000);
        assert_eq!(f.own(), 200_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_channel_over_the_budget_waits_for_its_own_adjustment() {
        let c = interactive(Duration::from_micros(50));
        let (a, b) = (Acks::default(), Acks::default());
        let mut fa = Flight::new(&a, &c);
        let mut fb = Flight::new(&b, &c);
        fa.sent(FLIGHT_BUDGET_MIN as usize, false);
        fb.sent(1000, false);
        // b is below FLIGHT_FREE: it may send although the budget is spent.
        let started = tokio::time::Instant::now();
        fb.room().await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        let waiting = async {
            fa.room().await;
            fa.free
        };
        let adjust = async {
            tokio::time::sleep(FLIGHT_ACK_WAIT / 2).await;
            c.adjusted(&a, 2 << 20);
        };
        let (free, ()) = tokio::join!(waiting, adjust);
        assert_eq!(started.elapsed(), FLIGHT_ACK_WAIT / 2);
        assert_eq!(free, FLIGHT_FREE, "the channel stays within the budget");
    }

    #[tokio::test(start_paused = true)]
    async fn a_channel_the_server_does_not_adjust_in_time_may_keep_twice_as_much_in_flight() {
        let c = interactive(Duration::from_micros(50));
        let a = Acks::default();
        let mut f = Flight::new(&a, &c);
        f.sent(FLIGHT_BUDGET_MIN as usize, false);
        let started = tokio::time::Instant::now();
        f.room().await;
        assert_eq!(started.elapsed(), FLIGHT_ACK_WAIT);
        assert_eq!(f.free, 2 * FLIGHT_BUDGET_MIN);
        f.sent(FLIGHT_BUDGET_MIN as usize - 1, false);
        let again = tokio::time::Instant::now();
        f.room().await;
        assert_eq!(again.elapsed(), Duration::ZERO, "below the doubled mark");
        f.sent(1, false);
        f.room().await;
        assert_eq!(again.elapsed(), FLIGHT_ACK_WAIT, "at it, it waits again");
        assert_eq!(f.free, 4 * FLIGHT_BUDGET_MIN);
    }

    #[tokio::test(start_paused = true)]
    async fn bulk_alone_is_not_held() {
        let c = FlightControl::default();
        c.round_trip(Duration::from_micros(50));
        let a = Acks::default();
        let mut f = Flight::new(&a, &c);
        f.sent(100 << 20, false);
        let started = tokio::time::Instant::now();
        f.room().await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
