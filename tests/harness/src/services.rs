//! Local targets: an echo service, a bulk sink and source, a small HTTP server; the open-file
//! limit.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Raise this process's open-file limit to the hard limit (1,000-channel tests need it).
pub fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A loopback listener with room for a thousand connections not yet accepted.
/// `TcpListener::bind` listens with a backlog of 128 (as std does): when a thousand channels
/// connect at once, the rest of the SYNs are dropped and retried one and three seconds later,
/// which a short `connect_timeout` reports as a timeout. Database servers listen with a deep
/// backlog (PostgreSQL: twice max_connections), so the test services do too.
pub fn deep_listener() -> TcpListener {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    sock.listen(1024).unwrap()
}

/// An echo service on loopback: every byte comes back.
pub async fn echo_server() -> SocketAddr {
    let l = deep_listener();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A bulk sink on `bind`: reads each connection to its end, then answers with the byte count
/// (a big-endian u64). Its port.
pub async fn counting_sink(bind: &str) -> u16 {
    let sink = TcpListener::bind((bind, 0)).await.unwrap();
    let port = sink.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = sink.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 256 << 10];
                let mut n = 0u64;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
            });
        }
    });
    port
}

/// A bulk source on `bind`: each connection sends a big-endian u64 and gets that many bytes,
/// then the end. Its port.
pub async fn sized_source(bind: &str) -> u16 {
    let source = TcpListener::bind((bind, 0)).await.unwrap();
    let port = source.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = source.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let Ok(mut left) = s.read_u64().await else {
                    return;
                };
                let block = vec![0x5au8; 256 << 10];
                while left > 0 {
                    let k = left.min(block.len() as u64) as usize;
                    if s.write_all(&block[..k]).await.is_err() {
                        return;
                    }
                    left -= k as u64;
                }
            });
        }
    });
    port
}

/// A minimal HTTP server answering every request with `body`.
pub async fn http_server(body: &'static str) -> SocketAddr {
    let l = deep_listener();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

/// `GET path` from an HTTP endpoint on loopback (the agent's metrics): head and body.
pub async fn scrape(port: u16, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

/// The value of the unlabelled metric `name` on the agent's metrics endpoint.
pub async fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = scrape(port, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}
