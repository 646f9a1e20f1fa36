//! What a session negotiated is visible (the "tunnel up" line, `status`, the metrics, `doctor`)
//! and agrees with the server's own log; `[tunnel] require_post_quantum` refuses a server
//! without a post-quantum key exchange before authenticating, loudly, and serves through one
//! that has it. Run against OpenSSH 9.2 (this system's) and OpenSSH 10 (Debian 13's, with
//! SECODA_TEST_OPENSSH10: tests/run-all.sh runs this file both ways).

use std::time::Duration;

use secoda_agent_harness::*;

/// The key exchange sshd logged for the first session (`kex: algorithm: NAME`, LogLevel DEBUG).
fn server_kex(sshd: &Sshd) -> String {
    let log = sshd.log();
    log.lines()
        .find_map(|l| l.split("kex: algorithm: ").nth(1))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_else(|| panic!("no key exchange in sshd's log:\n{log}"))
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test]
async fn the_negotiated_algorithms_are_shown_as_the_server_logged_them() {
    let sshd = Sshd::start_with("LogLevel DEBUG\n");
    let listen = free_port();
    let mport = free_port();
    let agent = Agent::start(&sshd.agent_toml(
        listen,
        &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\"\n"),
    ));
    agent.wait_ready().await;
    let kex = server_kex(&sshd);
    let expected = if openssh10_root().is_some() {
        "mlkem768x25519-sha256"
    } else {
        // OpenSSH 9.2 offers sntrup761x25519, which russh does not implement.
        "curve25519-sha256"
    };
    assert_eq!(kex, expected, "sshd's log:\n{}", sshd.log());
    let post_quantum = kex.starts_with("mlkem");

    let out = agent.output();
    let up = out
        .lines()
        .find(|l| l.contains("tunnel up"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(up.contains(&format!("key exchange {kex}")), "{up}");
    let pq_words = if post_quantum {
        "(post-quantum)"
    } else {
        "(not post-quantum)"
    };
    assert!(up.contains(pq_words), "{up}");
    assert!(up.contains("host key ssh-ed25519"), "{up}");
    assert!(up.contains("server SSH-2.0-OpenSSH_"), "{up}");

    let (code, text) = agent.status(&[]);
    assert_eq!(code, 0, "{text}");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("session:"))
        .unwrap_or_else(|| panic!("no session line: {text}"));
    assert!(line.contains(&kex) && line.contains(pq_words), "{line}");
    let v = json(&agent.status(&["--json"]).1);
    assert_eq!(v["session"]["kex"], kex.as_str());
    assert_eq!(v["session"]["post_quantum"], post_quantum);
    assert_eq!(v["session"]["host_key"], "ssh-ed25519");
    assert!(
        v["session"]["cipher"].as_str().unwrap().contains("gcm")
            || v["session"]["cipher"]
                .as_str()
                .unwrap()
                .contains("chacha20")
    );

    let m = metrics_text(mport).await;
    let info = m
        .lines()
        .find(|l| l.starts_with("secoda_agent_session_info{"))
        .unwrap_or_else(|| panic!("{m}"));
    assert!(info.contains(&format!("kex=\"{kex}\"")), "{info}");
    assert!(
        info.contains(&format!("post_quantum=\"{post_quantum}\"")),
        "{info}"
    );
    assert!(info.ends_with(" 1"), "{info}");

    // doctor names them too.
    let (code, text) = doctor(
        None,
        &std::fs::read_to_string(agent.config_path()).unwrap(),
        Some(&agent.status_socket()),
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("algorithms") && l.contains(&format!("key exchange {kex}"))),
        "{text}"
    );
}

#[tokio::test]
async fn require_post_quantum_refuses_a_server_without_it_and_serves_through_one_with_it() {
    let sshd = Sshd::start_with("LogLevel DEBUG\n");
    let listen = free_port();
    let agent = Agent::start(&sshd.agent_toml(listen, "require_post_quantum = true\n"));
    if openssh10_root().is_some() {
        agent.wait_ready().await;
        assert_serves(listen).await;
        assert_eq!(server_kex(&sshd), "mlkem768x25519-sha256");
        let v = json(&agent.status(&["--json"]).1);
        assert_eq!(v["session"]["post_quantum"], true);
        assert_eq!(agent.status(&[]).0, 0);
        return;
    }
    // OpenSSH 9.2: no ML-KEM. Refused at the key exchange, before the host key or a
    // signature with the client key; said at every attempt, with the server's offer.
    assert!(
        agent
            .wait_output_count(
                "offers no post-quantum key exchange",
                2,
                Duration::from_secs(15)
            )
            .await,
        "{}",
        agent.output()
    );
    let out = agent.output();
    let line = out
        .lines()
        .find(|l| l.contains("offers no post-quantum key exchange"))
        .unwrap();
    assert!(line.starts_with("ERROR"), "{line}");
    assert!(line.contains("require_post_quantum"), "{line}");
    assert!(
        line.contains("curve25519-sha256"),
        "the server's offer: {line}"
    );
    assert!(!line.contains("kex-strict"), "{line}");
    assert!(line.contains("OpenSSH 9.9"), "{line}");
    let (code, text) = agent.status(&[]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("post-quantum"), "{text}");
    assert!(
        !sshd.log().contains("Accepted publickey"),
        "authenticated despite require_post_quantum:\n{}",
        sshd.log()
    );
}
