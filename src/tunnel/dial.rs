//! The TCP connection a session runs over: straight to the server (its addresses raced, see
//! connect.rs), or through the configured proxy (proxy.rs).

use tokio::net::TcpStream;

use crate::config::TunnelConfig;
use crate::connect;
use crate::constants::*;
use crate::error::TunnelError;
use crate::proxy;

/// The TCP connection that will carry the SSH session: to the server itself, or through the
/// configured proxy. Every failure is classified.
pub async fn open_tcp(t: &TunnelConfig) -> Result<TcpStream, TunnelError> {
    match &t.proxy {
        None => connect_direct(t).await,
        Some(proxy) => {
            let through = async {
                let (mut tcp, _) = proxy::reach(proxy).await?;
                proxy::handshake(&mut tcp, proxy, &t.host, t.port).await?;
                Ok(tcp)
            };
            tokio::time::timeout(PROXY_CONNECT_TIMEOUT, through)
                .await
                .unwrap_or_else(|_| {
                    Err(TunnelError::ProxyTimeout {
                        proxy: proxy.to_string(),
                        timeout: PROXY_CONNECT_TIMEOUT,
                    })
                })
        }
    }
}

async fn connect_direct(t: &TunnelConfig) -> Result<TcpStream, TunnelError> {
    let server = proxy::host_port(&t.host, t.port);
    let addrs = connect::resolve(&t.host, t.port, SSH_CONNECT_TIMEOUT)
        .await
        .map_err(|e| TunnelError::Resolve {
            host: t.host.clone(),
            reason: e.to_string(),
        })?;
    // The addresses race (see connect.rs), all within SSH_CONNECT_TIMEOUT, and those that
    // have not answered are asked again every CONNECT_REPROBE: after a blackout, the tunnel
    // comes back within seconds of the path.
    match tokio::time::timeout(
        SSH_CONNECT_TIMEOUT,
        connect::first_of_probing(&addrs, CONNECT_STAGGER, Some(CONNECT_REPROBE)),
    )
    .await
    {
        Ok(Ok((s, _))) => Ok(s),
        Ok(Err(errors)) => {
            let (addr, e) = errors.last().ok_or_else(|| TunnelError::ConnectTimeout {
                server: server.clone(),
            })?;
            Err(TunnelError::Connect {
                server: server.clone(),
                via: via(&server, *addr),
                reason: e.to_string(),
            })
        }
        Err(_) => Err(TunnelError::ConnectTimeout { server }),
    }
}

/// " (ADDRESS)" when `server` names a host rather than that address.
fn via(server: &str, addr: std::net::SocketAddr) -> String {
    let shown = addr.to_string();
    if shown == server {
        String::new()
    } else {
        format!(" ({shown})")
    }
}
