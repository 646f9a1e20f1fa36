//! A channel's input: what the SSH session pushes for the channel's target, without ever
//! waiting (see `tunnel/handler.rs`). The channel's window (window.rs) is re-opened only as the
//! target takes the data, so a slow target's backlog stays within its window, in memory.
//! Should a server send past the window (or a reload lower `max_pending` under an open
//! channel), what passes `max_pending` goes to a spill file up to `max_spill` (spill.rs);
//! beyond both, the channel's bytes count fully toward the session's intake, which pauses
//! reading the SSH socket (transport.rs) until that target catches up; at twice
//! `max_pending` in memory it is cut.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use prometheus_client::metrics::gauge::Gauge;
use russh::{ChannelMsg, ChannelReadHalf};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Notify};

use crate::config::ForwardConfig;
use crate::constants::INTAKE_SHARE;
use crate::session::Intake;
use crate::spill::{Chunk, Spill};

use super::window::Window;
use crate::session::Acks;

/// What the session hands a channel task.
pub enum Inbound {
    Data(Bytes),
    /// Data held in the channel's spill file.
    Spilled(Chunk),
    Eof,
    /// The target fell too far behind (see the module comment): the bytes in memory.
    Overflow(u64),
}

/// The part of a channel's in-memory backlog that counts toward the session's [`Intake`]:
/// its first `INTAKE_SHARE` bytes (many busy channels together pace the session, as before),
/// plus whatever is beyond `max_pending` (the spill file is full or off: pause). The rest of a
/// slow target's backlog is its own and slows no one.
fn counted(ram: u64, max_pending: u64) -> u64 {
    ram.min(INTAKE_SHARE) + ram.saturating_sub(max_pending.max(INTAKE_SHARE))
}

/// The spill file of a channel, made on first need.
enum SpillState {
    Unused,
    Open(Spill),
    Failed,
    /// The channel's task has ended.
    Closed,
}

/// The session's end of a channel's input: pushes never wait.
pub struct Inbox {
    tx: mpsc::UnboundedSender<Inbound>,
    /// Bytes in memory, queued or in the channel task's hands.
    pending: Arc<AtomicU64>,
    max_pending: u64,
    /// Bytes in the spill file not yet read back.
    spilled: Arc<AtomicU64>,
    max_spill: u64,
    /// Shared with the channel task, which closes the file when it ends (the session may keep
    /// an ended channel's inbox a while).
    spill: Arc<Mutex<SpillState>>,
    /// Bytes in all spill files, agent-wide (the `spill_bytes` metric).
    spill_gauge: Gauge,
    cut: Arc<Notify>,
    intake: Arc<Intake>,
    /// russh's own bounded queue for this channel, when kept (see [`Inbox::with_queue`]).
    queued: Option<ChannelReadHalf>,
    /// The server's window adjustments for the channel (flight.rs).
    pub acks: Arc<Acks>,
}

/// Set in a channel's `pending` once its task has gone: nothing is counted after that.
const CLOSED: u64 = 1 << 62;

/// The channel task's end.
pub struct ChannelInput {
    rx: mpsc::UnboundedReceiver<Inbound>,
    pub(super) pending: Arc<AtomicU64>,
    max_pending: u64,
    spilled: Arc<AtomicU64>,
    spill: Arc<Mutex<SpillState>>,
    spill_gauge: Gauge,
    /// Bytes that went through the spill file, for the channel's log line.
    pub(super) spilled_total: u64,
    /// Reading the spill file back failed: the channel ends with this error.
    pub(super) failed: Option<io::Error>,
    /// Bytes received but not yet handed on (a partly read chunk during the handshake).
    leftover: Bytes,
    pub(super) eof: bool,
    pub(super) overflow: Option<u64>,
    /// Signalled on overflow, so the channel is cut even while its task waits on the target.
    pub(super) cut: Arc<Notify>,
    intake: Arc<Intake>,
    pub(super) acks: Arc<Acks>,
    /// Re-opens the channel's window as the target takes the data (window.rs); `None` in
    /// unit tests without a session.
    window: Option<Window>,
}

/// A channel's `pending` bytes are counted in the session's [`Intake`] as [`counted`] says,
/// until they are delivered or the channel's task ends.
/// `spill_gauge` counts the bytes in this channel's spill file with every other channel's.
pub fn inbox(
    settings: &ForwardConfig,
    intake: Arc<Intake>,
    spill_gauge: Gauge,
) -> (Inbox, ChannelInput) {
    let (tx, rx) = mpsc::unbounded_channel();
    let pending = Arc::new(AtomicU64::new(0));
    let spilled = Arc::new(AtomicU64::new(0));
    let spill = Arc::new(Mutex::new(SpillState::Unused));
    let cut = Arc::new(Notify::new());
    let acks = Arc::new(Acks::default());
    (
        Inbox {
            tx,
            pending: pending.clone(),
            max_pending: settings.max_pending,
            spilled: spilled.clone(),
            max_spill: settings.max_spill,
            spill: spill.clone(),
            spill_gauge: spill_gauge.clone(),
            cut: cut.clone(),
            intake: intake.clone(),
            queued: None,
            acks: acks.clone(),
        },
        ChannelInput {
            rx,
            pending,
            max_pending: settings.max_pending,
            spilled,
            spill,
            spill_gauge,
            spilled_total: 0,
            failed: None,
            leftover: Bytes::new(),
            eof: false,
            overflow: None,
            cut,
            intake,
            acks,
            window: None,
        },
    )
}

impl Inbox {
    /// Keep russh's queue for this channel, to take data from it without a copy. russh puts
    /// each message for a channel on that queue (waiting for room if it is full) just before
    /// the matching handler callback, with the very buffer it decoded. Every callback for the
    /// channel empties the queue (`push`, `drain`), so it never fills and never holds up the
    /// session; data still reaches the channel through `push` only, in callback order, and a
    /// message that is not the callback's own is dropped, so the queue is an optimisation,
    /// never the source of truth.
    pub fn with_queue(mut self, queued: ChannelReadHalf) -> Self {
        self.queued = Some(queued);
        self
    }

    /// Empty russh's queue; the buffer of the `Data` message that is `data` itself, if any.
    fn take_queued(&mut self, data: Option<&[u8]>) -> Option<Bytes> {
        let queued = self.queued.as_mut()?;
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut found = None;
        loop {
            // Unconstrained: tokio's cooperative budget must not hide a queued message.
            let next = std::pin::pin!(tokio::task::unconstrained(queued.wait()));
            match next.poll(&mut cx) {
                Poll::Ready(Some(ChannelMsg::Data { data: b }))
                    if data.is_some_and(|d| d.as_ptr() == b.as_ptr() && d.len() == b.len()) =>
                {
                    found = Some(b)
                }
                Poll::Ready(Some(_)) => {}
                Poll::Ready(None) | Poll::Pending => return found,
            }
        }
    }

    /// Empty russh's queue for this channel (from every handler callback without data).
    pub fn drain(&mut self) {
        self.take_queued(None);
    }

    /// Queue data for the channel. `false` means drop this inbox: the channel was cut for
    /// overflow, or its task is gone.
    pub fn push(&mut self, data: &[u8]) -> bool {
        let queued = self.take_queued(Some(data));
        if data.is_empty() {
            return true;
        }
        let len = data.len() as u64;
        let ram = self.pending.load(Ordering::Acquire);
        if ram & CLOSED != 0 {
            return false;
        }
        if ram + len > self.max_pending {
            if let Some(chunk) = self.spill(data) {
                return self.tx.send(Inbound::Spilled(chunk)).is_ok();
            }
        }
        let old = self.pending.fetch_add(len, Ordering::AcqRel);
        if old & CLOSED != 0 {
            return false;
        }
        let new = old + len;
        self.intake
            .add(counted(new, self.max_pending) - counted(old, self.max_pending));
        if new > self.max_pending.saturating_mul(2) {
            let _ = self.tx.send(Inbound::Overflow(new));
            self.cut.notify_one();
            return false;
        }
        let data = queued.unwrap_or_else(|| Bytes::copy_from_slice(data));
        self.tx.send(Inbound::Data(data)).is_ok()
    }

    /// Put `data` in the spill file, if it has room and can be written.
    fn spill(&mut self, data: &[u8]) -> Option<Chunk> {
        let spilled = self.spilled.load(Ordering::Acquire);
        if spilled + data.len() as u64 > self.max_spill {
            return None;
        }
        let mut state = self.spill.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*state, SpillState::Unused) {
            let dir = std::env::temp_dir();
            *state = match Spill::create(&dir) {
                Ok(s) => SpillState::Open(s),
                Err(e) => {
                    log::warn!(error_class = "spill"; "cannot create a spill file in {}: {e}; a slow target's backlog stays in memory and paces the whole tunnel instead", dir.display());
                    SpillState::Failed
                }
            };
        }
        let SpillState::Open(spill) = &mut *state else {
            return None;
        };
        match spill.write(data, spilled == 0) {
            Ok(chunk) => {
                // Under the lock, so that the channel's end (which takes it) sees this.
                self.spilled.fetch_add(data.len() as u64, Ordering::AcqRel);
                self.spill_gauge.inc_by(data.len() as i64);
                Some(chunk)
            }
            Err(e) => {
                log::warn!(error_class = "spill"; "cannot write to a spill file in {}: {e}; a slow target's backlog stays in memory and paces the whole tunnel instead", std::env::temp_dir().display());
                *state = SpillState::Failed;
                None
            }
        }
    }

    pub fn eof(&mut self) {
        self.drain();
        let _ = self.tx.send(Inbound::Eof);
    }

    /// The channel's task has ended.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl ChannelInput {
    /// Whether nothing more will be handed on: EOF, overflow, or a failed spill read.
    pub(super) fn done(&self) -> bool {
        self.eof || self.overflow.is_some() || self.failed.is_some()
    }

    /// The next chunk from the server; `None` at EOF, on close, overflow or failure.
    pub(super) async fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.leftover.is_empty() {
            return Some(std::mem::take(&mut self.leftover));
        }
        if self.done() {
            return None;
        }
        let m = self.rx.recv().await?;
        self.take(m)
    }

    /// Data is handed on (a spilled chunk read back first, then counted in memory like the
    /// rest until delivered); EOF and overflow are recorded.
    pub(super) fn take(&mut self, m: Inbound) -> Option<Bytes> {
        match m {
            Inbound::Data(b) => Some(b),
            Inbound::Spilled(chunk) => match chunk.read() {
                Ok(b) => {
                    let len = b.len() as u64;
                    self.spilled.fetch_sub(len, Ordering::AcqRel);
                    self.spill_gauge.dec_by(len as i64);
                    self.spilled_total += len;
                    let old = self.pending.fetch_add(len, Ordering::AcqRel);
                    self.intake
                        .add(counted(old + len, self.max_pending) - counted(old, self.max_pending));
                    Some(b)
                }
                Err(e) => {
                    self.failed = Some(io::Error::new(
                        e.kind(),
                        format!("reading the channel's spill file back failed: {e}"),
                    ));
                    None
                }
            },
            Inbound::Eof => {
                self.eof = true;
                None
            }
            Inbound::Overflow(n) => {
                self.overflow = Some(n);
                None
            }
        }
    }

    /// More data if it is already queued, without waiting (EOF and overflow are recorded).
    pub(super) fn try_next_data(&mut self) -> Option<Bytes> {
        if self.done() {
            return None;
        }
        let m = self.rx.try_recv().ok()?;
        self.take(m)
    }

    /// Count bytes as delivered to the target, and let the server send as many more.
    pub(super) fn consumed(&mut self, n: usize) {
        let old = self.pending.fetch_sub(n as u64, Ordering::AcqRel);
        let new = old.saturating_sub(n as u64);
        self.intake
            .sub(counted(old, self.max_pending) - counted(new, self.max_pending));
        if n > 0 && self.window.is_some() {
            let backlog = self.backlog();
            if let Some(w) = &mut self.window {
                w.consumed(n as u64, backlog);
            }
        }
    }

    /// Grant the channel's window through `window` as data is consumed.
    pub fn with_window(mut self, window: Window) -> Self {
        self.window = Some(window);
        self
    }

    /// Bytes still waiting for the target, in memory and on disk.
    pub(super) fn backlog(&self) -> u64 {
        (self.pending.load(Ordering::Acquire) & !CLOSED) + self.spilled.load(Ordering::Acquire)
    }

    /// Wait for the channel to be closed by the server (or cut), ignoring anything else.
    pub(super) async fn closed(&mut self) -> Option<u64> {
        while let Some(m) = self.rx.recv().await {
            if let Inbound::Overflow(n) = m {
                return Some(n);
            }
        }
        None
    }
}

impl Drop for ChannelInput {
    fn drop(&mut self) {
        // The file goes now (the queued chunks' references go with `rx`), and what it held
        // leaves the metric; no spill can start after this.
        let mut state = self.spill.lock().unwrap_or_else(|e| e.into_inner());
        *state = SpillState::Closed;
        self.spill_gauge
            .dec_by(self.spilled.swap(0, Ordering::AcqRel) as i64);
        drop(state);
        let left = self.pending.swap(CLOSED, Ordering::AcqRel);
        self.intake.sub(counted(left & !CLOSED, self.max_pending));
    }
}

impl AsyncRead for ChannelInput {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.leftover.is_empty() && !this.done() {
            match this.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(m)) => {
                    if let Some(b) = this.take(m) {
                        this.leftover = b;
                    }
                }
                Poll::Ready(None) => this.eof = true,
            }
        }
        let n = buf.remaining().min(this.leftover.len());
        buf.put_slice(&this.leftover[..n]);
        this.leftover.advance(n);
        this.consumed(n);
        Poll::Ready(Ok(()))
    }
}

/// The handshake sees the channel as one stream: reads from the inbox, writes to the server.
pub(super) struct Duplex<'a, W> {
    pub(super) input: &'a mut ChannelInput,
    pub(super) output: &'a mut W,
}

impl<W: Unpin> AsyncRead for Duplex<'_, W> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.input).poll_read(cx, buf)
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Duplex<'_, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.output).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.output).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.output).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    fn settings(max_pending: u64, max_spill: u64) -> ForwardConfig {
        ForwardConfig {
            connect_timeout: Duration::from_secs(1),
            max_connections: 1,
            max_connections_per_target: 0,
            connect_rate_per_target: 0,
            max_pending,
            max_spill,
            stall_timeout: Duration::from_secs(60),
            target_keepalive: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(1),
            policy: crate::policy::Policy::default(),
        }
    }

    #[tokio::test]
    async fn intake_counts_bytes_until_delivered_or_dropped() {
        let intake = Arc::new(Intake::default());
        let (mut inbox, mut input) = inbox(&settings(1 << 20, 0), intake.clone(), Gauge::default());
        assert!(inbox.push(&[1; 1000]));
        assert!(inbox.push(&[2; 500]));
        assert_eq!(intake.get(), 1500);
        let mut buf = [0u8; 1000];
        input.read_exact(&mut buf).await.unwrap();
        assert_eq!(intake.get(), 500, "delivered bytes come off");
        drop(input);
        assert_eq!(intake.get(), 0, "a closed channel's queue comes off");
        assert!(
            !inbox.push(&[3; 100]),
            "nothing is queued for a closed channel"
        );
        assert_eq!(intake.get(), 0);
    }

    #[tokio::test]
    async fn without_a_spill_file_the_backlog_counts_fully_then_is_cut_at_twice_max_pending() {
        let intake = Arc::new(Intake::default());
        let (mut inbox, input) = inbox(&settings(1000, 0), intake.clone(), Gauge::default());
        assert!(inbox.push(&[0; 600]));
        assert!(inbox.push(&[0; 600]));
        assert_eq!(intake.get(), 1200, "all of it paces the session");
        assert!(
            !inbox.push(&[0; 900]),
            "past twice max_pending the channel is cut"
        );
        drop(input);
        assert_eq!(intake.get(), 0);
    }

    #[tokio::test]
    async fn past_max_pending_data_waits_in_the_spill_file_in_order_uncounted() {
        let intake = Arc::new(Intake::default());
        let gauge = Gauge::default();
        let (mut inbox, mut input) = inbox(&settings(1000, 3000), intake.clone(), gauge.clone());
        let data: Vec<u8> = (0..3500u32).map(|i| i as u8).collect();
        for part in data.chunks(500) {
            assert!(inbox.push(part));
        }
        // 1000 in memory, 2500 in the file: only the memory part counts.
        assert_eq!(intake.get(), 1000);
        assert_eq!(input.spilled.load(Ordering::Acquire), 2500);
        assert_eq!(gauge.get(), 2500, "the metric shows what is on disk");
        // The file is full: the next 1000 go to memory and count (the pause), then a cut.
        assert!(inbox.push(&data[..1000]));
        assert_eq!(intake.get(), 2000);
        let mut back = vec![0u8; 3500];
        input.read_exact(&mut back).await.unwrap();
        assert_eq!(back, data, "memory first, then the file, in arrival order");
        assert_eq!(input.spilled_total, 2500);
        assert_eq!(input.spilled.load(Ordering::Acquire), 0);
        assert_eq!(gauge.get(), 0, "read back, it leaves the metric");
        drop(input);
        assert_eq!(intake.get(), 0);
    }

    #[tokio::test]
    async fn a_channel_that_ends_with_a_spilled_backlog_takes_it_off_the_metric() {
        let gauge = Gauge::default();
        let intake = Arc::new(Intake::default());
        let (mut first, first_input) =
            inbox(&settings(1000, 1 << 20), intake.clone(), gauge.clone());
        let (mut second, second_input) = inbox(&settings(1000, 1 << 20), intake, gauge.clone());
        for _ in 0..5 {
            assert!(first.push(&[1; 1000]));
            assert!(second.push(&[2; 1000]));
        }
        assert_eq!(gauge.get(), 8000, "both channels' files, 4000 each");
        drop(first_input);
        assert_eq!(gauge.get(), 4000, "the ended channel's file is gone");
        assert!(!first.push(&[1; 1000]), "and it takes no more");
        assert_eq!(gauge.get(), 4000);
        drop(second_input);
        assert_eq!(gauge.get(), 0);
    }
}
