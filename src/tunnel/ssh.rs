//! The SSH client settings of a session: keepalive, window, packet size, rekeying, and the
//! cipher preference, which follows whether this CPU does AES in hardware.

use russh::client::{self};
use russh::{cipher, kex, Preferred};

use crate::config::TunnelConfig;
use crate::constants::*;

/// Our cipher preference (the client's order decides). With AES in hardware (AES-NI and
/// carry-less multiply, or the ARMv8 crypto extensions) AES-GCM comes first: sshd encrypts it
/// about twice as fast as chacha20-poly1305, and sshd sets the pace of a bulk transfer.
/// Without it, software AES is the slow one, so chacha20-poly1305 comes first. OpenSSH's
/// client prefers chacha20-poly1305 by default.
pub fn cipher_preference(aes_in_hardware: bool) -> &'static [cipher::Name] {
    if aes_in_hardware {
        &[
            cipher::AES_256_GCM,
            cipher::AES_128_GCM,
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_CTR,
            cipher::AES_128_CTR,
        ]
    } else {
        &[
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_GCM,
            cipher::AES_128_GCM,
            cipher::AES_256_CTR,
            cipher::AES_128_CTR,
        ]
    }
}

/// Whether this CPU does AES-GCM in hardware (see [`cipher_preference`]).
pub fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// With `[tunnel] require_post_quantum`: the only key exchange offered (russh has no
/// sntrup761), with the extension markers russh offers by default (RFC 8308's ext-info and
/// OpenSSH's strict key exchange, the Terrapin fix).
const POST_QUANTUM_ONLY: &[kex::Name] = &[
    kex::MLKEM768X25519_SHA256,
    kex::EXTENSION_SUPPORT_AS_CLIENT,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
];

pub fn ssh_config(t: &TunnelConfig) -> client::Config {
    client::Config {
        // russh's own keepalive: ping when the server has been quiet for keepalive_interval.
        // russh gives up when the timer fires with more than `keepalive_max` pings unanswered,
        // i.e. after interval x (max + 1); we promise interval x max, so pass max - 1 (russh
        // reads 0 as "never", hence at least 1).
        keepalive_interval: Some(t.keepalive_interval),
        keepalive_max: (t.keepalive_max as usize).saturating_sub(1).max(1),
        window_size: SSH_WINDOW_SIZE,
        // Windows re-open as targets take the data (channel/window.rs, vendor/russh.patch).
        manual_window_adjust: true,
        maximum_packet_size: SSH_MAX_PACKET_SIZE,
        nodelay: true,
        // russh's queue from channel writers to the session (in packets); see Backlog.
        channel_buffer_size: SSH_SESSION_QUEUE,
        limits: russh::Limits {
            rekey_write_limit: REKEY_AFTER_BYTES,
            rekey_read_limit: REKEY_AFTER_BYTES,
            rekey_time_limit: REKEY_AFTER_TIME,
        },
        preferred: Preferred {
            cipher: std::borrow::Cow::Borrowed(cipher_preference(aes_in_hardware())),
            kex: if t.require_post_quantum {
                std::borrow::Cow::Borrowed(POST_QUANTUM_ONLY)
            } else {
                Preferred::default().kex
            },
            ..Preferred::default()
        },
        ..client::Config::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cipher_order_depends_on_aes_hardware_and_offers_the_same_set() {
        let hw = cipher_preference(true);
        let soft = cipher_preference(false);
        assert_eq!(hw[0], cipher::AES_256_GCM);
        assert_eq!(soft[0], cipher::CHACHA20_POLY1305);
        let names = |l: &[cipher::Name]| {
            let mut v: Vec<String> = l.iter().map(|n| n.as_ref().to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(names(hw), names(soft));
    }
}
