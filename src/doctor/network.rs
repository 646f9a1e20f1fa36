//! The network steps: resolve and connect (directly or through the proxy), then the SSH
//! version line.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::{elapsed_ms, Report};
use crate::config::{self, Config};
use crate::connect;
use crate::constants::{CONNECT_STAGGER, DOCTOR_STEP_TIMEOUT};
use crate::error::TunnelError;
use crate::proxy::{self, Proxy};

/// How the SSH step reaches the server again: the address that answered, or the proxy.
pub(super) enum Route {
    Direct(SocketAddr),
    Proxy,
}

/// Resolve, connect (directly or through the proxy), and wait for the SSH version line.
pub(super) async fn network(r: &mut Report, cfg: &Config) -> Option<Route> {
    let t = &cfg.tunnel;
    let server = proxy::host_port(&t.host, t.port);
    if let Some(p) = &t.proxy {
        let tcp = through_proxy(r, p, &server, t).await?;
        return banner(r, tcp, &server).await.then_some(Route::Proxy);
    }
    let started = Instant::now();
    let addrs = match connect::resolve(&t.host, t.port, DOCTOR_STEP_TIMEOUT).await {
        Ok(a) => a,
        Err(e) => {
            r.fail(
                "resolve",
                format!("{}: {e}", t.host),
                "check DNS on this host (/etc/resolv.conf) and [tunnel] host",
            );
            return None;
        }
    };
    let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    r.ok(
        "resolve",
        format!(
            "{} -> {} ({})",
            t.host,
            shown.join(", "),
            elapsed_ms(started)
        ),
    );

    // The addresses race as the tunnel's do (connect.rs).
    let started = Instant::now();
    let raced = tokio::time::timeout(
        DOCTOR_STEP_TIMEOUT,
        connect::first_of(&addrs, CONNECT_STAGGER),
    )
    .await;
    let (failures, timed_out) = match raced {
        Ok(Ok((tcp, addr))) => {
            r.ok(
                "connect",
                format!("{addr} accepted ({})", elapsed_ms(started)),
            );
            return banner(r, tcp, &server).await.then_some(Route::Direct(addr));
        }
        Ok(Err(errors)) => (
            errors
                .iter()
                .map(|(addr, e)| format!("{addr}: {e}"))
                .collect::<Vec<_>>(),
            false,
        ),
        Err(_) => (
            vec![format!(
                "{}: timed out after {DOCTOR_STEP_TIMEOUT:?}",
                addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )],
            true,
        ),
    };
    let remedy = if timed_out {
        "outbound traffic to this port is probably blocked by a firewall: allow it, or ask Secoda for an allow-listed port"
    } else {
        "nothing accepts connections there: check [tunnel] host and port, and any outbound proxy or firewall"
    };
    r.fail("connect", failures.join("; "), remedy);
    r.skip("ssh banner", "no TCP connection");
    None
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
                format!("{p} at {addr} accepted ({})", elapsed_ms(started)),
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
                format!("{p} connected us to {server} ({})", elapsed_ms(started)),
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
            r.ok("ssh banner", format!("{text} ({})", elapsed_ms(started)));
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
