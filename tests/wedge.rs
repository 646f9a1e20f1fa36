//! A session whose handler blocks for good (injected: the `fault-injection` feature, which
//! tests/run-all.sh turns on), direct and through each kind of proxy. The runtime stays
//! healthy, so the watchdog never fires: the session's own liveness probe must catch it, and
//! the teardown must reach everything the session held: its TCP connection (so the server,
//! or the proxy and then the server, frees the listen port), every channel task and their
//! target connections.
#![cfg(feature = "fault-injection")]

use std::process::Command;
use std::time::{Duration, Instant};

use secoda_agent_harness::proxies::{Dante, Squid};
use secoda_agent_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Local ports of the established TCP connections to 127.0.0.1:`port`.
fn connections_to(port: u16) -> Vec<u16> {
    let out = Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            "dst",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(2)?
                .rsplit_once(':')?
                .1
                .parse()
                .ok()
        })
        .collect()
}

/// `secoda_agent_channels_active` from the metrics endpoint.
async fn channels_active(mport: u16) -> Option<f64> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", mport))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("secoda_agent_channels_active "))
        .and_then(|v| v.trim().parse().ok())
}

enum Route {
    Direct,
    Http,
    Socks5,
}

async fn a_wedged_session_is_torn_down(route: Route) {
    let sshd = Sshd::start();
    let (proxy, _squid, _dante) = match route {
        Route::Direct => (String::new(), None, None),
        Route::Http => {
            let squid = Squid::start(sshd.port, None);
            let url = format!("proxy = \"http://127.0.0.1:{}\"\n", squid.port);
            (url, Some(squid), None)
        }
        Route::Socks5 => {
            let dante = Dante::start(None);
            let url = format!("proxy = \"socks5://127.0.0.1:{}\"\n", dante.port);
            (url, None, Some(dante))
        }
    };
    let (listen, mport) = (free_port(), free_port());
    let faults = tempfile::tempdir().unwrap();
    let wedge = faults.path().join("wedge");
    // keepalive 2 s x 3 (agent_toml): the window is 6 s.
    let window = Duration::from_secs(6);
    let agent = Agent::start_with(
        &sshd.agent_toml(
            listen,
            &format!("{proxy}[metrics]\nlisten = \"127.0.0.1:{mport}\"\n"),
        ),
        &[],
        &[("SECODA_AGENT_FAULT_WEDGE", wedge.to_str().unwrap())],
    );
    agent.wait_ready().await;
    // The session's connection to the server: the agent's own, or the proxy's.
    let old_session = connections_to(sshd.port);
    assert_eq!(old_session.len(), 1, "{old_session:?}");

    // A target that says when its connection closes.
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_port = target.local_addr().unwrap().port();
    let target_closed = tokio::spawn(async move {
        let (mut s, _) = target.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        Instant::now()
    });
    let (code, client) = socks5(listen, "127.0.0.1", target_port).await;
    assert_eq!(code, 0);
    let mut client = client.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            channels_active(mport).await == Some(1.0)
        })
        .await
    );

    // The next data from the server blocks the session's handler for good.
    std::fs::write(&wedge, "").unwrap();
    let wedged = Instant::now();
    client.write_all(b"wedge").await.unwrap();
    let bound = window + Duration::from_secs(10);
    let slack = Duration::from_secs(5);

    assert!(
        agent.wait_output("stopped responding", bound + slack).await,
        "the wedge was never detected: {}",
        tail(&agent.output(), 20)
    );
    let closed = tokio::time::timeout(slack, target_closed)
        .await
        .expect("the channel's target connection was never closed")
        .unwrap();
    assert!(closed - wedged < bound + slack);
    assert!(
        eventually(slack, || async {
            channels_active(mport).await == Some(0.0)
        })
        .await,
        "channels_active did not return to 0"
    );
    assert!(
        eventually(slack, || async {
            connections_to(sshd.port)
                .iter()
                .all(|p| !old_session.contains(p))
        })
        .await,
        "the wedged session's connection to the server is still open: {old_session:?}"
    );
    // The next session takes the listen port again.
    let served = eventually(bound + slack, || async {
        let refused = socks5(listen, "127.0.0.1", free_port());
        matches!(
            tokio::time::timeout(Duration::from_secs(2), refused).await,
            Ok((5, _))
        )
    })
    .await;
    assert!(served, "the port was not taken again: {}", agent.output());
    let took = wedged.elapsed();
    assert!(
        took < bound + slack,
        "the tunnel served again {took:?} after the wedge"
    );
    assert_serves(listen).await;
}

#[tokio::test]
async fn a_wedged_direct_session_is_torn_down() {
    a_wedged_session_is_torn_down(Route::Direct).await;
}

#[tokio::test]
async fn a_wedged_session_through_an_http_proxy_is_torn_down() {
    a_wedged_session_is_torn_down(Route::Http).await;
}

#[tokio::test]
async fn a_wedged_session_through_a_socks5_proxy_is_torn_down() {
    a_wedged_session_is_torn_down(Route::Socks5).await;
}
