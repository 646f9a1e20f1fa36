//! The core job against a real OpenSSH sshd: the forward, every SOCKS flavour, reply codes.

use std::process::Command;
use std::time::Duration;

use secoda_agent_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn up() -> (Sshd, Agent, u16) {
    tunnel_up("[forward]\nconnect_timeout = \"2s\"\n").await
}

#[tokio::test]
async fn socks5_socks4_and_4a_reach_a_local_service_byte_exact() {
    let (_sshd, _agent, listen) = up().await;
    let echo = echo_server().await;
    let data = payload(256 * 1024, 1);

    let (code, s) = socks5(listen, "localhost", echo.port()).await;
    assert_eq!(code, 0, "SOCKS5 by name");
    assert!(echo_roundtrip(s.unwrap(), &data).await);

    let (code, s) = socks5(listen, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 0, "SOCKS5 by IP");
    assert!(echo_roundtrip(s.unwrap(), &data).await);

    let (code, s) = socks4(listen, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 0x5a, "SOCKS4");
    assert!(echo_roundtrip(s.unwrap(), &data).await);

    let (code, s) = socks4(listen, "localhost", echo.port()).await;
    assert_eq!(code, 0x5a, "SOCKS4a");
    assert!(echo_roundtrip(s.unwrap(), &data).await);
}

#[tokio::test]
async fn curl_through_the_tunnel_with_every_socks_flavour() {
    let (_sshd, _agent, listen) = up().await;
    let web = http_server("hello through the tunnel").await;
    for flag in ["--socks5-hostname", "--socks5", "--socks4", "--socks4a"] {
        let out = tokio::task::spawn_blocking(move || {
            Command::new("curl")
                .args(["-sS", "--max-time", "10", flag])
                .arg(format!("127.0.0.1:{listen}"))
                .arg(format!("http://localhost:{}/", web.port()))
                .output()
                .expect("curl")
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "curl {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello through the tunnel",
            "curl {flag}"
        );
    }
}

#[tokio::test]
async fn failures_get_the_right_reply_codes() {
    let (_sshd, agent, listen) = up().await;
    // Refused: a port nobody listens on.
    let closed = free_port();
    assert_eq!(socks5(listen, "127.0.0.1", closed).await.0, 5, "refused");
    assert_eq!(
        socks4(listen, "127.0.0.1", closed).await.0,
        0x5b,
        "SOCKS4 refused"
    );
    // A name that does not resolve: host unreachable.
    assert_eq!(
        socks5(listen, "no-such-host.invalid", 80).await.0,
        4,
        "name not found"
    );
    // Link-local (cloud metadata) is denied by default, before any packet is sent.
    assert_eq!(
        socks5(listen, "169.254.169.254", 80).await.0,
        2,
        "metadata denied"
    );
    assert!(
        agent
            .wait_output("link-local", Duration::from_secs(5))
            .await
    );
    // A name that cannot be a host name (a forged log line, a terminal escape): host
    // unreachable, no lookup, and the log shows it escaped, never raw.
    let forged = "db\ninfo: forged\x1b[2J";
    assert_eq!(socks5(listen, forged, 5432).await.0, 4, "bad name, SOCKS5");
    assert_eq!(
        socks4(listen, forged, 5432).await.0,
        0x5b,
        "bad name, SOCKS4a"
    );
    assert!(
        agent
            .wait_output_count("db\\ninfo: forged\\x1b[2J", 2, Duration::from_secs(5))
            .await,
        "{}",
        agent.output()
    );
    assert!(
        !agent.output().contains('\x1b'),
        "a raw ESC reached the log"
    );
    assert!(!agent.output().contains("\ninfo: forged"), "a forged line");
    // The tunnel still serves after all that.
    let echo = echo_server().await;
    let (code, s) = socks5(listen, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 0);
    assert!(echo_roundtrip(s.unwrap(), b"still fine").await);
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_open() {
    let (_sshd, _agent, listen) = up().await;
    // A service that reads everything until EOF, then answers with the byte count.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        // Answer a while after the client's EOF: the channel must stay open for the answer.
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(format!("got {}", all.len()).as_bytes())
            .await
            .unwrap();
    });
    let (code, s) = socks5(listen, "127.0.0.1", port).await;
    assert_eq!(code, 0);
    let mut s = s.unwrap();
    s.write_all(&payload(100_000, 3)).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "got 100000");
}

#[tokio::test]
async fn a_thousand_concurrent_channels_arrive_intact() {
    raise_nofile();
    // The production keepalive (15 s x 4), not the tests' 2 s x 3: sshd packs a burst on a
    // thousand channels into one output buffer that it regrows, copying it, packet by packet,
    // and on a loaded machine it served no socket for more than 8 s (strace: only mmap and
    // munmap of a 14 MB buffer), so the agent rightly gave the session up. This test is about
    // the channels; keepalive timing has its own tests.
    let (sshd, agent, listen) = tunnel_up(
        "keepalive_interval = \"15s\"\nkeepalive_max = 4\n[forward]\nconnect_timeout = \"2s\"\n",
    )
    .await;
    let echo = echo_server().await;
    let mut tasks = Vec::new();
    for i in 0..1000u64 {
        tasks.push(tokio::spawn(async move {
            let data = payload(64 * 1024, i);
            match socks5_detail(listen, "127.0.0.1", echo.port()).await {
                Ok(s) => echo_roundtrip_detail(s, &data)
                    .await
                    .err()
                    .map(|e| format!("echo: {e}")),
                Err(e) => Some(format!("SOCKS: {e:?}")),
            }
        }));
    }
    // On failure, say which step failed for how many channels, with both logs' tails: a
    // rare failure here must leave enough behind to be explained.
    let mut failed = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        if let Some(why) = t.await.unwrap() {
            *failed.entry(why).or_default() += 1;
        }
    }
    // A thousand "channel ... closed" lines would push out what explains them (a lost
    // session, a pause): the rest of the agent's log is printed whole.
    let log = agent.output();
    let (channels, other): (Vec<&str>, Vec<&str>) =
        log.lines().partition(|l| l.contains(" channel to "));
    assert!(
        failed.is_empty(),
        "channels that failed, by cause: {failed:?}\nagent log without its {} per-channel lines:\n{}\nlast per-channel lines:\n{}\nsshd log (tail):\n{}",
        channels.len(),
        other.join("\n"),
        channels[channels.len().saturating_sub(10)..].join("\n"),
        tail(&sshd.log(), 60)
    );
}

#[tokio::test]
async fn a_black_holed_target_times_out_with_code_6() {
    let (_sshd, _agent, listen) = up().await;
    // A listener whose accept queue is full drops further SYNs: connecting hangs, as to a
    // black-holed host, without any traffic leaving loopback.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = sock.listen(0).unwrap();
    let port = full.local_addr().unwrap().port();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let started = std::time::Instant::now();
    assert_eq!(socks5(listen, "127.0.0.1", port).await.0, 6, "timed out");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(5),
        "connect_timeout is 2s, waited {waited:?}"
    );
    drop(full);
}

#[tokio::test]
async fn channels_beyond_max_connections_are_refused_and_nothing_else_breaks() {
    let sshd = Sshd::start();
    let listen = free_port();
    let agent = Agent::start(&sshd.agent_toml(listen, "[forward]\nmax_connections = 3\n"));
    agent.wait_ready().await;
    let echo = echo_server().await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let (code, s) = socks5(listen, "127.0.0.1", echo.port()).await;
        assert_eq!(code, 0);
        open.push(s.unwrap());
    }
    assert_eq!(
        socks5(listen, "127.0.0.1", echo.port()).await.0,
        1,
        "the 4th channel must be refused"
    );
    assert!(
        agent
            .wait_output("max_connections is 3", Duration::from_secs(5))
            .await
    );
    // The open ones still work, and a slot frees up when one closes.
    let first = open.remove(0);
    assert!(echo_roundtrip(first, b"still served").await);
    assert!(
        eventually(Duration::from_secs(5), || async {
            match socks5(listen, "127.0.0.1", echo.port()).await {
                (0, Some(s)) => echo_roundtrip(s, b"slot reused").await,
                _ => false,
            }
        })
        .await
    );
}

#[tokio::test]
async fn a_stalled_socks_handshake_is_closed_after_the_timeout() {
    let (_sshd, _agent, listen) = up().await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", listen))
        .await
        .unwrap();
    // Half a SOCKS5 greeting, then nothing.
    s.write_all(&[5]).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "not closed: {r:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9),
        "closed too early: {waited:?}"
    );
    // Other channels are unaffected.
    let echo = echo_server().await;
    let (code, c) = socks5(listen, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 0);
    assert!(echo_roundtrip(c.unwrap(), b"fine").await);
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn short_channels(listen: u16, echo: u16, n: usize) {
    let mut workers = Vec::new();
    for w in 0..20 {
        workers.push(tokio::spawn(async move {
            for i in 0..n / 20 {
                let (code, s) = socks5(listen, "127.0.0.1", echo).await;
                assert_eq!(code, 0);
                assert!(echo_roundtrip(s.unwrap(), &payload(2000, (w * 1000 + i) as u64)).await);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
}

/// Every channel's state goes when the channel does: thousands of short channels must not
/// grow the agent (russh keeps a channel it did not see the server close, so the agent lets
/// the server close a finished channel; before that, each channel left ~4 KiB behind).
#[tokio::test]
async fn many_short_channels_leave_no_memory_behind() {
    let (_sshd, agent, listen) = tunnel_up("").await;
    let echo = echo_server().await;
    let pid = agent.child.id();
    short_channels(listen, echo.port(), 1000).await;
    agent.wait_no_channels().await;
    let before = rss_kib(pid);
    short_channels(listen, echo.port(), 6000).await;
    agent.wait_no_channels().await;
    let after = rss_kib(pid);
    assert!(
        after < before + 8 * 1024,
        "6,000 channels grew the agent from {before} KiB to {after} KiB"
    );
}

/// What a client of the forwarded port asks for, in the channels the agent ends itself.
#[derive(Clone, Copy, Debug)]
enum Refused {
    /// A target port nobody listens on: SOCKS reply 5.
    ClosedPort(u16),
    /// A link-local target, denied by the default policy: SOCKS reply 2.
    Denied,
    /// Not SOCKS at all.
    Garbage,
}

async fn refused_channels(listen: u16, kind: Refused, n: usize) {
    let mut workers = Vec::new();
    for _ in 0..20 {
        workers.push(tokio::spawn(async move {
            for _ in 0..n / 20 {
                match kind {
                    Refused::ClosedPort(port) => {
                        assert_eq!(socks5(listen, "127.0.0.1", port).await.0, 5)
                    }
                    Refused::Denied => assert_eq!(socks5(listen, "169.254.169.254", 80).await.0, 2),
                    Refused::Garbage => {
                        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", listen))
                            .await
                            .unwrap();
                        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
                        let mut rest = Vec::new();
                        let r =
                            tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
                                .await;
                        assert!(matches!(r, Ok(Ok(0))), "{r:?}");
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
}

/// Channels the agent ends itself (a refused target, a denied one, garbage instead of a SOCKS
/// request) must not grow it either: russh keeps a channel the client closed first, so the
/// agent sends EOF and lets the server close (before that, each left ~4 KiB behind).
#[tokio::test]
async fn channels_the_agent_refuses_leave_no_memory_behind() {
    let (_sshd, agent, listen) = tunnel_up("").await;
    let pid = agent.child.id();
    for kind in [
        Refused::ClosedPort(free_port()),
        Refused::Denied,
        Refused::Garbage,
    ] {
        refused_channels(listen, kind, 1000).await;
        agent.wait_no_channels().await;
        let before = rss_kib(pid);
        refused_channels(listen, kind, 20_000).await;
        agent.wait_no_channels().await;
        let after = rss_kib(pid);
        assert!(
            after < before + 2 * 1024,
            "20,000 channels refused as {kind:?} grew the agent from {before} KiB to {after} KiB"
        );
    }
}
