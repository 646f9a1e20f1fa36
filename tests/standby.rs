//! Two agents with the same configuration against one sshd: the server's listen port is a
//! lock (sshd grants a port's forward to one session at a time), so the second stands by on a
//! healthy session, says so without errors, and takes the port over as soon as the first
//! gives it up (stopped, or killed), within its retry interval.

use std::time::{Duration, Instant};

use secoda_agent_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Lines the agent logged at warning or error level.
fn complaints(agent: &Agent) -> Vec<String> {
    agent
        .output()
        .lines()
        .filter(|l| l.starts_with("WARN") || l.starts_with("ERROR"))
        .map(str::to_string)
        .collect()
}

/// Which agent serves the port now: the target of a fresh channel sees the connection, and
/// the serving agent lists it in `status`.
async fn served_by(listen: u16, agents: [&Agent; 2]) -> Option<usize> {
    let echo = echo_server().await;
    let (code, s) = socks5(listen, "127.0.0.1", echo.port()).await;
    if code != 0 {
        return None;
    }
    let s = s.unwrap();
    let who = until_some(Duration::from_secs(5), || async {
        agents.iter().position(|a| !a.channels().is_empty())
    })
    .await;
    drop(s);
    for a in agents {
        a.wait_no_channels().await;
    }
    who
}

#[tokio::test]
async fn a_second_agent_stands_by_and_takes_over_when_the_first_stops_or_dies() {
    let sshd = Sshd::start();
    let listen = free_port();
    let (m1, m2, m3) = (free_port(), free_port(), free_port());
    let retry = Duration::from_secs(1);
    let toml = |mport: u16| {
        sshd.agent_toml(
            listen,
            &format!(
                "standby_retry = \"1s\"\npair = true\n[metrics]\nlisten = \"127.0.0.1:{mport}\"\n"
            ),
        )
    };
    let mut first = Agent::start(&toml(m1));
    first.wait_ready().await;
    let second = Agent::start(&toml(m2));
    // A standby is a started service: READY=1, STATUS says standby.
    second.wait_ready().await;
    assert!(
        second
            .notifications()
            .iter()
            .any(|n| n.contains("STATUS=standby: ")),
        "{:?}",
        second.notifications()
    );
    let (code, text) = second.status(&[]);
    assert_eq!(code, 5, "the standby's status exit code: {text}");
    assert!(text.contains("tunnel standby"), "{text}");
    assert!(text.contains("held by another session"), "{text}");
    let v = json(&second.status(&["--json"]).1);
    assert_eq!(v["state"], "standby");
    assert!(v["standby_since"].as_u64().unwrap() > 0);
    assert_eq!(standby_and_up(m2).await, (1.0, 0.0));
    assert_eq!(standby_and_up(m1).await, (0.0, 1.0));

    // Both healthy for a long run: the first keeps the port, the second never takes it (it
    // asks every second), a long-lived channel through the first is never cut, and the
    // second says nothing but the one line on entering standby.
    assert_eq!(served_by(listen, [&first, &second]).await, Some(0));
    let echo = echo_server().await;
    let (code, keep) = socks5(listen, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 0);
    let mut keep = keep.unwrap();
    let watch = Instant::now();
    let mut rounds = 0u64;
    while watch.elapsed() < Duration::from_secs(90) {
        let msg = rounds.to_be_bytes();
        keep.write_all(&msg)
            .await
            .expect("the long-lived channel was cut");
        let mut back = [0u8; 8];
        keep.read_exact(&mut back)
            .await
            .expect("the long-lived channel was cut");
        assert_eq!(back, msg);
        assert_eq!(first.status(&[]).0, 0, "the first lost the port");
        assert_eq!(second.status(&[]).0, 5, "the second left standby");
        assert_serves(listen).await;
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(keep);
    first.wait_no_channels().await;
    assert!(second.channels().is_empty());
    assert_eq!(second.status(&[]).0, 5);
    assert_eq!(complaints(&second), Vec::<String>::new());
    assert_eq!(
        second.output().matches("standing by").count(),
        1,
        "{}",
        second.output()
    );

    // doctor on the standby's host: the port is held by another session, and left alone.
    let (code, text) = doctor(None, &toml(m2), Some(&second.status_socket()));
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("stands by to take it over: not touched"),
        "{text}"
    );
    assert_eq!(served_by(listen, [&first, &second]).await, Some(0));

    // SIGTERM: the first gives the port back first; the second takes it within its retry.
    first.signal(libc::SIGTERM);
    let stopped = Instant::now();
    let took = until_some(retry * 2 + Duration::from_secs(2), || async {
        (served_by(listen, [&first, &second]).await == Some(1)).then_some(stopped.elapsed())
    })
    .await;
    let took = took.expect("the standby did not take over after SIGTERM");
    assert!(
        second
            .wait_output("took the server's port", Duration::from_secs(2))
            .await,
        "{}",
        second.output()
    );
    // The take-over's "tunnel up" line says what the session negotiated, as every such line.
    let out = second.output();
    let up = out
        .lines()
        .find(|l| l.contains("took the server's port"))
        .unwrap();
    assert!(
        up.contains("tunnel up:") && up.contains("; key exchange "),
        "{up}"
    );
    assert_eq!(second.status(&[]).0, 0);
    assert_eq!(standby_and_up(m2).await, (0.0, 1.0));
    assert!(first.wait_exit(Duration::from_secs(15)).await.is_some());
    eprintln!("takeover after SIGTERM: {took:?}");

    // A third agent stands by for the second; SIGKILL on the second (the kernel closes its
    // connection, sshd frees the port), and the third takes over.
    let third = Agent::start(&toml(m3));
    third.wait_ready().await;
    assert_eq!(third.status(&[]).0, 5);
    second.signal(libc::SIGKILL);
    let killed = Instant::now();
    let took = until_some(retry * 2 + Duration::from_secs(2), || async {
        (served_by(listen, [&third, &third]).await == Some(0)).then_some(killed.elapsed())
    })
    .await;
    took.expect("the standby did not take over after SIGKILL");
    assert_eq!(third.status(&[]).0, 0);
    assert_eq!(complaints(&third), Vec::<String>::new());
}

/// A take-over request the server never answers (the standby's sshd processes frozen) must
/// not hold up signals: SIGTERM stops the standby within its drain bound, not after the
/// request's own timeout (30 s) or the keepalives' verdict (here 30 s).
#[tokio::test]
async fn a_standby_stops_promptly_while_its_take_over_hangs() {
    let sshd = Sshd::start();
    let listen = free_port();
    let toml = sshd.agent_toml(
        listen,
        "standby_retry = \"1s\"\npair = true\nkeepalive_interval = \"10s\"\nkeepalive_max = 3\n[forward]\nshutdown_timeout = \"2s\"\n",
    );
    let first = Agent::start(&toml);
    first.wait_ready().await;
    let mut second = Agent::start(&toml);
    second.wait_ready().await;
    assert_eq!(second.status(&[]).0, 5, "{}", second.output());

    // The standby's connection to sshd, by its local port, then the sshd processes at the
    // server's end of it.
    let conns = String::from_utf8(
        std::process::Command::new("ss")
            .args(["-Htnp", "state", "established"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let pid = second.child.id();
    let port_of = |addr: &str| addr.rsplit_once(':').map(|(_, p)| p.to_string());
    let local = conns
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter_map(|l| {
            let mut cols = l.split_whitespace().skip(2);
            let (local, peer) = (cols.next()?, cols.next()?);
            (port_of(peer)? == sshd.port.to_string()).then(|| port_of(local))?
        })
        .next()
        .unwrap_or_else(|| panic!("no connection of pid {pid} to sshd:\n{conns}"));
    let server_side: Vec<i32> = conns
        .lines()
        .filter(|l| {
            let mut cols = l.split_whitespace().skip(2);
            let (Some(a), Some(b)) = (cols.next(), cols.next()) else {
                return false;
            };
            port_of(a).as_deref() == Some(&sshd.port.to_string())
                && port_of(b) == Some(local.clone())
        })
        .flat_map(|l| {
            l.split("pid=")
                .skip(1)
                .filter_map(|p| p.split(',').next()?.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    assert!(
        !server_side.is_empty(),
        "no sshd process for port {local}:\n{conns}"
    );
    for &p in &server_side {
        unsafe { libc::kill(p, libc::SIGSTOP) };
    }
    // A take-over request is now under way (every second) and unanswered.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    second.signal(libc::SIGTERM);
    let asked = Instant::now();
    let exited = second.wait_exit(Duration::from_secs(40)).await;
    let took = asked.elapsed();
    for &p in &server_side {
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    assert!(
        exited.is_some(),
        "the standby did not stop: {}",
        second.output()
    );
    // shutdown_timeout (2 s, nothing to drain), the disconnect's bound (5 s), and slack.
    assert!(
        took < Duration::from_secs(10),
        "the standby stopped {took:?} after SIGTERM: {}",
        second.output()
    );
    assert_eq!(first.status(&[]).0, 0);
}
