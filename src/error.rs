//! Why a session could not be set up or was lost: one variant per case an operator acts on
//! differently, each message saying what to check. None of these is fatal: the supervisor
//! retries them all.

use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot resolve the tunnel server name {host}: {reason} (check DNS on this host and [tunnel] host)")]
    Resolve { host: String, reason: String },

    #[error("outbound connection to {server} timed out: an outbound firewall may block it; Secoda can move the tunnel to an allow-listed port")]
    ConnectTimeout { server: String },

    /// `via` is " (ADDRESS)" when the server was named by a host name, else empty.
    #[error("outbound connection to {server}{via} failed: {reason} (is the port right, and is outbound traffic to it allowed?)")]
    Connect {
        server: String,
        via: String,
        reason: String,
    },

    #[error("connected to {server} but no SSH version line arrived: outbound traffic is probably intercepted or blocked by a firewall or proxy (Secoda's troubleshooting calls this \"stuck on the version number\")")]
    BannerTimeout { server: String },

    #[error("SSH handshake with {server} failed: {reason}")]
    Handshake { server: String, reason: String },

    #[error("HOST KEY MISMATCH for {server}: expected {}, the server presented {presented}. This may be a man-in-the-middle attack, or a wrong pin in [tunnel] host_keys / SSH_HOST_KEY; the agent will not connect until they match (retrying at the backoff ceiling)", .expected.join(" or "))]
    HostKeyMismatch {
        server: String,
        expected: Vec<String>,
        presented: String,
    },

    #[error("authentication rejected for user {user} with key {fingerprint}: check that this is the key Secoda issued for this tunnel and the user is right ([tunnel] user / SSH_USER)")]
    AuthRejected { user: String, fingerprint: String },

    #[error("the server stopped answering keepalives for {window:?}; the connection is dead")]
    KeepaliveTimeout { window: Duration },

    #[error("the SSH session stopped responding for {window:?}; tearing it down")]
    Wedged { window: Duration },

    #[error("the server {server} offers no post-quantum key exchange and [tunnel] require_post_quantum is set: refused before authentication (the server offers: {}); OpenSSH 9.9 and later offer mlkem768x25519-sha256: ask Secoda, or remove require_post_quantum", .offered.join(", "))]
    NotPostQuantum {
        server: String,
        offered: Vec<String>,
    },

    /// Only for a host that is not one of a pair (`[tunnel] pair`); a pair's host stands by.
    #[error("the server {server} refused to listen on {listen}: the port is held by another session (a tunnel on another host, an old Docker container, or a session the server has not timed out yet), or this account may not forward it (sshd's PermitListen or AllowTcpForwarding, a mistyped [tunnel] listen_port, a port taken by another process on the server); if another host runs this tunnel on purpose, set [tunnel] pair = true on both")]
    ForwardRefused { server: String, listen: String },

    #[error("the SSH session was lost: {reason}")]
    Lost { reason: String },

    #[error("cannot reach the proxy {proxy}: {reason} (check [tunnel] proxy / SSH_PROXY, and that this host may connect to the proxy)")]
    ProxyUnreachable { proxy: String, reason: String },

    #[error("the proxy {proxy} did not connect us to the tunnel server within {timeout:?} (is it overloaded, or is the address a black hole?)")]
    ProxyTimeout { proxy: String, timeout: Duration },

    #[error("the proxy {proxy} refused authentication: {detail}; check the user and password in [tunnel] proxy / SSH_PROXY (percent-encode @ : % as %40 %3A %25)")]
    ProxyAuth { proxy: String, detail: String },

    #[error("the proxy {proxy} refused to connect to {target}: {reason}; ask the proxy's administrators to allow CONNECT to {target}, or ask Secoda for a tunnel on port 443")]
    ProxyRefused {
        proxy: String,
        target: String,
        reason: String,
    },

    #[error("the proxy {proxy} did not answer as {expected} proxy: {detail} (check the scheme, host and port in [tunnel] proxy / SSH_PROXY)")]
    ProxyProtocol {
        proxy: String,
        expected: &'static str,
        detail: String,
    },
}

impl TunnelError {
    /// A short stable name for logs and the journal's ERROR_CLASS field.
    pub fn class(&self) -> &'static str {
        match self {
            TunnelError::Resolve { .. } => "resolve",
            TunnelError::ConnectTimeout { .. } => "connect_timeout",
            TunnelError::Connect { .. } => "connect",
            TunnelError::BannerTimeout { .. } => "banner_timeout",
            TunnelError::Handshake { .. } => "handshake",
            TunnelError::HostKeyMismatch { .. } => "host_key_mismatch",
            TunnelError::AuthRejected { .. } => "auth_rejected",
            TunnelError::KeepaliveTimeout { .. } => "keepalive_timeout",
            TunnelError::Wedged { .. } => "wedged",
            TunnelError::ForwardRefused { .. } => "forward_refused",
            TunnelError::NotPostQuantum { .. } => "not_post_quantum",
            TunnelError::Lost { .. } => "lost",
            TunnelError::ProxyUnreachable { .. } => "proxy_unreachable",
            TunnelError::ProxyTimeout { .. } => "proxy_timeout",
            TunnelError::ProxyAuth { .. } => "proxy_auth",
            TunnelError::ProxyRefused { .. } => "proxy_refused",
            TunnelError::ProxyProtocol { .. } => "proxy_protocol",
        }
    }
}
