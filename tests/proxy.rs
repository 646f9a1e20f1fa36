//! The tunnel through real forward proxies on loopback: squid (HTTP CONNECT, basic
//! authentication) and Dante (SOCKS5, username/password). The agent's own TCP connection goes
//! to the proxy, everything that works direct works through it, and each way the proxy can
//! fail is named with its remedy, without the password.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use secoda_agent_harness::proxies::{peer_ports, Dante, Squid};
use secoda_agent_harness::*;

const WAIT: Duration = Duration::from_secs(20);

/// The tunnel serves byte-exact through whatever path the agent took.
async fn assert_bulk(listen: u16) {
    let echo = echo_server().await;
    let (code, s) = socks5(listen, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 0, "the tunnel does not serve");
    assert!(echo_roundtrip(s.unwrap(), &payload(4 << 20, 7)).await);
}

#[tokio::test]
async fn through_squid_the_agents_connection_goes_to_the_proxy() {
    let sshd = Sshd::start();
    let squid = Squid::start(sshd.port, None);
    let listen = free_port();
    let proxy = format!("http://127.0.0.1:{}", squid.port);
    let agent = Agent::start(&sshd.agent_toml(listen, &format!("proxy = \"{proxy}\"\n")));
    agent.wait_ready().await;
    assert_bulk(listen).await;

    let peers = peer_ports(agent.child.id());
    assert!(peers.contains(&squid.port), "{peers:?}");
    assert!(!peers.contains(&sshd.port), "{peers:?}");

    let (code, text) = agent.status(&[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(&format!("  proxy:      {proxy}\n")), "{text}");
    let (_, json) = agent.status(&["--json"]);
    assert!(json.contains(&format!("\"proxy\": \"{proxy}\"")), "{json}");
    assert!(
        agent
            .notifications()
            .iter()
            .any(|n| n.contains(&format!("via {proxy}"))),
        "{:?}",
        agent.notifications()
    );

    // squid logs the CONNECT when the tunnel through it closes.
    drop(agent);
    let connect = format!("CONNECT 127.0.0.1:{}", sshd.port);
    assert!(
        eventually(WAIT, || async { squid.access_log().contains(&connect) }).await,
        "{}",
        squid.access_log()
    );
}

#[tokio::test]
async fn squid_with_basic_auth_a_percent_encoded_password_never_shown() {
    let sshd = Sshd::start();
    let squid = Squid::start(sshd.port, Some(("alice", "pa:ss@w%rd-9")));
    let listen = free_port();
    let mport = free_port();
    let url = format!("http://alice:pa%3Ass%40w%25rd-9@127.0.0.1:{}", squid.port);
    let toml = sshd.agent_toml(
        listen,
        &format!("proxy = \"{url}\"\n[metrics]\nlisten = \"127.0.0.1:{mport}\"\n"),
    );
    let agent = Agent::start(&toml);
    agent.wait_ready().await;
    assert_bulk(listen).await;

    let metrics = Command::new("curl")
        .args(["-s", &format!("http://127.0.0.1:{mport}/metrics")])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains(&format!(
            "secoda_agent_tunnel_route{{server=\"127.0.0.1:{}\",proxy=\"http://127.0.0.1:{}\"}} 1",
            sshd.port, squid.port
        )),
        "{metrics}"
    );

    let (code, text) = run_agent(
        None,
        &[
            "check-config",
            "--config",
            agent.config_path().to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!(
            "proxy:         http://alice:****@127.0.0.1:{}",
            squid.port
        )),
        "{text}"
    );
    for shown in [
        agent.status(&[]).1,
        agent.status(&["--json"]).1,
        text,
        metrics.to_string(),
    ] {
        assert!(
            !shown.contains("pa%3Ass") && !shown.contains("pa:ss@w"),
            "{shown}"
        );
    }
}

#[tokio::test]
async fn a_wrong_proxy_password_is_named_retried_and_fixed_by_a_reload() {
    let sshd = Sshd::start();
    let squid = Squid::start(sshd.port, Some(("alice", "right-password")));
    let listen = free_port();
    let good = sshd.agent_toml(
        listen,
        &format!(
            "proxy = \"http://alice:right-password@127.0.0.1:{}\"\n",
            squid.port
        ),
    );
    let agent = Agent::start(&good.replace("right-password", "wrong-password"));
    assert!(
        agent.wait_output("refused authentication", WAIT).await,
        "{}",
        agent.output()
    );
    let out = agent.output();
    let line = out
        .lines()
        .find(|l| l.contains("refused authentication"))
        .unwrap();
    assert!(line.contains("407"), "{line}");
    assert!(line.contains("the user or password is wrong"), "{line}");
    assert!(!out.contains("wrong-password"), "{out}");
    // Retried, not fatal; `status` says why it is not up.
    let (code, text) = agent.status(&[]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("refused authentication"), "{text}");

    // The proxy is a tunnel setting: a reload with the right password brings the tunnel up.
    std::fs::write(agent.config_path(), &good).unwrap();
    agent.signal(libc::SIGHUP);
    assert!(
        agent.wait_output("tunnel up", WAIT).await,
        "{}",
        agent.output()
    );
    assert_serves(listen).await;
}

#[tokio::test]
async fn a_port_the_proxy_does_not_allow_and_a_missing_password_are_named() {
    let sshd = Sshd::start();
    let squid = Squid::start(sshd.port + 1, None);
    let listen = free_port();
    let agent = Agent::start(&sshd.agent_toml(
        listen,
        &format!("proxy = \"http://127.0.0.1:{}\"\n", squid.port),
    ));
    let refused = format!("refused to connect to 127.0.0.1:{}", sshd.port);
    assert!(
        agent.wait_output(&refused, WAIT).await,
        "{}",
        agent.output()
    );
    let out = agent.output();
    let line = out.lines().find(|l| l.contains(&refused)).unwrap();
    assert!(line.contains("403"), "{line}");
    assert!(
        line.contains(&format!("allow CONNECT to 127.0.0.1:{}", sshd.port)),
        "{line}"
    );
    drop(agent);

    let squid = Squid::start(sshd.port, Some(("alice", "right-password")));
    let agent = Agent::start(&sshd.agent_toml(
        listen,
        &format!("proxy = \"http://127.0.0.1:{}\"\n", squid.port),
    ));
    assert!(
        agent
            .wait_output("it requires a user and password", WAIT)
            .await,
        "{}",
        agent.output()
    );
}

#[tokio::test]
async fn dante_socks5_without_and_with_a_password() {
    let sshd = Sshd::start();
    let listen = free_port();

    let open = Dante::start(None);
    let agent = Agent::start(&sshd.agent_toml(
        listen,
        &format!("proxy = \"socks5://127.0.0.1:{}\"\n", open.port),
    ));
    agent.wait_ready().await;
    assert_bulk(listen).await;
    let peers = peer_ports(agent.child.id());
    assert!(
        peers.contains(&open.port) && !peers.contains(&sshd.port),
        "{peers:?}"
    );
    drop(agent);

    let locked = Dante::start(Some(("sockuser", "so:ck@pw-1")));
    let with = |password: &str| {
        Agent::start(&sshd.agent_toml(
            listen,
            &format!(
                "proxy = \"socks5h://sockuser{password}@127.0.0.1:{}\"\n",
                locked.port
            ),
        ))
    };
    let agent = with(":so%3Ack%40pw-1");
    agent.wait_ready().await;
    assert_bulk(listen).await;
    drop(agent);

    let agent = with(":not-the-password");
    assert!(
        agent
            .wait_output("rejected the user name or password", WAIT)
            .await,
        "{}\n{}",
        agent.output(),
        locked.log()
    );
    drop(agent);

    let agent = Agent::start(&sshd.agent_toml(
        listen,
        &format!("proxy = \"socks5://127.0.0.1:{}\"\n", locked.port),
    ));
    assert!(
        agent
            .wait_output("requires a user and password", WAIT)
            .await,
        "{}",
        agent.output()
    );
}

#[tokio::test]
async fn an_unreachable_proxy_and_a_proxy_that_is_not_one_are_named() {
    let sshd = Sshd::start();
    let listen = free_port();
    let nobody = free_port();
    let agent =
        Agent::start(&sshd.agent_toml(listen, &format!("proxy = \"http://127.0.0.1:{nobody}\"\n")));
    assert!(
        agent
            .wait_output(
                &format!("cannot reach the proxy http://127.0.0.1:{nobody}"),
                WAIT
            )
            .await,
        "{}",
        agent.output()
    );
    assert!(
        agent.output().contains("Connection refused"),
        "{}",
        agent.output()
    );
    drop(agent);

    // The SSH server itself given as the proxy: it speaks first, and not HTTP.
    let agent = Agent::start(&sshd.agent_toml(
        listen,
        &format!("proxy = \"http://127.0.0.1:{}\"\n", sshd.port),
    ));
    assert!(
        agent
            .wait_output("that is an SSH server, not a proxy", WAIT)
            .await,
        "{}",
        agent.output()
    );
}

#[tokio::test]
async fn keepalive_through_the_proxy_notices_a_frozen_path_and_reconnects() {
    let sshd = Sshd::start();
    let squid = Squid::start(sshd.port, None);
    let listen = free_port();
    // agent_toml sets keepalive 2 s x 3.
    let agent = Agent::start(&sshd.agent_toml(
        listen,
        &format!("proxy = \"http://127.0.0.1:{}\"\n", squid.port),
    ));
    agent.wait_ready().await;
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(squid.pid(), libc::SIGSTOP) };
    let lost = agent.wait_output("tunnel lost", WAIT).await;
    unsafe { libc::kill(squid.pid(), libc::SIGCONT) };
    assert!(lost, "{}", agent.output());
    assert!(
        eventually(Duration::from_secs(40), || async {
            agent.output().matches("tunnel up").count() >= 2
        })
        .await,
        "{}",
        agent.output()
    );
    assert_serves(listen).await;
}

/// `doctor --config TOML` with no running agent.
#[tokio::test]
async fn doctor_walks_the_proxy_steps() {
    let sshd = Sshd::start();
    let squid = Squid::start(sshd.port, Some(("alice", "right-password")));
    let listen = free_port();
    let toml = sshd.agent_toml(
        listen,
        &format!(
            "proxy = \"http://alice:right-password@127.0.0.1:{}\"\n",
            squid.port
        ),
    );
    let (code, text) = doctor(None, &toml, None);
    assert_eq!(code, 0, "{text}");
    for step in [
        "proxy",
        "proxy handshake",
        "ssh banner",
        "host key",
        "authentication",
        "remote forward",
    ] {
        assert!(text.contains(&format!("[ ok ] {step}:")), "{step}:\n{text}");
    }
    assert!(!text.contains("right-password"), "{text}");

    let (code, text) = doctor(
        None,
        &toml.replace("right-password", "wrong-password"),
        None,
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("[ ok ] proxy:"), "{text}");
    assert!(text.contains("[FAIL] proxy handshake:"), "{text}");
    assert!(text.contains("-> fix the user and password"), "{text}");
    assert!(text.contains("[skip] ssh banner"), "{text}");
    assert!(!text.contains("wrong-password"), "{text}");
}

#[test]
fn check_config_refuses_bad_proxies_and_a_readable_password() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keygen(dir.path(), "id", "ed25519");
    let base = format!(
        "[tunnel]\nhost = \"tunnel.example.com\"\nlisten_port = 10123\nkey_file = \"{}\"\n",
        key.display()
    );
    let write = |text: &str, mode: u32| {
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p.display().to_string()
    };

    let p = write(
        &format!("{base}proxy = \"https://u:s3cret-pw@proxy:443\"\n"),
        0o600,
    );
    let (code, text) = run_agent(None, &["check-config", "--config", &p]);
    assert_eq!(code, 78, "{text}");
    assert!(text.contains("[tunnel] proxy"), "{text}");
    assert!(text.contains("(https://) is not supported"), "{text}");
    assert!(!text.contains("s3cret-pw"), "{text}");

    let p = write(
        &format!("{base}proxy = \"http://u:s3cret-pw@proxy:3128\"\n"),
        0o644,
    );
    let (code, text) = run_agent(None, &["check-config", "--config", &p]);
    assert_eq!(code, 78, "{text}");
    assert!(
        text.contains("[tunnel] proxy with a password and is readable by every user"),
        "{text}"
    );
    assert!(!text.contains("s3cret-pw"), "{text}");

    // SSH_PROXY in the environment wins over the file; without a password the file may be 0644.
    let p = write(
        &format!("{base}proxy = \"http://file-proxy:3128\"\n"),
        0o644,
    );
    let out = Command::new(agent_bin())
        .args(["check-config", "--config", &p])
        .env("SSH_PROXY", "socks5://env-proxy:1080")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("proxy:         socks5://env-proxy:1080"),
        "{text}"
    );
}
