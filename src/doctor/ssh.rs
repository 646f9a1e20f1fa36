//! The SSH steps over a fresh connection: host key, authentication, the remote forward.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use russh::client;
use russh::keys::{PublicKey, PublicKeyOrCertificate};
use tokio::net::TcpStream;

use super::network::Route;
use super::{elapsed_ms, Report};
use crate::algorithms::Negotiated;
use crate::config::fingerprint;
use crate::config::{self, ClientKey, Config};
use crate::constants::DOCTOR_STEP_TIMEOUT;
use crate::proxy;
use crate::telemetry::State;
use crate::tunnel::{authenticate, open_tcp, ssh_config};

/// Records the host key the server presents, and what the key exchange settled; accepts the
/// key only if it is pinned.
struct Probe {
    pins: Vec<PublicKey>,
    presented: Arc<Mutex<Option<String>>>,
    negotiated: Arc<Mutex<Option<Negotiated>>>,
}

impl client::Handler for Probe {
    type Error = russh::Error;

    async fn kex_done(
        &mut self,
        _shared_secret: Option<&[u8]>,
        names: &russh::Names,
        session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        Negotiated::record(&self.negotiated, names, session);
        Ok(())
    }

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(cert) => {
                PublicKey::new(cert.public_key().clone(), "")
            }
        };
        *self.presented.lock().unwrap_or_else(|e| e.into_inner()) = Some(fingerprint(&key));
        Ok(self.pins.iter().any(|p| p.key_data() == key.key_data()))
    }
}

/// Host key, authentication and the remote forward, over a fresh connection.
pub(super) async fn ssh(
    r: &mut Report,
    cfg: &Config,
    route: Route,
    running: Option<&crate::telemetry::Snapshot>,
) {
    let t = &cfg.tunnel;
    let pins: Vec<String> = t.host_keys.iter().map(fingerprint).collect();
    let presented = Arc::new(Mutex::new(None));
    let negotiated = Arc::new(Mutex::new(None));
    let probe = Probe {
        pins: t.host_keys.clone(),
        presented: presented.clone(),
        negotiated: negotiated.clone(),
    };
    let started = Instant::now();
    let handshake = async {
        let tcp = match route {
            Route::Direct(addr) => TcpStream::connect(addr).await?,
            Route::Proxy => open_tcp(t)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?,
        };
        client::connect_stream(Arc::new(ssh_config(t)), tcp, probe).await
    };
    let handshake = tokio::time::timeout(DOCTOR_STEP_TIMEOUT, handshake).await;
    let seen = presented.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut handle = match (handshake, seen) {
        (Ok(Ok(h)), Some(seen)) => {
            r.ok(
                "host key",
                format!(
                    "the server presented {seen}, which is pinned ({})",
                    elapsed_ms(started)
                ),
            );
            if let Some(n) = crate::lock(&negotiated).clone() {
                r.ok("algorithms", n.to_string());
            }
            h
        }
        (_, Some(seen)) if !pins.contains(&seen) => {
            r.fail(
                "host key",
                format!("the server presented {seen}; pinned: {}", pins.join(" or ")),
                "if Secoda confirms the server's key changed, update [tunnel] host_keys (or SSH_HOST_KEY); otherwise something intercepts the connection: do not connect",
            );
            r.skip("authentication", "the host key did not match");
            r.skip("remote forward", "the host key did not match");
            return;
        }
        (
            Ok(Err(russh::Error::NoCommonAlgo {
                kind: russh::AlgorithmKind::Kex,
                theirs,
                ..
            })),
            _,
        ) if t.require_post_quantum => {
            r.fail(
                "ssh handshake",
                format!(
                    "the server offers no post-quantum key exchange (it offers: {})",
                    crate::algorithms::kex_offered(theirs).join(", ")
                ),
                "[tunnel] require_post_quantum refuses it: OpenSSH 9.9 and later offer mlkem768x25519-sha256; ask Secoda, or remove require_post_quantum",
            );
            r.skip("authentication", "no SSH session");
            r.skip("remote forward", "no SSH session");
            return;
        }
        (Ok(Err(e)), _) => {
            r.fail(
                "ssh handshake",
                e.to_string(),
                "the server and the agent could not agree on algorithms, or the connection broke",
            );
            r.skip("authentication", "no SSH session");
            r.skip("remote forward", "no SSH session");
            return;
        }
        _ => {
            r.fail(
                "ssh handshake",
                format!("not complete within {DOCTOR_STEP_TIMEOUT:?}"),
                "the server or the network is too slow or drops traffic; try again, then check the path",
            );
            r.skip("authentication", "no SSH session");
            r.skip("remote forward", "no SSH session");
            return;
        }
    };

    if let ClientKey::InCredential(name) = &t.key {
        r.skip(
            "authentication",
            &format!(
                "the key is in systemd credential \"{name}\", which only the service can read; to run every step with it: systemd-run --pipe --wait -p {} secoda-agent doctor",
                config::credential_unit_setting(name)
            ),
        );
        r.skip("remote forward", "not authenticated");
        return;
    }
    let started = Instant::now();
    match tokio::time::timeout(DOCTOR_STEP_TIMEOUT, authenticate(&mut handle, t)).await {
        Ok(Ok(())) => r.ok(
            "authentication",
            format!(
                "user {} with key {} accepted ({})",
                t.user,
                t.key.fingerprint(),
                elapsed_ms(started)
            ),
        ),
        Ok(Err(e)) => {
            r.fail("authentication", e.to_string(), "ask Secoda which key and user this tunnel expects; the fingerprint above is what this host offers");
            r.skip("remote forward", "not authenticated");
            return;
        }
        Err(_) => {
            r.fail(
                "authentication",
                format!("no answer within {DOCTOR_STEP_TIMEOUT:?}"),
                "try again; if it persists, the server is overloaded",
            );
            r.skip("remote forward", "not authenticated");
            return;
        }
    }

    let listen = proxy::host_port(&t.listen_address, t.listen_port);
    let ours = running.filter(|s| same_listen(&s.listen, &listen));
    if let Some(s) = ours.filter(|s| s.state == State::Up) {
        r.ok(
            "remote forward",
            format!(
                "{listen} is held by the running agent (pid {}): not touched",
                s.pid
            ),
        );
    } else if let Some(s) = ours.filter(|s| s.state == State::Standby) {
        let since = s
            .standby_since
            .map_or_else(String::new, |t| format!(" since {}", crate::status::utc(t)));
        r.ok(
            "remote forward",
            format!(
                "the server refuses {listen} to the running agent (pid {}){since}: held by another session (the other host of its pair, or a session the server has not timed out yet), or not permitted; it stands by to take it over: not touched",
                s.pid
            ),
        );
    } else {
        let started = Instant::now();
        let forward = tokio::time::timeout(
            DOCTOR_STEP_TIMEOUT,
            handle.tcpip_forward(t.listen_address.clone(), u32::from(t.listen_port)),
        )
        .await;
        match forward {
            Ok(Ok(_)) => {
                let _ = tokio::time::timeout(
                    DOCTOR_STEP_TIMEOUT,
                    handle.cancel_tcpip_forward(t.listen_address.clone(), u32::from(t.listen_port)),
                )
                .await;
                r.ok(
                    "remote forward",
                    format!("the server listened on {listen} and released it again ({})", elapsed_ms(started)),
                );
            }
            Ok(Err(_)) => r.fail(
                "remote forward",
                format!("the server refused to listen on {listen}"),
                "held by another session (a tunnel on another host, an old Docker container, or a session the server has not timed out yet: wait a minute), or not permitted (sshd's PermitListen or AllowTcpForwarding, a mistyped listen_port, a port taken on the server: ask Secoda)",
            ),
            Err(_) => r.fail(
                "remote forward",
                format!("no answer within {DOCTOR_STEP_TIMEOUT:?}"),
                "try again; if it persists, ask Secoda",
            ),
        }
    }
    let _ = handle
        .disconnect(russh::Disconnect::ByApplication, "doctor done", "")
        .await;
}

/// Whether the running agent's `listen` (from `status`) is the configured one: as addresses
/// where both are ("[::]:10123" and "[0:0:0:0:0:0:0:0]:10123" are one), else as written.
fn same_listen(running: &str, configured: &str) -> bool {
    match (
        running.parse::<std::net::SocketAddr>(),
        configured.parse::<std::net::SocketAddr>(),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => running.eq_ignore_ascii_case(configured),
    }
}

#[cfg(test)]
mod tests {
    use super::same_listen;

    #[test]
    fn listen_addresses_compare_as_addresses() {
        assert!(same_listen("[::]:10123", "[::]:10123"));
        assert!(same_listen("[::]:10123", "[0:0:0:0:0:0:0:0]:10123"));
        assert!(same_listen("0.0.0.0:10123", "0.0.0.0:10123"));
        assert!(same_listen("Tunnel.Example:1", "tunnel.example:1"));
        assert!(!same_listen("[::]:10123", "0.0.0.0:10123"));
        assert!(!same_listen("[::]:10123", "[::]:10124"));
    }
}
