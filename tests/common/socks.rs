//! A small SOCKS4/4a/5 client, as Secoda speaks to the tunnel.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// SOCKS5 CONNECT (no auth) to `host:port` through `proxy`; returns the reply code and, on
/// success, the stream.
pub async fn socks5(proxy: u16, host: &str, port: u16) -> (u8, Option<TcpStream>) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", proxy)).await else {
        // Nothing listens on the proxy port (the tunnel is down): no SOCKS reply at all.
        return (0xff, None);
    };
    s.set_nodelay(true).unwrap();
    let mut req = vec![5, 1, 0, 5, 1, 0];
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.octets());
        }
        Ok(std::net::IpAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.octets());
        }
        Err(_) => {
            req.push(3);
            req.push(host.len() as u8);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    if s.write_all(&req).await.is_err() {
        return (0xff, None);
    }
    let mut method = [0u8; 2];
    if s.read_exact(&mut method).await.is_err() {
        return (0xff, None);
    }
    assert_eq!(method, [5, 0], "method selection");
    let mut head = [0u8; 4];
    if s.read_exact(&mut head).await.is_err() {
        return (0xff, None);
    }
    assert_eq!(head[0], 5);
    let rest = match head[3] {
        1 => 6,
        4 => 18,
        t => panic!("bad address type {t} in reply"),
    };
    let mut tail = vec![0u8; rest];
    s.read_exact(&mut tail).await.unwrap();
    if head[1] == 0 {
        (0, Some(s))
    } else {
        (head[1], None)
    }
}

/// SOCKS4 (or 4a when `host` is a name) CONNECT; returns the reply code and the stream.
pub async fn socks4(proxy: u16, host: &str, port: u16) -> (u8, Option<TcpStream>) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", proxy)).await else {
        // Nothing listens on the proxy port (the tunnel is down): no SOCKS reply at all.
        return (0xff, None);
    };
    let mut req = vec![4, 1];
    req.extend_from_slice(&port.to_be_bytes());
    match host.parse::<std::net::Ipv4Addr>() {
        Ok(a) => {
            req.extend_from_slice(&a.octets());
            req.extend_from_slice(b"user\0");
        }
        Err(_) => {
            req.extend_from_slice(&[0, 0, 0, 1]);
            req.extend_from_slice(b"user\0");
            req.extend_from_slice(host.as_bytes());
            req.push(0);
        }
    }
    s.write_all(&req).await.unwrap();
    let mut reply = [0u8; 8];
    if s.read_exact(&mut reply).await.is_err() {
        return (0xff, None);
    }
    if reply[1] == 0x5a {
        (reply[1], Some(s))
    } else {
        (reply[1], None)
    }
}
