//! `secoda-agent doctor`: walk the path the tunnel takes, one step at a time, each with a short
//! timeout, and say for each failure what to do about it. Safe while the service runs: the
//! listen port is only tried when the running agent does not hold it, and released at once.

mod network;
mod ssh;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use tokio::net::TcpStream;

use crate::config::{self, ClientKey, Config, Sources};
use crate::constants::DOCTOR_STEP_TIMEOUT;
use crate::status;

/// Exit codes: 0 every hard step passed, 1 one failed, 78 the configuration is invalid.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const CONFIG: u8 = crate::exit::CONFIG;
}

/// Prints each step as it finishes and counts failures.
#[derive(Default)]
pub(super) struct Report {
    failed: usize,
}

impl Report {
    pub(super) fn ok(&mut self, step: &str, detail: impl AsRef<str>) {
        println!("[ ok ] {step}: {}", detail.as_ref());
    }

    pub(super) fn warn(&mut self, step: &str, detail: impl AsRef<str>) {
        println!("[warn] {step}: {}", detail.as_ref());
    }

    pub(super) fn fail(&mut self, step: &str, detail: impl AsRef<str>, remedy: impl AsRef<str>) {
        self.failed += 1;
        println!("[FAIL] {step}: {}", detail.as_ref());
        println!("       -> {}", remedy.as_ref());
    }

    pub(super) fn skip(&mut self, step: &str, why: &str) {
        println!("[skip] {step}: {why}");
    }
}

pub(super) fn elapsed_ms(t: Instant) -> String {
    format!("{:.0} ms", t.elapsed().as_secs_f64() * 1000.0)
}

/// Run every check; returns the exit code.
pub async fn run(sources: &Sources, socket: &Path) -> u8 {
    let mut r = Report::default();
    println!("secoda-agent {} doctor", env!("CARGO_PKG_VERSION"));
    let cfg = match config::load(sources) {
        Ok(c) => {
            r.ok("configuration", format!("valid (from {})", c.origin));
            for w in &c.warnings {
                r.warn("configuration", w);
            }
            c
        }
        Err(e) => {
            for err in &e.errors {
                r.fail(
                    "configuration",
                    err,
                    "fix the file or variable named; `secoda-agent check-config` re-checks",
                );
            }
            println!("\nthe configuration is invalid: no further checks");
            return exit::CONFIG;
        }
    };
    // Loading refuses a key file that others can read, or a key that does not parse.
    match &cfg.tunnel.key {
        ClientKey::Loaded(k) => r.ok("client key", format!("{k} (permissions and format OK)")),
        ClientKey::InCredential(_) => r.skip("client key", &cfg.tunnel.key.to_string()),
    }
    let running = status::query(socket).ok();
    match &running {
        Some(s) => r.ok(
            "running agent",
            format!("pid {}, tunnel {}", s.pid, s.state.as_str()),
        ),
        None => r.ok(
            "running agent",
            format!("none answers on {}", socket.display()),
        ),
    }

    if let Some(route) = network::network(&mut r, &cfg).await {
        ssh::ssh(&mut r, &cfg, route, running.as_ref()).await;
    }
    targets(&mut r, &cfg).await;

    println!();
    if r.failed == 0 {
        println!("all checks passed");
        exit::OK
    } else {
        println!(
            "{} check{} failed",
            r.failed,
            if r.failed == 1 { "" } else { "s" }
        );
        exit::FAILED
    }
}

/// Each `allow` entry that names a host: it resolves, and accepts a connection from here.
async fn targets(r: &mut Report, cfg: &Config) {
    for (host, port, entry) in cfg.forward.policy.allowed_hosts() {
        let step = format!("allow \"{entry}\"");
        let started = Instant::now();
        let port_for_lookup = port.unwrap_or(0);
        let addrs: Vec<SocketAddr> = match tokio::time::timeout(
            DOCTOR_STEP_TIMEOUT,
            tokio::net::lookup_host((host.as_str(), port_for_lookup)),
        )
        .await
        {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => {
                r.fail(
                    &step,
                    format!("{host} does not resolve here: {e}"),
                    "the agent resolves names on this host: fix DNS or /etc/hosts, or the entry",
                );
                continue;
            }
            Err(_) => {
                r.fail(
                    &step,
                    format!("{host}: no DNS answer within {DOCTOR_STEP_TIMEOUT:?}"),
                    "check DNS on this host",
                );
                continue;
            }
        };
        let Some(port) = port else {
            r.ok(
                &step,
                format!(
                    "{host} resolves ({}); no port in the entry to try",
                    addrs
                        .first()
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default()
                ),
            );
            continue;
        };
        let Some(addr) = addrs.first().copied() else {
            r.fail(
                &step,
                format!("{host} has no addresses"),
                "fix DNS or the entry",
            );
            continue;
        };
        match tokio::time::timeout(DOCTOR_STEP_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(_)) => r.ok(&step, format!("{host}:{port} ({addr}) accepts connections ({})", elapsed_ms(started))),
            Ok(Err(e)) => r.fail(
                &step,
                format!("{host}:{port} ({addr}): {e}"),
                "is the database running, and does its firewall (pg_hba.conf, security group) let this host in?",
            ),
            Err(_) => r.fail(
                &step,
                format!("{host}:{port} ({addr}): no answer within {DOCTOR_STEP_TIMEOUT:?}"),
                "a firewall between this host and the database drops the traffic",
            ),
        }
    }
}
