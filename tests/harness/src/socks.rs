//! A small SOCKS4/4a/5 client, as Secoda speaks to the tunnel.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// SOCKS5 CONNECT (no auth) to `host:port` through `proxy`; returns the reply code and, on
/// success, the stream. 0xff stands for "no reply at all".
pub async fn socks5(proxy: u16, host: &str, port: u16) -> (u8, Option<TcpStream>) {
    match socks5_detail(proxy, host, port).await {
        Ok(s) => (0, Some(s)),
        Err(Socks5Error::Reply(code)) => (code, None),
        Err(Socks5Error::NoReply(_)) => (0xff, None),
    }
}

/// How a SOCKS5 request failed.
#[derive(Debug)]
pub enum Socks5Error {
    /// The proxy answered with this reply code.
    Reply(u8),
    /// No answer: which step failed and how (nothing listening, reset, closed).
    NoReply(String),
}

/// As [`socks5`], saying at which step a request that got no reply failed.
pub async fn socks5_detail(proxy: u16, host: &str, port: u16) -> Result<TcpStream, Socks5Error> {
    let step = |what: &'static str| {
        move |e: std::io::Error| Socks5Error::NoReply(format!("{what}: {:?}", e.kind()))
    };
    // Nothing listens on the proxy port when the tunnel is down.
    let mut s = TcpStream::connect(("127.0.0.1", proxy))
        .await
        .map_err(step("connect"))?;
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
    s.write_all(&req).await.map_err(step("request"))?;
    let mut method = [0u8; 2];
    s.read_exact(&mut method)
        .await
        .map_err(step("method selection"))?;
    assert_eq!(method, [5, 0], "method selection");
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.map_err(step("reply"))?;
    assert_eq!(head[0], 5);
    let rest = match head[3] {
        1 => 6,
        4 => 18,
        t => panic!("bad address type {t} in reply"),
    };
    let mut tail = vec![0u8; rest];
    s.read_exact(&mut tail).await.unwrap();
    if head[1] == 0 {
        Ok(s)
    } else {
        Err(Socks5Error::Reply(head[1]))
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
