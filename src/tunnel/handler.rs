//! The russh client handler of one session: pins the host key, takes forwarded channels (and
//! refuses every other kind), and empties russh's per-channel queues into each channel's
//! inbox without waiting (see the module comment of `tunnel`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use russh::client::{self, Msg};
use russh::keys::{PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelId};
use tokio::sync::oneshot;

use crate::algorithms::Negotiated;
use crate::channel::{self, ChannelContext, Forwarder, Inbox};
use crate::config::fingerprint;
use crate::count::OpenGuard;
use crate::error::TunnelError;
use crate::session::SessionShared;

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

pub(super) struct SessionHandler {
    pub(super) pins: Vec<PublicKey>,
    pub(super) fwd: Arc<Forwarder>,
    /// What this session shares with its transport and channels.
    pub(super) shared: Arc<SessionShared>,
    pub(super) inboxes: HashMap<ChannelId, Inbox>,
    /// `inboxes` is pruned when it grows to this size.
    pub(super) prune_at: usize,
    /// Tells the [`Session`] why the session loop ended (see `disconnected` and `Drop`).
    pub(super) ended: Option<oneshot::Sender<TunnelError>>,
    pub(super) keepalive_window: Duration,
    /// The remote forward's port: forwarded channels for any other are refused.
    pub(super) listen_port: u16,
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

impl SessionHandler {
    /// Empty russh's queue for `channel` (see the module comment).
    fn drain(&mut self, channel: ChannelId) {
        if let Some(inbox) = self.inboxes.get_mut(&channel) {
            inbox.drain();
        }
    }
}

impl Drop for SessionHandler {
    fn drop(&mut self) {
        if let Some(tx) = self.ended.take() {
            let _ = tx.send(TunnelError::Lost {
                reason: "the session ended".into(),
            });
        }
    }
}

impl client::Handler for SessionHandler {
    type Error = HandlerError;

    /// After each key exchange (the first only once the host key matched its pin): what was
    /// negotiated, for the "tunnel up" line, status and the metrics.
    async fn kex_done(
        &mut self,
        _shared_secret: Option<&[u8]>,
        names: &russh::Names,
        session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        Negotiated::record(&self.shared.negotiated, names, session);
        Ok(())
    }

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
        if !ours || !self.shared.accepting.load(Ordering::Acquire) {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        reply.accept().await;
        let id = channel.id();
        let (read_half, write_half) = channel.split();
        let settings = self.fwd.settings();
        let (inbox, input) = channel::inbox(
            &settings,
            self.shared.intake.clone(),
            self.fwd.telemetry.metrics.spill_bytes.clone(),
        );
        // russh's queue for the channel is emptied by the handler (see the module comment).
        let inbox = inbox.with_queue(read_half);
        let input = match self.shared.window.get() {
            Some(adjuster) => input.with_window(channel::Window::new(
                adjuster.clone(),
                id,
                self.shared.clone(),
                settings.max_pending,
            )),
            None => input,
        };
        // A channel we had to close first gets no `channel_close` callback from russh: drop
        // the inboxes of ended channels now and then (amortised over channel opens).
        if self.inboxes.len() >= self.prune_at {
            self.inboxes.retain(|_, i| !i.is_closed());
            self.prune_at = (self.inboxes.len() * 2).max(64);
        }
        self.inboxes.insert(id, inbox);
        let guard = OpenGuard::new(vec![
            self.fwd.telemetry.active.clone(),
            self.shared.channels.clone(),
        ]);
        let origin = ChannelContext {
            originator: format!("{originator_address}:{originator_port}"),
            session: self.shared.clone(),
        };
        tokio::spawn(channel::serve_channel(
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
        #[cfg(feature = "fault-injection")]
        crate::fault::wedge_if_asked().await;
        if let Some(inbox) = self.inboxes.get_mut(&channel) {
            if !inbox.push(data) {
                self.inboxes.remove(&channel);
            }
        }
        Ok(())
    }

    /// Also the server's word that it passed the channel's data on (session/flight.rs).
    async fn window_adjusted(
        &mut self,
        channel: ChannelId,
        remaining: u32,
        _: &mut client::Session,
    ) -> Result<(), Self::Error> {
        if let Some(inbox) = self.inboxes.get_mut(&channel) {
            inbox.drain();
            self.shared.flight.adjusted(&inbox.acks, remaining);
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

    // russh queues a message for the channel before each of these callbacks too (and before
    // `window_adjusted` above): empty the queue there (see the module comment). This list
    // matches every `chan.send` in russh 0.65's client/encrypted.rs; re-check it on upgrade.
    // A message queued with no callback after it would fill the queue and wedge the session
    // until the liveness probe replaces it (without draining in `window_adjusted`,
    // `rekeys_under_load_cut_no_channel` hangs).
    drain_only! {
        extended_data(u32, &[u8]);
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
