//! A server that opens channels the agent never asked for. OpenSSH's sshd opens only the
//! forwarded-tcpip channels of a forward the client requested, so this plays a misbehaving (or
//! compromised) server with russh's own server side. Every other channel type, and a forwarded
//! channel for a port the agent does not listen on, must be refused; the agent's own forward
//! keeps working.

use std::sync::Arc;
use std::time::Duration;

use russh::server::{self, Auth, Session, VerifiedPublicKey};
use secoda_agent_harness::*;
use tokio::sync::mpsc;

/// Accepts the agent's key and its remote forward, and reports the forwarded port.
struct Server {
    forwarded: mpsc::UnboundedSender<u32>,
}

impl server::Handler for Server {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn tcpip_forward(
        &mut self,
        _address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let _ = self.forwarded.send(*port);
        Ok(true)
    }
}

#[tokio::test]
async fn channels_the_agent_never_asked_for_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (host_key, host_pub) = keygen(dir.path(), "host", "ed25519");
    let (client_key, _) = keygen(dir.path(), "client", "ed25519");
    let mut config = server::Config {
        inactivity_timeout: None,
        ..Default::default()
    };
    config
        .keys
        .push(russh::keys::load_secret_key(&host_key, None).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (forwarded_tx, mut forwarded) = mpsc::unbounded_channel();
    let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let handler = Server {
            forwarded: forwarded_tx,
        };
        let running = server::run_stream(Arc::new(config), socket, handler)
            .await
            .unwrap();
        let _ = handle_tx.send(running.handle());
        let _ = running.await;
    });

    let listen = free_port();
    let host_key_line = host_pub
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let agent = Agent::start(&format!(
        "[tunnel]\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"tunnel\"\nlisten_port = {listen}\n\
         listen_address = \"127.0.0.1\"\nkey_file = \"{}\"\nhost_keys = [\"{host_key_line}\"]\n",
        client_key.display()
    ));
    let asked = tokio::time::timeout(Duration::from_secs(20), forwarded.recv())
        .await
        .expect("the agent never asked for its forward")
        .unwrap();
    assert_eq!(asked, u32::from(listen));
    agent.wait_ready().await;
    let handle = handle_rx.await.unwrap();

    assert!(
        handle.channel_open_session().await.is_err(),
        "a session channel was accepted"
    );
    assert!(
        handle
            .channel_open_direct_tcpip("127.0.0.1", 22, "192.0.2.1", 1)
            .await
            .is_err(),
        "a direct-tcpip channel was accepted"
    );
    assert!(
        handle.channel_open_x11("192.0.2.1", 6000).await.is_err(),
        "an x11 channel was accepted"
    );
    assert!(
        handle
            .channel_open_forwarded_tcpip("127.0.0.1", u32::from(listen) + 1, "192.0.2.1", 1)
            .await
            .is_err(),
        "a forwarded channel for a port the agent does not listen on was accepted"
    );
    // The forward the agent asked for is still served.
    assert!(
        handle
            .channel_open_forwarded_tcpip("127.0.0.1", u32::from(listen), "192.0.2.1", 1)
            .await
            .is_ok(),
        "the agent's own forward was refused: {}",
        agent.output()
    );
    // The agent's log reaches the harness through a pipe: the refusal of the last open may
    // still be on its way when that open's answer is already here (seen in CI).
    for kind in [
        "a session channel",
        "a direct-tcpip channel",
        "an x11",
        "never asked for",
    ] {
        let kind = kind.trim_start_matches("a ").trim_start_matches("an ");
        assert!(
            agent.wait_output(kind, Duration::from_secs(5)).await,
            "no refusal logged for {kind}: {}",
            agent.output()
        );
    }
    server.abort();
}
