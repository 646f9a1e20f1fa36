//! `secoda-agent doctor`: walk the path the tunnel takes, one step at a time, each with a short
//! timeout, and say for each failure what to do about it. Safe while the service runs: the
//! listen port is only tried when the running agent does not hold it, and released at once.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use russh::client;
use russh::keys::{PublicKey, PublicKeyOrCertificate};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::fingerprint;
use crate::config::{self, ClientKey, Config, Sources};
use crate::constants::DOCTOR_STEP_TIMEOUT;
use crate::error::TunnelError;
use crate::proxy::{self, Proxy};
use crate::status;
use crate::telemetry::State;
use crate::tunnel::{authenticate, open_tcp, ssh_config};

/// Exit codes: 0 every hard step passed, 1 one failed, 78 the configuration is invalid.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const CONFIG: u8 = crate::exit::CONFIG;
}

/// Prints each step as it finishes and counts failures.
#[derive(Default)]
struct Report {
    failed: usize,
}

impl Report {
    fn ok(&mut self, step: &str, detail: impl AsRef<str>) {
        println!("[ ok ] {step}: {}", detail.as_ref());
    }

    fn warn(&mut self, step: &str, detail: impl AsRef<str>) {
        println!("[warn] {step}: {}", detail.as_ref());
    }

    fn fail(&mut self, step: &str, detail: impl AsRef<str>, remedy: impl AsRef<str>) {
        self.failed += 1;
        println!("[FAIL] {step}: {}", detail.as_ref());
        println!("       -> {}", remedy.as_ref());
    }

    fn skip(&mut self, step: &str, why: &str) {
        println!("[skip] {step}: {why}");
    }
}

fn secs(t: Instant) -> String {
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

    if let Some(route) = network(&mut r, &cfg).await {
        ssh(&mut r, &cfg, route, running.as_ref()).await;
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

/// How the SSH step reaches the server again: the address that answered, or the proxy.
enum Route {
    Direct(SocketAddr),
    Proxy,
}

/// Resolve, connect (directly or through the proxy), and wait for the SSH version line.
async fn network(r: &mut Report, cfg: &Config) -> Option<Route> {
    let t = &cfg.tunnel;
    let server = proxy::host_port(&t.host, t.port);
    if let Some(p) = &t.proxy {
        let tcp = through_proxy(r, p, &server, t).await?;
        return banner(r, tcp, &server).await.then_some(Route::Proxy);
    }
    let started = Instant::now();
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        DOCTOR_STEP_TIMEOUT,
        tokio::net::lookup_host((t.host.as_str(), t.port)),
    )
    .await
    {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => {
            r.fail(
                "resolve",
                format!("{}: {e}", t.host),
                "check DNS on this host (/etc/resolv.conf) and [tunnel] host",
            );
            return None;
        }
        Err(_) => {
            r.fail(
                "resolve",
                format!("{}: no answer within {DOCTOR_STEP_TIMEOUT:?}", t.host),
                "check DNS on this host (/etc/resolv.conf)",
            );
            return None;
        }
    };
    let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    r.ok(
        "resolve",
        format!("{} -> {} ({})", t.host, shown.join(", "), secs(started)),
    );

    let mut connected = None;
    let mut failures = Vec::new();
    let mut timed_out = false;
    for addr in &addrs {
        let started = Instant::now();
        match tokio::time::timeout(DOCTOR_STEP_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                r.ok("connect", format!("{addr} accepted ({})", secs(started)));
                connected = Some((*addr, s));
                break;
            }
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => {
                timed_out = true;
                failures.push(format!("{addr}: timed out after {DOCTOR_STEP_TIMEOUT:?}"));
            }
        }
    }
    let Some((addr, tcp)) = connected else {
        let remedy = if timed_out {
            "outbound traffic to this port is probably blocked by a firewall: allow it, or ask Secoda for an allow-listed port"
        } else {
            "nothing accepts connections there: check [tunnel] host and port, and any outbound proxy or firewall"
        };
        r.fail("connect", failures.join("; "), remedy);
        r.skip("ssh banner", "no TCP connection");
        return None;
    };

    banner(r, tcp, &server).await.then_some(Route::Direct(addr))
}

/// The proxy steps: reach the proxy, then have it connect us to the server.
async fn through_proxy(
    r: &mut Report,
    p: &Proxy,
    server: &str,
    t: &config::TunnelConfig,
) -> Option<TcpStream> {
    let started = Instant::now();
    let mut tcp = match tokio::time::timeout(DOCTOR_STEP_TIMEOUT, proxy::reach(p)).await {
        Ok(Ok((tcp, addr))) => {
            r.ok(
                "proxy",
                format!("{p} at {addr} accepted ({})", secs(started)),
            );
            tcp
        }
        Ok(Err(e)) => {
            r.fail(
                "proxy",
                e.to_string(),
                "check the proxy's host and port in [tunnel] proxy / SSH_PROXY, and that this host may connect to it",
            );
            r.skip("proxy handshake", "no connection to the proxy");
            r.skip("ssh banner", "no connection to the proxy");
            return None;
        }
        Err(_) => {
            r.fail(
                "proxy",
                format!("{p}: no connection within {DOCTOR_STEP_TIMEOUT:?}"),
                "a firewall probably drops traffic to the proxy: check its address, or ask the network's administrators",
            );
            r.skip("proxy handshake", "no connection to the proxy");
            r.skip("ssh banner", "no connection to the proxy");
            return None;
        }
    };
    let started = Instant::now();
    let remedy = match tokio::time::timeout(
        DOCTOR_STEP_TIMEOUT,
        proxy::handshake(&mut tcp, p, &t.host, t.port),
    )
    .await
    {
        Ok(Ok(())) => {
            r.ok(
                "proxy handshake",
                format!("{p} connected us to {server} ({})", secs(started)),
            );
            return Some(tcp);
        }
        Ok(Err(e)) => {
            let remedy = match &e {
                TunnelError::ProxyAuth { .. } => "fix the user and password in the proxy URL (percent-encode @ : % as %40 %3A %25)".to_string(),
                TunnelError::ProxyRefused { .. } => format!("ask the proxy's administrators to allow CONNECT to {server}, or ask Secoda for a tunnel on port 443"),
                _ => "check the scheme (http:// or socks5://), host and port of [tunnel] proxy / SSH_PROXY".to_string(),
            };
            r.fail("proxy handshake", e.to_string(), remedy);
            r.skip("ssh banner", "the proxy did not connect us");
            return None;
        }
        Err(_) => {
            format!("{p} did not answer the request for {server} within {DOCTOR_STEP_TIMEOUT:?}")
        }
    };
    r.fail(
        "proxy handshake",
        remedy,
        "the proxy cannot reach the server, or is overloaded: ask its administrators",
    );
    r.skip("ssh banner", "the proxy did not connect us");
    None
}

/// The server speaks first: "SSH-2.0-...\r\n". Whether a version line arrived.
async fn banner(r: &mut Report, mut tcp: TcpStream, server: &str) -> bool {
    let started = Instant::now();
    let mut line = Vec::new();
    let read = tokio::time::timeout(DOCTOR_STEP_TIMEOUT, async {
        let mut byte = [0u8; 1];
        while line.len() < 255 {
            if tcp.read(&mut byte).await? == 0 {
                break;
            }
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    let text = String::from_utf8_lossy(&line).trim_end().to_string();
    match read {
        Err(_) if line.is_empty() => {
            r.fail(
                "ssh banner",
                format!("{server} accepted the connection but sent no SSH version line within {DOCTOR_STEP_TIMEOUT:?}"),
                "this is what Secoda's troubleshooting calls \"stuck on the version number\": a firewall, proxy or DPI box intercepts outbound traffic; allow this host to reach the server directly",
            );
            false
        }
        _ if text.starts_with("SSH-") => {
            r.ok("ssh banner", format!("{text} ({})", secs(started)));
            true
        }
        _ => {
            r.fail(
                "ssh banner",
                format!("{server} answered, but not as an SSH server: {:?}", text),
                "check [tunnel] host and port: something else listens there (a proxy, a web server?)",
            );
            false
        }
    }
}

/// Records the host key the server presents; accepts it only if it is pinned.
struct Probe {
    pins: Vec<PublicKey>,
    presented: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Probe {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(cert) => {
                PublicKey::new(cert.public_key().clone(), "")
            }
        };
        *self.presented.lock().unwrap_or_else(|e| e.into_inner()) = Some(fingerprint(&key));
        Ok(self.pins.iter().any(|p| p.key_data() == key.key_data()))
    }
}

/// Host key, authentication and the remote forward, over a fresh connection.
async fn ssh(
    r: &mut Report,
    cfg: &Config,
    route: Route,
    running: Option<&crate::telemetry::Snapshot>,
) {
    let t = &cfg.tunnel;
    let pins: Vec<String> = t.host_keys.iter().map(fingerprint).collect();
    let presented = Arc::new(Mutex::new(None));
    let probe = Probe {
        pins: t.host_keys.clone(),
        presented: presented.clone(),
    };
    let started = Instant::now();
    let handshake = async {
        let tcp = match route {
            Route::Direct(addr) => TcpStream::connect(addr).await?,
            Route::Proxy => open_tcp(t)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?,
        };
        client::connect_stream(Arc::new(ssh_config(t)), tcp, probe).await
    };
    let handshake = tokio::time::timeout(DOCTOR_STEP_TIMEOUT, handshake).await;
    let seen = presented.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut handle = match (handshake, seen) {
        (Ok(Ok(h)), Some(seen)) => {
            r.ok(
                "host key",
                format!(
                    "the server presented {seen}, which is pinned ({})",
                    secs(started)
                ),
            );
            h
        }
        (_, Some(seen)) if !pins.contains(&seen) => {
            r.fail(
                "host key",
                format!("the server presented {seen}; pinned: {}", pins.join(" or ")),
                "if Secoda confirms the server's key changed, update [tunnel] host_keys (or SSH_HOST_KEY); otherwise something intercepts the connection: do not connect",
            );
            r.skip("authentication", "the host key did not match");
            r.skip("remote forward", "the host key did not match");
            return;
        }
        (Ok(Err(e)), _) => {
            r.fail(
                "ssh handshake",
                e.to_string(),
                "the server and the agent could not agree on algorithms, or the connection broke",
            );
            r.skip("authentication", "no SSH session");
            r.skip("remote forward", "no SSH session");
            return;
        }
        _ => {
            r.fail(
                "ssh handshake",
                format!("not complete within {DOCTOR_STEP_TIMEOUT:?}"),
                "the server or the network is too slow or drops traffic; try again, then check the path",
            );
            r.skip("authentication", "no SSH session");
            r.skip("remote forward", "no SSH session");
            return;
        }
    };

    if let ClientKey::InCredential(name) = &t.key {
        r.skip(
            "authentication",
            &format!(
                "the key is in systemd credential \"{name}\", which only the service can read; to run every step with it: systemd-run --pipe --wait -p {} secoda-agent doctor",
                config::credential_unit_setting(name)
            ),
        );
        r.skip("remote forward", "not authenticated");
        return;
    }
    let started = Instant::now();
    match tokio::time::timeout(DOCTOR_STEP_TIMEOUT, authenticate(&mut handle, t)).await {
        Ok(Ok(())) => r.ok(
            "authentication",
            format!(
                "user {} with key {} accepted ({})",
                t.user,
                t.key.fingerprint(),
                secs(started)
            ),
        ),
        Ok(Err(e)) => {
            r.fail("authentication", e.to_string(), "ask Secoda which key and user this tunnel expects; the fingerprint above is what this host offers");
            r.skip("remote forward", "not authenticated");
            return;
        }
        Err(_) => {
            r.fail(
                "authentication",
                format!("no answer within {DOCTOR_STEP_TIMEOUT:?}"),
                "try again; if it persists, the server is overloaded",
            );
            r.skip("remote forward", "not authenticated");
            return;
        }
    }

    let listen = format!("{}:{}", t.listen_address, t.listen_port);
    let held = running.filter(|s| s.state == State::Up && s.listen == listen);
    if let Some(s) = held {
        r.ok(
            "remote forward",
            format!(
                "{listen} is held by the running agent (pid {}): not touched",
                s.pid
            ),
        );
    } else {
        let started = Instant::now();
        let forward = tokio::time::timeout(
            DOCTOR_STEP_TIMEOUT,
            handle.tcpip_forward(t.listen_address.clone(), u32::from(t.listen_port)),
        )
        .await;
        match forward {
            Ok(Ok(_)) => {
                let _ = tokio::time::timeout(
                    DOCTOR_STEP_TIMEOUT,
                    handle.cancel_tcpip_forward(t.listen_address.clone(), u32::from(t.listen_port)),
                )
                .await;
                r.ok(
                    "remote forward",
                    format!("the server listened on {listen} and released it again ({})", secs(started)),
                );
            }
            Ok(Err(_)) => r.fail(
                "remote forward",
                format!("the server refused to listen on {listen}"),
                "the port is held by another session: a tunnel on another host, an old Docker container, or a session the server has not timed out yet (wait a minute); else the account may not forward this port: ask Secoda",
            ),
            Err(_) => r.fail(
                "remote forward",
                format!("no answer within {DOCTOR_STEP_TIMEOUT:?}"),
                "try again; if it persists, ask Secoda",
            ),
        }
    }
    let _ = handle
        .disconnect(russh::Disconnect::ByApplication, "doctor done", "")
        .await;
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
            Ok(Ok(_)) => r.ok(&step, format!("{host}:{port} ({addr}) accepts connections ({})", secs(started))),
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
