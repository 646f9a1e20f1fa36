//! Copying a channel's bytes both ways once its target is connected: server to target from
//! the channel's input in vectored batches, target to server paced by the SSH window, the
//! session's budget for data in flight (flight.rs) and the transport's backlog, with
//! half-close, and a cut for a target that takes nothing for `stall_timeout`.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use russh::client::Msg;
use russh::ChannelWriteHalf;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;

use super::inbox::ChannelInput;
use crate::constants::{SMALL_READ, SPLICE_BATCH, SPLICE_BUFFER_SIZE, SPLICE_IOVECS};
use crate::session::Flight;
use crate::session::SessionShared;
use crate::telemetry::ChannelStat;

pub(super) enum End {
    /// Both sides ended; `client_first`: Secoda's side sent its EOF before the target did.
    Normal {
        client_first: bool,
    },
    Overflow(u64),
    /// The target took nothing for `stall_timeout`; the bytes that were waiting for it.
    Stalled(u64),
    Error(io::Error),
    /// A reload's policy denies the target (channel/mod.rs): why.
    Revoked(String),
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

/// Where a channel's bytes for the server go: russh's channel in the agent, a recorder in
/// tests. `window` is what may be sent now (0 while the server's window is shut).
pub(super) trait ChannelOutput {
    fn window(&self) -> impl Future<Output = usize> + Send;
    fn send(&self, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
}

impl ChannelOutput for ChannelWriteHalf<Msg> {
    async fn window(&self) -> usize {
        self.writable_packet_size().await
    }

    async fn send(&self, data: Bytes) -> io::Result<()> {
        // Owned bytes go to the session as they are: the `AsyncWrite` path would copy them
        // into a fresh allocation per packet.
        self.data_bytes(data)
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

/// Copy both ways until both sides are done. EOF in one direction is passed on as a
/// half-close (`writer`'s shutdown) and the other direction keeps flowing. A close from the
/// server, an overflow, or an error on either side ends both.
pub(super) async fn splice<C: ChannelOutput, W: AsyncWrite + Unpin>(
    input: &mut ChannelInput,
    target: TcpStream,
    channel: &C,
    writer: &mut W,
    session: &SessionShared,
    counts: &ChannelStat,
    stall_timeout: Duration,
) -> End {
    let (mut tr, mut tw) = target.into_split();
    let server_eof = AtomicBool::new(false);
    // Set when the target ended first (its EOF before Secoda's side's).
    let target_first = AtomicBool::new(false);
    let backlog = &session.backlog;
    let acks = input.acks.clone();
    let mut flight = Flight::new(&acks, &session.flight);

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
        // would be most of the agent's memory. A channel over the session's budget for data in
        // flight waits for the server to pass some of its data on (flight.rs). While the
        // server's window for this channel is open, the channel takes a turn and waits for
        // room in the transport before it reads (see `Backlog`), so output is produced no
        // faster than the socket takes it.
        let down = async {
            loop {
                tr.readable().await?;
                flight.room().await;
                let window = channel.window().await;
                // A small reply (a query result, a protocol message) goes to the session at
                // once: it must not wait for a turn behind bulk data. What fills the small
                // read is bulk, and waits like bulk (holding only that much meanwhile).
                let small = if window > 0 {
                    window.min(SMALL_READ)
                } else {
                    SPLICE_BUFFER_SIZE
                };
                let mut buf = BytesMut::with_capacity(small);
                let first = match read_now(&mut tr, &mut buf, small) {
                    Ok(0) => {
                        target_first.store(!server_eof.load(Ordering::Relaxed), Ordering::Relaxed);
                        break;
                    }
                    Ok(n) => n,
                    // Either the socket was drained after all, or the task's cooperative
                    // budget ran out: tokio's `readable()` does not count against the budget
                    // but the read does, so without a yield the loop would spin on a ready
                    // socket it may not read, and stop the worker thread (seen in a test).
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        tokio::task::coop::consume_budget().await;
                        continue;
                    }
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
                    // Never more than the window: the send would then wait for the server's
                    // adjust while holding the turn, and a few channels whose readers on
                    // Secoda's side are slow would hold every turn. (`reserve` may allocate
                    // more than asked; the read is limited, not the buffer.)
                    let rest = window.min(SPLICE_BUFFER_SIZE) - first;
                    buf.reserve(rest);
                    match read_now(&mut tr, &mut buf, rest) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // EOF and errors show again on the next read; first send what we have.
                        Err(_) => {}
                    }
                }
                let n = buf.len();
                // A read that emptied the socket before filling the probe is a reply.
                let reply = window > 0 && first < small;
                channel.send(buf.freeze()).await?;
                flight.sent(n, reply);
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
        None => End::Normal {
            client_first: !target_first.load(Ordering::Relaxed),
        },
    }
}

/// One read of what the target has sent, without waiting: like `try_read_buf`, but through
/// tokio's `poll_read`, which marks the socket drained when a read comes back short. After a
/// reply the next `readable()` then waits at once, where `try_read_buf` would leave the socket
/// marked ready and the loop would make a read that can only fail with `WouldBlock`, between
/// the reply's hand-over and the session's send of it.
/// At most `max` bytes are read, whatever room `buf` has.
fn read_now(tr: &mut OwnedReadHalf, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    let mut limited = buf.limit(max);
    let read = std::pin::pin!(tr.read_buf(&mut limited));
    match read.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
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
    use std::sync::{Arc, Mutex};

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::channel::inbox;
    use crate::config::ForwardConfig;
    use crate::constants::SSH_OUTPUT_TURNS;
    use crate::session::Intake;
    use crate::telemetry::{Endpoints, Telemetry};

    /// Records what the channel sends to the server; its window is always open.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<u8>>);

    impl ChannelOutput for Recorder {
        async fn window(&self) -> usize {
            32 * 1024
        }

        async fn send(&self, data: Bytes) -> io::Result<()> {
            self.0.lock().unwrap().extend_from_slice(&data);
            Ok(())
        }
    }

    fn settings() -> ForwardConfig {
        ForwardConfig {
            connect_timeout: Duration::from_secs(1),
            max_connections: 1,
            max_connections_per_target: 0,
            connect_rate_per_target: 0,
            max_pending: 1 << 20,
            max_spill: 0,
            stall_timeout: Duration::from_secs(60),
            target_keepalive: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(1),
            policy: crate::policy::Policy::default(),
        }
    }

    /// A connected target socket pair, a channel's inbox and input, and its counters.
    struct Fixture {
        agent_side: TcpStream,
        target: TcpStream,
        inbox: inbox::Inbox,
        input: ChannelInput,
        counts: Arc<ChannelStat>,
    }

    async fn fixture() -> Fixture {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent_side = TcpStream::connect(listener.local_addr().unwrap());
        let (agent_side, accepted) = tokio::join!(agent_side, listener.accept());
        let (inbox, input) = inbox::inbox(
            &settings(),
            Arc::new(Intake::default()),
            prometheus_client::metrics::gauge::Gauge::default(),
        );
        let telemetry = Telemetry::new(
            None,
            Endpoints {
                server: "s:22".into(),
                listen: "l:1".into(),
                proxy: None,
                pair: false,
            },
        );
        Fixture {
            agent_side: agent_side.unwrap(),
            target: accepted.unwrap().0,
            inbox,
            input,
            counts: telemetry.open_channel("t:1".into(), "o:1".into()),
        }
    }

    /// Both directions through a real socket pair, without SSH: the server's bytes reach the
    /// target, the target's reach the channel, and each EOF is passed on as a half-close.
    #[tokio::test]
    async fn both_directions_with_half_close() {
        let Fixture {
            agent_side,
            mut target,
            mut inbox,
            mut input,
            counts,
        } = fixture().await;
        let (output, session) = (Recorder::default(), SessionShared::default());
        let mut eof = tokio::io::sink();

        let from_server: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for part in from_server.chunks(32 * 1024) {
            assert!(inbox.push(part));
        }
        inbox.eof();
        let target_side = async {
            let mut got = Vec::new();
            target.read_to_end(&mut got).await.unwrap();
            target
                .write_all(b"reply after the server's EOF")
                .await
                .unwrap();
            target.shutdown().await.unwrap();
            got
        };
        let splicing = splice(
            &mut input,
            agent_side,
            &output,
            &mut eof,
            &session,
            &counts,
            Duration::from_secs(60),
        );
        // The server closes the channel once both sides sent EOF: here, when the inbox goes.
        let both = async {
            tokio::join!(
                async {
                    let end = splicing.await;
                    drop(inbox);
                    end
                },
                target_side
            )
        };
        let (end, got) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("a direction never ended: an EOF was not passed on");
        assert!(
            matches!(end, End::Normal { .. }),
            "the splice did not end normally"
        );
        assert_eq!(got, from_server);
        assert_eq!(
            &output.0.lock().unwrap()[..],
            b"reply after the server's EOF"
        );
        assert_eq!(counts.to_target.load(Ordering::Relaxed), 200_000);
    }

    /// A server window of 6 KiB, re-opened after each send: what russh does with a send
    /// larger than the window is wait for the server's adjust, here forever.
    struct SmallWindow {
        window: usize,
        got: Mutex<Vec<u8>>,
        largest: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl ChannelOutput for SmallWindow {
        async fn window(&self) -> usize {
            self.window
        }

        async fn send(&self, data: Bytes) -> io::Result<()> {
            self.largest.fetch_max(data.len(), Ordering::Relaxed);
            if data.len() > self.window {
                std::future::pending::<()>().await;
            }
            self.got.lock().unwrap().extend_from_slice(&data);
            Ok(())
        }
    }

    /// With between 4 and 8 KiB of window left, no read (and so no send) may exceed it:
    /// a send that waits for the window holds its output turn, and with turns held that way
    /// every channel's output stops. Run on a thread of its own, so that a splice that waits
    /// for ever or spins fails the test rather than hanging it.
    #[test]
    fn no_send_exceeds_the_window_and_turns_come_back() {
        const WINDOW: usize = 6 * 1024;
        let largest = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (done_tx, done) = std::sync::mpsc::channel();
        let seen = largest.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _ = done_tx.send(rt.block_on(small_window_splice(WINDOW, seen)));
        });
        let done = done.recv_timeout(Duration::from_secs(20));
        let largest = largest.load(Ordering::Relaxed);
        assert!(
            largest <= WINDOW,
            "a send of {largest} bytes with a window of {WINDOW}"
        );
        let (end, got_all, free_turns) =
            done.expect("the splice neither ended nor waited: it spun");
        assert!(end, "the splice did not end normally");
        assert!(got_all, "the target's bytes did not all arrive in order");
        assert_eq!(free_turns, SSH_OUTPUT_TURNS);
    }

    /// 1 MB from the target through a small window: whether the splice ended normally with
    /// every byte, and the output turns free afterwards.
    async fn small_window_splice(
        window: usize,
        largest: Arc<std::sync::atomic::AtomicUsize>,
    ) -> (bool, bool, usize) {
        let Fixture {
            agent_side,
            mut target,
            mut inbox,
            mut input,
            counts,
        } = fixture().await;
        let output = SmallWindow {
            window,
            got: Mutex::default(),
            largest,
        };
        let session = SessionShared::default();
        let mut eof = tokio::io::sink();
        inbox.eof();
        let from_target: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let target_side = async {
            target.write_all(&from_target).await.unwrap();
            target.shutdown().await.unwrap();
        };
        let splicing = splice(
            &mut input,
            agent_side,
            &output,
            &mut eof,
            &session,
            &counts,
            Duration::from_secs(60),
        );
        let (end, ()) = tokio::join!(
            async {
                let end = splicing.await;
                drop(inbox);
                end
            },
            target_side
        );
        let got_all = *output.got.lock().unwrap() == from_target;
        (
            matches!(end, End::Normal { .. }),
            got_all,
            session.backlog.free_turns(),
        )
    }
}
