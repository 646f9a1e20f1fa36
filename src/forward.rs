//! One forwarded channel: read its SOCKS request, check the destination policy, resolve and
//! connect, answer, then splice bytes both ways with half-close.
//!
//! Data from the server reaches a channel through an [`Inbox`] that the SSH session pushes
//! into without ever waiting (see `tunnel.rs`), so a target that stops reading can only fill
//! its own channel's buffer; past `max_pending` that channel alone is cut.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

use crate::config::ForwardConfig;
use crate::connect;
use crate::constants::{
    CHANNEL_CLOSE_WAIT, CONNECT_STAGGER, SOCKS_HANDSHAKE_TIMEOUT, SPLICE_BATCH, SPLICE_BUFFER_SIZE,
    SPLICE_IOVECS,
};
use crate::socks::{self, Host, Reply, Request};
use crate::telemetry::{ChannelStat, Telemetry};
use crate::transport::{Backlog, Intake};

/// What the session hands a channel task.
#[derive(Debug)]
pub enum Inbound {
    Data(Bytes),
    Eof,
    /// The target fell behind by more than `max_pending` bytes.
    Overflow(u64),
}

/// The session's end of a channel's input: pushes never wait.
pub struct Inbox {
    tx: mpsc::UnboundedSender<Inbound>,
    pending: Arc<AtomicU64>,
    max_pending: u64,
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
    /// Bytes received but not yet handed on (a partly read chunk during the handshake).
    leftover: Bytes,
    eof: bool,
    overflow: Option<u64>,
    /// Signalled on overflow, so the channel is cut even while its task waits on the target.
    cut: Arc<Notify>,
    intake: Arc<Intake>,
}

/// Every byte counted in a channel's `pending` is also counted in the session's [`Intake`],
/// until it is delivered or the channel's task ends.
pub fn inbox(max_pending: u64, intake: Arc<Intake>) -> (Inbox, ChannelInput) {
    let (tx, rx) = mpsc::unbounded_channel();
    let pending = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(Notify::new());
    (
        Inbox {
            tx,
            pending: pending.clone(),
            max_pending,
            cut: cut.clone(),
            intake: intake.clone(),
            queued: None,
        },
        ChannelInput {
            rx,
            pending,
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
        let pending = self.pending.fetch_add(len, Ordering::AcqRel) + len;
        if pending & CLOSED != 0 {
            return false;
        }
        self.intake.add(len);
        if pending > self.max_pending {
            let _ = self.tx.send(Inbound::Overflow(pending));
            self.cut.notify_one();
            return false;
        }
        let data = queued.unwrap_or_else(|| Bytes::copy_from_slice(data));
        self.tx.send(Inbound::Data(data)).is_ok()
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
    /// The next chunk from the server; `None` at EOF, on close or overflow.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.leftover.is_empty() {
            return Some(std::mem::take(&mut self.leftover));
        }
        if self.eof || self.overflow.is_some() {
            return None;
        }
        let m = self.rx.recv().await?;
        self.take(m)
    }

    /// Data is handed on; EOF and overflow are recorded.
    fn take(&mut self, m: Inbound) -> Option<Bytes> {
        match m {
            Inbound::Data(b) => Some(b),
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
        if self.eof || self.overflow.is_some() {
            return None;
        }
        let m = self.rx.try_recv().ok()?;
        self.take(m)
    }

    /// Count bytes as delivered to the target.
    fn consumed(&self, n: usize) {
        self.pending.fetch_sub(n as u64, Ordering::AcqRel);
        self.intake.sub(n as u64);
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
        let left = self.pending.swap(CLOSED, Ordering::AcqRel);
        self.intake.sub(left & !CLOSED);
    }
}

impl AsyncRead for ChannelInput {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.leftover.is_empty() && !this.eof && this.overflow.is_none() {
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

/// A count that can be waited on until it reaches zero (open channels, globally or per session).
#[derive(Default)]
pub struct Gauge {
    count: AtomicUsize,
    zero: Notify,
}

impl Gauge {
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
pub struct GaugeGuard(Vec<Arc<Gauge>>);

impl GaugeGuard {
    pub fn new(gauges: Vec<Arc<Gauge>>) -> Self {
        for g in &gauges {
            g.count.fetch_add(1, Ordering::AcqRel);
        }
        GaugeGuard(gauges)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        for g in &self.0 {
            if g.count.fetch_sub(1, Ordering::AcqRel) == 1 {
                g.zero.notify_waiters();
            }
        }
    }
}

/// What every channel shares: the live forward settings, the channel count and telemetry.
pub struct Forwarder {
    settings: RwLock<Arc<ForwardConfig>>,
    pub active: Arc<Gauge>,
    pub telemetry: Arc<Telemetry>,
}

impl Forwarder {
    pub fn new(settings: ForwardConfig, telemetry: Arc<Telemetry>) -> Self {
        Forwarder {
            settings: RwLock::new(Arc::new(settings)),
            active: telemetry.active.clone(),
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

/// Run one channel to its end. `guard` is released when the channel is done.
pub async fn serve_channel(
    mut input: ChannelInput,
    channel: ChannelWriteHalf<Msg>,
    fwd: Arc<Forwarder>,
    guard: GaugeGuard,
    origin: ChannelContext,
) {
    let settings = fwd.settings();
    let metrics = &fwd.telemetry.metrics;
    let mut writer = channel.make_writer();
    let started = Instant::now();
    let over_limit = fwd.active.get() > settings.max_connections;

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
                fwd.active.get() - 1,
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
        end = splice(&mut input, stream, &channel, &mut writer, &origin.backlog, &counts) => end,
        _ = cut.notified() => End::Overflow(input.pending.load(Ordering::Acquire)),
    };
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
    match end {
        End::Normal => log::info!(
            target = target.as_str(), bytes_to_target = up, bytes_from_target = down, duration_s = secs;
            "channel to {target} closed after {secs:.1}s: {up} bytes to target, {down} bytes from target"),
        End::Overflow(pending) => log::warn!(
            target = target.as_str(), bytes_to_target = up, bytes_from_target = down, duration_s = secs, error_class = "overflow";
            "channel to {target} cut: the target fell {pending} bytes behind the server ([forward] max_pending is {}); other channels are unaffected", settings.max_pending),
        End::Error(e) => log::info!(
            target = target.as_str(), bytes_to_target = up, bytes_from_target = down, duration_s = secs, error_class = "io";
            "channel to {target} ended after {secs:.1}s: {e} ({up} bytes to target, {down} bytes from target)"),
    }
}

/// End a channel the agent will not serve (a bad or late SOCKS request, a denied or failed
/// target) the way the normal path ends one: send EOF and let the server close it (see
/// [`close_after_server`]). The channel no longer counts as open meanwhile.
async fn refuse(channel: &ChannelWriteHalf<Msg>, input: &mut ChannelInput, guard: GaugeGuard) {
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
    Error(io::Error),
}

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
                write_all_vectored(&mut tw, &mut batch).await?;
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
                let turn = if window > 0 {
                    let turn = backlog.turn().await;
                    backlog.wait_room().await;
                    turn
                } else {
                    None
                };
                let mut buf = BytesMut::with_capacity(if window > 0 {
                    window.min(SPLICE_BUFFER_SIZE)
                } else {
                    SPLICE_BUFFER_SIZE
                });
                match tr.try_read_buf(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        // Owned bytes go to the session as they are: the `AsyncWrite` path
                        // would copy them into a fresh allocation per packet.
                        channel
                            .data_bytes(buf.freeze())
                            .await
                            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
                        drop(turn);
                        counts.add_from_target(n as u64);
                    }
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
                }
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
    match (input.overflow, end) {
        (Some(n), _) => End::Overflow(n),
        (None, Some(e)) => End::Error(e),
        (None, None) => End::Normal,
    }
}

/// Write every byte of `batch` with vectored writes, leaving it empty.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &mut Vec<Bytes>,
) -> io::Result<()> {
    let mut first = 0;
    while first < batch.len() {
        let slices: Vec<io::IoSlice<'_>> =
            batch[first..].iter().map(|b| io::IoSlice::new(b)).collect();
        let mut n = w.write_vectored(&slices).await?;
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

    #[tokio::test]
    async fn intake_counts_bytes_until_delivered_or_dropped() {
        let intake = Arc::new(Intake::default());
        let (mut inbox, mut input) = inbox(1 << 20, intake.clone());
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
    async fn intake_is_released_by_a_channel_cut_for_overflow() {
        let intake = Arc::new(Intake::default());
        let (mut inbox, input) = inbox(1000, intake.clone());
        assert!(inbox.push(&[0; 600]));
        assert!(
            !inbox.push(&[0; 600]),
            "past max_pending the channel is cut"
        );
        assert!(intake.get() >= 600);
        drop(input);
        assert_eq!(intake.get(), 0);
    }
}
