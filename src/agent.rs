//! `secoda-agent run` inside its runtime: signals become [`Control`] messages, then the
//! watchdog, the status socket, the metrics endpoint and the supervisor start. main.rs only
//! parses the command line and builds the runtime; tests drive [`supervisor::run`] directly.

use std::io;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};

use crate::config::{Config, Sources};
use crate::constants::MALLOC_TRIM_THRESHOLD;
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
    if let Some(interval) = systemd::watchdog_interval() {
        tokio::spawn(systemd::watchdog(interval, systemd::watchdog_ping));
    }
    let telemetry = Telemetry::new(opts.instance.clone(), supervisor::endpoints(&cfg));
    serve_status(opts.instance.as_deref(), &telemetry).await;
    let mut own_listeners = Vec::new();
    if let Some(addr) = cfg.metrics.listen {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                log::info!("metrics at http://{addr}/metrics");
                own_listeners.push(l.local_addr().unwrap_or(addr));
                tokio::spawn(metrics::serve(l, telemetry.clone()));
            }
            Err(e) => {
                log::error!(error_class = "metrics"; "[metrics] listen = \"{addr}\": cannot listen there: {e}; the tunnel runs without metrics")
            }
        }
    }
    let options = Options {
        sources: opts.sources,
        log_level: opts.log_level,
        telemetry,
        own_listeners,
    };
    supervisor::run(cfg, options, rx).await;
    Ok(())
}

/// The status socket for `secoda-agent status`; without it the tunnel still runs.
async fn serve_status(instance: Option<&str>, telemetry: &Arc<Telemetry>) {
    let path = status::default_socket(instance);
    match status::bind(&path).await {
        Ok(l) => {
            tokio::spawn(status::serve(l, telemetry.clone()));
        }
        Err(e) => log::warn!(
            "status socket {} not available: {e}; `secoda-agent status` will not reach this agent",
            path.display()
        ),
    }
}
