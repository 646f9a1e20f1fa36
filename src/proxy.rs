//! The tunnel's way out through a forward proxy: HTTP CONNECT (with basic authentication when
//! the URL carries credentials) or SOCKS5 (RFC 1928; username/password, RFC 1929). The proxy
//! resolves the tunnel server's name (as curl's `socks5h://` does): on a host that may only
//! talk to its proxy, local DNS often cannot resolve outside names at all.
//!
//! Once the proxy has connected us, the stream is the SSH connection: the session's keepalive,
//! host-key pin and dead-peer detection run inside it unchanged. TLS to the proxy (`https://`)
//! is refused at load: the SSH session inside is already encrypted and authenticated end to
//! end, and a TLS stack would be the agent's largest dependency for a rare setup.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::connect;
use crate::constants::{CONNECT_STAGGER, PROXY_MAX_RESPONSE_HEAD};
use crate::error::TunnelError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Socks5,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Socks5 => "socks5",
        }
    }
}

/// `[tunnel] proxy` / `SSH_PROXY`, parsed. Shown (Display and Debug alike) with the password
/// masked.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    credentials: Option<(String, String)>,
}

impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme.as_str())?;
        if let Some((user, _)) = &self.credentials {
            write!(f, "{user}:****@")?;
        }
        write!(f, "{}", host_port(&self.host, self.port))
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proxy({self})")
    }
}

/// `host:port`, with an IPv6 literal in brackets.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The URL with any user and password replaced, for messages about a value that did not parse.
/// Everything before the last `@` of the whole URL goes: a value that did not parse may hold a
/// password with an unescaped `/`, `?` or `#`, so where its authority ends cannot be trusted
/// (at worst a path's `@` hides the host too).
pub fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    match rest.rfind('@') {
        Some(at) if scheme.is_empty() => format!("****@{}", &rest[at + 1..]),
        Some(at) => format!("{scheme}://****@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

impl Proxy {
    /// Parse `scheme://[user[:password]@]host:port[/]`. Errors never contain the password.
    pub fn parse(url: &str) -> Result<Proxy, String> {
        const FORM: &str =
            "expected http://[user:password@]host:port or socks5://[user:password@]host:port";
        let shown = redact(url);
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(format!("\"{shown}\" is not a proxy URL: {FORM}"));
        };
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "socks5" | "socks5h" => Scheme::Socks5,
            "https" => return Err(format!(
                "\"{shown}\": TLS to the proxy (https://) is not supported; use http:// (the SSH session inside is encrypted end to end either way)"
            )),
            "socks4" | "socks4a" => return Err(format!(
                "\"{shown}\": SOCKS4 proxies are not supported; use socks5:// or http://"
            )),
            _ => return Err(format!("\"{shown}\": unknown proxy scheme \"{scheme}\": {FORM}")),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(format!(
                "\"{shown}\": a proxy URL has no path or query: {FORM}"
            ));
        }
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let credentials = match userinfo {
            None => None,
            Some(u) => {
                let (user, password) = u.split_once(':').unwrap_or((u, ""));
                let user = percent_decode(user).ok_or_else(|| {
                    format!("\"{shown}\": the user name is not valid percent-encoded UTF-8")
                })?;
                let password = percent_decode(password)
                    .ok_or_else(|| format!("\"{shown}\": the password is not valid percent-encoded UTF-8 (write @ as %40, : as %3A, % as %25)"))?;
                if user.is_empty() {
                    return Err(format!("\"{shown}\": the user name is empty"));
                }
                Some((user, password))
            }
        };
        let (host, port) = match hostport.strip_prefix('[') {
            Some(v6) => match v6.split_once("]:") {
                Some((h, p)) if h.parse::<std::net::Ipv6Addr>().is_ok() => (h, p),
                _ => return Err(format!("\"{shown}\": a bracketed host must be an IPv6 address followed by :port")),
            },
            None => match hostport.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && !h.contains(':') => (h, p),
                _ => return Err(format!(
                    "\"{shown}\": the proxy's port is missing (proxies have no default port here: write it, e.g. :3128 or :1080)"
                )),
            },
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(format!(
                    "\"{shown}\": \"{port}\" is not a port (1 to 65535)"
                ))
            }
        };
        if socks5_too_long(scheme, credentials.as_ref()) {
            return Err(format!(
                "\"{shown}\": SOCKS5 user names and passwords are at most 255 bytes each"
            ));
        }
        Ok(Proxy {
            scheme,
            host: host.to_string(),
            port,
            credentials,
        })
    }

    /// Whether the URL carries a password, so the file holding it must be private.
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// What `status` and the metrics show: no user, no password.
    pub fn endpoint(&self) -> String {
        format!(
            "{}://{}",
            self.scheme.as_str(),
            host_port(&self.host, self.port)
        )
    }
}

fn socks5_too_long(scheme: Scheme, credentials: Option<&(String, String)>) -> bool {
    scheme == Scheme::Socks5 && credentials.is_some_and(|(u, p)| u.len() > 255 || p.len() > 255)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Resolve the proxy's name and connect to it (its addresses race, see connect.rs). The caller
/// bounds the time.
pub async fn reach(proxy: &Proxy) -> Result<(TcpStream, SocketAddr), TunnelError> {
    let unreachable = |reason: String| TunnelError::ProxyUnreachable {
        proxy: proxy.to_string(),
        reason,
    };
    // The caller's timeout bounds the lookup too.
    let addrs = connect::resolve_unbounded(&proxy.host, proxy.port)
        .await
        .map_err(|e| unreachable(format!("cannot resolve {}: {e}", proxy.host)))?;
    match connect::first_of(&addrs, CONNECT_STAGGER).await {
        Ok(found) => Ok(found),
        Err(errors) => Err(unreachable(match errors.last() {
            Some((addr, e)) => format!("{addr}: {e}"),
            None => format!("{} has no addresses", proxy.host),
        })),
    }
}

/// Ask the proxy for a connection to `host:port`; on success the stream carries the SSH
/// connection from its first byte. The caller bounds the time.
pub async fn handshake(
    stream: &mut TcpStream,
    proxy: &Proxy,
    host: &str,
    port: u16,
) -> Result<(), TunnelError> {
    match proxy.scheme {
        Scheme::Http => http_connect(stream, proxy, host, port).await,
        Scheme::Socks5 => socks5_connect(stream, proxy, host, port).await,
    }
}

fn lost_proxy(proxy: &Proxy, expected: &'static str, e: std::io::Error) -> TunnelError {
    let detail = match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "it closed the connection without answering".into(),
        _ => e.to_string(),
    };
    TunnelError::ProxyProtocol {
        proxy: proxy.to_string(),
        expected,
        detail,
    }
}

async fn http_connect(
    stream: &mut TcpStream,
    proxy: &Proxy,
    host: &str,
    port: u16,
) -> Result<(), TunnelError> {
    let target = host_port(host, port);
    let mut request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: secoda-agent/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some((user, password)) = &proxy.credentials {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        request += &format!("Proxy-Authorization: Basic {token}\r\n");
    }
    request += "\r\n";
    let lost = |e| lost_proxy(proxy, "an HTTP", e);
    stream.write_all(request.as_bytes()).await.map_err(lost)?;
    // Byte by byte up to the blank line: what follows is the server's SSH banner, which must
    // stay in the socket for the SSH session. A response head is a few hundred bytes, once per
    // connection.
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= PROXY_MAX_RESPONSE_HEAD {
            return Err(not_http(proxy, &head));
        }
        match stream.read(&mut byte).await {
            Ok(0) if head.is_empty() => return Err(lost(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(0) => return Err(not_http(proxy, &head)),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(lost(e)),
        }
        // Something that is not HTTP shows itself in its first bytes (an SSH banner, TLS).
        if head.len() == 5 && &head[..] != b"HTTP/" {
            return Err(not_http(proxy, &head));
        }
    }
    let status_line = String::from_utf8_lossy(head.split(|&b| b == b'\n').next().unwrap_or(&[]))
        .trim_end()
        .to_string();
    let code = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| not_http(proxy, &head))?;
    match code {
        200..=299 => Ok(()),
        407 => Err(TunnelError::ProxyAuth {
            proxy: proxy.to_string(),
            detail: if proxy.credentials.is_some() {
                format!("it answered \"{status_line}\": the user or password is wrong")
            } else {
                format!("it answered \"{status_line}\": it requires a user and password (http://USER:PASSWORD@host:port)")
            },
        }),
        _ => Err(TunnelError::ProxyRefused {
            proxy: proxy.to_string(),
            target,
            reason: format!("it answered \"{status_line}\""),
        }),
    }
}

fn not_http(proxy: &Proxy, head: &[u8]) -> TunnelError {
    let start: String = head
        .iter()
        .take(40)
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    let hint = if head.starts_with(b"SSH-") {
        " (that is an SSH server, not a proxy)"
    } else {
        ""
    };
    TunnelError::ProxyProtocol {
        proxy: proxy.to_string(),
        expected: "an HTTP",
        detail: format!("it began with \"{start}\"{hint}"),
    }
}

async fn socks5_connect(
    stream: &mut TcpStream,
    proxy: &Proxy,
    host: &str,
    port: u16,
) -> Result<(), TunnelError> {
    let lost = |e| lost_proxy(proxy, "a SOCKS5", e);
    let not_socks = |what: String| TunnelError::ProxyProtocol {
        proxy: proxy.to_string(),
        expected: "a SOCKS5",
        detail: what,
    };
    let auth = |detail: String| TunnelError::ProxyAuth {
        proxy: proxy.to_string(),
        detail,
    };
    let greeting: &[u8] = match proxy.credentials {
        Some(_) => &[5, 2, 0x00, 0x02],
        None => &[5, 1, 0x00],
    };
    stream.write_all(greeting).await.map_err(lost)?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await.map_err(lost)?;
    if choice[0] != 5 {
        return Err(not_socks(format!(
            "its first bytes were {:?}, not a SOCKS5 method choice",
            String::from_utf8_lossy(&choice)
        )));
    }
    match (choice[1], &proxy.credentials) {
        (0x00, _) => {}
        (0x02, Some((user, password))) => {
            let mut msg = vec![1, user.len() as u8];
            msg.extend_from_slice(user.as_bytes());
            msg.push(password.len() as u8);
            msg.extend_from_slice(password.as_bytes());
            stream.write_all(&msg).await.map_err(lost)?;
            let mut verdict = [0u8; 2];
            stream.read_exact(&mut verdict).await.map_err(lost)?;
            if verdict[1] != 0 {
                return Err(auth(
                    "it rejected the user name or password (RFC 1929)".into(),
                ));
            }
        }
        (0xFF, None) => {
            return Err(auth(
                "it accepts none of the offered methods: it requires a user and password (socks5://USER:PASSWORD@host:port)".into(),
            ))
        }
        (0xFF, Some(_)) => {
            return Err(auth(
                "it accepts neither no authentication nor a user and password (GSSAPI only?)"
                    .into(),
            ))
        }
        (m, _) => return Err(not_socks(format!("it chose method {m}, which was not offered"))),
    }
    let mut request = vec![5, 1, 0];
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => {
            request.push(1);
            request.extend_from_slice(&a.octets());
        }
        Ok(IpAddr::V6(a)) => {
            request.push(4);
            request.extend_from_slice(&a.octets());
        }
        Err(_) => {
            // The proxy resolves the name (socks5h); config limits host names to 255 bytes.
            request.push(3);
            request.push(host.len().min(255) as u8);
            request.extend_from_slice(&host.as_bytes()[..host.len().min(255)]);
        }
    }
    request.extend_from_slice(&port.to_be_bytes());
    stream.write_all(&request).await.map_err(lost)?;
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply).await.map_err(lost)?;
    if reply[0] != 5 {
        return Err(not_socks(format!(
            "its reply began with byte {}, not 5",
            reply[0]
        )));
    }
    if reply[1] != 0 {
        return Err(TunnelError::ProxyRefused {
            proxy: proxy.to_string(),
            target: host_port(host, port),
            reason: format!(
                "SOCKS5 reply {} ({})",
                reply[1],
                socks5_reply_meaning(reply[1])
            ),
        });
    }
    // The bound address, which we do not need, then the stream is the server's.
    let rest = match reply[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            stream.read_exact(&mut len).await.map_err(lost)?;
            usize::from(len[0]) + 2
        }
        t => return Err(not_socks(format!("its reply has address type {t}"))),
    };
    let mut bound = vec![0u8; rest];
    stream.read_exact(&mut bound).await.map_err(lost)?;
    Ok(())
}

fn socks5_reply_meaning(code: u8) -> &'static str {
    match code {
        1 => "general failure",
        2 => "not allowed by the proxy's rules",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused by the server",
        6 => "TTL expired",
        7 => "command not supported",
        8 => "address type not supported",
        _ => "unassigned code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let p = Proxy::parse("http://squid.corp:3128").unwrap();
        assert_eq!(
            (p.scheme, p.host.as_str(), p.port),
            (Scheme::Http, "squid.corp", 3128)
        );
        assert!(!p.has_credentials());
        assert_eq!(p.to_string(), "http://squid.corp:3128");

        let p = Proxy::parse("socks5h://a%40b:p%3Ass%25w@[fd00::1]:1080/").unwrap();
        assert_eq!(
            (p.scheme, p.host.as_str(), p.port),
            (Scheme::Socks5, "fd00::1", 1080)
        );
        assert_eq!(p.credentials, Some(("a@b".into(), "p:ss%w".into())));
        assert_eq!(p.to_string(), "socks5://a@b:****@[fd00::1]:1080");
        assert_eq!(format!("{p:?}"), "Proxy(socks5://a@b:****@[fd00::1]:1080)");
        assert_eq!(p.endpoint(), "socks5://[fd00::1]:1080");

        // A password with an @ in it, unencoded: the last @ ends the user info.
        let p = Proxy::parse("http://u:p@ss@proxy:8080").unwrap();
        assert_eq!(p.credentials, Some(("u".into(), "p@ss".into())));
    }

    #[test]
    fn bad_urls_say_why_and_never_show_the_password() {
        for (url, says) in [
            ("https://u:hunter2@proxy:443", "(https://) is not supported"),
            ("socks4://u:hunter2@proxy:1080", "SOCKS4"),
            ("ftp://u:hunter2@proxy:21", "unknown proxy scheme"),
            ("proxy:3128", "not a proxy URL"),
            ("u:hunter2@proxy:3128", "not a proxy URL"),
            ("http://u:hunter2@proxy", "port is missing"),
            ("http://u:hunter2@proxy:0", "is not a port"),
            ("http://u:hunter2@proxy:3128/path", "no path"),
            ("http://u:hunter2%zz@proxy:3128", "percent-encoded"),
            ("http://:hunter2@proxy:3128", "user name is empty"),
            // Characters that end an authority in a well-formed URL, inside the password: the
            // URL is malformed, and its message must still mask all of it before the last @.
            ("http://u:hun/ter2@proxy:3128", "no path"),
            ("http://u:hun?ter2@proxy:3128", "no path"),
            ("http://u:hun#ter2@proxy:3128", "no path"),
            ("http://u:hunter2/@proxy", "no path"),
            ("ftp://u:hun/ter2@proxy:21", "unknown proxy scheme"),
        ] {
            let e = Proxy::parse(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("hunter2") && !e.contains("hun"), "{url}: {e}");
        }
    }
}
