//! A refused forward: the session is up, but the server will not listen on the tunnel's port.
//! Why is not something the server says: the port may be held by another session (the other
//! host of a pair, an old container, a session of ours it has not timed out yet), or this
//! account may not forward it (`PermitListen`, `AllowTcpForwarding no`, a mistyped
//! `listen_port`, a port taken on the server). Only the operator knows which is expected, so
//! `[tunnel] pair` says it: one of a pair stands by quietly, any other host reports an error
//! at every attempt (down, in status and the metrics). Either way the session is kept and the
//! port asked for again on the same schedule, without holding up signals.

use std::time::Duration;

use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::constants::{QUICK_STANDBY_FOR, QUICK_STANDBY_RETRY};
use crate::error::TunnelError;
use crate::telemetry::Telemetry;
use crate::tunnel::Session;

use super::failures::FailureLog;

/// When to ask for a refused port again.
pub(super) struct Refusals {
    /// The next request for the port.
    pub(super) retry_at: tokio::time::Instant,
    /// Until when a refused port is asked for again within a second rather than after
    /// `standby_retry`: just after resetting our own lost session, whose port the server
    /// frees a moment later.
    quick_until: Option<tokio::time::Instant>,
    /// The request for the port under way (`Session::ask_again`).
    asking: Option<JoinHandle<Result<bool, TunnelError>>>,
}

impl Default for Refusals {
    fn default() -> Self {
        Refusals {
            retry_at: tokio::time::Instant::now(),
            quick_until: None,
            asking: None,
        }
    }
}

impl Refusals {
    /// Whether a request for the port is under way.
    pub(super) fn asking(&self) -> bool {
        self.asking.is_some()
    }

    /// Ask for the port again (in its own task: signals are served meanwhile).
    pub(super) fn ask(&mut self, session: &Session) {
        if self.asking.is_none() {
            self.asking = Some(session.ask_again());
        }
    }

    /// The server's answer to the request under way; never resolves while none is.
    /// Cancellation-safe.
    pub(super) async fn answer(&mut self) -> Result<bool, TunnelError> {
        let Some(task) = self.asking.as_mut() else {
            return std::future::pending().await;
        };
        let r = task.await.unwrap_or_else(|e| {
            Err(TunnelError::Lost {
                reason: format!("the forward request failed: {e}"),
            })
        });
        self.asking = None;
        r
    }

    /// The session is gone (lost, retired, replaced): drop its request.
    pub(super) fn cancel(&mut self) {
        if let Some(task) = self.asking.take() {
            task.abort();
        }
    }

    /// Our own lost session's connection was just reset: the server frees its port soon.
    pub(super) fn after_reset(&mut self) {
        self.quick_until = Some(tokio::time::Instant::now() + QUICK_STANDBY_FOR);
    }

    /// The server refused the port, at the session's start (`first`) or when asked again.
    /// Logs, publishes and schedules the next request.
    pub(super) fn refused(
        &mut self,
        first: bool,
        cfg: &Config,
        session: &Session,
        backoff: &mut Backoff,
        failures: &mut FailureLog,
        telemetry: &Telemetry,
    ) {
        let t = &cfg.tunnel;
        let (addr, port) = &session.listen;
        self.retry_at = self.next(backoff, t.standby_retry);
        let delay = self
            .retry_at
            .saturating_duration_since(tokio::time::Instant::now());
        if t.pair {
            // Not a failure: the other host of the pair serves. One line, then quiet.
            if first {
                failures.recovered();
                log::info!(
                    tunnel_host = t.host.as_str(), tunnel_port = t.port, listen_port = *port;
                    "standing by: connected to {} as {}, but the server refuses its port {addr}:{port}: held by another session (the other host of this pair, or a session the server has not timed out yet), or not permitted; asking for it every {:?}", session.server, t.user, t.standby_retry);
                telemetry.standby();
            }
        } else {
            let e = TunnelError::ForwardRefused {
                server: session.server.clone(),
                listen: format!("{addr}:{port}"),
            };
            failures.report(&e, delay, cfg);
            telemetry.refused(&e.to_string());
        }
    }

    /// The server granted the port after refusing it.
    pub(super) fn granted(
        &self,
        cfg: &Config,
        session: &Session,
        refused_for: Duration,
        failures: &mut FailureLog,
        telemetry: &Telemetry,
    ) {
        let (addr, port) = &session.listen;
        failures.recovered();
        let was = if cfg.tunnel.pair {
            "standing by"
        } else {
            "being refused it"
        };
        let how = format!(
            "took the server's port {addr}:{port} over after {was} for {:.0}s",
            refused_for.as_secs_f64()
        );
        super::tunnel_up(cfg, session, &how);
        telemetry.up();
    }

    /// `standby_retry` with jitter; about a second instead until `quick_until`.
    fn next(&self, backoff: &mut Backoff, standby_retry: Duration) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let every = match self.quick_until {
            Some(t) if now < t => QUICK_STANDBY_RETRY.min(standby_retry),
            _ => standby_retry,
        };
        now + backoff.around(every)
    }
}

/// The STATUS line of a session the server refuses the port: a pair's standby, or an error.
pub(super) fn status(cfg: &Config, s: &Session, since: String) -> String {
    let (addr, port) = &s.listen;
    let t = &cfg.tunnel;
    if t.pair {
        format!(
            "standby: connected to {}; the server refuses the port {addr}:{port} (held by another session, or not permitted) since {since}; asking every {:?}",
            t.route(),
            t.standby_retry
        )
    } else {
        format!(
            "refused: connected to {}, but the server refuses to listen on {addr}:{port} (held by another session, or not permitted) since {since}; not one of a pair ([tunnel] pair), so this is an error; asking every {:?}",
            t.route(),
            t.standby_retry
        )
    }
}
