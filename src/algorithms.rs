//! What a session negotiated (key exchange, cipher, the server's host key type and version),
//! and which key exchanges are post-quantum: for the "tunnel up" line, `status`, the metrics
//! and `doctor`, so that a security review can read from a customer's `status` whether the
//! tunnel resists "harvest now, decrypt later".

use serde::{Deserialize, Serialize};

/// Key exchanges that are post-quantum hybrids (a lattice KEM with X25519 or a NIST curve),
/// by OpenSSH's names. The agent itself offers `mlkem768x25519-sha256` (OpenSSH 9.9 and later
/// offer it; 10.0 prefers it).
pub const POST_QUANTUM_KEX: &[&str] = &[
    "mlkem768x25519-sha256",
    "mlkem768nistp256-sha256",
    "mlkem1024nistp384-sha384",
    "sntrup761x25519-sha512",
    "sntrup761x25519-sha512@openssh.com",
];

pub fn is_post_quantum(kex: &str) -> bool {
    POST_QUANTUM_KEX.contains(&kex)
}

/// The key exchanges proper of a server's offer, without the extension markers OpenSSH lists
/// among them (`ext-info-s`, `kex-strict-s-v00@openssh.com`): what an error names.
pub fn kex_offered(theirs: Vec<String>) -> Vec<String> {
    theirs
        .into_iter()
        .filter(|k| !k.starts_with("ext-info-") && !k.starts_with("kex-strict-"))
        .collect()
}

/// The algorithms of an established session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Negotiated {
    pub kex: String,
    pub cipher: String,
    /// The server's host key algorithm.
    pub host_key: String,
    /// The server's SSH version line, e.g. `SSH-2.0-OpenSSH_10.0p2 Debian-7`.
    pub server_version: String,
    pub post_quantum: bool,
}

impl Negotiated {
    /// Keep in `slot` what russh's key exchange settled: the `Handler::kex_done` of the
    /// agent's session and of `doctor`.
    pub fn record(
        slot: &std::sync::Mutex<Option<Negotiated>>,
        names: &russh::Names,
        session: &russh::client::Session,
    ) {
        let negotiated = Self::new(
            names.kex.as_ref(),
            names.cipher.as_ref(),
            names.key.as_str(),
            session.remote_sshid(),
        );
        *crate::lock(slot) = Some(negotiated);
    }

    pub fn new(kex: &str, cipher: &str, host_key: &str, server_version: &[u8]) -> Self {
        // The version line is the server's to choose: keep it printable and short.
        let server_version: String = String::from_utf8_lossy(server_version)
            .trim_end()
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .take(255)
            .collect();
        Negotiated {
            kex: kex.to_string(),
            cipher: cipher.to_string(),
            host_key: host_key.to_string(),
            server_version,
            post_quantum: is_post_quantum(kex),
        }
    }
}

impl std::fmt::Display for Negotiated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "key exchange {} ({}), cipher {}, host key {}, server {}",
            self.kex,
            if self.post_quantum {
                "post-quantum"
            } else {
                "not post-quantum"
            },
            self.cipher,
            self.host_key,
            self.server_version
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_quantum_is_read_off_the_key_exchange() {
        let pq = Negotiated::new(
            "mlkem768x25519-sha256",
            "aes256-gcm@openssh.com",
            "ssh-ed25519",
            b"SSH-2.0-OpenSSH_10.0p2 Debian-7\r\n",
        );
        assert!(pq.post_quantum);
        assert_eq!(pq.server_version, "SSH-2.0-OpenSSH_10.0p2 Debian-7");
        assert!(pq.to_string().contains("(post-quantum)"));
        let classic = Negotiated::new("curve25519-sha256", "c", "k", b"SSH-2.0-x\x1b[31m");
        assert!(!classic.post_quantum);
        assert_eq!(classic.server_version, "SSH-2.0-x?[31m");
    }
}
