//! The SSH transport socket, wrapped for the jobs russh cannot do itself.
//!
//! 1. **Writes never stop reads.** russh's session loop writes all its output before it reads
//!    again. OpenSSH's sshd stops reading from a client while it has much data queued for that
//!    client. With many busy channels both sides end up writing and neither reading: a
//!    deadlock (seen here with 1,000 concurrent echo channels). So `poll_write` and
//!    `poll_flush` never wait: what the socket does not take goes to a buffer, which drains
//!    whenever the session polls for reading (which it always does while idle), woken by
//!    write readiness. The buffer is kept small at the source instead: channel tasks wait on
//!    the session's [`Backlog`](crate::session::Backlog) before producing more (see
//!    `channel/splice.rs`), so memory stays bounded.
//! 2. **No delayed-ACK stalls.** sshd leaves Nagle on for forwarded channels, so a small
//!    reply (a SOCKS answer, a query result) waits in sshd until our delayed ACK (~40 ms)
//!    arrives. Re-arming `TCP_QUICKACK` after each read that empties the socket makes us ACK
//!    at once; reads that fill the buffer (bulk data, more behind it) skip the system call.
//!    The re-arm sends the pending ACK within the system call, so it is left to a small task
//!    of its own ([`Acker`]) that tokio runs after the channel task the packet woke: the ACK
//!    follows the packet's write to its target instead of delaying it.
//! 3. **Reading no faster than the channels deliver.** Each channel's window bounds its own
//!    backlog (channel/window.rs), but many busy channels together still hold a window each;
//!    this bounds the total. While
//!    more than `INTAKE_HIGH` counted bytes wait for targets (what counts: channel/inbox.rs;
//!    the first 256 KiB of each channel's in-memory backlog, and all of it beyond the
//!    channel's `max_pending`), the transport stops
//!    reading the socket and TCP holds the server back. Pausing must never stall the tunnel
//!    behind targets that stopped reading: if a pause sees no progress at all within
//!    `INTAKE_PAUSE_MAX`, pausing is off until the queue is below half the mark again (a
//!    stuck target is cut after `stall_timeout`, or at twice `max_pending` in memory).
//! 4. **Counting bytes received**, to know whether the server spoke at all, so a silent
//!    server (firewall, "stuck on the version number") is told apart from a slow handshake.
//! 5. **Fewer wake-ups for bulk data.** The agent decrypts faster than sshd encrypts, so
//!    during a bulk transfer it woke for every packet sshd wrote (about 20,000 times a GiB),
//!    and each wake-up costs the agent, sshd and the target a round of scheduling. After two
//!    large reads in a row, `SO_RCVLOWAT` makes the socket wake the agent only once
//!    `COALESCE_BYTES` are waiting; a wait that lasts `COALESCE_WAIT` drops the mark again
//!    and reads what is there (kernels before 4.19 do not signal it), so a burst's tail, or
//!    a small message that follows it, waits at most that long (1 to 2 ms with tokio's timer). Measured: a third
//!    of the wake-ups and a quarter of the system calls. Small messages on a quiet tunnel
//!    never see the mark, and the mark is only raised once the receive buffer is large
//!    enough that Linux does not clamp the TCP window to it.
//! 6. **Small replies do not queue behind bulk data.** With two bulk downloads running, the
//!    kernel's send buffer held megabytes of unsent data ahead of a small reply (a query
//!    result), and the socket took more as soon as there was room. `TCP_NOTSENT_LOWAT` keeps
//!    the unsent part small (what is in flight is unaffected, so throughput is not), and the
//!    buffer in front of the socket is bounded by `SSH_BACKLOG_HIGH`: a reply waits behind at
//!    most their sum.

use std::future::Future;
use std::io::{self, Read};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::constants::{
    COALESCE_AFTER_READ, COALESCE_BYTES, COALESCE_MIN_RCVBUF, COALESCE_RETRY_READS, COALESCE_WAIT,
    INTAKE_HIGH, INTAKE_PAUSE_MAX, SSH_NOTSENT_LOWAT, SSH_READ_BUFFER, TRANSPORT_BUFFER_KEEP,
};
use crate::session::SessionShared;
use crate::sys;

type Pause = Pin<Box<dyn Future<Output = bool> + Send>>;

pub struct Transport {
    tcp: TcpStream,
    pending: BytesMut,
    session: Arc<SessionShared>,
    rbuf: Box<[u8]>,
    rpos: usize,
    rlen: usize,
    /// A pause in progress, and the queue size when it began.
    pause: Option<(Pause, usize)>,
    /// A pause saw no progress: read freely until the queue is below half the mark.
    stuck: bool,
    coalesce: Coalesce,
    /// `None` outside a runtime or when the socket cannot be duplicated: re-arm in place.
    acker: Option<Acker>,
}

/// Point 2: re-arms `TCP_QUICKACK` on its own duplicate of the socket each time it is woken.
/// A task of its own because of the order tokio runs woken tasks in: the task woken last runs
/// first. The acker is woken when a small packet is read, before russh decodes it; the
/// channel task its data is for is woken after, so it writes to the target first and the
/// ACK goes right after, instead of a system call in between.
struct Acker {
    due: Arc<Notify>,
    task: AbortHandle,
}

impl Acker {
    fn spawn(tcp: &TcpStream) -> Option<Self> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        // Its own descriptor: the task may outlive the transport by a poll.
        let socket = socket2::SockRef::from(tcp).try_clone().ok()?;
        let due = Arc::new(Notify::new());
        let woken = due.clone();
        let task = runtime
            .spawn(async move {
                loop {
                    woken.notified().await;
                    // Best effort: a failure only costs latency.
                    let _ = socket.set_tcp_quickack(true);
                }
            })
            .abort_handle();
        Some(Acker { due, task })
    }
}

impl Drop for Acker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Point 5: consecutive large reads, and whether `SO_RCVLOWAT` is raised because of them.
#[derive(Default)]
struct Coalesce {
    /// The mark: `COALESCE_BYTES`, or less where the session's channels start with a small
    /// window (see [`Coalesce::for_window`]); 0: never coalesce.
    mark: usize,
    streak: u8,
    on: bool,
    /// While on, how long a wait for the socket may last before the mark drops.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
    /// Tests only: leave the kernel's mark up when it "drops", as a stand-in for a kernel
    /// before 4.19, which does not signal data already waiting when the mark is lowered.
    #[cfg(test)]
    kernel_ignores_lowering: bool,
}

impl Coalesce {
    /// One channel alone must be able to fill the mark with half its window in flight
    /// (channel/window.rs grants back once half is used up): a mark above that makes a lone
    /// bulk channel wait for the fallback timer on every read (seen: a 256 KiB window ran at a
    /// sixth of the speed). The default window (2 MiB) allows the whole `COALESCE_BYTES`
    /// (constants.rs asserts it); a `max_pending` under 1 MiB starts channels with a smaller
    /// window, and the mark shrinks with it, down to none below a large read.
    fn for_window(window: u32) -> Coalesce {
        let mark = COALESCE_BYTES.min(window as usize / 4);
        Coalesce {
            mark: if mark >= COALESCE_AFTER_READ { mark } else { 0 },
            ..Coalesce::default()
        }
    }

    /// After a read of `n` bytes. Bulk data starts coalescing; only a quiet spell (the timer)
    /// ends it, since the read right after a full one is often short while data keeps flowing.
    fn after_read(&mut self, tcp: &TcpStream, n: usize) {
        self.armed = false;
        if n >= COALESCE_AFTER_READ {
            self.streak = self.streak.wrapping_add(1);
            // Try at the second large read, and then only every `COALESCE_RETRY_READS`:
            // while the receive buffer is too small, each try costs a system call.
            if !self.on && self.mark > 0 && self.streak % COALESCE_RETRY_READS == 2 {
                self.set(tcp, true);
            }
        } else if !self.on {
            self.streak = 0;
        }
    }

    /// Raise or drop the mark. Raising needs a receive buffer of at least
    /// `COALESCE_MIN_RCVBUF`: below that, Linux would grow the buffer for the mark and clamp
    /// the TCP window to it, which a long-distance link would feel. A failure only costs
    /// wake-ups.
    fn set(&mut self, tcp: &TcpStream, on: bool) {
        if on {
            let big = socket2::SockRef::from(tcp)
                .recv_buffer_size()
                .is_ok_and(|b| b >= COALESCE_MIN_RCVBUF);
            self.on = big && set_recv_lowat(tcp, self.mark).is_ok();
        } else {
            #[cfg(test)]
            let lower = !self.kernel_ignores_lowering;
            #[cfg(not(test))]
            let lower = true;
            if lower {
                let _ = set_recv_lowat(tcp, 1);
            }
            self.on = false;
        }
        self.armed = false;
    }

    /// The socket had nothing to read. While on, arm the fallback timer; once a wait has
    /// lasted `COALESCE_WAIT`, drop the mark and say so (`true`): the caller then reads what
    /// is waiting. Only Linux 4.19 and later signal data already waiting when the mark is
    /// lowered; on older kernels (RHEL 8's 4.18, Amazon Linux 2's 4.14) a burst's tail below
    /// the mark would wait for the next packet, the keepalive reply 15 s later.
    fn poll_wait(&mut self, tcp: &TcpStream, cx: &mut Context<'_>) -> bool {
        if !self.on {
            return false;
        }
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(COALESCE_WAIT)));
        if !self.armed {
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + COALESCE_WAIT);
            self.armed = true;
        }
        if timer.as_mut().poll(cx).is_ready() {
            self.streak = 0;
            self.set(tcp, false);
            return true;
        }
        false
    }
}

impl Transport {
    pub fn new(tcp: TcpStream, session: Arc<SessionShared>) -> Self {
        // Best effort: without it (a kernel before 3.12), small replies queue behind more
        // bulk data, nothing else changes.
        let _ = set_notsent_lowat(&tcp, SSH_NOTSENT_LOWAT);
        let acker = Acker::spawn(&tcp);
        Transport {
            tcp,
            pending: BytesMut::new(),
            coalesce: Coalesce::for_window(session.initial_window),
            session,
            pause: None,
            stuck: false,
            rbuf: vec![0u8; SSH_READ_BUFFER].into_boxed_slice(),
            rpos: 0,
            rlen: 0,
            acker,
        }
    }

    /// Write buffered bytes until done (`Ready`) or the socket is full (`Pending`, with the
    /// task registered for write readiness).
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = self.drain_inner(cx);
        self.session.backlog.set(self.pending.len());
        if self.pending.is_empty() && self.pending.capacity() > TRANSPORT_BUFFER_KEEP {
            // A burst is over: give its memory back rather than keep the high-water mark.
            self.pending = BytesMut::new();
        }
        r
    }

    fn drain_inner(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            match Pin::new(&mut self.tcp).poll_write(cx, &self.pending) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.pending.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Transport {
    /// `Pending` while the channels have too much queued for their targets (see point 3).
    fn poll_intake(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let queued = self.session.intake.get();
            if let Some((pause, start)) = &mut self.pause {
                let drained = match pause.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(d) => d,
                };
                if !drained && queued >= *start {
                    log::debug!(
                        "{queued} bytes wait for targets that made no progress in {INTAKE_PAUSE_MAX:?}: \
                         reading the server on regardless until half of it is delivered \
                         (a target that stays stuck is cut after stall_timeout)"
                    );
                    self.stuck = true;
                }
                self.pause = None;
                return Poll::Ready(());
            }
            if self.stuck && queued <= INTAKE_HIGH / 2 {
                self.stuck = false;
            }
            if self.stuck || queued <= INTAKE_HIGH {
                return Poll::Ready(());
            }
            self.pause = Some((Box::pin(self.session.intake.clone().below_high()), queued));
        }
    }
}

/// `SO_RCVLOWAT`: readiness is signalled only once `bytes` are waiting (a read still returns
/// whatever is there). Lowering it signals data already waiting at once (Linux >= 4.19).
fn set_recv_lowat(tcp: &TcpStream, bytes: usize) -> io::Result<()> {
    sys::set_int_option(tcp, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// `TCP_NOTSENT_LOWAT`: the socket counts as writable only while fewer than `bytes` written
/// to it are still unsent (point 6).
fn set_notsent_lowat(tcp: &TcpStream, bytes: usize) -> io::Result<()> {
    sys::set_int_option(tcp, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, bytes)
}

impl AsyncRead for Transport {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Poll::Ready(Err(e)) = self.drain(cx) {
            return Poll::Ready(Err(e));
        }
        // russh reads each packet's header and body separately; serve those small reads from
        // one large socket read instead of a system call each.
        if self.rpos == self.rlen {
            if self.poll_intake(cx).is_pending() {
                return Poll::Pending;
            }
            let this = &mut *self;
            let mut rb = ReadBuf::new(&mut this.rbuf);
            let n = match Pin::new(&mut this.tcp).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => rb.filled().len(),
                Poll::Pending if this.coalesce.poll_wait(&this.tcp, cx) => {
                    // The mark just dropped: read what waits below it now, past tokio's
                    // readiness (cleared, and on an older kernel nothing would set it). It
                    // all fits: the buffer holds a whole mark's worth.
                    match (&*socket2::SockRef::from(&this.tcp)).read(&mut this.rbuf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            };
            (this.rpos, this.rlen) = (0, n);
            this.coalesce.after_read(&this.tcp, n);
            if n > 0 {
                this.session.received.fetch_add(n as u64, Ordering::Relaxed);
                // Whenever a read empties the socket: what came last may be a segment
                // shorter than a full one, which the kernel ACKs only when its delayed-ACK
                // timer fires, and until then sshd's Nagle holds any small packet (another
                // channel's ping) behind it. A slow target's data arrives as such bursts
                // all the time, one per window grant, and a read may take a whole burst
                // (docs/performance.md, "A long COPY"). A read that fills the buffer leaves more to
                // come, which the kernel ACKs as it arrives.
                if n < this.rbuf.len() {
                    match &this.acker {
                        Some(acker) => acker.due.notify_one(),
                        // Best effort: a failure only costs latency.
                        None => {
                            let _ = socket2::SockRef::from(&this.tcp).set_tcp_quickack(true);
                        }
                    }
                }
            }
        }
        let this = &mut *self;
        let n = buf.remaining().min(this.rlen - this.rpos);
        buf.put_slice(&this.rbuf[this.rpos..this.rpos + n]);
        this.rpos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.pending.is_empty() {
            match Pin::new(&mut self.tcp).poll_write(cx, data) {
                Poll::Ready(Ok(n)) if n == data.len() => return Poll::Ready(Ok(n)),
                Poll::Ready(Ok(n)) => {
                    self.pending.extend_from_slice(&data[n..]);
                    self.session.backlog.set(self.pending.len());
                    return Poll::Ready(Ok(data.len()));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        } else if let Poll::Ready(Err(e)) = self.drain(cx) {
            return Poll::Ready(Err(e));
        }
        // The attempt above registered this task for write readiness.
        self.pending.extend_from_slice(data);
        self.session.backlog.set(self.pending.len());
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Deliberately "done" while bytes are still buffered: the reader side finishes the job.
        match self.drain(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.tcp).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants::SSH_WINDOW_SIZE;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A transport over a real loopback connection, and its peer.
    async fn pair() -> (Transport, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let t = Transport::new(tcp, Arc::default());
        (t, peer)
    }

    /// A lone channel fills the mark with half its window in flight, whatever max_pending
    /// made the window: the full mark for the default, less for smaller, none below a read.
    #[test]
    fn the_coalescing_mark_fits_half_the_sessions_window() {
        assert_eq!(Coalesce::for_window(SSH_WINDOW_SIZE).mark, COALESCE_BYTES);
        assert_eq!(Coalesce::for_window(512 * 1024).mark, 128 * 1024);
        assert!(2 * Coalesce::for_window(256 * 1024).mark <= 128 * 1024);
        assert_eq!(Coalesce::for_window(64 * 1024).mark, 0);
    }

    /// Read `n` bytes; a read stalled for 10 s fails the test instead of hanging it.
    async fn read_exactly(t: &mut Transport, n: usize) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < n {
            let k = tokio::time::timeout(Duration::from_secs(10), t.read(&mut buf))
                .await
                .expect("a read stalled")
                .unwrap();
            assert!(k > 0, "early EOF");
            got += k;
        }
        assert_eq!(got, n);
    }

    /// Bulk data until coalescing is on (a pause of the writer longer than the fallback turns
    /// it off again, so look after each MiB).
    async fn coalesce(t: &mut Transport, peer: &mut TcpStream) {
        let block = vec![7u8; 1 << 20];
        for _ in 0..256 {
            let (w, ()) = tokio::join!(peer.write_all(&block), read_exactly(t, block.len()));
            w.unwrap();
            if t.coalesce.on {
                return;
            }
        }
        let rcvbuf = socket2::SockRef::from(&t.tcp).recv_buffer_size().unwrap();
        panic!("256 MiB of bulk data did not start coalescing (receive buffer {rcvbuf} bytes)");
    }

    /// A message far below the mark, with nothing after it, lands while the agent is not
    /// reading: the mark keeps the kernel from signalling it, and the fallback must deliver
    /// it, not more data. (First a read that finds nothing, so that the runtime's own
    /// readiness flag is clear, as after any quiet spell.)
    async fn a_short_tail_arrives(t: &mut Transport, peer: &mut TcpStream) {
        let quiet = t.tcp.try_read(&mut [0u8; 1]);
        assert!(matches!(quiet, Err(ref e) if e.kind() == io::ErrorKind::WouldBlock));
        peer.write_all(&[1u8; 100]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        read_exactly(t, 100).await;
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_millis(500),
            "a 100-byte tail waited {waited:?}"
        );
    }

    #[tokio::test]
    async fn bulk_data_coalesces_and_a_short_tail_still_arrives_at_once() {
        let (mut t, mut peer) = pair().await;
        coalesce(&mut t, &mut peer).await;
        a_short_tail_arrives(&mut t, &mut peer).await;
        assert!(!t.coalesce.on, "coalescing outlived the burst");

        // Quiet again: the next small message needs no timer.
        let started = Instant::now();
        peer.write_all(&[2u8; 100]).await.unwrap();
        read_exactly(&mut t, 100).await;
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    /// On a kernel before 4.19, dropping the mark signals nothing: a burst's tail below it
    /// must still arrive within the fallback wait, not with the next packet. The stand-in
    /// leaves the kernel's mark up, so only the transport's own read can deliver the tail.
    #[tokio::test]
    async fn without_the_kernels_signal_a_tail_below_the_mark_still_arrives() {
        let (mut t, mut peer) = pair().await;
        t.coalesce.kernel_ignores_lowering = true;
        coalesce(&mut t, &mut peer).await;
        a_short_tail_arrives(&mut t, &mut peer).await;
    }

    /// Point 2: a small read re-arms `TCP_QUICKACK`, from the acker task, so not before the
    /// reading task yields (a channel task woken by the packet would write to its target
    /// first), and every time.
    #[tokio::test]
    async fn a_small_read_re_arms_quickack_once_the_reader_yields() {
        let (mut t, mut peer) = pair().await;
        // The same socket, through a descriptor of the test's own.
        let sock = socket2::SockRef::from(&t.tcp).try_clone().unwrap();
        for round in 0..3u8 {
            // The kernel's delayed-ACK ("ping-pong") mode, as after any exchange.
            sock.set_tcp_quickack(false).unwrap();
            assert!(!sock.tcp_quickack().unwrap());
            let started = Instant::now();
            peer.write_all(&[round; 100]).await.unwrap();
            read_exactly(&mut t, 100).await;
            // The kernel leaves that mode by itself when a delayed ACK times out (40 ms at
            // least): only a check made well before then can tell the acker's work apart.
            let early = started.elapsed() < Duration::from_millis(20);
            if early {
                assert!(
                    !sock.tcp_quickack().unwrap(),
                    "round {round}: re-armed in the read's own path"
                );
            }
            tokio::task::yield_now().await;
            assert!(
                sock.tcp_quickack().unwrap(),
                "round {round}: not re-armed after the reader yielded"
            );
        }
    }

    #[tokio::test]
    async fn small_messages_never_coalesce() {
        let (mut t, mut peer) = pair().await;
        for _ in 0..200 {
            peer.write_all(&[3u8; 1000]).await.unwrap();
            read_exactly(&mut t, 1000).await;
            assert!(!t.coalesce.on);
        }
    }
}
