//! What one SSH session shares with its transport, its handler and its channels, made once
//! per session: the output backlog channels pace themselves on, the intake that pauses
//! reading, the bytes received (for liveness), whether new channels are taken, and how many
//! are open, and the account of data in flight towards the server (flight.rs). Channels use
//! this module; it uses nothing of theirs.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use russh::client::WindowAdjuster;

use tokio::sync::{watch, Notify, Semaphore, SemaphorePermit};

mod flight;
pub(crate) use flight::Flight;
pub use flight::{Acks, FlightControl};

use crate::algorithms::Negotiated;
use crate::constants::{INTAKE_HIGH, INTAKE_PAUSE_MAX, SSH_BACKLOG_HIGH, SSH_OUTPUT_TURNS};
use crate::count::OpenCount;

/// The session's shared state (see the module comment).
pub struct SessionShared {
    pub backlog: Backlog,
    pub intake: Arc<Intake>,
    /// Bytes read from the server so far.
    pub received: AtomicU64,
    /// Cleared when the session retires: new channels are refused.
    pub accepting: AtomicBool,
    /// This session's open channels, so a retired session can drain on its own.
    pub channels: Arc<OpenCount>,
    /// The channels' data in flight towards the server (session/flight.rs).
    pub flight: FlightControl,
    /// Set when the session is torn down: every channel task still running ends at once,
    /// closing its target connection. A session whose task is stuck never drops its
    /// handler, so the channels' inputs would never close by themselves.
    pub torn_down: watch::Sender<bool>,
    /// Re-opens the channels' receive windows (channel/window.rs); set once the session is
    /// established, before any channel can open.
    pub window: OnceLock<WindowAdjuster>,
    /// The window the session's channels start with (channel/window.rs).
    pub initial_window: u32,
    /// What the key exchange settled (set by the handler's `kex_done`, again at each rekey).
    pub negotiated: Mutex<Option<Negotiated>>,
}

impl Default for SessionShared {
    fn default() -> Self {
        SessionShared {
            backlog: Backlog::default(),
            intake: Arc::new(Intake::default()),
            received: AtomicU64::new(0),
            accepting: AtomicBool::new(true),
            channels: Arc::new(OpenCount::default()),
            flight: FlightControl::default(),
            torn_down: watch::Sender::new(false),
            window: OnceLock::new(),
            initial_window: crate::constants::SSH_WINDOW_SIZE,
            negotiated: Mutex::new(None),
        }
    }
}

impl SessionShared {
    /// End every channel task of the session (see `torn_down`).
    pub fn tear_down(&self) {
        self.torn_down.send_replace(true);
    }

    /// Resolves once the session is torn down.
    pub async fn torn_down(&self) {
        let _ = self.torn_down.subscribe().wait_for(|down| *down).await;
    }
}

/// How many bytes wait in the transport's buffer, for channel tasks to pace themselves on.
pub struct Backlog {
    bytes: AtomicUsize,
    drained: Notify,
    /// Turns to hand data to the session. russh's session loop takes every message its
    /// channel writers have ready in one go (a writer waiting for queue space refills it at
    /// once), so with a thousand busy channels one pass gathered 30+ MiB of output, all of it
    /// past the `bytes` check. A channel whose SSH window is open takes a turn, then waits for
    /// room, then reads and hands over one packet: one pass is bounded by the turns plus
    /// russh's queue. A channel waiting for its window goes without a turn, so it never holds
    /// up the others (its output is paced by the server instead).
    turns: Semaphore,
}

impl Default for Backlog {
    fn default() -> Self {
        Backlog {
            bytes: AtomicUsize::new(0),
            drained: Notify::new(),
            turns: Semaphore::new(SSH_OUTPUT_TURNS),
        }
    }
}

impl Backlog {
    /// A turn to hand one packet to the session (see `turns`).
    pub async fn turn(&self) -> Option<SemaphorePermit<'_>> {
        self.turns.acquire().await.ok()
    }

    /// Turns not taken now.
    #[cfg(test)]
    pub fn free_turns(&self) -> usize {
        self.turns.available_permits()
    }

    /// Wait until the transport has room for more output.
    pub async fn wait_room(&self) {
        loop {
            let drained = self.drained.notified();
            if self.bytes.load(Ordering::Acquire) < SSH_BACKLOG_HIGH {
                return;
            }
            drained.await;
        }
    }

    pub(crate) fn set(&self, n: usize) {
        let old = self.bytes.swap(n, Ordering::AcqRel);
        if old >= SSH_BACKLOG_HIGH && n < SSH_BACKLOG_HIGH {
            self.drained.notify_waiters();
        }
    }
}

/// Bytes received for channels and not yet delivered to their targets, across a session.
/// Signed: a channel closing while data arrives for it may take its bytes off a moment before
/// they were put on.
#[derive(Default)]
pub struct Intake {
    bytes: AtomicI64,
    drained: Notify,
}

impl Intake {
    pub fn add(&self, n: u64) {
        self.bytes.fetch_add(n as i64, Ordering::AcqRel);
    }

    pub fn sub(&self, n: u64) {
        let old = self.bytes.fetch_sub(n as i64, Ordering::AcqRel);
        let high = INTAKE_HIGH as i64;
        if old > high && old - (n as i64) <= high {
            self.drained.notify_waiters();
        }
    }

    pub fn get(&self) -> usize {
        self.bytes.load(Ordering::Acquire).max(0) as usize
    }

    /// Wait until at most `INTAKE_HIGH` bytes are queued; `false` if that took longer than
    /// `INTAKE_PAUSE_MAX`.
    pub(crate) async fn below_high(self: Arc<Self>) -> bool {
        let wait = async {
            loop {
                let drained = self.drained.notified();
                if self.get() <= INTAKE_HIGH {
                    return;
                }
                drained.await;
            }
        };
        tokio::time::timeout(INTAKE_PAUSE_MAX, wait).await.is_ok()
    }
}
