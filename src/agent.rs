//! `secoda-agent run` inside its runtime: signals become [`Control`] messages, then the
//! watchdog, the status socket, the metrics endpoint and the supervisor start. main.rs only
//! parses the command line and builds the runtime; tests drive [`supervisor::run`] directly.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};

use crate::config::{Config, Sources};
use crate::constants::MALLOC_TRIM_THRESHOLD;
use crate::handover::{self, Successor};
use crate::supervisor::{self, Control, Options};
use crate::telemetry::Telemetry;
use crate::{metrics, status, sys, systemd};

/// What `run` needs besides the configuration.
pub struct RunOptions {
    /// Re-read on reload.
    pub sources: Sources,
    pub instance: Option<String>,
    /// `--log-level`, which overrides `[log] level` across reloads.
    pub log_level: Option<log::LevelFilter>,
    /// Set when an upgrade's handover started this process (handover.rs): the channel to the
    /// old process, and the listeners it passed on.
    pub handover: Option<Inherited>,
}

/// What a new binary's process gets from the old one (read before the runtime starts).
pub struct Inherited {
    pub channel: std::os::fd::OwnedFd,
    pub status: Option<std::os::unix::net::UnixListener>,
    pub metrics: Option<std::net::TcpListener>,
}

impl Inherited {
    /// Tell the old process that this one will not take over, and why (one line).
    pub fn refuse(&self, why: &str) {
        use std::io::Write;
        if let Ok(fd) = self.channel.try_clone() {
            let mut s = std::os::unix::net::UnixStream::from(fd);
            let line = why.replace('\n', "; ");
            let _ = writeln!(s, "failed {line}");
        }
    }

    /// This process was started by a handover: take what it was given.
    pub fn from_env() -> Option<Inherited> {
        let channel = Successor::from_env()?;
        let (status, metrics) = handover::inherited_listeners();
        Some(Inherited {
            channel,
            status,
            metrics,
        })
    }
}

/// Process-wide settings, before the runtime's threads exist.
pub fn prepare_process() {
    if !sys::raise_open_file_limit() {
        log::debug!("could not raise the open-file limit; channels are limited by the current one");
    }
    if !sys::keep_freed_memory(MALLOC_TRIM_THRESHOLD) {
        log::debug!("could not set the allocator's trim threshold");
    }
}

/// Run until SIGTERM/SIGINT (and the drain that follows). Fails only if the signal handlers
/// cannot be installed.
pub async fn run(cfg: Config, opts: RunOptions) -> io::Result<()> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // Installed before the first connect, so an early SIGHUP reloads instead of killing.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                _ = term.recv() => Control::Shutdown,
                _ = int.recv() => Control::Shutdown,
                _ = hup.recv() => Control::Reload,
            };
            if tx.send(c).is_err() {
                return;
            }
        }
    });
    let successor = opts.handover.is_some();
    if successor {
        // Not the main process yet: systemd would refuse (and log) what it says.
        systemd::keep_silent();
    }
    // The local servers start at once, or once this process is the main one (a handover's
    // new process: the old one serves them until then, on the same listeners).
    let (live, _) = tokio::sync::watch::channel(!successor);
    let mut local = LocalServers {
        live: live.clone(),
        ..LocalServers::default()
    };
    if let Some(interval) = systemd::watchdog_interval(successor) {
        local.spawn(systemd::watchdog(interval, systemd::watchdog_ping));
    }
    let telemetry = Telemetry::new(opts.instance.clone(), supervisor::endpoints(&cfg));
    let (inherited_status, inherited_metrics, channel) = match opts.handover {
        Some(h) => (h.status, h.metrics, Some(h.channel)),
        None => (None, None, None),
    };
    serve_status(
        opts.instance.as_deref(),
        &telemetry,
        inherited_status,
        &mut local,
    )
    .await;
    let mut own_listeners = Vec::new();
    let metrics = match inherited_metrics {
        Some(l) => l
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(l))
            .map(Some),
        None => match cfg.metrics.listen {
            Some(addr) => tokio::net::TcpListener::bind(addr).await.map(Some),
            None => Ok(None),
        },
    };
    match metrics {
        Ok(Some(l)) => {
            let addr = l.local_addr().ok().or(cfg.metrics.listen);
            if let Some(addr) = addr {
                log::info!("metrics at http://{addr}/metrics");
                own_listeners.push(addr);
            }
            local.metrics_fd = Some(handover::raw(&l));
            local.spawn_live(metrics::serve(l, telemetry.clone()));
        }
        Ok(None) => {}
        Err(e) => {
            let addr = cfg
                .metrics
                .listen
                .map(|a| a.to_string())
                .unwrap_or_default();
            log::error!(error_class = "metrics"; "[metrics] listen = \"{addr}\": cannot listen there: {e}; the tunnel runs without metrics")
        }
    }
    let successor = match channel {
        Some(fd) => match Successor::new(fd) {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!(error_class = "handover"; "cannot use the channel to the previous process: {e}; starting as a new agent");
                systemd::speak();
                let _ = live.send(true);
                None
            }
        },
        None => None,
    };
    let options = Options {
        sources: opts.sources,
        log_level: opts.log_level,
        telemetry,
        own_listeners,
        local,
        successor,
    };
    supervisor::run(cfg, options, rx).await;
    Ok(())
}

/// The status socket and the metrics endpoint (and the watchdog's pings): what an upgrade's
/// handover passes on to the new binary's process and stops here.
#[derive(Default)]
pub struct LocalServers {
    pub status_fd: Option<RawFd>,
    pub metrics_fd: Option<RawFd>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Whether the servers may answer (false while a new process waits to take over).
    live: tokio::sync::watch::Sender<bool>,
}

impl LocalServers {
    fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }

    /// Start `task` once the servers are live.
    fn spawn_live(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut live = self.live.subscribe();
        self.spawn(async move {
            if live.wait_for(|l| *l).await.is_ok() {
                task.await;
            }
        });
    }

    /// This process is the main one now (a handover's new process): serve, and ping the
    /// watchdog.
    pub fn go_live(&mut self) {
        self.live.send_replace(true);
        if let Some(interval) = systemd::watchdog_interval(true) {
            self.spawn(systemd::watchdog(interval, systemd::watchdog_ping));
        }
    }

    /// The tunnel was handed over: the new process serves these now.
    pub fn stop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

/// The status socket for `secoda-agent status`; without it the tunnel still runs.
async fn serve_status(
    instance: Option<&str>,
    telemetry: &Arc<Telemetry>,
    inherited: Option<std::os::unix::net::UnixListener>,
    local: &mut LocalServers,
) {
    let path = status::default_socket(instance);
    let listener = match inherited {
        Some(l) => l
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(l)),
        None => status::bind(&path).await,
    };
    match listener {
        Ok(l) => {
            local.status_fd = Some(handover::raw(&l));
            local.spawn_live(status::serve(l, telemetry.clone()));
        }
        Err(e) => log::warn!(
            "status socket {} not available: {e}; `secoda-agent status` will not reach this agent",
            path.display()
        ),
    }
}
