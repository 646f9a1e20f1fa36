//! What Secoda may reach through the agent, and for how long, as a customer changes it: the
//! agent's own metrics listener stays out of reach across a reload that moves it, a reload that
//! revokes a target ends its open channels at once, and a target that vanishes without a
//! reset frees its channel within the keepalive bound.

use std::time::{Duration, Instant};

use secoda_agent_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Rewrite the agent's configuration and reload; returns once the reload is logged.
async fn reload_with(agent: &Agent, toml: &str) {
    let before = agent.output().matches("reloading configuration").count();
    std::fs::write(agent.config_path(), toml).unwrap();
    agent.signal(libc::SIGHUP);
    assert!(
        agent
            .wait_output_count(
                "reloading configuration",
                before + 1,
                Duration::from_secs(10)
            )
            .await,
        "{}",
        agent.output()
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            agent.output().matches("configuration reloaded").count() > before
                || agent.output().matches("tunnel settings changed").count() > before
        })
        .await,
        "{}",
        agent.output()
    );
}

/// After a reload moves `[metrics] listen`, the endpoint the agent still serves (it moves only
/// at restart) is as unreachable through the tunnel as before.
#[tokio::test]
async fn the_metrics_listener_still_bound_stays_out_of_reach_after_a_reload_moves_it() {
    let sshd = Sshd::start();
    let listen = free_port();
    let (m1, m2) = (free_port(), free_port());
    let toml = |m: u16| {
        sshd.agent_toml(
            listen,
            &format!(
                "[metrics]\nlisten = \"127.0.0.1:{m}\"\n[forward]\nallow = [\"127.0.0.0/8\"]\n"
            ),
        )
    };
    let agent = Agent::start(&toml(m1));
    agent.wait_ready().await;
    let (code, _) = socks5(listen, "127.0.0.1", m1).await;
    assert_eq!(code, 2, "the metrics endpoint reached through the tunnel");

    reload_with(&agent, &toml(m2)).await;
    assert!(
        agent.output().contains("[metrics] changed"),
        "{}",
        agent.output()
    );
    // Still served where it was bound ...
    assert!(std::net::TcpStream::connect(("127.0.0.1", m1)).is_ok());
    // ... and still refused through the tunnel.
    let (code, s) = socks5(listen, "127.0.0.1", m1).await;
    if let Some(mut s) = s {
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await;
        let mut body = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut body)).await;
        assert!(
            !body.contains("secoda_agent_"),
            "the metrics came back through the tunnel: {body}"
        );
    }
    assert_eq!(
        code,
        2,
        "after the reload, SOCKS reply {code}: {}",
        agent.output()
    );
}

/// A reload that denies a target ends the open channels to it at once, logged with the target
/// and the rule; channels to other targets carry on untouched.
#[tokio::test]
async fn a_reload_that_denies_a_target_ends_its_open_channels_and_only_those() {
    let sshd = Sshd::start();
    let listen = free_port();
    let (revoked, kept) = (echo_server().await, echo_server().await);
    let base = sshd.agent_toml(listen, "");
    let agent = Agent::start(&base);
    agent.wait_ready().await;

    let (code, a) = socks5(listen, "127.0.0.1", revoked.port()).await;
    assert_eq!(code, 0);
    let (code, b) = socks5(listen, "127.0.0.1", kept.port()).await;
    assert_eq!(code, 0);
    let (mut a, mut b) = (a.unwrap(), b.unwrap());
    for s in [&mut a, &mut b] {
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
    }

    let rule = format!("127.0.0.1:{}", revoked.port());
    reload_with(&agent, &format!("{base}[forward]\ndeny = [\"{rule}\"]\n")).await;
    let cut = Instant::now();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), a.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "the channel to the revoked target is still open 5 s after the reload: {}",
        agent.output()
    );
    eprintln!("revoked channel ended {:?} after the reload", cut.elapsed());
    let out = agent.output();
    let line = out
        .lines()
        .find(|l| l.contains("the reloaded [forward] policy denies it"))
        .unwrap_or_else(|| panic!("no revocation logged: {out}"));
    assert!(line.contains(&rule), "{line}");
    assert!(line.contains(&format!("deny entry \"{rule}\"")), "{line}");

    // The other channel is untouched, and new requests follow the new policy.
    for i in 0..10u8 {
        b.write_all(&[i; 16]).await.unwrap();
        let mut back = [0u8; 16];
        b.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [i; 16]);
    }
    assert_eq!(socks5(listen, "127.0.0.1", revoked.port()).await.0, 2);
    assert_eq!(socks5(listen, "127.0.0.1", kept.port()).await.0, 0);
    assert_eq!(out.matches("policy denies it").count(), 1, "{out}");
}

/// A target whose packets vanish after connect (a database host powered off, a failover
/// without a reset): with `target_keepalive = "2s"` its channel ends within the bound (2 s
/// idle, 6 probes 1 s apart), and Secoda's side sees it closed.
#[tokio::test]
async fn a_vanished_target_frees_its_channel_within_the_keepalive_bound() {
    let ns = NetNs::new("vanishdb");
    let sshd = Sshd::start_in(Some(&ns.name), "");
    let listen = 10127;
    let agent = Agent::start_in(
        Some(&ns.name),
        &sshd.agent_toml(listen, "[forward]\ntarget_keepalive = \"2s\"\n"),
        &[],
        &[],
    );
    agent.wait_ready().await;
    let name = ns.name.clone();
    let ended = ns
        .within(move || async move {
            let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = target.local_addr().unwrap().port();
            let server = tokio::spawn(async move {
                let (mut s, _) = target.accept().await.unwrap();
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf).await.unwrap();
                s.write_all(&buf).await.unwrap();
                // Holds the connection: the packets stop, nothing closes it.
                tokio::time::sleep(Duration::from_secs(120)).await;
                drop(s);
            });
            let (code, s) = socks5(listen, "127.0.0.1", port).await;
            assert_eq!(code, 0);
            let mut s = s.unwrap();
            s.write_all(b"ping").await.unwrap();
            let mut back = [0u8; 4];
            s.read_exact(&mut back).await.unwrap();
            for rule in [
                vec!["nft", "add", "table", "inet", "vanish"],
                vec![
                    "nft",
                    "add",
                    "chain",
                    "inet",
                    "vanish",
                    "input",
                    "{ type filter hook input priority 0 ; }",
                ],
            ]
            .into_iter()
            .chain(["sport", "dport"].map(|d| {
                vec![
                    "nft", "add", "rule", "inet", "vanish", "input", "tcp", d, "PORT", "drop",
                ]
            })) {
                let port = port.to_string();
                let args: Vec<&str> = rule
                    .iter()
                    .map(|a| if *a == "PORT" { port.as_str() } else { a })
                    .collect();
                let ok = command_in(Some(&name), args[0])
                    .args(&args[1..])
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "{args:?}");
            }
            let dark = Instant::now();
            let mut rest = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest)).await;
            server.abort();
            r.ok().map(|_| dark.elapsed())
        })
        .join()
        .unwrap();
    let took = ended.unwrap_or_else(|| {
        panic!(
            "the channel to the vanished target was still open after 30 s: {}",
            agent.output()
        )
    });
    eprintln!("the vanished target's channel ended {took:?} after its packets stopped");
    // 2 s idle + 6 probes 1 s apart = 8 s, with slack for the timers.
    assert!(
        took < Duration::from_secs(15),
        "{took:?}: {}",
        agent.output()
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            agent.channels().is_empty()
        })
        .await,
        "{:?}",
        agent.channels()
    );
}
