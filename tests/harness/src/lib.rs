//! Test harness: a real OpenSSH `sshd` on a free loopback port, the real agent binary, a
//! systemd-style notify socket, local target services and a small SOCKS client.

mod agent;
mod delayline;
pub mod load;
mod netns;
pub mod proxies;
mod services;
mod socks;
mod sshd;

pub use {agent::*, delayline::*, netns::*, services::*, socks::*, sshd::*};

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Deterministic pseudo-random payload.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, enough to compare payloads.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Send `data` through an open stream to an echo service and check it all comes back.
pub async fn echo_roundtrip(s: TcpStream, data: &[u8]) -> bool {
    echo_roundtrip_detail(s, data).await.is_ok()
}

/// As [`echo_roundtrip`], saying what went wrong.
pub async fn echo_roundtrip_detail(mut s: TcpStream, data: &[u8]) -> Result<(), String> {
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut back = Vec::with_capacity(data.len());
    let recv = r.read_to_end(&mut back);
    let (sent, got) = tokio::join!(send, recv);
    if let Err(e) = sent {
        return Err(format!(
            "send failed ({:?}) after {} bytes back",
            e.kind(),
            back.len()
        ));
    }
    if let Err(e) = got {
        return Err(format!(
            "receive failed ({:?}) after {} bytes",
            e.kind(),
            back.len()
        ));
    }
    if back.len() != data.len() {
        return Err(format!("{} of {} bytes came back", back.len(), data.len()));
    }
    if checksum(&back) != checksum(data) {
        return Err("bytes came back changed".into());
    }
    Ok(())
}

/// The last `n` lines of a log.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Poll (every 20 ms) until `f` gives a value or the timeout passes.
pub async fn until_some<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether something accepts TCP connections at `addr` within `timeout`.
pub async fn listening(addr: std::net::SocketAddr, timeout: Duration) -> bool {
    eventually(timeout, || async { TcpStream::connect(addr).await.is_ok() }).await
}

/// Poll until `f` is true or the timeout passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    until_some(timeout, || {
        let check = f();
        async move { check.await.then_some(()) }
    })
    .await
    .is_some()
}

/// The tunnel serves: a SOCKS5 channel to a fresh echo service round-trips byte-exact.
pub async fn assert_serves(listen: u16) {
    let echo = echo_server().await;
    let (code, s) = socks5(listen, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 0, "the tunnel does not serve");
    assert!(echo_roundtrip(s.unwrap(), &payload(10_000, 9)).await);
}

/// A fresh sshd and an agent connected to it (extra agent.toml lines appended), once READY.
pub async fn tunnel_up(extra: &str) -> (Sshd, Agent, u16) {
    let sshd = Sshd::start();
    let listen = free_port();
    let agent = Agent::start(&sshd.agent_toml(listen, extra));
    agent.wait_ready().await;
    (sshd, agent, listen)
}

/// The metrics endpoint's text (`GET /metrics` on loopback port `mport`).
pub async fn metrics_text(mport: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", mport)).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

/// `secoda_agent_standby` and `secoda_agent_tunnel_up` from a metrics endpoint.
pub async fn standby_and_up(mport: u16) -> (f64, f64) {
    let body = metrics_text(mport).await;
    let get = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name}:\n{body}"))
    };
    (get("secoda_agent_standby"), get("secoda_agent_tunnel_up"))
}
