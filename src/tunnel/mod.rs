//! One SSH session: connect out, pin the host key, authenticate, ask for the dynamic remote
//! forward, and hand each forwarded channel to `channel/`.
//!
//! Head-of-line blocking: russh pushes incoming channel data into a bounded per-channel queue
//! with an awaited send, so a channel whose reader stalls would freeze the whole session. No
//! channel task reads those queues: data arrives through the handler's `data` callback, which
//! queues it in the channel's own [`Inbox`] without waiting. The handler itself empties
//! russh's queue in every callback for the channel (taking the data from it without a copy),
//! so the queue never fills; see [`Inbox::with_queue`].

mod dial;
mod handler;
mod ssh;

pub use dial::open_tcp;
pub use ssh::{aes_in_hardware, cipher_preference, ssh_config};

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg};
use tokio::sync::oneshot;

use crate::algorithms::Negotiated;
use crate::channel::{self, Forwarder};
use crate::config::{fingerprint, TunnelConfig};
use crate::constants::*;
use crate::error::TunnelError;
use crate::session::{FlightControl, SessionShared};
use crate::sys;
use crate::transport::Transport;
use handler::{HandlerError, SessionHandler};

/// An established session with the remote forward in place.
pub struct Session {
    /// Shared with a take-over in flight (`Session::ask_again`).
    handle: Arc<Handle<SessionHandler>>,
    shared: Arc<SessionShared>,
    pub listen: (String, u16),
    pub server: String,
    pub since: Instant,
    /// Since when the server has refused the forward on this otherwise healthy session (the
    /// port held by another session, or not permitted): the agent asks again. `None` while
    /// the forward is in place.
    refused: Option<Instant>,
    keepalive_window: Duration,
    ended: oneshot::Receiver<TunnelError>,
    finished: bool,
    next_probe: tokio::time::Instant,
    probe_deadline: Option<tokio::time::Instant>,
    /// Probes still to come `PATH_PROBE_INTERVAL` apart (learning the path's round trip).
    path_probes: u32,
    /// Bytes read from the server so far, and at the start of the current probe.
    received_at_probe: u64,
    /// A second descriptor of the session's TCP socket (to the server, or to the proxy), to
    /// shut the connection down when the session is torn down: dropping russh's `Handle`
    /// does not end its session task while channels hold senders to it, nor a task that is
    /// stuck. Shut, the server (through a proxy: the proxy, then the server) sees the session
    /// end and frees the listen port.
    socket: Option<OwnedFd>,
}

/// The socket of a lost session (see [`Session::abandon`]). Closing it normally leaves the
/// connection to the kernel's backed-off retransmissions; [`Stale::reset`] ends it at once.
#[derive(Default)]
pub struct Stale(Option<OwnedFd>);

impl Stale {
    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// Close the old connection abortively: the kernel sends a reset (with a sequence number
    /// the server accepts, or after its challenge ACK, RFC 5961), so the server ends that
    /// session and frees the listen port for ours. Called once a new connection has been
    /// answered: the path is back, so the reset gets through.
    pub fn reset(&mut self) {
        if let Some(fd) = self.0.take() {
            let sock = socket2::SockRef::from(&fd);
            if sock.set_linger(Some(Duration::ZERO)).is_ok() {
                log::debug!(
                    "reset the lost session's connection, so that the server frees its port"
                );
            }
        }
    }
}

/// Ask the server to listen on the tunnel's port: `Ok(false)` when it refuses (the port is
/// held by another session, or this account may not forward it). Once granted, the first samples of the path's round trip
/// (session/flight.rs `FlightControl::rtt`, which the budget and the channels' windows use):
/// the request's own time, a ping's, and the kernel's reading of the connection (`socket`).
/// The liveness probes refine them (`Session::closed`).
async fn request_forward(
    handle: &Handle<SessionHandler>,
    shared: &SessionShared,
    server: &str,
    (address, port): (&str, u16),
    socket: Option<&OwnedFd>,
) -> Result<bool, TunnelError> {
    let asked = Instant::now();
    match handle.tcpip_forward(address, u32::from(port)).await {
        Ok(_) => {
            let forward = asked.elapsed();
            shared.flight.round_trip(forward);
            // The request's answer waited on sshd's work (80 ms on a 40 ms path, 1 ms on
            // loopback): a ping straight after is the first fair sample.
            let pinged = tokio::time::Instant::now();
            if probe(handle, Some(pinged + PATH_PROBE_WAIT)).await.is_ok() {
                shared.flight.round_trip(pinged.elapsed());
            }
            let kernel = note_kernel_round_trip(shared, socket);
            log::debug!(
                "round trip to {server}: {:?} (the forward request's {forward:?} and a ping, the kernel's {kernel:?}); windows and the budget for data in flight follow from it",
                shared.flight.rtt().unwrap_or_default(),
            );
            Ok(true)
        }
        Err(russh::Error::RequestDenied) => Ok(false),
        Err(e) => Err(TunnelError::Lost {
            reason: e.to_string(),
        }),
    }
}

/// The kernel's round trip of the session's connection, noted for `FlightControl::rtt`.
fn note_kernel_round_trip(shared: &SessionShared, socket: Option<&OwnedFd>) -> Option<Duration> {
    let rtt = socket.and_then(sys::tcp_round_trip)?;
    shared.flight.kernel_round_trip(rtt);
    Some(rtt)
}

/// A ping that must come back by `deadline` (`None`: now).
async fn probe(
    handle: &Handle<SessionHandler>,
    deadline: Option<tokio::time::Instant>,
) -> Result<(), ()> {
    let deadline = deadline.unwrap_or_else(tokio::time::Instant::now);
    match tokio::time::timeout_at(deadline, handle.send_ping()).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Connect, authenticate and request the forward (unless `forward` is false: a new binary's
/// process waits for the old one to give the port back, handover.rs). Every failure is
/// classified. `stale`, a lost session's connection, is reset as soon as the new one is
/// answered.
pub async fn establish(
    t: &TunnelConfig,
    fwd: Arc<Forwarder>,
    stale: &mut Stale,
    forward: bool,
) -> Result<Session, TunnelError> {
    let server = t.route();
    let tcp = open_tcp(t).await?;
    stale.reset();
    // Kept to tear the session down (see `Session::socket`).
    let socket = tcp.as_fd().try_clone_to_owned().ok();
    tcp.set_nodelay(true).map_err(|e| TunnelError::Connect {
        server: server.clone(),
        via: String::new(),
        reason: e.to_string(),
    })?;

    let initial_window = channel::initial_window(fwd.settings().max_pending);
    let shared = Arc::new(SessionShared {
        flight: FlightControl::new(fwd.telemetry.metrics.in_flight_bytes.clone()),
        initial_window,
        ..SessionShared::default()
    });
    let keepalive_window = t.keepalive_interval * t.keepalive_max.max(1);
    let (ended_tx, ended_rx) = oneshot::channel();
    let handler = SessionHandler {
        pins: t.host_keys.clone(),
        fwd,
        shared: shared.clone(),
        inboxes: HashMap::new(),
        prune_at: 64,
        ended: Some(ended_tx),
        keepalive_window,
        listen_port: t.listen_port,
    };
    let transport = Transport::new(tcp, shared.clone());
    let handshake = async {
        let config = client::Config {
            window_size: initial_window,
            ..ssh_config(t)
        };
        let mut handle = client::connect_stream(Arc::new(config), transport, handler)
            .await
            .map_err(|e| match e {
                HandlerError::HostKeyMismatch { presented } => TunnelError::HostKeyMismatch {
                    server: server.clone(),
                    expected: t.host_keys.iter().map(fingerprint).collect(),
                    presented,
                },
                HandlerError::Ssh(russh::Error::NoCommonAlgo {
                    kind: russh::AlgorithmKind::Kex,
                    theirs,
                    ..
                }) if t.require_post_quantum => TunnelError::NotPostQuantum {
                    server: server.clone(),
                    offered: crate::algorithms::kex_offered(theirs),
                },
                HandlerError::Ssh(e) => TunnelError::Handshake {
                    server: server.clone(),
                    reason: e.to_string(),
                },
            })?;
        let _ = shared.window.set(handle.window_adjuster());
        authenticate(&mut handle, t).await?;
        let forwarding = forward
            && request_forward(
                &handle,
                &shared,
                &server,
                (&t.listen_address, t.listen_port),
                socket.as_ref(),
            )
            .await?;
        Ok((handle, forwarding))
    };
    let (handle, forwarding) = match tokio::time::timeout(SSH_HANDSHAKE_TIMEOUT, handshake).await {
        Ok(r) => r?,
        Err(_) if shared.received.load(Ordering::Relaxed) == 0 => {
            return Err(TunnelError::BannerTimeout { server })
        }
        Err(_) => {
            return Err(TunnelError::Handshake {
                server,
                reason: format!("no progress within {SSH_HANDSHAKE_TIMEOUT:?}"),
            })
        }
    };
    Ok(Session {
        handle: Arc::new(handle),
        shared,
        listen: (t.listen_address.clone(), t.listen_port),
        server,
        since: Instant::now(),
        refused: (!forwarding).then(Instant::now),
        keepalive_window,
        ended: ended_rx,
        finished: false,
        next_probe: tokio::time::Instant::now() + PATH_PROBE_INTERVAL,
        path_probes: PATH_PROBES - 1,
        probe_deadline: None,
        received_at_probe: 0,
        socket,
    })
}

pub(crate) async fn authenticate<H: client::Handler>(
    handle: &mut Handle<H>,
    t: &TunnelConfig,
) -> Result<(), TunnelError> {
    // `run` loads with the key required, so only `doctor` from a shell gets here without it
    // (and skips this step before).
    let Some(secret) = t.key.loaded() else {
        return Err(TunnelError::Lost {
            reason: format!("the private key is {}", t.key.fingerprint()),
        });
    };
    let key = secret.key();
    let hash = if key.algorithm().is_rsa() {
        // OpenSSH 8.8+ refuses SHA-1 signatures; default to SHA-512 if the server is silent.
        match handle.best_supported_rsa_hash().await {
            Ok(Some(Some(h))) => Some(h),
            _ => Some(HashAlg::Sha512),
        }
    } else {
        None
    };
    let lost = |reason: String| TunnelError::Lost { reason };
    let result = match secret.rsa_signer() {
        // RSA signs through ring (rsa_sign.rs: RUSTSEC-2023-0071).
        Some(mut rsa) => handle
            .authenticate_publickey_with(t.user.clone(), key.public_key().clone(), hash, &mut rsa)
            .await
            .map_err(|e| lost(e.to_string()))?,
        None => handle
            .authenticate_publickey(t.user.clone(), PrivateKeyWithHashAlg::new(key, hash))
            .await
            .map_err(|e| lost(e.to_string()))?,
    };
    if result.success() {
        Ok(())
    } else {
        Err(TunnelError::AuthRejected {
            user: t.user.clone(),
            fingerprint: t.key.fingerprint(),
        })
    }
}

impl Session {
    pub fn open_channels(&self) -> usize {
        self.shared.channels.get()
    }

    /// What the key exchange settled.
    pub fn negotiated(&self) -> Option<Negotiated> {
        crate::lock(&self.shared.negotiated).clone()
    }

    /// Since when the server refuses the forward, if it does.
    pub fn refused_since(&self) -> Option<Instant> {
        self.refused
    }

    /// While refused: ask for the forward again, in a task of its own, so that the caller
    /// keeps serving signals while the server takes its time (a black-holed server never
    /// answers: the request gives up after `SSH_HANDSHAKE_TIMEOUT`). `Ok(true)`: granted,
    /// to be noted with [`Session::granted`]; an error means the session is no longer usable.
    pub fn ask_again(&self) -> tokio::task::JoinHandle<Result<bool, TunnelError>> {
        let handle = self.handle.clone();
        let shared = self.shared.clone();
        let server = self.server.clone();
        let (address, port) = self.listen.clone();
        let socket = self.socket.as_ref().and_then(|s| s.try_clone().ok());
        tokio::spawn(async move {
            let asked =
                request_forward(&handle, &shared, &server, (&address, port), socket.as_ref());
            match tokio::time::timeout(SSH_HANDSHAKE_TIMEOUT, asked).await {
                Ok(r) => r,
                Err(_) => Err(TunnelError::Lost {
                    reason: format!(
                        "no answer to the forward request within {SSH_HANDSHAKE_TIMEOUT:?}"
                    ),
                }),
            }
        })
    }

    /// The server granted the forward asked for by [`Session::ask_again`]: the session is
    /// active.
    pub fn granted(&mut self) {
        self.refused = None;
    }

    /// The forward was cancelled for a handover (handover.rs): the port is another
    /// process's now, and is not cancelled again when this session retires.
    pub fn released(&mut self) {
        self.refused = Some(Instant::now());
    }

    /// Take new channels again (a handover that failed).
    pub fn resume_accepting(&self) {
        self.shared.accepting.store(true, Ordering::Release);
    }

    /// The session's open-channel count, to follow while it retires.
    pub fn channel_count(&self) -> Arc<crate::count::OpenCount> {
        self.shared.channels.clone()
    }

    /// Resolves when the session is over: closed by the server, dead keepalives, or wedged.
    /// Cancellation-safe: the caller may drop and recreate this future (it does, to refresh
    /// STATUS), and the liveness probe's schedule and deadline carry over.
    pub async fn closed(&mut self) -> TunnelError {
        if self.finished {
            return TunnelError::Lost {
                reason: "session already closed".into(),
            };
        }
        loop {
            tokio::select! {
                r = &mut self.ended => {
                    self.finished = true;
                    return r.unwrap_or(TunnelError::Lost { reason: "the session ended".into() });
                }
                _ = tokio::time::sleep_until(self.next_probe), if self.probe_deadline.is_none() => {
                    // As long as the keepalives' own verdict: a wedged session is torn down
                    // within the keepalive window and one probe interval.
                    self.probe_deadline = Some(tokio::time::Instant::now() + self.keepalive_window);
                    self.received_at_probe = self.shared.received.load(Ordering::Relaxed);
                }
                r = probe(&self.handle, self.probe_deadline), if self.probe_deadline.is_some() => {
                    // A ping that must come back: if the session loop itself is stuck, the
                    // keepalives cannot catch it, this does. Under heavy load the answer can
                    // queue behind a lot of data: a session that kept reading is not stuck.
                    let progressed = self.shared.received.load(Ordering::Relaxed) != self.received_at_probe;
                    if let (Ok(()), Some(deadline)) = (r, self.probe_deadline) {
                        // Since the probe was first sent (a re-sent one only lengthens it):
                        // a sample of the path's round trip, the shortest one kept.
                        let probe = (deadline - self.keepalive_window).elapsed();
                        let before = self.shared.flight.rtt();
                        self.shared.flight.round_trip(probe);
                        let _ = note_kernel_round_trip(&self.shared, self.socket.as_ref());
                        let now = self.shared.flight.rtt();
                        if now != before {
                            log::debug!(
                                "round trip to {}: {:?} (a probe's {probe:?})",
                                self.server,
                                now.unwrap_or_default()
                            );
                        }
                    }
                    if r.is_err() && !progressed {
                        // Which of the two: the server (or the path) silent, or our session
                        // stuck at home. The keepalives would say the first a moment later;
                        // the probe may get there first, and must not call it the second.
                        let silent = self
                            .socket
                            .as_ref()
                            .and_then(sys::tcp_unacknowledged)
                            .unwrap_or(false);
                        let window = self.keepalive_window;
                        self.finished = true;
                        self.tear_down();
                        return if silent {
                            TunnelError::KeepaliveTimeout { window }
                        } else {
                            TunnelError::Wedged { window }
                        };
                    }
                    self.probe_deadline = None;
                    self.next_probe = tokio::time::Instant::now() + if self.path_probes > 0 {
                        self.path_probes -= 1;
                        PATH_PROBE_INTERVAL
                    } else {
                        LIVENESS_INTERVAL
                    };
                }
            }
        }
    }

    /// End the session whatever state its task is in: every channel task ends (its target
    /// connection closed), and the TCP connection is shut, so the server (or the proxy) sees
    /// it end and frees the listen port; russh's task, if it is waiting on the socket, ends
    /// with an error. A task stuck elsewhere stays stuck, but holds nothing that matters.
    fn tear_down(&mut self) {
        self.shared.tear_down();
        if let Some(fd) = &self.socket {
            let _ = socket2::SockRef::from(fd).shutdown(std::net::Shutdown::Both);
        }
    }

    /// A lost session, torn down, giving up its connection's socket rather than closing it.
    /// A session lost in a blackout is still open at the server, which holds the listen port
    /// for it until a packet of ours reaches it, and the kernel's retransmissions of our FIN
    /// back off to minutes apart. Kept, the socket can be reset (see [`Stale`]) the moment a
    /// new connection shows the path is back.
    pub fn abandon(mut self) -> Stale {
        self.tear_down();
        Stale(self.socket.take())
    }

    /// Stop taking new channels and give the listen port back to the server.
    pub async fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::Release);
        if self.refused.is_some() {
            return;
        }
        let (addr, port) = &self.listen;
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.handle
                .cancel_tcpip_forward(addr.clone(), u32::from(*port)),
        )
        .await;
    }

    /// Let open channels finish (up to `timeout`), then disconnect, each step bounded: a
    /// session that does not answer is torn down all the same (on drop). Returns the
    /// channels cut.
    pub async fn retire(mut self, timeout: Duration) -> usize {
        self.stop_accepting().await;
        let _ = tokio::time::timeout(timeout, self.shared.channels.wait_zero()).await;
        let left = self.shared.channels.get();
        let bye = async {
            let _ = self
                .handle
                .disconnect(russh::Disconnect::ByApplication, "agent stopping", "")
                .await;
            // The session's task sends the disconnect and ends. (A forward request still
            // holding the handle, cancelled by the supervisor, may not have let go of it yet:
            // the session is torn down on drop all the same.)
            if let Some(handle) = Arc::get_mut(&mut self.handle) {
                let _ = handle.await;
            }
        };
        let _ = tokio::time::timeout(SESSION_CLOSE_WAIT, bye).await;
        left
    }
}

impl Drop for Session {
    /// However a session ends (lost, wedged, retired, or dropped at exit), nothing of it
    /// outlives it: not a channel task, not the connection.
    fn drop(&mut self) {
        self.tear_down();
    }
}
