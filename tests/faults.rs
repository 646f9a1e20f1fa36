//! Faults: a black-holed server, targets that misbehave, reload storms. Every surviving
//! transfer is checked byte for byte.

use std::time::{Duration, Instant};

use secoda_agent_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The server stays up but its packets vanish (nft drop inside a private network namespace):
/// the agent must declare the session dead within keepalive_interval x keepalive_max, come
/// back as soon as packets flow, and leak no file descriptor.
#[tokio::test]
async fn a_black_holed_server_is_declared_dead_and_the_tunnel_returns() {
    let ns = NetNs::new("blackhole");
    let sshd = Sshd::start_in(Some(&ns.name), "");
    let listen = 10123;
    // keepalive 2s x 3: dead within 6s of silence.
    let agent = Agent::start_in(Some(&ns.name), &sshd.agent_toml(listen, ""), &[], &[]);
    agent.wait_ready().await;
    let fds_before = agent.fd_count();

    ns.drop_tcp(
        "blackhole",
        "input",
        &[("dport", sshd.port), ("sport", sshd.port)],
    );
    let cut = Instant::now();
    let seen = agent.notifications().len();
    assert!(
        agent
            .wait_output("tunnel lost", Duration::from_secs(15))
            .await,
        "{}",
        agent.output()
    );
    let dead_after = cut.elapsed();
    assert!(
        agent.output().contains("stopped answering keepalives"),
        "{}",
        agent.output()
    );
    // 6 s of keepalives, plus up to one interval for the silence to start counting.
    assert!(
        dead_after <= Duration::from_secs(9),
        "declared dead only after {dead_after:?}"
    );

    // A new attempt hangs in the black hole (its SYN unanswered) when the packets flow again:
    // the tunnel must not wait for that attempt's own timeout to come back.
    let port_filter = format!("dport = :{}", sshd.port);
    assert!(
        eventually(Duration::from_secs(10), || async {
            !ns.run(&["ss", "-Htn", "state", "syn-sent", &port_filter])
                .trim()
                .is_empty()
        })
        .await,
        "no reconnect attempt into the black hole; {}",
        agent.output()
    );
    ns.run(&["nft", "delete", "table", "inet", "blackhole"]);
    agent.wait_ready_from(seen).await;
    // Served again: curl from inside the namespace to a web server inside it.
    std::fs::write(agent.dir.path().join("index.html"), "back").unwrap();
    let mut web = ns.serve_http(agent.dir.path(), "127.0.0.1");
    let url = "http://localhost:8080/index.html";
    let proxy = format!("127.0.0.1:{listen}");
    let fetched = eventually(Duration::from_secs(10), || async {
        let out = command_in(Some(&ns.name), "curl")
            .args(["-sS", "--max-time", "5", "--socks5-hostname", &proxy, url])
            .output()
            .unwrap();
        out.stdout == b"back"
    })
    .await;
    let _ = web.kill();
    let _ = web.wait();
    assert!(
        fetched,
        "no page through the tunnel after the black hole; {}",
        agent.output()
    );
    // The fetch's own channel closes a moment after curl has its page.
    let settled = eventually(Duration::from_secs(5), || async {
        agent.fd_count() <= fds_before
    })
    .await;
    assert!(
        settled,
        "file descriptors leaked: {fds_before} before, {} after",
        agent.fd_count()
    );
}

/// A blackout far longer than the keepalive window, on a 40 ms path: the agent gives its
/// session up, but the server cannot know (nothing of ours reaches it) and keeps that session
/// and its port until a packet of ours does; the kernel's retransmissions on the old
/// connection are by then many seconds apart. The agent must serve again within seconds of
/// the path's return, its old session ended at the server (reset the moment a new connection
/// is answered).
#[tokio::test]
async fn after_a_long_blackout_the_tunnel_is_back_within_seconds_of_the_path() {
    let line = DelayLine::new("bo", Duration::from_millis(20), 0.0);
    let sshd = line.sshd("");
    let listen = 10128;
    // keepalive 2s x 3: the session is given up 6-8 s into the blackout.
    let toml = sshd.agent_toml_at((FAR_ADDR, sshd.port), listen, "");
    let agent = Agent::start_in(Some(&line.near.name), &toml, &[], &[]);
    agent.wait_ready().await;
    std::fs::write(agent.dir.path().join("index.html"), "back").unwrap();
    let mut web = line.near.serve_http(agent.dir.path(), "127.0.0.1");
    let far = line.far.name.clone();
    let fetch = move || {
        let far = far.clone();
        async move {
            let out = command_in(Some(&far), "curl")
                .args(["-sS", "--max-time", "3", "--socks5-hostname"])
                .arg(format!("127.0.0.1:{listen}"))
                .arg("http://127.0.0.1:8080/index.html")
                .output()
                .unwrap();
            out.stdout == b"back"
        }
    };
    assert!(
        eventually(Duration::from_secs(10), fetch.clone()).await,
        "no page through the tunnel before the blackout: {}",
        agent.output()
    );

    line.set_blackout(true);
    let cut = Instant::now();
    assert!(
        agent
            .wait_output("tunnel lost", Duration::from_secs(15))
            .await,
        "{}",
        agent.output()
    );
    // 45 s dark, as a long outage: the old connection's retransmissions are by then tens of
    // seconds apart, and new attempts have met silence for over half a minute. Meanwhile the
    // agent keeps at most two attempts in flight to the server's one address (before: up to
    // eight, which could all be answered at once when the path returned).
    let mut most_syn_sent = 0;
    while cut.elapsed() < Duration::from_secs(45) {
        let syn_sent = line.near.run(&["ss", "-Htn", "state", "syn-sent"]);
        most_syn_sent = most_syn_sent.max(syn_sent.lines().count());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("at most {most_syn_sent} connection attempts in flight during the blackout");
    assert!(
        (1..=2).contains(&most_syn_sent),
        "{most_syn_sent} connection attempts in flight at once during the blackout"
    );
    line.set_blackout(false);
    let back = Instant::now();

    let served = eventually(Duration::from_secs(60), fetch).await;
    let took = back.elapsed();
    let _ = web.kill();
    let _ = web.wait();
    eprintln!("served {took:?} after the path returned");
    assert!(served, "not served after the blackout: {}", agent.output());
    // Target: 5 s. Asserted with slack for a loaded machine.
    assert!(
        took < Duration::from_secs(8),
        "served only {took:?} after the path returned: {}",
        agent.output()
    );
    // The server holds one session: the old one was ended, not left to time out.
    let filter = format!("sport = :{}", sshd.port);
    let sessions = line
        .far
        .run(&["ss", "-Htn", "state", "established", &filter]);
    assert_eq!(
        sessions.lines().count(),
        1,
        "sshd's connections:\n{sessions}\n{}",
        agent.output()
    );
    assert_eq!(agent.status(&[]).0, 0, "{}", agent.status(&[]).1);
}

/// Removes /etc/netns/NAME (the files `ip netns exec` mounts over /etc) when dropped.
struct NetnsEtc(std::path::PathBuf);

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Threads of a process, from /proc.
fn threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line[8..].trim().parse().unwrap()
}

/// Names whose DNS never answers (the only name server silent) must not hold up other
/// names' lookups: with 700 requests for 700 such names under way, a name in /etc/hosts is
/// looked up and connected at once (answered from the file: with sixteen names it got a
/// resolver turn, with 700 it waited the whole connect_timeout behind them), and the resolver
/// threads stay bounded (unbounded, they filled tokio's 512).
#[tokio::test]
async fn names_whose_dns_never_answers_do_not_hold_up_other_names() {
    let ns = NetNs::new("deaddns");
    ns.run(&["ip", "addr", "add", "10.78.0.53/32", "dev", "lo"]);
    let etc = NetnsEtc(std::path::PathBuf::from("/etc/netns").join(&ns.name));
    std::fs::create_dir_all(&etc.0).unwrap();
    std::fs::write(
        etc.0.join("hosts"),
        "127.0.0.1 localhost\n127.0.0.1 db.alive.test\n",
    )
    .unwrap();
    std::fs::write(
        etc.0.join("resolv.conf"),
        "nameserver 10.78.0.53\noptions timeout:30 attempts:1\n",
    )
    .unwrap();

    let sshd = Sshd::start_in(Some(&ns.name), "");
    let listen = 10125;
    let agent = Agent::start_in(
        Some(&ns.name),
        &sshd.agent_toml(listen, "[forward]\nconnect_timeout = \"60s\"\n"),
        &[],
        &[],
    );
    agent.wait_ready().await;
    let pid = agent.child.id();
    let threads_before = threads(pid);

    let (code, waited, hung_answered, threads_during) = ns
        .within(move || async move {
            // The only name server: it takes every query and never answers (no ICMP error
            // either, so the resolver waits its whole timeout).
            let _silent = std::net::UdpSocket::bind("10.78.0.53:53").unwrap();
            let echo = echo_server().await;
            let mut hung = tokio::task::JoinSet::new();
            for i in 0..700 {
                hung.spawn(
                    async move { socks5(listen, &format!("db{i}.dead.test"), 5432).await.0 },
                );
            }
            // Time for the 700 requests to reach the agent and start their lookups.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let threads_during = threads(pid);
            let started = Instant::now();
            let (code, s) = socks5(listen, "db.alive.test", echo.port()).await;
            let waited = started.elapsed();
            if let Some(s) = s {
                assert!(echo_roundtrip(s, b"alive").await);
            }
            let mut hung_answered = 0;
            while let Some(Some(_)) = hung.try_join_next().map(Result::ok) {
                hung_answered += 1;
            }
            hung.abort_all();
            (code, waited, hung_answered, threads_during)
        })
        .join()
        .unwrap();
    assert!(
        waited < Duration::from_secs(5),
        "a name in /etc/hosts waited {waited:?} behind names whose DNS never answers"
    );
    // At most TARGET_LOOKUPS_MAX (32) lookups plus TARGET_LOOKUPS_STUCK_MAX (64) set aside.
    assert!(
        threads_during <= threads_before + 96 + 4,
        "the agent ran {threads_during} threads (from {threads_before}) for 700 names"
    );
    assert_eq!(code, 0, "{}", tail(&agent.output(), 20));
    assert_eq!(
        hung_answered, 0,
        "the dead names were answered: no hung resolver"
    );
}

/// The active host of a standby pair vanishes (its process frozen, its packets dropped, as
/// at a power loss): nothing tells the server, so the port stays held until sshd declares the
/// session dead (here ClientAliveInterval 3 x ClientAliveCountMax 2); then the standby, asking
/// every second, takes it over.
#[tokio::test]
async fn a_vanished_active_host_is_replaced_once_the_server_gives_up_on_it() {
    let ns = NetNs::new("vanish");
    let sshd = Sshd::start_in(
        Some(&ns.name),
        "ClientAliveInterval 3\nClientAliveCountMax 2\n",
    );
    let listen = 10126;
    let toml = sshd.agent_toml(listen, "standby_retry = \"1s\"\npair = true\n");
    let first = Agent::start_in(Some(&ns.name), &toml, &[], &[]);
    first.wait_ready().await;
    let second = Agent::start_in(Some(&ns.name), &toml, &[], &[]);
    second.wait_ready().await;
    assert_eq!(second.status(&[]).0, 5, "{}", second.output());

    // The first host's connection to the server, by its local port.
    let pid = first.child.id();
    let conns = ns.run(&["ss", "-Htnp", "state", "established"]);
    let local = conns
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter_map(|l| {
            let mut cols = l.split_whitespace().skip(2);
            let (local, peer) = (cols.next()?, cols.next()?);
            let port = local.rsplit_once(':')?.1.to_string();
            peer.ends_with(&format!(":{}", sshd.port)).then_some(port)
        })
        .next()
        .unwrap_or_else(|| panic!("no connection of pid {pid} to sshd:\n{conns}"));
    first.signal(libc::SIGSTOP);
    let local: u16 = local.parse().unwrap();
    ns.drop_tcp("vanish", "input", &[("sport", local), ("dport", local)]);
    let vanished = Instant::now();
    // Watched through the standby's status, not by connecting to the port: a connection to
    // the port wakes the vanished session's sshd process, and OpenSSH 9.2 runs its first
    // client-alive check only after a poll that timed out, so steady traffic to the port
    // keeps a dead session's port held (docs/high-availability.md says so).
    let took_over = eventually(Duration::from_secs(30), || async {
        second.status(&[]).0 == 0
    })
    .await;
    let took = vanished.elapsed();
    first.signal(libc::SIGKILL);
    assert!(
        took_over,
        "the standby never took over: {}\nsshd: {}",
        second.output(),
        sshd.log()
            .lines()
            .filter(|l| !l.contains("cannot listen") && !l.contains("Address already in use"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The server's verdict is the limit: OpenSSH 9.2 counts a client-alive miss only after a
    // poll of ClientAliveInterval that timed out, and drops the session after more than
    // ClientAliveCountMax misses (18.7 and 18.9 s here in two runs, for 3 s x 2). Asserted
    // loosely: within 30 s.
    assert!(
        took < Duration::from_secs(30),
        "the standby took over {took:?} after the active host vanished"
    );
    let served = ns
        .within(move || async move {
            let echo = echo_server().await;
            let (code, s) = socks5(listen, "127.0.0.1", echo.port()).await;
            code == 0 && echo_roundtrip(s.unwrap(), b"standby").await
        })
        .join()
        .unwrap();
    assert!(served, "the standby does not serve: {}", second.output());
    assert_eq!(second.status(&[]).0, 0, "{}", second.status(&[]).1);
    assert!(second.output().contains("took the server's port"));
}

/// A database name with two addresses, the first one black-holed (a stale DNS entry): the
/// agent must try the second after a moment (RFC 8305), not spend the whole connect_timeout
/// on the first and give up.
#[tokio::test]
async fn a_black_holed_first_address_falls_over_to_the_next() {
    let ns = NetNs::new("eyeballs");
    ns.run(&["ip", "addr", "add", "10.77.0.1/32", "dev", "lo"]);
    ns.run(&["ip", "addr", "add", "10.77.0.2/32", "dev", "lo"]);
    let etc = NetnsEtc(std::path::PathBuf::from("/etc/netns").join(&ns.name));
    std::fs::create_dir_all(&etc.0).unwrap();
    std::fs::write(
        etc.0.join("hosts"),
        "127.0.0.1 localhost\n10.77.0.1 db.eyeballs.test\n10.77.0.2 db.eyeballs.test\n",
    )
    .unwrap();
    // Black-hole whichever address the resolver gives first.
    let first = ns.run(&["getent", "ahostsv4", "db.eyeballs.test"]);
    let first = first.split_whitespace().next().unwrap().to_string();
    assert!(first.starts_with("10.77.0."), "{first}");
    ns.run(&["nft", "add", "table", "inet", "eyeballs"]);
    ns.run(&[
        "nft",
        "add",
        "chain",
        "inet",
        "eyeballs",
        "output",
        "{ type filter hook output priority 0 ; }",
    ]);
    ns.run(&[
        "nft", "add", "rule", "inet", "eyeballs", "output", "ip", "daddr", &first, "tcp", "dport",
        "8080", "drop",
    ]);

    let sshd = Sshd::start_in(Some(&ns.name), "");
    let listen = 10124;
    let agent = Agent::start_in(
        Some(&ns.name),
        &sshd.agent_toml(listen, "[forward]\nconnect_timeout = \"5s\"\n"),
        &[],
        &[],
    );
    agent.wait_ready().await;
    std::fs::write(agent.dir.path().join("index.html"), "second address").unwrap();
    let mut web = ns.serve_http(agent.dir.path(), "0.0.0.0");
    let proxy = format!("127.0.0.1:{listen}");
    let fetched = eventually(Duration::from_secs(10), || async {
        let out = command_in(Some(&ns.name), "curl")
            .args([
                "-sS",
                "--max-time",
                "8",
                "--socks5-hostname",
                &proxy,
                "http://db.eyeballs.test:8080/index.html",
            ])
            .output()
            .unwrap();
        out.stdout == b"second address"
    })
    .await;
    let _ = web.kill();
    let _ = web.wait();
    assert!(
        fetched,
        "no page from the second address ({first} black-holed): {}",
        agent.output()
    );
    assert!(
        !agent.output().contains("timed out after"),
        "{}",
        agent.output()
    );
}

/// 100 SIGHUP reloads while 50 transfers run: the tunnel settings do not change, so no
/// transfer may be cut.
#[tokio::test]
async fn a_hundred_reloads_cut_none_of_fifty_transfers() {
    let (_sshd, agent, listen) = tunnel_up("").await;
    let echo = echo_server().await;
    let mut transfers = Vec::new();
    for i in 0..50u64 {
        transfers.push(tokio::spawn(async move {
            let (code, s) = socks5(listen, "127.0.0.1", echo.port()).await;
            if code != 0 {
                return false;
            }
            let (mut r, mut w) = s.unwrap().into_split();
            let data = payload(2 << 20, i);
            let sum = checksum(&data);
            let reader = tokio::spawn(async move {
                let mut back = Vec::new();
                r.read_to_end(&mut back).await.ok().map(|_| checksum(&back))
            });
            for c in data.chunks(64 * 1024) {
                w.write_all(c).await.unwrap();
                // 3.2 s in all: longer than the hundred reloads, each awaited (below).
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            w.shutdown().await.unwrap();
            reader.await.unwrap() == Some(sum)
        }));
    }
    // Each reload is seen in the log before the next signal: signals sent while one is
    // pending merge into it, so counting what was sent would not count reloads.
    for i in 1..=100 {
        agent.signal(libc::SIGHUP);
        let reloaded = eventually(Duration::from_secs(10), || async {
            agent.output().matches("reloading configuration").count() >= i
        })
        .await;
        assert!(reloaded, "reload {i} not logged: {}", agent.output());
    }
    let mut ok = 0;
    for t in transfers {
        ok += t.await.unwrap() as usize;
    }
    assert_eq!(ok, 50, "transfers cut by reloads: {}", 50 - ok);
    assert!(!agent.output().contains("tunnel lost"));
}

/// Key re-exchanges in the middle of heavy traffic on many channels (the server rekeys every
/// 16 MiB here) cut nothing: every byte arrives and the session stays up.
#[tokio::test]
async fn rekeys_under_load_cut_no_channel() {
    let sshd = Sshd::start_with("RekeyLimit 16M\nLogLevel DEBUG1\n");
    let listen = free_port();
    let agent = Agent::start(&sshd.agent_toml(listen, ""));
    agent.wait_ready().await;
    let echo = echo_server().await;
    let mut transfers = Vec::new();
    for i in 0..16u64 {
        transfers.push(tokio::spawn(async move {
            match socks5(listen, "127.0.0.1", echo.port()).await {
                (0, Some(s)) => echo_roundtrip(s, &payload(8 << 20, i)).await,
                _ => false,
            }
        }));
    }
    let mut ok = 0;
    for t in transfers {
        ok += t.await.unwrap() as usize;
    }
    let rekeys = sshd.log().matches("SSH2_MSG_KEXINIT sent").count();
    assert!(rekeys >= 4, "expected several key exchanges, saw {rekeys}");
    assert_eq!(ok, 16, "transfers cut across {rekeys} key exchanges");
    assert!(
        !agent.output().contains("tunnel lost"),
        "{}",
        agent.output()
    );
}

/// A target that resets mid-stream ends its own channel only.
#[tokio::test]
async fn a_target_reset_mid_stream_ends_only_its_channel() {
    let (_sshd, agent, listen) = tunnel_up("").await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 1000];
        let _ = s.read_exact(&mut buf).await;
        // RST instead of FIN.
        s.set_zero_linger().unwrap();
        drop(s);
    });
    let echo = echo_server().await;
    let (_, steady) = socks5(listen, "127.0.0.1", echo.port()).await;
    let (code, s) = socks5(listen, "127.0.0.1", port).await;
    assert_eq!(code, 0);
    let mut s = s.unwrap();
    let _ = s.write_all(&payload(100_000, 1)).await;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    assert!(echo_roundtrip(steady.unwrap(), &payload(500_000, 2)).await);
    assert!(!agent.output().contains("tunnel lost"));
}

/// A target that resets after the client's EOF (PostgreSQL does after Terminate) ends its
/// channel normally: logged as closed, not as a failure.
#[tokio::test]
async fn a_target_reset_after_the_clients_eof_is_a_normal_close() {
    let (_sshd, agent, listen) = tunnel_up("").await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got).await;
        let _ = s.write_all(b"bye").await;
        s.set_zero_linger().unwrap();
        drop(s);
    });
    let (code, s) = socks5(listen, "127.0.0.1", port).await;
    assert_eq!(code, 0);
    let mut s = s.unwrap();
    s.write_all(b"X\0\0\0\x04").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await;
    let target = format!("channel to 127.0.0.1:{port} ");
    assert!(
        agent
            .wait_output(&format!("{target}closed after"), Duration::from_secs(10))
            .await,
        "{}",
        agent.output()
    );
    let line = agent
        .output()
        .lines()
        .find(|l| l.contains(&target))
        .unwrap_or_default()
        .to_string();
    assert!(!line.contains("reset"), "{line}");
}

/// A slow reader receives everything, byte-exact, and the tunnel stays healthy meanwhile.
#[tokio::test]
async fn a_slow_reading_client_gets_every_byte() {
    let (_sshd, _agent, listen) = tunnel_up("").await;
    // A target that sends 8 MiB as fast as it can.
    let data = payload(8 << 20, 4);
    let sum = checksum(&data);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(&data).await.unwrap();
    });
    let (code, s) = socks5(listen, "127.0.0.1", port).await;
    assert_eq!(code, 0);
    let mut s = s.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    // Slow at first (the SSH window and the transport backlog hold the target back)...
    for _ in 0..10 {
        let n = s.read(&mut buf).await.unwrap();
        got.extend_from_slice(&buf[..n]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...meanwhile other channels are served...
    assert_serves(listen).await;
    // ...then the rest.
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(checksum(&got), sum);
}
