//! One SSH session: connect out, pin the host key, authenticate, ask for the dynamic remote
//! forward, and hand each forwarded channel to `forward.rs`.
//!
//! Head-of-line blocking: russh pushes incoming channel data into a bounded per-channel queue
//! with an awaited send, so a channel whose reader stalls would freeze the whole session. No
//! channel task reads those queues: data arrives through the handler's `data` callback, which
//! queues it in the channel's own [`Inbox`] without waiting. The handler itself empties
//! russh's queue in every callback for the channel (taking the data from it without a copy),
//! so the queue never fills; see [`Inbox::with_queue`].

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::client::{self, Handle, Msg};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{cipher, Channel, ChannelId, Preferred};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::config::TunnelConfig;
use crate::connect;
use crate::constants::*;
use crate::count::{OpenCount, OpenGuard};
use crate::error::TunnelError;
use crate::forward::{self, ChannelContext, Forwarder, Inbox};
use crate::proxy;
use crate::transport::{Backlog, Intake, Transport};

/// Handler errors: russh's own, or our verdict on the host key.
#[derive(Debug)]
pub enum HandlerError {
    Ssh(russh::Error),
    HostKeyMismatch { presented: String },
}

impl From<russh::Error> for HandlerError {
    fn from(e: russh::Error) -> Self {
        HandlerError::Ssh(e)
    }
}

struct Client {
    pins: Vec<PublicKey>,
    fwd: Arc<Forwarder>,
    /// Channels of this session, so a retired session can drain on its own.
    channels: Arc<OpenCount>,
    accepting: Arc<AtomicBool>,
    backlog: Arc<Backlog>,
    intake: Arc<Intake>,
    inboxes: HashMap<ChannelId, Inbox>,
    /// `inboxes` is pruned when it grows to this size.
    prune_at: usize,
    /// Tells the [`Session`] why the session loop ended (see `disconnected` and `Drop`).
    ended: Option<oneshot::Sender<TunnelError>>,
    keepalive_window: Duration,
    /// The remote forward's port: forwarded channels for any other are refused.
    listen_port: u16,
}

/// Handler callbacks whose only job is to empty russh's queue for the channel.
macro_rules! drain_only {
    ($($name:ident($($arg:ty),*);)*) => {$(
        async fn $name(
            &mut self,
            channel: ChannelId,
            $(_: $arg,)*
            _: &mut client::Session,
        ) -> Result<(), Self::Error> {
            self.drain(channel);
            Ok(())
        }
    )*};
}

/// Handler callbacks for channel types the agent never serves: russh would accept them, and
/// an accepted channel nobody reads is a leak (and an open door, should the server misbehave).
macro_rules! refuse_channel {
    ($($name:ident($($arg:ty),*) => $kind:literal;)*) => {$(
        async fn $name(
            &mut self,
            channel: Channel<Msg>,
            $(_: $arg,)*
            reply: client::ChannelOpenHandle,
            _: &mut client::Session,
        ) -> Result<(), Self::Error> {
            log::warn!(error_class = "channel_refused"; "the server opened a {} channel (id {}); refused: only forwarded-tcpip channels are served", $kind, channel.id());
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            Ok(())
        }
    )*};
}

impl Client {
    /// Empty russh's queue for `channel` (see the module comment).
    fn drain(&mut self, channel: ChannelId) {
        if let Some(inbox) = self.inboxes.get_mut(&channel) {
            inbox.drain();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(tx) = self.ended.take() {
            let _ = tx.send(TunnelError::Lost {
                reason: "the session ended".into(),
            });
        }
    }
}

impl client::Handler for Client {
    type Error = HandlerError;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let presented = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(cert) => {
                // Pin the CA-less way: the certificate's own key must be pinned.
                return match PublicKey::new(cert.public_key().clone(), "") {
                    k if self.pins.iter().any(|p| p.key_data() == k.key_data()) => Ok(true),
                    k => Err(HandlerError::HostKeyMismatch {
                        presented: fingerprint(&k),
                    }),
                };
            }
        };
        if self
            .pins
            .iter()
            .any(|p| p.key_data() == presented.key_data())
        {
            Ok(true)
        } else {
            Err(HandlerError::HostKeyMismatch {
                presented: fingerprint(presented),
            })
        }
    }

    refuse_channel! {
        server_channel_open_session() => "session";
        server_channel_open_direct_tcpip(&str, u32, &str, u32) => "direct-tcpip";
        server_channel_open_direct_streamlocal(&str) => "direct-streamlocal";
        server_channel_open_forwarded_streamlocal(&str) => "forwarded-streamlocal";
        server_channel_open_x11(&str, u32) => "x11";
        server_channel_open_agent_forward() => "auth-agent";
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // Only for the one forward we asked for (the port is what identifies it: servers
        // report the listen address in their own spelling), and not while retiring.
        let ours = connected_port == u32::from(self.listen_port);
        if !ours {
            log::warn!(error_class = "channel_refused"; "the server opened a forwarded-tcpip channel for {connected_address}:{connected_port}, which the agent never asked for (it listens on port {}); refused", self.listen_port);
        }
        if !ours || !self.accepting.load(Ordering::Acquire) {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        reply.accept().await;
        let id = channel.id();
        let (read_half, write_half) = channel.split();
        let settings = self.fwd.settings();
        let (inbox, input) = forward::inbox(&settings, self.intake.clone());
        // russh's queue for the channel is emptied by the handler (see the module comment).
        let inbox = inbox.with_queue(read_half);
        // A channel we had to close first gets no `channel_close` callback from russh: drop
        // the inboxes of ended channels now and then (amortised over channel opens).
        if self.inboxes.len() >= self.prune_at {
            self.inboxes.retain(|_, i| !i.is_closed());
            self.prune_at = (self.inboxes.len() * 2).max(64);
        }
        self.inboxes.insert(id, inbox);
        let guard = OpenGuard::new(vec![
            self.fwd.telemetry.active.clone(),
            self.channels.clone(),
        ]);
        let origin = ChannelContext {
            originator: format!("{originator_address}:{originator_port}"),
            backlog: self.backlog.clone(),
        };
        tokio::spawn(forward::serve_channel(
            input,
            write_half,
            self.fwd.clone(),
            settings,
            guard,
            origin,
        ));
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _: &mut client::Session,
    ) -> Result<(), Self::Error> {
        if let Some(inbox) = self.inboxes.get_mut(&channel) {
            if !inbox.push(data) {
                self.inboxes.remove(&channel);
            }
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _: &mut client::Session,
    ) -> Result<(), Self::Error> {
        if let Some(inbox) = self.inboxes.get_mut(&channel) {
            inbox.eof();
        }
        Ok(())
    }

    // russh queues a message for the channel before each of these callbacks too: empty the
    // queue there (see the module comment). This list matches every `chan.send` in russh
    // 0.65's client/encrypted.rs; re-check it on upgrade. A message queued with no callback
    // after it would fill the queue and wedge the session until the liveness probe replaces
    // it (without `window_adjusted` here, `rekeys_under_load_cut_no_channel` hangs).
    drain_only! {
        extended_data(u32, &[u8]);
        window_adjusted(u32);
        channel_success();
        channel_failure();
        xon_xoff(bool);
        exit_status(u32);
        exit_signal(russh::Sig, bool, &str, &str);
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let (error, result) = match reason {
            client::DisconnectReason::ReceivedDisconnect(info) => (
                TunnelError::Lost {
                    reason: format!("the server disconnected: {}", info.message),
                },
                Ok(()),
            ),
            client::DisconnectReason::Error(HandlerError::Ssh(russh::Error::KeepaliveTimeout)) => (
                TunnelError::KeepaliveTimeout {
                    window: self.keepalive_window,
                },
                Err(HandlerError::Ssh(russh::Error::KeepaliveTimeout)),
            ),
            client::DisconnectReason::Error(HandlerError::Ssh(e)) => (
                TunnelError::Lost {
                    reason: e.to_string(),
                },
                Err(HandlerError::Ssh(e)),
            ),
            client::DisconnectReason::Error(e @ HandlerError::HostKeyMismatch { .. }) => (
                TunnelError::Lost {
                    reason: "the host key check failed".into(),
                },
                Err(e),
            ),
        };
        if let Some(tx) = self.ended.take() {
            let _ = tx.send(error);
        }
        result
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.inboxes.remove(&channel);
        Ok(())
    }
}

/// " (ADDRESS)" when `server` names a host rather than that address.
fn via(server: &str, addr: std::net::SocketAddr) -> String {
    let shown = addr.to_string();
    if shown == server {
        String::new()
    } else {
        format!(" ({shown})")
    }
}

pub fn fingerprint(key: &PublicKey) -> String {
    format!(
        "{} {}",
        key.algorithm().as_str(),
        key.fingerprint(HashAlg::Sha256)
    )
}

/// An established session with the remote forward in place.
pub struct Session {
    handle: Handle<Client>,
    accepting: Arc<AtomicBool>,
    channels: Arc<OpenCount>,
    pub listen: (String, u16),
    pub server: String,
    pub since: Instant,
    keepalive_window: Duration,
    ended: oneshot::Receiver<TunnelError>,
    finished: bool,
    next_probe: tokio::time::Instant,
    probe_deadline: Option<tokio::time::Instant>,
    /// Bytes read from the server so far, and at the start of the current probe.
    received: Arc<AtomicU64>,
    received_at_probe: u64,
    /// A second descriptor of the session's TCP socket, to shut the connection down when the
    /// session is declared wedged: dropping russh's `Handle` does not end its session task
    /// while channels hold senders to it, nor a task that is stuck.
    socket: Option<OwnedFd>,
}

async fn probe(handle: &Handle<Client>, deadline: Option<tokio::time::Instant>) -> Result<(), ()> {
    let deadline = deadline.unwrap_or_else(tokio::time::Instant::now);
    match tokio::time::timeout_at(deadline, handle.send_ping()).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Our cipher preference (the client's order decides). With AES in hardware (AES-NI and
/// carry-less multiply, or the ARMv8 crypto extensions) AES-GCM comes first: sshd encrypts it
/// about twice as fast as chacha20-poly1305, and sshd sets the pace of a bulk transfer.
/// Without it, software AES is the slow one, so chacha20-poly1305 comes first. OpenSSH's
/// client prefers chacha20-poly1305 by default.
pub(crate) fn cipher_preference(aes_in_hardware: bool) -> &'static [cipher::Name] {
    if aes_in_hardware {
        &[
            cipher::AES_256_GCM,
            cipher::AES_128_GCM,
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_CTR,
            cipher::AES_128_CTR,
        ]
    } else {
        &[
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_GCM,
            cipher::AES_128_GCM,
            cipher::AES_256_CTR,
            cipher::AES_128_CTR,
        ]
    }
}

/// Whether this CPU does AES-GCM in hardware (see [`cipher_preference`]).
pub(crate) fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

pub(crate) fn ssh_config(t: &TunnelConfig) -> client::Config {
    client::Config {
        // russh's own keepalive: ping when the server has been quiet for keepalive_interval.
        // russh gives up when the timer fires with more than `keepalive_max` pings unanswered,
        // i.e. after interval x (max + 1); we promise interval x max, so pass max - 1 (russh
        // reads 0 as "never", hence at least 1).
        keepalive_interval: Some(t.keepalive_interval),
        keepalive_max: (t.keepalive_max as usize).saturating_sub(1).max(1),
        window_size: SSH_WINDOW_SIZE,
        maximum_packet_size: SSH_MAX_PACKET_SIZE,
        nodelay: true,
        // russh's queue from channel writers to the session (in packets); see Backlog.
        channel_buffer_size: SSH_SESSION_QUEUE,
        limits: russh::Limits {
            rekey_write_limit: REKEY_AFTER_BYTES,
            rekey_read_limit: REKEY_AFTER_BYTES,
            rekey_time_limit: REKEY_AFTER_TIME,
        },
        preferred: Preferred {
            cipher: std::borrow::Cow::Borrowed(cipher_preference(aes_in_hardware())),
            ..Preferred::default()
        },
        ..client::Config::default()
    }
}

/// The TCP connection that will carry the SSH session: to the server itself, or through the
/// configured proxy. Every failure is classified.
pub(crate) async fn open_tcp(t: &TunnelConfig) -> Result<TcpStream, TunnelError> {
    match &t.proxy {
        None => connect_direct(t).await,
        Some(proxy) => {
            let through = async {
                let (mut tcp, _) = proxy::reach(proxy).await?;
                proxy::handshake(&mut tcp, proxy, &t.host, t.port).await?;
                Ok(tcp)
            };
            tokio::time::timeout(PROXY_CONNECT_TIMEOUT, through)
                .await
                .unwrap_or_else(|_| {
                    Err(TunnelError::ProxyTimeout {
                        proxy: proxy.to_string(),
                        timeout: PROXY_CONNECT_TIMEOUT,
                    })
                })
        }
    }
}

async fn connect_direct(t: &TunnelConfig) -> Result<TcpStream, TunnelError> {
    let server = proxy::host_port(&t.host, t.port);
    let addrs: Vec<_> = match tokio::time::timeout(
        SSH_CONNECT_TIMEOUT,
        tokio::net::lookup_host((t.host.as_str(), t.port)),
    )
    .await
    {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => {
            return Err(TunnelError::Resolve {
                host: t.host.clone(),
                reason: e.to_string(),
            })
        }
        Err(_) => {
            return Err(TunnelError::Resolve {
                host: t.host.clone(),
                reason: "the resolver did not answer".into(),
            })
        }
    };
    if addrs.is_empty() {
        return Err(TunnelError::Resolve {
            host: t.host.clone(),
            reason: "no addresses".into(),
        });
    }
    // The addresses race (see connect.rs), all within SSH_CONNECT_TIMEOUT.
    match tokio::time::timeout(
        SSH_CONNECT_TIMEOUT,
        connect::first_of(&addrs, CONNECT_STAGGER),
    )
    .await
    {
        Ok(Ok((s, _))) => Ok(s),
        Ok(Err(errors)) => {
            let (addr, e) = errors.last().ok_or_else(|| TunnelError::ConnectTimeout {
                server: server.clone(),
            })?;
            Err(TunnelError::Connect {
                server: server.clone(),
                via: via(&server, *addr),
                reason: e.to_string(),
            })
        }
        Err(_) => Err(TunnelError::ConnectTimeout { server }),
    }
}

/// Connect, authenticate and request the forward. Every failure is classified.
pub async fn establish(t: &TunnelConfig, fwd: Arc<Forwarder>) -> Result<Session, TunnelError> {
    let server = t.route();
    let tcp = open_tcp(t).await?;
    let socket = tcp.as_fd().try_clone_to_owned().ok();
    tcp.set_nodelay(true).map_err(|e| TunnelError::Connect {
        server: server.clone(),
        via: String::new(),
        reason: e.to_string(),
    })?;

    let received = Arc::new(AtomicU64::new(0));
    let accepting = Arc::new(AtomicBool::new(true));
    let channels = Arc::new(OpenCount::default());
    let backlog = Arc::new(Backlog::default());
    let intake = Arc::new(Intake::default());
    let keepalive_window = t.keepalive_interval * t.keepalive_max.max(1);
    let (ended_tx, ended_rx) = oneshot::channel();
    let handler = Client {
        pins: t.host_keys.clone(),
        fwd,
        channels: channels.clone(),
        accepting: accepting.clone(),
        backlog: backlog.clone(),
        intake: intake.clone(),
        inboxes: HashMap::new(),
        prune_at: 64,
        ended: Some(ended_tx),
        keepalive_window,
        listen_port: t.listen_port,
    };
    let transport = Transport::new(tcp, backlog, intake, received.clone());
    let handshake = async {
        let mut handle = client::connect_stream(Arc::new(ssh_config(t)), transport, handler)
            .await
            .map_err(|e| match e {
                HandlerError::HostKeyMismatch { presented } => TunnelError::HostKeyMismatch {
                    server: server.clone(),
                    expected: t.host_keys.iter().map(fingerprint).collect(),
                    presented,
                },
                HandlerError::Ssh(e) => TunnelError::Handshake {
                    server: server.clone(),
                    reason: e.to_string(),
                },
            })?;
        authenticate(&mut handle, t).await?;
        match handle
            .tcpip_forward(t.listen_address.clone(), u32::from(t.listen_port))
            .await
        {
            Ok(_) => Ok(handle),
            Err(russh::Error::RequestDenied) => Err(TunnelError::ForwardRefused {
                address: t.listen_address.clone(),
                port: t.listen_port,
            }),
            Err(e) => Err(TunnelError::Lost {
                reason: e.to_string(),
            }),
        }
    };
    let handle = match tokio::time::timeout(SSH_HANDSHAKE_TIMEOUT, handshake).await {
        Ok(r) => r?,
        Err(_) if received.load(Ordering::Relaxed) == 0 => {
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
        handle,
        accepting,
        channels,
        listen: (t.listen_address.clone(), t.listen_port),
        server,
        since: Instant::now(),
        keepalive_window,
        ended: ended_rx,
        finished: false,
        next_probe: tokio::time::Instant::now() + LIVENESS_INTERVAL,
        probe_deadline: None,
        received,
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
    let result = handle
        .authenticate_publickey(t.user.clone(), PrivateKeyWithHashAlg::new(key, hash))
        .await
        .map_err(|e| TunnelError::Lost {
            reason: e.to_string(),
        })?;
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
        self.channels.get()
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
                    self.probe_deadline = Some(tokio::time::Instant::now() + self.keepalive_window + LIVENESS_INTERVAL);
                    self.received_at_probe = self.received.load(Ordering::Relaxed);
                }
                r = probe(&self.handle, self.probe_deadline), if self.probe_deadline.is_some() => {
                    // A ping that must come back: if the session loop itself is stuck, the
                    // keepalives cannot catch it, this does. Under heavy load the answer can
                    // queue behind a lot of data: a session that kept reading is not stuck.
                    let progressed = self.received.load(Ordering::Relaxed) != self.received_at_probe;
                    if r.is_err() && !progressed {
                        self.finished = true;
                        self.shut_down_socket();
                        return TunnelError::Wedged { window: self.keepalive_window + LIVENESS_INTERVAL };
                    }
                    self.probe_deadline = None;
                    self.next_probe = tokio::time::Instant::now() + LIVENESS_INTERVAL;
                }
            }
        }
    }

    /// End the TCP connection under a session that no longer answers: the peer sees it
    /// closed, and russh's task, waiting on the socket, ends with an error, dropping the
    /// socket and its channels.
    fn shut_down_socket(&mut self) {
        if let Some(fd) = self.socket.take() {
            let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
        }
    }

    /// Stop taking new channels and give the listen port back to the server.
    pub async fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
        let (addr, port) = &self.listen;
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.handle
                .cancel_tcpip_forward(addr.clone(), u32::from(*port)),
        )
        .await;
    }

    /// Let open channels finish (up to `timeout`), then disconnect. Returns the channels cut.
    pub async fn retire(self, timeout: Duration) -> usize {
        self.stop_accepting().await;
        let _ = tokio::time::timeout(timeout, self.channels.wait_zero()).await;
        let left = self.channels.get();
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "agent stopping", "")
            .await;
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cipher_order_depends_on_aes_hardware_and_offers_the_same_set() {
        let hw = cipher_preference(true);
        let soft = cipher_preference(false);
        assert_eq!(hw[0], cipher::AES_256_GCM);
        assert_eq!(soft[0], cipher::CHACHA20_POLY1305);
        let names = |l: &[cipher::Name]| {
            let mut v: Vec<String> = l.iter().map(|n| n.as_ref().to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(names(hw), names(soft));
    }
}
