//! The agent's main loop: keep one session up, reconnect with backoff, apply reloads, and stop
//! gracefully. Signals reach it as [`Control`] messages, so tests can drive it directly. A
//! refused forward (a pair's standby, or an error) has a room of its own (standby.rs).

mod failures;
mod standby;
mod upgrade;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::channel::Forwarder;
use crate::config::{self, Config, Sources};
use crate::constants::{BACKOFF_RESET_AFTER, READY_WAIT_MAX};
use crate::error::TunnelError;
use crate::telemetry::{Endpoints, Telemetry};
use crate::tunnel::{self, Session, Stale};
use crate::{logging, proxy, systemd};
use failures::FailureLog;
use standby::Refusals;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// SIGHUP: re-read the configuration.
    Reload,
    /// SIGTERM/SIGINT: stop; a second one stops at once.
    Shutdown,
}

/// What `run` needs besides the configuration.
pub struct Options {
    /// Where to re-read the configuration from on reload.
    pub sources: Sources,
    /// `--log-level`, which wins over `[log] level` across reloads.
    pub log_level: Option<log::LevelFilter>,
    /// Where the state is published for `status` and the metrics endpoint.
    pub telemetry: Arc<Telemetry>,
    /// The agent's own TCP listeners as bound (the metrics endpoint): never a target.
    pub own_listeners: Vec<std::net::SocketAddr>,
    /// The status socket, the metrics endpoint and the watchdog: passed on in a handover.
    pub local: crate::agent::LocalServers,
    /// Set in a new binary's process started by a handover: the channel to the old one.
    pub successor: Option<crate::handover::Successor>,
}

enum Flow {
    Continue,
    Stop,
}

struct Supervisor {
    cfg: Config,
    opts: Options,
    fwd: Arc<Forwarder>,
    control: mpsc::UnboundedReceiver<Control>,
    backoff: Backoff,
    failures: FailureLog,
    session: Option<Session>,
    last_status: String,
    /// Set while the last reload failed: STATUS keeps saying so until a reload succeeds.
    reload_error: Option<String>,
    /// While READY=1 is still owed: when to send it even without a tunnel (READY_WAIT_MAX
    /// after start). `None` once sent (the first tunnel up, a reload, or that moment).
    ready_by: Option<tokio::time::Instant>,
    /// While the server refuses the port: when to ask for it again.
    refusals: Refusals,
    /// The connection of the last session lost, reset once a new one is answered.
    stale: Stale,
}

/// Run until told to stop. Transient trouble never ends this; only `Control::Shutdown` does.
pub async fn run(cfg: Config, opts: Options, control: mpsc::UnboundedReceiver<Control>) {
    let mut sup = Supervisor {
        fwd: Arc::new(Forwarder::new(
            cfg.forward.clone(),
            opts.own_listeners.clone(),
            opts.telemetry.clone(),
        )),
        cfg,
        opts,
        control,
        backoff: Backoff::default(),
        failures: FailureLog::default(),
        session: None,
        last_status: String::new(),
        reload_error: None,
        ready_by: Some(tokio::time::Instant::now() + READY_WAIT_MAX),
        refusals: Refusals::default(),
        stale: Stale::default(),
    };
    sup.main_loop().await;
}

impl Supervisor {
    async fn main_loop(&mut self) {
        loop {
            let flow = match self.session.is_some() {
                false => self.connect().await,
                true => self.watch().await,
            };
            if let Flow::Stop = flow {
                return;
            }
        }
    }

    /// One attempt to bring the tunnel up, and the wait after a failure.
    async fn connect(&mut self) -> Flow {
        // While failures repeat, STATUS keeps saying the last one rather than "connecting".
        if !self.failures.failing() {
            let t = &self.cfg.tunnel;
            self.set_status(format!("connecting to {}", t.route()));
            self.opts.telemetry.connecting();
        }
        let tunnel_cfg = self.cfg.tunnel.clone();
        let fwd = self.fwd.clone();
        // A handover's new process waits for the old one to give the port back (upgrade.rs).
        let forward = self.opts.successor.is_none();
        // The attempt owns the stale connection while it runs and hands it back (a signal
        // that interrupts it closes it normally: the server then frees the port later).
        let mut stale = std::mem::take(&mut self.stale);
        let resetting = stale.is_some();
        let attempt = async move {
            let r = tunnel::establish(&tunnel_cfg, fwd, &mut stale, forward).await;
            (r, stale)
        };
        tokio::pin!(attempt);
        let (result, stale) = loop {
            tokio::select! {
                r = &mut attempt => break r,
                _ = ready_due(self.ready_by) => ready_while_down(&mut self.ready_by, &self.last_status),
                c = self.control.recv() => return self.on_control(c).await,
            }
        };
        self.stale = stale;
        if resetting && !self.stale.is_some() {
            self.refusals.after_reset();
        }
        // A handover's new process takes over, or tells the old one why not (upgrade.rs).
        if let Some(successor) = self.opts.successor.as_mut() {
            return match result {
                Ok(session) => self.take_over_from_predecessor(session).await,
                Err(e) => {
                    // The old process keeps serving; it ends this one.
                    successor.say(&format!("failed {e}")).await;
                    log::error!(error_class = e.class(); "cannot take the tunnel over from the previous binary: {e}");
                    Flow::Stop
                }
            };
        }
        match result {
            Ok(session) => {
                self.opts.telemetry.set_session(session.negotiated());
                if session.refused_since().is_some() {
                    self.refusals.refused(
                        true,
                        &self.cfg,
                        &session,
                        &mut self.backoff,
                        &mut self.failures,
                        &self.opts.telemetry,
                    );
                } else {
                    self.failures.recovered();
                    let (addr, port) = &session.listen;
                    tunnel_up(
                        &self.cfg,
                        &session,
                        &format!(
                            "connected to {} as {}, the server listens on {addr}:{port}",
                            session.server, self.cfg.tunnel.user
                        ),
                    );
                    self.opts.telemetry.up();
                }
                // A pair's standby is a started service; a refused port on any other host is
                // not up, and READY=1 waits for it as for any failure (`READY_WAIT_MAX`).
                let serving = session.refused_since().is_none() || self.cfg.tunnel.pair;
                self.session = Some(session);
                let status = self.connected_status();
                if serving {
                    self.last_status = status.clone();
                    systemd::ready(&status);
                    self.ready_by = None;
                } else {
                    self.set_status(status);
                }
                Flow::Continue
            }
            Err(e) => {
                let delay = match e {
                    TunnelError::HostKeyMismatch { .. } => self.backoff.ceiling_delay(),
                    // Nothing answered: the attempt itself waited, sending a SYN every
                    // moment (connect.rs). Keep probing, so that the tunnel is back within
                    // seconds of the path, however long the outage.
                    TunnelError::ConnectTimeout { .. } => self.backoff.probe_delay(),
                    _ => self.backoff.next_delay(),
                };
                self.failures.report(&e, delay, &self.cfg);
                self.opts.telemetry.down(&e.to_string());
                self.set_status(format!(
                    "reconnecting in {}s: {e}",
                    delay.as_secs_f64().ceil()
                ));
                self.pause(delay).await
            }
        }
    }

    /// While the tunnel is up (or the server refuses its port): wait for it to end or for a
    /// signal, keeping STATUS current and asking for a refused port again.
    async fn watch(&mut self) -> Flow {
        let Some(session) = self.session.as_mut() else {
            return Flow::Continue;
        };
        let mut refresh = tokio::time::interval(Duration::from_secs(2));
        let lost = loop {
            let refused = session.refused_since();
            tokio::select! {
                e = session.closed() => break e,
                c = self.control.recv() => return self.on_control(c).await,
                _ = ready_due(self.ready_by) => ready_while_down(&mut self.ready_by, &self.last_status),
                _ = tokio::time::sleep_until(self.refusals.retry_at), if refused.is_some() && !self.refusals.asking() => {
                    self.refusals.ask(session);
                }
                r = self.refusals.answer() => match r {
                    Ok(true) => {
                        session.granted();
                        let since = refused.map(|t| t.elapsed()).unwrap_or_default();
                        self.refusals.granted(&self.cfg, session, since, &mut self.failures, &self.opts.telemetry);
                        let status = status_line(&self.cfg, session, self.reload_error.as_deref());
                        if self.ready_by.take().is_some() {
                            systemd::ready(&status);
                        } else {
                            systemd::status(&status);
                        }
                        self.last_status = status;
                    }
                    Ok(false) => self.refusals.refused(false, &self.cfg, session, &mut self.backoff, &mut self.failures, &self.opts.telemetry),
                    Err(e) => break e,
                },
                _ = refresh.tick() => {
                    let status = status_line(&self.cfg, session, self.reload_error.as_deref());
                    if status != self.last_status {
                        systemd::status(&status);
                        self.last_status = status;
                    }
                }
            }
        };
        let lived = session.since.elapsed();
        self.refusals.cancel();
        if let Some(session) = self.session.take() {
            self.stale = session.abandon();
        }
        if lived >= BACKOFF_RESET_AFTER {
            self.backoff.reset();
        }
        self.backoff.session_lost();
        let delay = self.backoff.next_delay();
        self.opts
            .telemetry
            .down(&format!("tunnel lost after {}s: {lost}", lived.as_secs()));
        log::warn!(
            tunnel_host = self.cfg.tunnel.host.as_str(), tunnel_port = self.cfg.tunnel.port, error_class = lost.class();
            "tunnel lost after {}s: {lost}; reconnecting in {:.1}s", lived.as_secs(), delay.as_secs_f64());
        self.set_status(format!(
            "reconnecting in {}s: {lost}",
            delay.as_secs_f64().ceil()
        ));
        self.pause(delay).await
    }

    /// Sleep before the next attempt, still answering signals.
    async fn pause(&mut self, delay: Duration) -> Flow {
        let until = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return Flow::Continue,
                _ = ready_due(self.ready_by) => ready_while_down(&mut self.ready_by, &self.last_status),
                c = self.control.recv() => return self.on_control(c).await,
            }
        }
    }

    async fn on_control(&mut self, c: Option<Control>) -> Flow {
        match c {
            Some(Control::Reload) => match crate::handover::replaced_binary() {
                // A package upgrade replaced the binary: hand the tunnel to it (upgrade.rs).
                Some(binary) => self.hand_over(binary).await,
                None => {
                    self.reload().await;
                    Flow::Continue
                }
            },
            Some(Control::Shutdown) | None => {
                self.shutdown().await;
                Flow::Stop
            }
        }
    }

    async fn reload(&mut self) {
        // Every way out of a reload sends READY=1.
        self.ready_by = None;
        systemd::reloading();
        log::info!("reloading configuration");
        let new = match config::load(&self.opts.sources) {
            Ok(c) => c,
            Err(e) => {
                for err in &e.errors {
                    log::error!(error_class = "config"; "config reload failed: {err}");
                }
                let first = e
                    .errors
                    .first()
                    .map(String::as_str)
                    .unwrap_or("invalid configuration");
                let note =
                    format!("config reload failed: {first}; running with the previous config");
                self.opts.telemetry.error(&note);
                let status = match &self.session {
                    Some(s) => status_line(&self.cfg, s, Some(&note)),
                    None => note.clone(),
                };
                self.reload_error = Some(note);
                self.last_status = status.clone();
                systemd::ready(&status);
                return;
            }
        };
        for w in &new.warnings {
            log::warn!("{w}");
        }
        self.reload_error = None;
        logging::set_level(self.opts.log_level.unwrap_or(new.log.level));
        self.fwd.update(new.forward.clone());
        let tunnel_changed = new.tunnel != self.cfg.tunnel;
        if new.metrics != self.cfg.metrics {
            log::warn!("[metrics] changed: the metrics endpoint moves at the next restart");
        }
        self.opts.telemetry.set_endpoints(endpoints(&new));
        self.cfg = new;
        if tunnel_changed {
            log::info!(
                "tunnel settings changed: opening a new session; open channels of the old one finish there (up to {:?}, [forward] drain_timeout)",
                self.cfg.forward.drain_timeout
            );
            self.refusals.cancel();
            if let Some(old) = self.session.take() {
                // The old session gives the listen port back first, so the new one can take it.
                old.stop_accepting().await;
                // A sync in flight runs for minutes to hours: it is not cut for a reload.
                let timeout = self.cfg.forward.drain_timeout;
                tokio::spawn(async move {
                    let cut = old.retire(timeout).await;
                    if cut > 0 {
                        log::warn!("old session retired: {cut} channels were still open after {timeout:?} and were cut");
                    }
                });
            }
            self.backoff.reset();
            // The reload is done once the new settings are in force: READY=1 now, so that
            // `systemctl reload` never waits on the network. STATUS follows the new session.
            let t = &self.cfg.tunnel;
            let status = format!("connecting to {}", t.route());
            self.last_status = status.clone();
            systemd::ready(&status);
        } else {
            log::info!("configuration reloaded; forward settings apply to new channels, open channels keep theirs (but end if the new policy denies their target)");
            let status = match &self.session {
                Some(s) => status_line(&self.cfg, s, None),
                None => self.last_status.clone(),
            };
            self.last_status = status.clone();
            systemd::ready(&status);
        }
    }

    async fn shutdown(&mut self) {
        systemd::stopping();
        self.opts.telemetry.stopping();
        self.refusals.cancel();
        let Some(session) = self.session.take() else {
            log::info!("stopping");
            return;
        };
        let timeout = self.cfg.forward.shutdown_timeout;
        let open = session.open_channels();
        log::info!("stopping: no new channels; waiting up to {timeout:?} for {open} open channels");
        tokio::select! {
            cut = session.retire(timeout) => {
                if cut > 0 {
                    log::warn!("stopped with {cut} channels still open after {timeout:?}");
                } else {
                    log::info!("stopped cleanly");
                }
            }
            _ = second_stop(&mut self.control) => log::warn!("second stop signal: exiting at once"),
        }
    }

    fn connected_status(&self) -> String {
        match &self.session {
            Some(s) => status_line(&self.cfg, s, self.reload_error.as_deref()),
            None => String::new(),
        }
    }

    fn set_status(&mut self, status: String) {
        let status = match &self.reload_error {
            Some(note) => format!("{note}; {status}"),
            None => status,
        };
        if status != self.last_status {
            systemd::status(&status);
            self.last_status = status;
        }
    }
}

/// The "tunnel up" line, however the tunnel came up (`how`: connected, took a refused port
/// over, took over from the previous binary), with what the key exchange settled in its text
/// and in its journald fields (`KEX`, `CIPHER`, `HOST_KEY_ALGORITHM`, `SERVER_VERSION`,
/// `POST_QUANTUM`; docs/security.md), so that one query finds every such line.
fn tunnel_up(cfg: &Config, session: &Session, how: &str) {
    let negotiated = session.negotiated();
    let n = negotiated.as_ref();
    let field = |f: fn(&crate::algorithms::Negotiated) -> &str| n.map_or("", f);
    let algorithms = n.map_or_else(String::new, |n| format!("; {n}"));
    let t = &cfg.tunnel;
    log::info!(
        tunnel_host = t.host.as_str(), tunnel_port = t.port, listen_port = session.listen.1,
        kex = field(|n| &n.kex), cipher = field(|n| &n.cipher), host_key_algorithm = field(|n| &n.host_key),
        server_version = field(|n| &n.server_version), post_quantum = n.is_some_and(|n| n.post_quantum);
        "tunnel up: {how}{algorithms}");
}

/// The tunnel is not up `READY_WAIT_MAX` after start: tell systemd the service is up anyway,
/// so that `systemctl start` and package scripts never wait on the network. STATUS and
/// `secoda-agent status` keep saying that the tunnel is down, and why.
fn ready_while_down(ready_by: &mut Option<tokio::time::Instant>, last_status: &str) {
    *ready_by = None;
    log::warn!(
        "no tunnel after {}s; the service counts as started and keeps retrying (see `secoda-agent status`)",
        READY_WAIT_MAX.as_secs()
    );
    systemd::ready(last_status);
}

/// Resolves at `ready_by`; never when READY=1 was already sent.
async fn ready_due(ready_by: Option<tokio::time::Instant>) {
    match ready_by {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// While stopping, only a second SIGTERM/SIGINT (or the end of the signal stream) cuts the
/// drain short; a reload is pointless then and is ignored.
async fn second_stop(control: &mut mpsc::UnboundedReceiver<Control>) {
    while let Some(Control::Reload) = control.recv().await {
        log::info!("reload ignored: stopping");
    }
}

/// The server, the remote listener and the proxy, as `status` and the metrics show them.
pub fn endpoints(cfg: &Config) -> Endpoints {
    let t = &cfg.tunnel;
    Endpoints {
        server: proxy::host_port(&t.host, t.port),
        listen: proxy::host_port(&t.listen_address, t.listen_port),
        proxy: t.proxy.as_ref().map(|p| p.endpoint()),
        pair: t.pair,
    }
}

/// The STATUS line while connected, after the note of a failed reload if there is one.
fn status_line(cfg: &Config, s: &Session, note: Option<&str>) -> String {
    let (addr, port) = &s.listen;
    let n = s.open_channels();
    let line = match s.refused_since() {
        Some(since) => standby::status(cfg, s, crate::status::utc(unix_secs_ago(since.elapsed()))),
        None => format!(
            "connected to {}, listening on {addr}:{port}, {n} active connection{}",
            cfg.tunnel.route(),
            if n == 1 { "" } else { "s" }
        ),
    };
    match note {
        Some(note) => format!("{note}; {line}"),
        None => line,
    }
}

/// Unix seconds of the moment `ago` before now.
fn unix_secs_ago(ago: Duration) -> u64 {
    std::time::SystemTime::now()
        .checked_sub(ago)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}
