//! The service-manager side, through a NOTIFY_SOCKET of our own: readiness, STATUS, watchdog,
//! reload (valid, broken, new tunnel settings), graceful stop, and journald fields.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use secoda_agent_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// A transfer that takes about `chunks * pause`: it must arrive byte-exact through the echo.
fn slow_transfer(listen: u16, echo: u16, chunks: usize, pause: Duration) -> JoinHandle<bool> {
    tokio::spawn(async move {
        let (code, s) = socks5(listen, "127.0.0.1", echo).await;
        if code != 0 {
            return false;
        }
        let (mut r, mut w) = s.unwrap().into_split();
        let data = payload(chunks * 32 * 1024, 11);
        let expect = checksum(&data);
        let reader = tokio::spawn(async move {
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.map(|_| checksum(&back)).ok()
        });
        for c in data.chunks(32 * 1024) {
            if w.write_all(c).await.is_err() {
                return false;
            }
            tokio::time::sleep(pause).await;
        }
        let _ = w.shutdown().await;
        reader.await.unwrap() == Some(expect)
    })
}

#[tokio::test]
async fn ready_comes_only_once_the_forward_is_up_and_status_follows_the_state() {
    let mut sshd = Sshd::start();
    sshd.kill();
    let listen = free_port();
    let agent = Agent::start(&sshd.agent_toml(listen, ""));
    let reconnecting = agent
        .wait_notify(0, Duration::from_secs(10), |m| {
            m.contains("STATUS=reconnecting in")
        })
        .await
        .expect("a reconnecting STATUS while the server is down");
    assert!(
        reconnecting.contains("failed: Connection refused"),
        "{reconnecting}"
    );
    assert!(
        !agent.notifications().iter().any(|m| m.contains("READY=1")),
        "READY before the tunnel was up"
    );

    sshd.restart();
    agent.wait_ready().await;
    // At READY the server already listens.
    assert!(std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok());
    let ready = agent
        .notifications()
        .into_iter()
        .find(|m| m.contains("READY=1"))
        .unwrap();
    assert!(
        ready.contains(&format!("STATUS=connected to 127.0.0.1:{}, listening on 127.0.0.1:{listen}, 0 active connections", sshd.port)),
        "{ready}"
    );

    // STATUS counts open channels.
    let echo = echo_server().await;
    let (_, s) = socks5(listen, "127.0.0.1", echo.port()).await;
    let open = s.unwrap();
    assert!(agent
        .wait_notify(0, Duration::from_secs(5), |m| m.lines().any(|l| l
            .starts_with("STATUS=connected")
            && l.ends_with(" 1 active connection")))
        .await
        .is_some());
    drop(open);
}

/// `systemctl start`, a package upgrade's restart and `systemctl reload` must never wait on
/// the network: READY=1 comes at the latest 30 s after start (READY_WAIT_MAX), and at once
/// after a reload, with STATUS saying the tunnel is not up; the agent keeps retrying.
#[tokio::test]
async fn ready_never_waits_on_a_server_that_stays_down() {
    let mut sshd = Sshd::start();
    sshd.kill();
    let listen = free_port();
    let agent = Agent::start(&sshd.agent_toml(listen, ""));
    let ready = agent
        .wait_notify(0, Duration::from_secs(45), |m| {
            m.lines().any(|l| l == "READY=1")
        })
        .await
        .expect("no READY=1 while the server stays down");
    assert!(ready.contains("STATUS=reconnecting in"), "{ready}");
    assert!(
        agent.output().contains("no tunnel after 30s"),
        "{}",
        agent.output()
    );

    sshd.restart();
    let connected = format!("STATUS=connected to 127.0.0.1:{}", sshd.port);
    assert!(
        agent
            .wait_notify(0, Duration::from_secs(90), |m| m.contains(&connected))
            .await
            .is_some(),
        "the agent stopped retrying: {}",
        agent.output()
    );
    assert_serves(listen).await;

    // A reload onto a server that does not answer is done at once, too.
    let closed = free_port();
    let toml = sshd.agent_toml(listen, "").replace(
        &format!("\nport = {}\n", sshd.port),
        &format!("\nport = {closed}\n"),
    );
    assert!(toml.contains(&format!("\nport = {closed}\n")), "{toml}");
    std::fs::write(agent.config_path(), toml).unwrap();
    let seen = agent.notifications().len();
    agent.signal(libc::SIGHUP);
    let ready = agent
        .wait_notify(seen, Duration::from_secs(5), |m| {
            m.lines().any(|l| l == "READY=1")
        })
        .await
        .expect("a reload onto an unreachable server did not finish");
    assert!(
        ready.contains(&format!("STATUS=connecting to 127.0.0.1:{closed}")),
        "{ready}"
    );
}

#[tokio::test]
async fn the_watchdog_is_pinged_at_half_its_interval() {
    let sshd = Sshd::start();
    let agent = Agent::start_with(
        &sshd.agent_toml(free_port(), ""),
        &[],
        &[("WATCHDOG_USEC", "200000")],
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let pings = agent
        .notifications()
        .iter()
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    assert!(
        (4..=12).contains(&pings),
        "{pings} pings in 1.1 s at a 100 ms interval"
    );
}

#[tokio::test]
async fn reload_applies_forward_settings_without_touching_open_channels() {
    let (sshd, agent, listen) = tunnel_up("").await;
    let echo = echo_server().await;
    let other = echo_server().await;
    let transfer = slow_transfer(listen, echo.port(), 20, Duration::from_millis(50));
    agent.wait_transfer().await;

    // Deny another service's port from now on (a channel to a target the new policy denies
    // is ended: tests/targets.rs).
    let toml = sshd.agent_toml(
        listen,
        &format!("[forward]\ndeny = [\"127.0.0.1:{}\"]\n", other.port()),
    );
    std::fs::write(agent.config_path(), toml).unwrap();
    let seen = agent.notifications().len();
    agent.signal(libc::SIGHUP);
    let reloading = agent
        .wait_notify(seen, Duration::from_secs(5), |m| m.contains("RELOADING=1"))
        .await
        .expect("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    agent.wait_ready_from(seen).await;

    assert!(
        transfer.await.unwrap(),
        "the transfer in flight was cut by a reload"
    );
    assert_eq!(
        socks5(listen, "127.0.0.1", other.port()).await.0,
        2,
        "new policy not applied"
    );
    assert_eq!(socks5(listen, "127.0.0.1", echo.port()).await.0, 0);
    assert!(!agent.output().contains("tunnel lost"));
}

#[tokio::test]
async fn a_broken_reload_keeps_the_old_config_serving() {
    let (_sshd, agent, listen) = tunnel_up("").await;
    let echo = echo_server().await;
    let transfer = slow_transfer(listen, echo.port(), 20, Duration::from_millis(50));
    agent.wait_transfer().await;

    std::fs::write(agent.config_path(), "[tunnel]\nhost = \n").unwrap();
    let seen = agent.notifications().len();
    agent.signal(libc::SIGHUP);
    let status = agent
        .wait_notify(seen, Duration::from_secs(5), |m| m.contains("READY=1"))
        .await
        .expect("READY=1 after a failed reload");
    assert!(
        status.contains("STATUS=config reload failed:")
            && status.contains("running with the previous config"),
        "{status}"
    );
    assert!(agent.output().contains("config reload failed"));
    assert!(transfer.await.unwrap(), "the transfer in flight was cut");
    let (code, s) = socks5(listen, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 0);
    assert!(echo_roundtrip(s.unwrap(), b"old config still serves").await);
}

#[tokio::test]
async fn new_tunnel_settings_bring_up_a_new_session_and_drain_the_old() {
    let sshd = Sshd::start();
    let (old_port, new_port) = (free_port(), free_port());
    let agent = Agent::start(&sshd.agent_toml(old_port, ""));
    agent.wait_ready().await;
    let echo = echo_server().await;
    let transfer = slow_transfer(old_port, echo.port(), 20, Duration::from_millis(50));
    agent.wait_transfer().await;

    std::fs::write(agent.config_path(), sshd.agent_toml(new_port, "")).unwrap();
    let seen = agent.notifications().len();
    agent.signal(libc::SIGHUP);
    // The reload is done at once (READY=1); the new session follows.
    agent.wait_ready_from(seen).await;
    let connected = format!(
        "STATUS=connected to 127.0.0.1:{}, listening on 127.0.0.1:{new_port}",
        sshd.port
    );
    assert!(
        agent
            .wait_notify(seen, Duration::from_secs(20), |m| m.contains(&connected))
            .await
            .is_some(),
        "{:?}",
        agent.notifications()
    );
    let (code, s) = socks5(new_port, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 0, "the new listen port does not serve");
    assert!(echo_roundtrip(s.unwrap(), b"new session").await);
    assert!(transfer.await.unwrap(), "the old session's channel was cut");
    // The old port was given back to the server.
    assert!(
        eventually(Duration::from_secs(5), || async {
            std::net::TcpStream::connect(("127.0.0.1", old_port)).is_err()
        })
        .await
    );
}

#[tokio::test]
async fn sigterm_lets_a_transfer_finish_then_exits_0() {
    let (_sshd, mut agent, listen) = tunnel_up("").await;
    let echo = echo_server().await;
    let transfer = slow_transfer(listen, echo.port(), 20, Duration::from_millis(50));
    agent.wait_transfer().await;

    agent.signal(libc::SIGTERM);
    assert!(agent
        .wait_notify(0, Duration::from_secs(5), |m| m.contains("STOPPING=1"))
        .await
        .is_some());
    // No new channels once stopping.
    assert!(
        eventually(Duration::from_secs(5), || async {
            std::net::TcpStream::connect(("127.0.0.1", listen)).is_err()
        })
        .await
    );
    assert!(
        transfer.await.unwrap(),
        "the transfer in flight was cut by SIGTERM"
    );
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("agent did not exit");
    assert_eq!(status.code(), Some(0), "{}", agent.output());
}

/// An agent told to stop (SIGTERM) while one idle echo channel would hold its drain for a
/// minute; the channel is returned open.
async fn draining_with_one_channel(sshd: &Sshd) -> (Agent, tokio::net::TcpStream) {
    let listen = free_port();
    let agent = Agent::start(&sshd.agent_toml(listen, "[forward]\nshutdown_timeout = \"60s\"\n"));
    agent.wait_ready().await;
    let echo = echo_server().await;
    let (code, channel) = socks5(listen, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 0);
    agent.signal(libc::SIGTERM);
    assert!(
        agent
            .wait_output(
                "waiting up to 60s for 1 open channels",
                Duration::from_secs(5)
            )
            .await,
        "{}",
        agent.output()
    );
    (agent, channel.unwrap())
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let sshd = Sshd::start();
    let (mut agent, idle) = draining_with_one_channel(&sshd).await;
    let started = Instant::now();
    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("second signal ignored");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(status.code(), Some(0));
    drop(idle);
}

#[tokio::test]
async fn sighup_while_stopping_leaves_the_drain_running() {
    let sshd = Sshd::start();
    let (mut agent, held) = draining_with_one_channel(&sshd).await;
    agent.signal(libc::SIGHUP);
    assert!(
        agent
            .wait_output("reload ignored: stopping", Duration::from_secs(5))
            .await,
        "{}",
        agent.output()
    );
    // Still draining: the open channel carries its data to the end, then the agent stops.
    assert!(
        echo_roundtrip(held, &payload(100_000, 3)).await,
        "the drain was cut: {}",
        agent.output()
    );
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("agent did not exit after the drain");
    assert_eq!(status.code(), Some(0));
    assert!(
        !agent.output().contains("second stop signal"),
        "{}",
        agent.output()
    );
}

/// Parse journald's native protocol: `KEY=value\n`, or `KEY\n<u64 LE length><value>\n`.
fn parse_journal_entry(mut data: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while !data.is_empty() {
        let nl = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
        let line = &data[..nl];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            fields.push((
                String::from_utf8_lossy(&line[..eq]).to_string(),
                String::from_utf8_lossy(&line[eq + 1..]).to_string(),
            ));
            data = &data[(nl + 1).min(data.len())..];
        } else {
            let key = String::from_utf8_lossy(line).to_string();
            let rest = &data[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            fields.push((key, String::from_utf8_lossy(&rest[8..8 + len]).to_string()));
            data = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    fields
}

/// With stderr connected to "the journal" (JOURNAL_STREAM matching), the agent writes native
/// journal entries with structured fields. We stand in for journald at its socket path.
#[tokio::test]
async fn journald_entries_carry_structured_fields() {
    use std::os::unix::fs::MetadataExt;
    // The agent writes to journald's fixed socket path. It runs in a mount namespace of its
    // own where our directory is mounted over /run/systemd/journal, so this test owns the
    // socket there whether or not the machine has a real journald.
    let journal_dir = tempfile::tempdir().unwrap();
    let socket_path = journal_dir.path().join("socket");
    std::fs::create_dir_all("/run/systemd/journal").unwrap();
    let journal = UnixDatagram::bind(&socket_path).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let sshd = Sshd::start();
    let listen = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, sshd.agent_toml(listen, "")).unwrap();
    let stderr_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = std::fs::metadata(&stderr_path).unwrap();
    let mut child = std::process::Command::new("unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            "mount --bind \"$1\" /run/systemd/journal && exec \"$2\" run --env-file /dev/null --config \"$3\"",
            "sh",
        ])
        .arg(journal_dir.path())
        .arg(agent_bin())
        .arg(&config)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env_remove("NOTIFY_SOCKET")
        .stderr(stderr)
        .spawn()
        .unwrap();

    let mut entries: Vec<Vec<(String, String)>> = Vec::new();
    let mut buf = vec![0u8; 65536];
    let get = |entries: &Vec<Vec<(String, String)>>, msg: &str| {
        entries
            .iter()
            .find(|e| e.iter().any(|(k, v)| k == "MESSAGE" && v.contains(msg)))
            .cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut transferred = false;
    while Instant::now() < deadline && get(&entries, "closed after").is_none() {
        if let Ok(n) = journal.recv(&mut buf) {
            entries.push(parse_journal_entry(&buf[..n]));
        }
        if !transferred && get(&entries, "tunnel up").is_some() {
            transferred = true;
            let echo = echo_server().await;
            let (code, s) = socks5(listen, "localhost", echo.port()).await;
            assert_eq!(code, 0);
            assert!(echo_roundtrip(s.unwrap(), &payload(1000, 1)).await);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    drop(journal);

    let up = get(&entries, "tunnel up").expect("no 'tunnel up' entry");
    let field = |e: &Vec<(String, String)>, k: &str| {
        e.iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(field(&up, "TUNNEL_HOST"), ["127.0.0.1"]);
    assert_eq!(field(&up, "LISTEN_PORT"), [listen.to_string()]);
    // systemd-journal-logger maps info to 5 (notice).
    assert_eq!(field(&up, "PRIORITY"), ["5"]);
    assert_eq!(field(&up, "SYSLOG_IDENTIFIER"), ["secoda-agent"]);
    let closed = get(&entries, "closed after").expect("no channel close entry");
    // One value per field: journald's TARGET is the logging module, the channel's target
    // has a field of its own.
    assert_eq!(
        field(&closed, "TARGET"),
        ["secoda_agent::channel"],
        "{closed:?}"
    );
    let target = field(&closed, "CHANNEL_TARGET");
    assert!(
        target.len() == 1 && target[0].starts_with("localhost:"),
        "{closed:?}"
    );
    // The audit trail's open event, by its MESSAGE_ID (docs/audit.md).
    let open = get(&entries, "audit: channel ").expect("no audit open entry");
    assert_eq!(
        field(&open, "MESSAGE_ID"),
        ["1f7a8e5dc5b44f8791c5a552ab2494d2"],
        "{open:?}"
    );
    assert_eq!(field(&open, "AUDIT_EVENT"), ["channel.open"], "{open:?}");
    assert_eq!(field(&open, "CHANNEL_ID").len(), 1, "{open:?}");
    assert_eq!(field(&closed, "BYTES_TO_TARGET"), ["1000"]);
    assert_eq!(field(&closed, "BYTES_FROM_TARGET"), ["1000"]);
    assert!(!field(&closed, "DURATION_S").is_empty());
    // Nothing went to stderr as plain text meanwhile.
    assert!(!std::fs::read_to_string(&stderr_path)
        .unwrap()
        .contains("tunnel up"));
}

/// The template unit is the main unit plus instance lines: the hardening cannot drift apart.
#[test]
fn the_template_unit_is_the_main_unit_plus_instance_lines() {
    let read = |name: &str| {
        std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("systemd")
                .join(name),
        )
        .unwrap()
    };
    let main = read("secoda-agent.service");
    let template = read("secoda-agent@.service");
    for line in [
        "ExecStart=/usr/bin/secoda-agent run --instance %i",
        "ExecReload=/usr/bin/secoda-agent check-config --instance %i",
        "RuntimeDirectory=secoda-agent-%i",
        "SyslogIdentifier=secoda-agent@%i",
    ] {
        assert!(template.lines().any(|l| l == line), "template lacks {line}");
    }
    let normal = |unit: &str| -> Vec<String> {
        unit.lines()
            .filter(|l| {
                !l.starts_with('#')
                    && !l.starts_with("Description=")
                    && !l.starts_with("SyslogIdentifier=")
            })
            .map(|l| {
                l.replace(" --instance %i", "")
                    .replace("secoda-agent-%i", "secoda-agent")
            })
            .collect()
    };
    assert_eq!(normal(&main), normal(&template));
}
