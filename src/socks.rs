//! The server side of SOCKS4, SOCKS4a and SOCKS5 (no authentication, CONNECT only), generic
//! over any byte stream so it can be tested over `tokio::io::duplex`.
//!
//! Reads exactly the bytes of the request (never more), so whatever the client sends after it
//! stays in the stream for the splice.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest SOCKS4 user id or SOCKS4a host name we read before giving up.
const MAX_NUL_TERMINATED: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(a) => write!(f, "{a}"),
            Host::Name(n) => write!(f, "{n}"),
        }
    }
}

/// A CONNECT request that parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub version: Version,
    pub host: Host,
    pub port: u16,
}

/// The outcome we report to the client; the SOCKS5 reply codes of RFC 1928.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    TtlExpired = 6,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

/// Why a handshake ended without a request to act on.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("I/O error during the SOCKS handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a SOCKS request (first byte {0:#04x})")]
    UnknownVersion(u8),
    #[error("the client offers no method we accept (we accept only 'no authentication')")]
    NoAcceptableMethod,
    #[error("SOCKS command {0} is not supported (only CONNECT)")]
    UnsupportedCommand(u8),
    #[error("SOCKS5 address type {0} is not supported")]
    UnsupportedAddressType(u8),
    #[error("malformed SOCKS request: {0}")]
    Malformed(&'static str),
    /// The name as asked for, escaped: it came from the other side and goes into logs and
    /// `status`, so no control character of it is ever written raw.
    #[error("SOCKS request for \"{0}\", which is not a host name (letters, digits, '-', '_' and '.', labels of at most 63 bytes) nor an IP address")]
    InvalidHostName(String),
}

impl HandshakeError {
    /// The reply already sent to the client for this error, if any (for metrics and logs).
    pub fn reply_sent(&self) -> Option<Reply> {
        match self {
            HandshakeError::UnsupportedCommand(_) => Some(Reply::CommandNotSupported),
            HandshakeError::UnsupportedAddressType(_) => Some(Reply::AddressTypeNotSupported),
            HandshakeError::InvalidHostName(_) => Some(Reply::HostUnreachable),
            _ => None,
        }
    }
}

/// Read one request. Protocol errors that SOCKS can express are answered before returning.
pub async fn read_request<S>(stream: &mut S) -> Result<Request, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match stream.read_u8().await? {
        4 => read_v4(stream).await,
        5 => read_v5(stream).await,
        other => Err(HandshakeError::UnknownVersion(other)),
    }
}

async fn read_v4<S>(stream: &mut S) -> Result<Request, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cmd = stream.read_u8().await?;
    let port = stream.read_u16().await?;
    let mut ip = [0u8; 4];
    stream.read_exact(&mut ip).await?;
    read_nul_terminated(stream).await?; // user id, ignored
    if cmd != 1 {
        write_v4_reply(stream, false).await?;
        return Err(HandshakeError::UnsupportedCommand(cmd));
    }
    // SOCKS4a: 0.0.0.x with x != 0 means "a host name follows".
    let host = if ip[..3] == [0, 0, 0] && ip[3] != 0 {
        let name = read_nul_terminated(stream).await?;
        match host_name(name) {
            Ok(name) => name,
            Err(e) => {
                write_v4_reply(stream, false).await?;
                return Err(e);
            }
        }
    } else {
        Host::Ip(IpAddr::V4(Ipv4Addr::from(ip)))
    };
    Ok(Request {
        version: Version::V4,
        host,
        port,
    })
}

async fn read_v5<S>(stream: &mut S) -> Result<Request, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let n = stream.read_u8().await? as usize;
    let mut methods = [0u8; 255];
    stream.read_exact(&mut methods[..n]).await?;
    if !methods[..n].contains(&0) {
        stream.write_all(&[5, 0xff]).await?;
        return Err(HandshakeError::NoAcceptableMethod);
    }
    stream.write_all(&[5, 0]).await?;

    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(HandshakeError::Malformed("request version is not 5"));
    }
    let (cmd, atyp) = (head[1], head[3]);
    let host = match atyp {
        1 => {
            let mut a = [0u8; 4];
            stream.read_exact(&mut a).await?;
            Ok(Host::Ip(IpAddr::V4(Ipv4Addr::from(a))))
        }
        3 => {
            let len = stream.read_u8().await? as usize;
            let mut name = vec![0u8; len];
            stream.read_exact(&mut name).await?;
            // Judged once the request is complete, so the reply comes after all of it.
            Err(name)
        }
        4 => {
            let mut a = [0u8; 16];
            stream.read_exact(&mut a).await?;
            Ok(Host::Ip(IpAddr::V6(Ipv6Addr::from(a))))
        }
        other => {
            write_v5_reply(stream, Reply::AddressTypeNotSupported, None).await?;
            return Err(HandshakeError::UnsupportedAddressType(other));
        }
    };
    let port = stream.read_u16().await?;
    if cmd != 1 {
        write_v5_reply(stream, Reply::CommandNotSupported, None).await?;
        return Err(HandshakeError::UnsupportedCommand(cmd));
    }
    let host = match host.or_else(host_name) {
        Ok(host) => host,
        Err(e) => {
            write_v5_reply(stream, Reply::HostUnreachable, None).await?;
            return Err(e);
        }
    };
    Ok(Request {
        version: Version::V5,
        host,
        port,
    })
}

/// A name as asked for, if it can be one: a DNS host name (letters, digits, `-`, `_`, labels
/// of 1 to 63 bytes, at most 253 bytes, an optional final dot) or an IP address written out.
/// Anything else (control characters, spaces, non-ASCII, empty labels) is refused before any
/// lookup: no resolver would find it, and it would reach the logs as it came.
fn host_name(name: Vec<u8>) -> Result<Host, HandshakeError> {
    let text = std::str::from_utf8(&name).ok();
    if let Some(ip) = text.and_then(|t| t.parse::<IpAddr>().ok()) {
        return Ok(Host::Ip(ip));
    }
    let body = name.strip_suffix(b".").unwrap_or(&name);
    let valid = !body.is_empty()
        && body.len() <= 253
        && body.split(|&b| b == b'.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    match text {
        Some(t) if valid => Ok(Host::Name(t.to_string())),
        _ => Err(HandshakeError::InvalidHostName(
            name.escape_ascii().to_string(),
        )),
    }
}

async fn read_nul_terminated<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Vec<u8>, HandshakeError> {
    let mut out = Vec::new();
    loop {
        match stream.read_u8().await? {
            0 => return Ok(out),
            b if out.len() < MAX_NUL_TERMINATED => out.push(b),
            _ => return Err(HandshakeError::Malformed("field longer than 255 bytes")),
        }
    }
}

/// Answer a request. `bound` is the agent's local address toward the target on success.
pub async fn write_reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    version: Version,
    reply: Reply,
    bound: Option<SocketAddr>,
) -> std::io::Result<()> {
    match version {
        Version::V4 => write_v4_reply(stream, reply == Reply::Succeeded).await,
        Version::V5 => write_v5_reply(stream, reply, bound).await,
    }
}

async fn write_v4_reply<S: AsyncWrite + Unpin>(stream: &mut S, ok: bool) -> std::io::Result<()> {
    let code = if ok { 0x5a } else { 0x5b };
    stream.write_all(&[0, code, 0, 0, 0, 0, 0, 0]).await?;
    stream.flush().await
}

async fn write_v5_reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    reply: Reply,
    bound: Option<SocketAddr>,
) -> std::io::Result<()> {
    let bound = bound.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut buf = Vec::with_capacity(22);
    buf.extend_from_slice(&[5, reply as u8, 0]);
    match bound.ip() {
        IpAddr::V4(a) => {
            buf.push(1);
            buf.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            buf.push(4);
            buf.extend_from_slice(&a.octets());
        }
    }
    buf.extend_from_slice(&bound.port().to_be_bytes());
    stream.write_all(&buf).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    async fn serve(input: &[u8]) -> (Result<Request, HandshakeError>, Vec<u8>) {
        let (mut client, mut server) = duplex(4096);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let r = read_request(&mut server).await;
        drop(server);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        (r, out)
    }

    #[tokio::test]
    async fn socks5_by_name_ip4_ip6() {
        let (r, out) = serve(b"\x05\x01\x00\x05\x01\x00\x03\x09localhost\x1f\x90").await;
        assert_eq!(out, [5, 0]);
        let r = r.unwrap();
        assert_eq!(
            (r.version, r.host, r.port),
            (Version::V5, Host::Name("localhost".into()), 8080)
        );

        let (r, _) = serve(b"\x05\x02\x02\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50").await;
        assert_eq!(r.unwrap().host, Host::Ip("127.0.0.1".parse().unwrap()));

        let mut v6 = b"\x05\x01\x00\x05\x01\x00\x04".to_vec();
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0, 22]);
        let (r, _) = serve(&v6).await;
        assert_eq!(r.unwrap().host, Host::Ip("::1".parse().unwrap()));
    }

    #[tokio::test]
    async fn socks5_refusals_are_answered() {
        let (r, out) = serve(b"\x05\x01\x02").await;
        assert!(matches!(r, Err(HandshakeError::NoAcceptableMethod)));
        assert_eq!(out, [5, 0xff]);

        let (r, out) = serve(b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50").await;
        assert!(matches!(r, Err(HandshakeError::UnsupportedCommand(2))));
        assert_eq!(out[2..4], [5, 7]);

        let (r, out) = serve(b"\x05\x01\x00\x05\x01\x00\x09").await;
        assert!(matches!(r, Err(HandshakeError::UnsupportedAddressType(9))));
        assert_eq!(out[2..4], [5, 8]);
    }

    #[tokio::test]
    async fn socks4_and_4a() {
        let (r, _) = serve(b"\x04\x01\x00\x50\x0a\x00\x00\x01user\x00").await;
        let r = r.unwrap();
        assert_eq!(
            (r.version, r.host, r.port),
            (Version::V4, Host::Ip("10.0.0.1".parse().unwrap()), 80)
        );

        let (r, _) = serve(b"\x04\x01\x00\x50\x00\x00\x00\x01\x00db.internal\x00").await;
        assert_eq!(r.unwrap().host, Host::Name("db.internal".into()));

        let (r, out) = serve(b"\x04\x02\x00\x50\x0a\x00\x00\x01\x00").await;
        assert!(matches!(r, Err(HandshakeError::UnsupportedCommand(2))));
        assert_eq!(out, [0, 0x5b, 0, 0, 0, 0, 0, 0]);
    }

    /// A name that cannot be a host name is answered "host unreachable" (SOCKS4: rejected),
    /// and the error shows it escaped: it goes into logs and `status`.
    #[tokio::test]
    async fn names_that_are_not_host_names_are_refused_and_escaped() {
        let bad: [&[u8]; 8] = [
            b"db\ninfo: forged line",
            b"\x1b[2Jdb",
            b"db internal",
            b"caf\xc3\xa9.internal",
            b"\xff\xfe",
            b"a..b",
            b".",
            b"",
        ];
        for name in bad {
            let mut v5 = b"\x05\x01\x00\x05\x01\x00\x03".to_vec();
            v5.push(name.len() as u8);
            v5.extend_from_slice(name);
            v5.extend_from_slice(&[0, 80]);
            let (r, out) = serve(&v5).await;
            let e = r.unwrap_err();
            assert!(
                matches!(e, HandshakeError::InvalidHostName(_)),
                "{name:?}: {e}"
            );
            assert_eq!(e.reply_sent(), Some(Reply::HostUnreachable));
            assert_eq!(out[2..4], [5, 4], "{name:?}");
            let text = e.to_string();
            assert!(text.chars().all(|c| !c.is_control()), "{text:?}");

            let mut v4 = b"\x04\x01\x00\x50\x00\x00\x00\x01\x00".to_vec();
            v4.extend_from_slice(name);
            v4.push(0);
            let (r, out) = serve(&v4).await;
            if name.is_empty() {
                // 0.0.0.1 with an empty name: still a SOCKS4a request for no name.
                assert!(r.is_err());
            } else {
                assert!(
                    matches!(r, Err(HandshakeError::InvalidHostName(_))),
                    "{name:?}"
                );
            }
            assert_eq!(out, [0, 0x5b, 0, 0, 0, 0, 0, 0], "{name:?}");
        }
        let (r, _) = serve(b"\x05\x01\x00\x05\x01\x00\x03\x05a\nb\x1bc\x00\x50").await;
        assert!(r.unwrap_err().to_string().contains("a\\nb\\x1bc"));

        // Names that are host names, and addresses written as names.
        for (name, host) in [
            (
                "db-1.internal_zone.",
                Host::Name("db-1.internal_zone.".into()),
            ),
            ("10.0.0.1", Host::Ip("10.0.0.1".parse().unwrap())),
            ("fd00::1", Host::Ip("fd00::1".parse().unwrap())),
        ] {
            let mut v5 = b"\x05\x01\x00\x05\x01\x00\x03".to_vec();
            v5.push(name.len() as u8);
            v5.extend_from_slice(name.as_bytes());
            v5.extend_from_slice(&[0, 80]);
            assert_eq!(serve(&v5).await.0.unwrap().host, host, "{name}");
        }
        let long_label = "a".repeat(64);
        let mut v5 = b"\x05\x01\x00\x05\x01\x00\x03\x40".to_vec();
        v5.extend_from_slice(long_label.as_bytes());
        v5.extend_from_slice(&[0, 80]);
        assert!(serve(&v5).await.0.is_err(), "a 64-byte label");
    }

    #[tokio::test]
    async fn truncated_and_garbage_input_closes_cleanly() {
        let full = b"\x05\x01\x00\x05\x01\x00\x03\x09localhost\x1f\x90";
        for cut in 0..full.len() {
            let (r, _) = serve(&full[..cut]).await;
            assert!(r.is_err(), "accepted a request cut at {cut}");
        }
        let (r, _) = serve(b"GET / HTTP/1.1\r\n").await;
        assert!(matches!(r, Err(HandshakeError::UnknownVersion(b'G'))));
        let mut long = b"\x04\x01\x00\x50\x0a\x00\x00\x01".to_vec();
        long.extend(std::iter::repeat_n(b'a', 1000));
        let (r, _) = serve(&long).await;
        assert!(matches!(r, Err(HandshakeError::Malformed(_))));
    }

    #[tokio::test]
    async fn bytes_after_the_request_stay_in_the_stream() {
        let (mut client, mut server) = duplex(4096);
        client
            .write_all(b"\x04\x01\x00\x50\x0a\x00\x00\x01\x00hello")
            .await
            .unwrap();
        read_request(&mut server).await.unwrap();
        let mut rest = [0u8; 5];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hello");
    }

    #[tokio::test]
    async fn replies_are_well_formed() {
        let (mut a, mut b) = duplex(64);
        write_reply(
            &mut a,
            Version::V5,
            Reply::Succeeded,
            Some("127.0.0.1:4000".parse().unwrap()),
        )
        .await
        .unwrap();
        write_reply(
            &mut a,
            Version::V5,
            Reply::TtlExpired,
            Some("[::1]:1".parse().unwrap()),
        )
        .await
        .unwrap();
        write_reply(&mut a, Version::V4, Reply::Succeeded, None)
            .await
            .unwrap();
        drop(a);
        let mut out = Vec::new();
        b.read_to_end(&mut out).await.unwrap();
        let mut want = vec![5, 0, 0, 1, 127, 0, 0, 1, 0x0f, 0xa0, 5, 6, 0, 4];
        want.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        want.extend_from_slice(&[0, 1, 0, 0x5a, 0, 0, 0, 0, 0, 0]);
        assert_eq!(out, want);
    }

    /// Property: for random and truncated input the parser never panics, never reads past
    /// what a request can hold, and either returns a request or an error, having written only
    /// well-formed replies.
    #[tokio::test]
    async fn random_and_truncated_requests_get_a_well_formed_answer_or_a_clean_close() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid: [&[u8]; 3] = [
            b"\x05\x01\x00\x05\x01\x00\x03\x09localhost\x1f\x90",
            b"\x04\x01\x00\x50\x00\x00\x00\x01u\x00db\x00",
            b"\x05\x02\x00\x02\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
        ];
        for round in 0..5000 {
            let mut input: Vec<u8> = if round % 2 == 0 {
                // A valid request, truncated and with some bytes flipped.
                let v = valid[(next() % 3) as usize];
                let mut v = v[..(next() as usize % (v.len() + 1))].to_vec();
                for _ in 0..(next() % 3) {
                    if !v.is_empty() {
                        let i = next() as usize % v.len();
                        v[i] = next() as u8;
                    }
                }
                v
            } else {
                let len = next() as usize % 600;
                (0..len).map(|_| next() as u8).collect()
            };
            if round % 3 == 0 && !input.is_empty() {
                input[0] = if round % 2 == 0 { 4 } else { 5 };
            }
            let (_, out) = serve(&input).await;
            assert!(
                well_formed(&out),
                "round {round}: reply {out:?} to {input:?}"
            );
        }
    }

    /// Method selection, then at most one request reply, each in its exact wire form.
    fn well_formed(mut out: &[u8]) -> bool {
        if out.is_empty() {
            return true;
        }
        if out.len() == 8 {
            return out[0] == 0 && (out[1] == 0x5a || out[1] == 0x5b);
        }
        if out.len() < 2 || out[0] != 5 || !(out[1] == 0 || out[1] == 0xff) {
            return false;
        }
        out = &out[2..];
        match out.len() {
            0 => true,
            10 => out[0] == 5 && out[1] <= 8 && out[3] == 1,
            22 => out[0] == 5 && out[1] <= 8 && out[3] == 4,
            _ => false,
        }
    }
}
