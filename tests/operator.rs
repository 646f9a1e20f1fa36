//! Operator tools against a real sshd: `status` (up, reconnecting, stopped), the metrics
//! endpoint (scraped and parsed), and `doctor` against each failure it claims to diagnose.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use secoda_agent_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test]
async fn status_reports_up_channels_reconnecting_and_not_running() {
    let (mut sshd, mut agent, listen) = tunnel_up("").await;
    let mode = std::fs::metadata(agent.status_socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "only owner and group may connect");

    // One open channel with traffic both ways.
    let echo = echo_server().await;
    let (code, s) = socks5(listen, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 0);
    let mut s = s.unwrap();
    s.write_all(&[7u8; 5000]).await.unwrap();
    let mut back = vec![0u8; 5000];
    s.read_exact(&mut back).await.unwrap();

    let (code, text) = agent.status(&[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("tunnel up"), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{}", sshd.port)), "{text}");
    assert!(text.contains("reconnects: 0"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", echo.port())),
        "{text}"
    );

    let (code, text) = agent.status(&["--json"]);
    assert_eq!(code, 0);
    let v = json(&text);
    assert_eq!(v["state"], "up");
    assert_eq!(v["listen"], format!("127.0.0.1:{listen}"));
    assert!(v["connected_since"].as_u64().unwrap() > 0);
    let channels = v["channels"].as_array().unwrap();
    assert_eq!(channels.len(), 1, "{text}");
    assert_eq!(channels[0]["target"], format!("127.0.0.1:{}", echo.port()));
    assert_eq!(channels[0]["bytes_to_target"], 5000);
    assert_eq!(channels[0]["bytes_from_target"], 5000);
    drop(s);
    assert!(
        eventually(Duration::from_secs(5), || async {
            json(&agent.status(&["--json"]).1)["channels"]
                .as_array()
                .unwrap()
                .is_empty()
        })
        .await,
        "a closed channel leaves the list"
    );

    // Server gone: down (3), with the reason.
    sshd.kill();
    assert!(
        eventually(Duration::from_secs(10), || async {
            agent.status(&[]).0 == 3
        })
        .await,
        "status must say down while the server is gone"
    );
    let v = json(&agent.status(&["--json"]).1);
    assert_eq!(v["state"], "reconnecting");
    assert!(v["connected_since"].is_null());
    let err = v["last_error"]["message"].as_str().unwrap().to_string();
    assert!(!err.is_empty());
    let (_, text) = agent.status(&[]);
    assert!(text.contains("last error:"), "{text}");

    // Back: up again, one reconnect counted.
    sshd.restart();
    assert!(
        eventually(Duration::from_secs(20), || async {
            agent.status(&[]).0 == 0
        })
        .await,
        "status must say up once the tunnel is back"
    );
    assert_eq!(json(&agent.status(&["--json"]).1)["reconnects"], 1);

    // Agent stopped: not running (4), and the message says so.
    agent.signal(libc::SIGTERM);
    agent.wait_exit(Duration::from_secs(15)).await.unwrap();
    let (code, text) = agent.status(&[]);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("not running"), "{text}");
}

/// Prometheus text: `name{labels} value` lines, keyed by `name{labels}`.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (key, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        out.insert(key.to_string(), value);
    }
    out
}

#[tokio::test]
async fn metrics_count_channels_by_outcome_and_bytes() {
    let mport = free_port();
    let (_sshd, _agent, listen) =
        tunnel_up(&format!("[metrics]\nlisten = \"127.0.0.1:{mport}\"\n")).await;
    let echo = echo_server().await;
    let (code, s) = socks5(listen, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 0);
    assert!(echo_roundtrip(s.unwrap(), &payload(100_000, 1)).await);
    let closed = free_port();
    assert_eq!(socks5(listen, "127.0.0.1", closed).await.0, 5, "refused");
    assert_eq!(
        socks5(listen, "169.254.169.254", 80).await.0,
        2,
        "denied by default"
    );
    // The agent's own metrics endpoint is no target for Secoda's side, by any address that
    // reaches it.
    for own in ["127.0.0.1", "0.0.0.0"] {
        assert_eq!(socks5(listen, own, mport).await.0, 2, "{own}:{mport}");
    }

    let (head, body) = scrape(mport, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("openmetrics-text"), "{head}");
    let m = parse_metrics(&body);
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no {k} in the scrape:\n{body}"))
    };
    assert_eq!(get("secoda_agent_tunnel_up"), 1.0);
    assert_eq!(get("secoda_agent_reconnects_total"), 0.0);
    assert!(get("secoda_agent_session_age_seconds") > 0.0);
    assert_eq!(
        get("secoda_agent_channels_opened_total{outcome=\"ok\"}"),
        1.0
    );
    assert_eq!(
        get("secoda_agent_channels_opened_total{outcome=\"refused\"}"),
        1.0
    );
    assert_eq!(
        get("secoda_agent_channels_opened_total{outcome=\"denied\"}"),
        3.0
    );
    assert_eq!(
        get("secoda_agent_bytes_total{direction=\"to_target\"}"),
        100_000.0
    );
    assert_eq!(
        get("secoda_agent_bytes_total{direction=\"from_target\"}"),
        100_000.0
    );
    assert_eq!(get("secoda_agent_socks_handshake_seconds_count"), 5.0);
    assert_eq!(get("secoda_agent_target_connect_seconds_count"), 1.0);
    assert_eq!(
        get("secoda_agent_target_connect_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    let (head, _) = scrape(mport, "/nope").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

/// CPU time (user + system, in clock ticks) the process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted from after the command name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Out of descriptors, a pending connection to the metrics endpoint cannot be accepted: the
/// accept loop must pause, not spin the agent's worker thread.
#[tokio::test]
async fn out_of_descriptors_the_metrics_listener_does_not_spin() {
    let mport = free_port();
    let (_sshd, agent, listen) =
        tunnel_up(&format!("[metrics]\nlisten = \"127.0.0.1:{mport}\"\n")).await;
    let pid = agent.child.id();
    let limit = agent.fd_count() + 6;
    let out = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Use the descriptors up with open channels, until the agent cannot connect another.
    let echo = echo_server().await;
    let mut held = Vec::new();
    for _ in 0..limit {
        match socks5(listen, "127.0.0.1", echo.port()).await {
            (0, Some(s)) => held.push(s),
            _ => break,
        }
    }
    assert!(held.len() < limit, "the descriptor limit was never reached");
    let mut pending = tokio::net::TcpStream::connect(("127.0.0.1", mport))
        .await
        .unwrap();
    pending
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 50,
        "the agent used {used} ticks of CPU in 2 s while out of descriptors (a spinning accept loop)"
    );
    // Descriptors back: the waiting scrape is answered.
    held.clear();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), pending.read_to_string(&mut text))
        .await
        .expect("the pending scrape was never answered")
        .unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        agent
            .output()
            .contains("metrics endpoint: cannot accept a connection"),
        "{}",
        agent.output()
    );
}

fn line_with<'a>(text: &'a str, start: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no line starting {start:?} in:\n{text}"))
}

#[tokio::test]
async fn doctor_passes_on_a_healthy_path_and_checks_allowed_targets() {
    let sshd = Sshd::start();
    let echo = echo_server().await;
    let listen = free_port();
    let toml = sshd.agent_toml(
        listen,
        &format!(
            "[forward]\nallow = [\"localhost:{}\", \"no-such-host.invalid:5432\"]\n",
            echo.port()
        ),
    );
    let (code, text) = doctor(None, &toml, None);
    assert_eq!(code, 1, "the unresolvable allow entry fails:\n{text}");
    for step in [
        "[ ok ] configuration",
        "[ ok ] client key",
        "[ ok ] resolve",
        "[ ok ] connect",
        "[ ok ] ssh banner: SSH-2.0-OpenSSH",
        "[ ok ] host key",
        "[ ok ] authentication",
        "[ ok ] remote forward",
    ] {
        line_with(&text, step);
    }
    assert!(line_with(&text, "[ ok ] remote forward").contains("released"));
    line_with(
        &text,
        &format!("[ ok ] allow \"localhost:{}\"", echo.port()),
    );
    line_with(&text, "[FAIL] allow \"no-such-host.invalid:5432\"");
    assert!(text.contains("1 check failed"), "{text}");

    // The port was released: an agent can take it right away.
    let agent = Agent::start(&sshd.agent_toml(listen, ""));
    agent.wait_ready().await;
    assert_serves(listen).await;

    // While that agent runs, doctor leaves its port alone and says who holds it.
    let (code, text) = doctor(
        None,
        &sshd.agent_toml(listen, ""),
        Some(&agent.status_socket()),
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        line_with(&text, "[ ok ] remote forward").contains("held by the running agent"),
        "{text}"
    );
    assert!(line_with(&text, "[ ok ] running agent").contains("tunnel up"));
    assert_serves(listen).await;

    // A port held by some other session (not the agent it can ask): a failure, with the cause.
    let (code, text) = doctor(None, &sshd.agent_toml(listen, ""), None);
    assert_eq!(code, 1, "{text}");
    let fail = line_with(&text, "[FAIL] remote forward");
    assert!(fail.contains("refused to listen"), "{text}");
    assert!(text.contains("held by another session"), "{text}");
    assert_serves(listen).await;
}

/// With an IPv6 listen address, `status` writes it bracketed ("[::]:PORT"): doctor still
/// recognises the running agent's port and leaves it alone.
#[tokio::test]
async fn doctor_recognises_the_running_agents_ipv6_listen_address() {
    let sshd = Sshd::start();
    let listen = free_port();
    let toml = sshd
        .agent_toml(listen, "")
        .replace("listen_address = \"127.0.0.1\"", "listen_address = \"::\"");
    assert!(toml.contains("listen_address = \"::\""), "{toml}");
    let agent = Agent::start(&toml);
    agent.wait_ready().await;
    assert_eq!(
        json(&agent.status(&["--json"]).1)["listen"],
        format!("[::]:{listen}")
    );
    let (code, text) = doctor(None, &toml, Some(&agent.status_socket()));
    assert_eq!(code, 0, "{text}");
    assert!(
        line_with(&text, "[ ok ] remote forward").contains("held by the running agent"),
        "{text}"
    );
    // The server still listens there for the agent (sshd binds an IPv6 forward IPv6-only).
    assert!(tokio::net::TcpStream::connect(("::1", listen))
        .await
        .is_ok());
}

#[tokio::test]
async fn doctor_diagnoses_wrong_host_key_and_wrong_client_key() {
    let sshd = Sshd::start();
    let listen = free_port();
    let dir = tempfile::tempdir().unwrap();

    let (_, other_host) = keygen(dir.path(), "other_host", "ed25519");
    let toml = sshd
        .agent_toml(listen, "")
        .replace(&sshd.host_key, &other_host);
    let (code, text) = doctor(None, &toml, None);
    assert_eq!(code, 1, "{text}");
    let fail = line_with(&text, "[FAIL] host key");
    // Both fingerprints: what the server presented and what is pinned.
    assert_eq!(fail.matches("SHA256:").count(), 2, "{fail}");
    line_with(&text, "[skip] authentication");

    let (other_key, _) = keygen(dir.path(), "other_client", "ed25519");
    let toml = sshd.agent_toml(listen, "").replace(
        &sshd.client_key.display().to_string(),
        &other_key.display().to_string(),
    );
    let (code, text) = doctor(None, &toml, None);
    assert_eq!(code, 1, "{text}");
    line_with(&text, "[ ok ] host key");
    assert!(
        line_with(&text, "[FAIL] authentication").contains("rejected"),
        "{text}"
    );
}

#[tokio::test]
async fn doctor_diagnoses_a_silent_server_and_a_closed_port() {
    let sshd = Sshd::start();
    // Accepts TCP, never says a word: "stuck on the version number".
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((c, _)) = silent.accept() {
            held.push(c);
        }
    });
    let toml = sshd.agent_toml(free_port(), "").replace(
        &format!("port = {}\n", sshd.port),
        &format!("port = {silent_port}\n"),
    );
    let (code, text) = doctor(None, &toml, None);
    assert_eq!(code, 1, "{text}");
    line_with(&text, "[ ok ] connect");
    line_with(&text, "[FAIL] ssh banner");
    assert!(text.contains("stuck on the version number"), "{text}");

    let closed = free_port();
    let toml = sshd.agent_toml(free_port(), "").replace(
        &format!("port = {}\n", sshd.port),
        &format!("port = {closed}\n"),
    );
    let (code, text) = doctor(None, &toml, None);
    assert_eq!(code, 1, "{text}");
    assert!(
        line_with(&text, "[FAIL] connect").contains("refused"),
        "{text}"
    );
    line_with(&text, "[skip] ssh banner");
}

/// Outbound packets to the server's port vanish (nft drop in a private namespace): the
/// connect step times out and the remedy names the firewall and an allow-listed port.
#[tokio::test]
async fn doctor_diagnoses_a_blocked_port() {
    let ns = NetNs::new("doctor");
    let sshd = Sshd::start_in(Some(&ns.name), "");
    ns.drop_tcp("block", "output", &[("dport", sshd.port)]);
    let (code, text) = doctor(Some(&ns.name), &sshd.agent_toml(free_port(), ""), None);
    assert_eq!(code, 1, "{text}");
    let fail = line_with(&text, "[FAIL] connect");
    assert!(fail.contains("timed out"), "{text}");
    assert!(text.contains("allow-listed port"), "{text}");
}

#[test]
fn doctor_stops_at_an_invalid_configuration_with_exit_78() {
    let (code, text) = doctor(None, "[tunnel]\nport = \"x\"\n", None);
    assert_eq!(code, 78, "{text}");
    line_with(&text, "[FAIL] configuration");
}

#[test]
fn status_without_an_agent_exits_4() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(agent_bin())
        .args(["status", "--socket"])
        .arg(dir.path().join("status.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
}
