//! One forwarded channel: read its SOCKS request, check the destination policy, resolve and
//! connect, answer, then splice bytes both ways with half-close.
//!
//! Data from the server reaches a channel through an [`Inbox`] that the SSH session pushes
//! into without ever waiting (see `tunnel.rs`), so a slow target only grows its own channel's
//! backlog: in memory up to `max_pending`, then in a spill file up to `max_spill` (spill.rs).
//! Beyond both, the channel's bytes count fully toward the session's intake, which pauses
//! reading the SSH socket (transport.rs) until that target catches up; at twice
//! `max_pending` in memory it is cut. A target that takes nothing for `stall_timeout` is cut.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

use crate::config::ForwardConfig;
use crate::connect;
use crate::constants::{
    CHANNEL_CLOSE_WAIT, CONNECT_STAGGER, INTAKE_SHARE, SMALL_READ, SOCKS_HANDSHAKE_TIMEOUT,
    SPLICE_BATCH, SPLICE_BUFFER_SIZE, SPLICE_IOVECS,
};
use crate::count::OpenGuard;
use crate::socks::{self, Host, Reply, Request};
use crate::spill::{Chunk, Spill};
use crate::telemetry::{ChannelStat, Telemetry};
use crate::transport::{Backlog, Intake};

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
    cut: Arc<Notify>,
    intake: Arc<Intake>,
    /// russh's own bounded queue for this channel, when kept (see [`Inbox::with_queue`]).
    queued: Option<ChannelReadHalf>,
}

/// Set in a channel's `pending` once its task has gone: nothing is counted after that.
const CLOSED: u64 = 1 << 62;

/// The channel task's end.
pub struct ChannelInput {
    rx: mpsc::UnboundedReceiver<Inbound>,
    pending: Arc<AtomicU64>,
    max_pending: u64,
    spilled: Arc<AtomicU64>,
    spill: Arc<Mutex<SpillState>>,
    /// Bytes that went through the spill file, for the channel's log line.
    spilled_total: u64,
    /// Reading the spill file back failed: the channel ends with this error.
    failed: Option<io::Error>,
    /// Bytes received but not yet handed on (a partly read chunk during the handshake).
    leftover: Bytes,
    eof: bool,
    overflow: Option<u64>,
    /// Signalled on overflow, so the channel is cut even while its task waits on the target.
    cut: Arc<Notify>,
    intake: Arc<Intake>,
}

/// A channel's `pending` bytes are counted in the session's [`Intake`] as [`counted`] says,
/// until they are delivered or the channel's task ends.
pub fn inbox(settings: &ForwardConfig, intake: Arc<Intake>) -> (Inbox, ChannelInput) {
    let (tx, rx) = mpsc::unbounded_channel();
    let pending = Arc::new(AtomicU64::new(0));
    let spilled = Arc::new(AtomicU64::new(0));
    let spill = Arc::new(Mutex::new(SpillState::Unused));
    let cut = Arc::new(Notify::new());
    (
        Inbox {
            tx,
            pending: pending.clone(),
            max_pending: settings.max_pending,
            spilled: spilled.clone(),
            max_spill: settings.max_spill,
            spill: spill.clone(),
            cut: cut.clone(),
            intake: intake.clone(),
            queued: None,
        },
        ChannelInput {
            rx,
            pending,
            max_pending: settings.max_pending,
            spilled,
            spill,
            spilled_total: 0,
            failed: None,
            leftover: Bytes::new(),
            eof: false,
            overflow: None,
            cut,
            intake,
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
                self.spilled.fetch_add(data.len() as u64, Ordering::AcqRel);
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
    fn done(&self) -> bool {
        self.eof || self.overflow.is_some() || self.failed.is_some()
    }

    /// The next chunk from the server; `None` at EOF, on close, overflow or failure.
    async fn next_chunk(&mut self) -> Option<Bytes> {
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
    fn take(&mut self, m: Inbound) -> Option<Bytes> {
        match m {
            Inbound::Data(b) => Some(b),
            Inbound::Spilled(chunk) => match chunk.read() {
                Ok(b) => {
                    let len = b.len() as u64;
                    self.spilled.fetch_sub(len, Ordering::AcqRel);
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
    fn try_next_data(&mut self) -> Option<Bytes> {
        if self.done() {
            return None;
        }
        let m = self.rx.try_recv().ok()?;
        self.take(m)
    }

    /// Count bytes as delivered to the target.
    fn consumed(&self, n: usize) {
        let old = self.pending.fetch_sub(n as u64, Ordering::AcqRel);
        let new = old.saturating_sub(n as u64);
        self.intake
            .sub(counted(old, self.max_pending) - counted(new, self.max_pending));
    }

    /// Bytes still waiting for the target, in memory and on disk.
    fn backlog(&self) -> u64 {
        (self.pending.load(Ordering::Acquire) & !CLOSED) + self.spilled.load(Ordering::Acquire)
    }

    /// Wait for the channel to be closed by the server (or cut), ignoring anything else.
    async fn closed(&mut self) -> Option<u64> {
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
        // The file goes now (the queued chunks' references go with `rx`).
        *self.spill.lock().unwrap_or_else(|e| e.into_inner()) = SpillState::Closed;
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
struct Duplex<'a, W> {
    input: &'a mut ChannelInput,
    output: &'a mut W,
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

/// What every channel shares: the live forward settings, the channel count and telemetry.
pub struct Forwarder {
    settings: RwLock<Arc<ForwardConfig>>,
    pub telemetry: Arc<Telemetry>,
}

impl Forwarder {
    pub fn new(settings: ForwardConfig, telemetry: Arc<Telemetry>) -> Self {
        Forwarder {
            settings: RwLock::new(Arc::new(settings)),
            telemetry,
        }
    }

    pub fn settings(&self) -> Arc<ForwardConfig> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies to channels opened from now on; open channels keep running untouched.
    pub fn update(&self, settings: ForwardConfig) {
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(settings);
    }
}

/// What a channel task gets from its session: where it came from (for logs) and the session's output backlog.
pub struct ChannelContext {
    pub originator: String,
    pub backlog: Arc<Backlog>,
}

/// Run one channel to its end, with the settings its inbox was made with. `guard` is
/// released when the channel is done.
pub async fn serve_channel(
    mut input: ChannelInput,
    channel: ChannelWriteHalf<Msg>,
    fwd: Arc<Forwarder>,
    settings: Arc<ForwardConfig>,
    guard: OpenGuard,
    origin: ChannelContext,
) {
    let metrics = &fwd.telemetry.metrics;
    let mut writer = channel.make_writer();
    let started = Instant::now();
    let over_limit = fwd.telemetry.active.get() > settings.max_connections;

    let request = {
        let mut stream = Duplex {
            input: &mut input,
            output: &mut writer,
        };
        match tokio::time::timeout(SOCKS_HANDSHAKE_TIMEOUT, socks::read_request(&mut stream)).await
        {
            Ok(Ok(r)) => {
                metrics
                    .socks_handshake
                    .observe(started.elapsed().as_secs_f64());
                r
            }
            Ok(Err(e)) => {
                metrics.channel_outcome("socks_error");
                log::info!(originator = origin.originator.as_str(), error_class = "socks"; "channel from {} closed: {e}", origin.originator);
                return refuse(&channel, &mut input, guard).await;
            }
            Err(_) => {
                metrics.channel_outcome("socks_timeout");
                log::info!(originator = origin.originator.as_str(), error_class = "socks_timeout"; "channel from {} closed: no complete SOCKS request within {SOCKS_HANDSHAKE_TIMEOUT:?}", origin.originator);
                return refuse(&channel, &mut input, guard).await;
            }
        }
    };
    let target = format!("{}:{}", request.host, request.port);

    let connecting = Instant::now();
    let connected = if over_limit {
        Err((
            Reply::GeneralFailure,
            format!(
                "refused: {} channels are open, [forward] max_connections is {}",
                fwd.telemetry.active.get() - 1,
                settings.max_connections
            ),
        ))
    } else {
        connect_target(&request, &settings).await
    };
    let stream = match connected {
        Ok(s) => {
            metrics
                .target_connect
                .observe(connecting.elapsed().as_secs_f64());
            s
        }
        Err((reply, why)) => {
            let class = if over_limit {
                "over_limit"
            } else {
                reply_class(reply)
            };
            metrics.channel_outcome(class);
            log::warn!(target_addr = target.as_str(), target = target.as_str(), error_class = class; "connection to {target} failed: {why}");
            let _ = socks::write_reply(&mut writer, request.version, reply, None).await;
            return refuse(&channel, &mut input, guard).await;
        }
    };
    let bound = stream.local_addr().ok();
    if socks::write_reply(&mut writer, request.version, Reply::Succeeded, bound)
        .await
        .is_err()
    {
        drop(stream);
        return refuse(&channel, &mut input, guard).await;
    }
    log::debug!(target = target.as_str(); "channel open to {target}");
    metrics.channel_outcome("ok");

    let counts = fwd
        .telemetry
        .open_channel(target.clone(), origin.originator.clone());
    let cut = input.cut.clone();
    let end = tokio::select! {
        end = splice(&mut input, stream, &channel, &mut writer, &origin.backlog, &counts, settings.stall_timeout) => end,
        _ = cut.notified() => End::Overflow(input.pending.load(Ordering::Acquire)),
    };
    let spilled = input.spilled_total;
    // A normal end means both sides sent EOF: the server closes the channel.
    if matches!(end, End::Normal) {
        close_after_server(&channel, &mut input).await;
    } else {
        let _ = channel.close().await;
    }
    drop(guard);
    let secs = started.elapsed().as_secs_f64();
    let up = counts.to_target.load(Ordering::Relaxed);
    let down = counts.from_target.load(Ordering::Relaxed);
    drop(counts);
    let on_disk = if spilled > 0 {
        format!("; {spilled} bytes waited for the target in a spill file")
    } else {
        String::new()
    };
    match end {
        End::Normal => log::info!(
            target = target.as_str(), bytes_to_target = up, bytes_from_target = down, duration_s = secs, bytes_spilled = spilled;
            "channel to {target} closed after {secs:.1}s: {up} bytes to target, {down} bytes from target{on_disk}"),
        End::Overflow(pending) => log::warn!(
            target = target.as_str(), bytes_to_target = up, bytes_from_target = down, duration_s = secs, error_class = "overflow";
            "channel to {target} cut: the target fell {pending} bytes behind in memory with its spill file full ([forward] max_pending is {}, max_spill {}); other channels are unaffected", settings.max_pending, settings.max_spill),
        End::Stalled(backlog) => log::warn!(
            target = target.as_str(), bytes_to_target = up, bytes_from_target = down, duration_s = secs, error_class = "stalled";
            "channel to {target} cut: the target took no data for {:?} ([forward] stall_timeout); {backlog} bytes for it were dropped ({up} bytes reached it)", settings.stall_timeout),
        End::Error(e) => log::info!(
            target = target.as_str(), bytes_to_target = up, bytes_from_target = down, duration_s = secs, error_class = "io";
            "channel to {target} ended after {secs:.1}s: {e} ({up} bytes to target, {down} bytes from target)"),
    }
}

/// End a channel the agent will not serve (a bad or late SOCKS request, a denied or failed
/// target) the way the normal path ends one: send EOF and let the server close it (see
/// [`close_after_server`]). The channel no longer counts as open meanwhile.
async fn refuse(channel: &ChannelWriteHalf<Msg>, input: &mut ChannelInput, guard: OpenGuard) {
    drop(guard);
    if channel.eof().await.is_ok() {
        close_after_server(channel, input).await;
    } else {
        let _ = channel.close().await;
    }
}

/// Once both sides sent EOF the server closes the channel itself; wait for that close.
/// russh (0.65) forgets a channel only when the close comes from the server: one the agent
/// closed first stayed in its tables for good (about 4 KiB each). A server that has not closed
/// within `CHANNEL_CLOSE_WAIT` (or an overflow meanwhile) gets our close after all.
async fn close_after_server(channel: &ChannelWriteHalf<Msg>, input: &mut ChannelInput) {
    let closed_by_server = tokio::time::timeout(CHANNEL_CLOSE_WAIT, input.closed())
        .await
        .is_ok_and(|overflow| overflow.is_none());
    if !closed_by_server {
        let _ = channel.close().await;
    }
}

fn reply_class(r: Reply) -> &'static str {
    match r {
        Reply::NotAllowed => "denied",
        Reply::ConnectionRefused => "refused",
        Reply::TtlExpired => "timeout",
        Reply::HostUnreachable => "host_unreachable",
        Reply::NetworkUnreachable => "network_unreachable",
        _ => "failed",
    }
}

/// Resolve (on this host, with the system resolver), apply the policy to each address, and
/// connect to the first that answers, all within `connect_timeout`.
async fn connect_target(
    req: &Request,
    settings: &ForwardConfig,
) -> Result<TcpStream, (Reply, String)> {
    let attempt = async {
        let (name, addrs): (Option<&str>, Vec<SocketAddr>) = match &req.host {
            Host::Ip(ip) => (None, vec![SocketAddr::new(*ip, req.port)]),
            Host::Name(n) => {
                let addrs = tokio::net::lookup_host((n.as_str(), req.port))
                    .await
                    .map_err(|e| {
                        (
                            Reply::HostUnreachable,
                            format!("name {n} not resolved: {e}"),
                        )
                    })?;
                (Some(n.as_str()), addrs.collect())
            }
        };
        // The policy decides on each address; the allowed ones race (see connect.rs).
        let mut denied = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(
                |addr| match settings.policy.check(name, addr.ip(), addr.port()) {
                    Ok(()) => true,
                    Err(denial) => {
                        denied = Some((Reply::NotAllowed, format!("{addr} {denial}")));
                        false
                    }
                },
            )
            .collect();
        if allowed.is_empty() {
            return Err(denied.unwrap_or((
                Reply::HostUnreachable,
                "the name has no addresses".to_string(),
            )));
        }
        match connect::first_of(&allowed, CONNECT_STAGGER).await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Err(errors) => Err(errors.last().map_or(
                (Reply::GeneralFailure, "no address answered".to_string()),
                |(addr, e)| (io_reply(e), format!("{addr}: {e}")),
            )),
        }
    };
    match tokio::time::timeout(settings.connect_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err((
            Reply::TtlExpired,
            format!(
                "timed out after {:?} ([forward] connect_timeout)",
                settings.connect_timeout
            ),
        )),
    }
}

fn io_reply(e: &io::Error) -> Reply {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Reply::ConnectionRefused,
        io::ErrorKind::NetworkUnreachable => Reply::NetworkUnreachable,
        io::ErrorKind::HostUnreachable => Reply::HostUnreachable,
        io::ErrorKind::TimedOut => Reply::TtlExpired,
        _ => Reply::GeneralFailure,
    }
}

enum End {
    Normal,
    Overflow(u64),
    /// The target took nothing for `stall_timeout`; the bytes that were waiting for it.
    Stalled(u64),
    Error(io::Error),
}

/// The error `write_all_vectored` ends with when the target makes no progress.
#[derive(Debug)]
struct Stalled;

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the target took no data")
    }
}

impl std::error::Error for Stalled {}

/// Copy both ways until both sides are done. EOF in one direction is passed on as a
/// half-close and the other direction keeps flowing. A close from the server, an overflow,
/// or an error on either side ends both.
async fn splice<W: AsyncWrite + Unpin>(
    input: &mut ChannelInput,
    target: TcpStream,
    channel: &ChannelWriteHalf<Msg>,
    writer: &mut W,
    backlog: &Backlog,
    counts: &ChannelStat,
    stall_timeout: Duration,
) -> End {
    let (tr, mut tw) = target.into_split();
    let server_eof = AtomicBool::new(false);

    let end = {
        // Server -> target. After the server's EOF it keeps watching the inbox, so that a
        // close from the server is seen even while the other direction is still busy.
        let up = async {
            // What has queued up meanwhile goes out in one vectored write: one system call
            // per batch instead of one per SSH packet, and no copy.
            let mut batch: Vec<Bytes> = Vec::with_capacity(SPLICE_IOVECS);
            while let Some(chunk) = input.next_chunk().await {
                let mut len = chunk.len();
                batch.push(chunk);
                while len < SPLICE_BATCH && batch.len() < SPLICE_IOVECS {
                    match input.try_next_data() {
                        Some(b) => {
                            len += b.len();
                            batch.push(b);
                        }
                        None => break,
                    }
                }
                write_all_vectored(&mut tw, &mut batch, stall_timeout).await?;
                input.consumed(len);
                counts.add_to_target(len as u64);
            }
            if input.eof {
                server_eof.store(true, Ordering::Relaxed);
                tw.shutdown().await?;
                if let Some(n) = input.closed().await {
                    input.overflow = Some(n);
                }
            }
            Ok::<(), io::Error>(())
        };
        // Target -> server, then our EOF. A buffer exists only while data is in hand (an
        // idle channel holds none): with a thousand open channels, per-channel read buffers
        // would be most of the agent's memory. While the server's window for this channel is
        // open, the channel takes a turn and waits for room in the transport before it reads
        // (see `Backlog`), so output is produced no faster than the socket takes it.
        let down = async {
            loop {
                tr.readable().await?;
                let window = channel.writable_packet_size().await;
                // A small reply (a query result, a protocol message) goes to the session at
                // once: it must not wait for a turn behind bulk data. What fills the small
                // read is bulk, and waits like bulk (holding only that much meanwhile).
                let small = if window > 0 {
                    window.min(SMALL_READ)
                } else {
                    SPLICE_BUFFER_SIZE
                };
                let mut buf = BytesMut::with_capacity(small);
                let first = match tr.try_read_buf(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    // A reset after the client's EOF is how some servers end a session
                    // (PostgreSQL after Terminate, like any server closing with unread
                    // data): the exchange is over, so it ends the channel normally.
                    Err(e)
                        if e.kind() == io::ErrorKind::ConnectionReset
                            && server_eof.load(Ordering::Relaxed) =>
                    {
                        break
                    }
                    Err(e) => return Err(e),
                };
                let mut turn = None;
                if window > 0 && first == small && first < window {
                    // Bulk: take a turn and wait for room in the transport before reading
                    // the rest of a packet (see `Backlog`).
                    turn = backlog.turn().await;
                    backlog.wait_room().await;
                    buf.reserve(window.min(SPLICE_BUFFER_SIZE) - first);
                    match tr.try_read_buf(&mut buf) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // EOF and errors show again on the next read; first send what we have.
                        Err(_) => {}
                    }
                }
                let n = buf.len();
                // Owned bytes go to the session as they are: the `AsyncWrite` path would
                // copy them into a fresh allocation per packet.
                channel
                    .data_bytes(buf.freeze())
                    .await
                    .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
                drop(turn);
                counts.add_from_target(n as u64);
            }
            writer.shutdown().await
        };
        tokio::pin!(up, down);
        tokio::select! {
            r = &mut up => r.err(),
            r = &mut down => match r {
                Ok(()) if server_eof.load(Ordering::Relaxed) => None,
                Ok(()) => up.await.err(),
                Err(e) => Some(e),
            },
        }
    };
    if let Some(n) = input.overflow {
        return End::Overflow(n);
    }
    if let Some(e) = input.failed.take() {
        return End::Error(e);
    }
    match end {
        Some(e) if e.get_ref().is_some_and(|i| i.is::<Stalled>()) => End::Stalled(input.backlog()),
        Some(e) => End::Error(e),
        None => End::Normal,
    }
}

/// Write every byte of `batch` with vectored writes, leaving it empty. A write that takes
/// nothing for `stall` fails with [`Stalled`].
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &mut Vec<Bytes>,
    stall: Duration,
) -> io::Result<()> {
    let mut first = 0;
    while first < batch.len() {
        let slices: Vec<io::IoSlice<'_>> =
            batch[first..].iter().map(|b| io::IoSlice::new(b)).collect();
        let mut n = tokio::time::timeout(stall, w.write_vectored(&slices))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, Stalled))??;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let b = &mut batch[first];
            let k = n.min(b.len());
            b.advance(k);
            n -= k;
            if b.is_empty() {
                first += 1;
            }
        }
    }
    batch.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn settings(max_pending: u64, max_spill: u64) -> ForwardConfig {
        ForwardConfig {
            connect_timeout: Duration::from_secs(1),
            max_connections: 1,
            max_pending,
            max_spill,
            stall_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(1),
            policy: crate::policy::Policy::default(),
        }
    }

    #[tokio::test]
    async fn intake_counts_bytes_until_delivered_or_dropped() {
        let intake = Arc::new(Intake::default());
        let (mut inbox, mut input) = inbox(&settings(1 << 20, 0), intake.clone());
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
        let (mut inbox, input) = inbox(&settings(1000, 0), intake.clone());
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
        let (mut inbox, mut input) = inbox(&settings(1000, 3000), intake.clone());
        let data: Vec<u8> = (0..3500u32).map(|i| i as u8).collect();
        for part in data.chunks(500) {
            assert!(inbox.push(part));
        }
        // 1000 in memory, 2500 in the file: only the memory part counts.
        assert_eq!(intake.get(), 1000);
        assert_eq!(input.spilled.load(Ordering::Acquire), 2500);
        // The file is full: the next 1000 go to memory and count (the pause), then a cut.
        assert!(inbox.push(&data[..1000]));
        assert_eq!(intake.get(), 2000);
        let mut back = vec![0u8; 3500];
        input.read_exact(&mut back).await.unwrap();
        assert_eq!(back, data, "memory first, then the file, in arrival order");
        assert_eq!(input.spilled_total, 2500);
        assert_eq!(input.spilled.load(Ordering::Acquire), 0);
        drop(input);
        assert_eq!(intake.get(), 0);
    }
}
