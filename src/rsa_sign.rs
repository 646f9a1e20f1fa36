//! RSA signatures for the client key through ring, not through the `rsa` crate.
//!
//! russh signs an RSA key with the `rsa` crate, whose private-key operation is not constant
//! time (RUSTSEC-2023-0071, the Marvin attack: the key can be recovered from the timing of
//! enough operations; no fixed release). Secoda hands out RSA keys, and the agent signs with
//! its key at every connect. ring's RSA signing (BoringSSL's constant-time Montgomery
//! arithmetic, with blinding) does the same job, and ring is already in the build for the
//! ciphers. So an RSA key is converted once when it is loaded (PKCS#1 DER through the `rsa`
//! crate, which computes the CRT exponents: a single local operation, never repeated, never
//! timed by anyone) and every signature is ring's; the `rsa` crate then only parses the key.
//! ring signs keys of 2048 to 4096 bits whose public exponent is at least 65537 (what
//! `ssh-keygen -t rsa` makes); any other RSA key is refused when loaded, with the way out.

use std::sync::Arc;

use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256, RSA_PKCS1_SHA512};
use rsa::pkcs1::EncodeRsaPrivateKey;
use russh::keys::ssh_key::private::RsaKeypair;
use russh::keys::HashAlg;

/// The modulus sizes ring signs with.
const RSA_BITS_MIN: usize = 2048;
const RSA_BITS_MAX: usize = 4096;

/// A loaded RSA key, ready to sign through ring. Its `Debug` shows the modulus size only.
#[derive(Clone)]
pub struct RsaSigner {
    pair: Arc<RsaKeyPair>,
    /// The modulus's exact size (ring's `modulus_len` counts whole bytes).
    bits: usize,
}

impl std::fmt::Debug for RsaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RsaSigner({} bits)", self.bits())
    }
}

impl RsaSigner {
    /// The key as ring takes it; the error says why ring refuses it (in words for the user:
    /// no key material).
    pub fn new(key: &RsaKeypair) -> Result<RsaSigner, String> {
        let bits = key.public().n().as_positive_bytes().map_or(0, |n| {
            let lead = n.first().map_or(8, |b| b.leading_zeros() as usize);
            n.len() * 8 - lead
        });
        const WAY_OUT: &str = "the agent signs RSA with constant-time code (ring) that takes keys of 2048 to 4096 bits with a public exponent of at least 65537: generate a new key with ssh-keygen -t ed25519 (or -t rsa -b 4096) and have Secoda authorize it";
        if !(RSA_BITS_MIN..=RSA_BITS_MAX).contains(&bits) {
            return Err(format!("an RSA key of {bits} bits; {WAY_OUT}"));
        }
        // ring takes an exponent of at least 65537 and at most 33 bits.
        let e = key.public().e().as_positive_bytes().unwrap_or_default();
        let e_bits = e.len() * 8 - e.first().map_or(8, |b| b.leading_zeros() as usize);
        if e_bits > 33 {
            return Err(format!(
                "an RSA key whose public exponent is {e_bits} bits long; {WAY_OUT}"
            ));
        }
        let e_value = e.iter().fold(0u64, |v, &b| v << 8 | u64::from(b));
        if e_value < 65537 {
            return Err(format!(
                "an RSA key whose public exponent is {e_value}; {WAY_OUT}"
            ));
        }
        let der = rsa::RsaPrivateKey::try_from(key)
            .ok()
            .and_then(|k| k.to_pkcs1_der().ok())
            .ok_or_else(|| "an RSA key whose numbers do not form a valid key".to_string())?;
        let pair = RsaKeyPair::from_der(der.as_bytes())
            .map_err(|e| format!("an RSA key that ring refuses ({e})"))?;
        Ok(RsaSigner {
            pair: Arc::new(pair),
            bits,
        })
    }

    pub fn bits(&self) -> usize {
        self.bits
    }

    /// `data` followed by its signature in SSH's encoding (RFC 4253 section 6.6, RFC 8332):
    /// string(string(algorithm) || string(signature)). `Sha256` signs as rsa-sha2-256, any
    /// other choice as rsa-sha2-512 (the agent never offers SHA-1).
    pub fn sign_appended(
        &self,
        hash: Option<HashAlg>,
        mut data: Vec<u8>,
    ) -> Result<Vec<u8>, SignError> {
        let (encoding, name) = match hash {
            Some(HashAlg::Sha256) => (&RSA_PKCS1_SHA256, "rsa-sha2-256"),
            _ => (&RSA_PKCS1_SHA512, "rsa-sha2-512"),
        };
        let mut sig = vec![0u8; self.pair.public().modulus_len()];
        self.pair
            .sign(encoding, &SystemRandom::new(), &data, &mut sig)
            .map_err(|_| SignError::Ring)?;
        let string = |out: &mut Vec<u8>, s: &[u8]| {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s);
        };
        let mut blob = Vec::with_capacity(8 + name.len() + sig.len());
        string(&mut blob, name.as_bytes());
        string(&mut blob, &sig);
        string(&mut data, &blob);
        Ok(data)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("the SSH session ended while signing")]
    Send(#[from] russh::SendError),
    #[error("ring could not sign with the RSA key")]
    Ring,
}

impl russh::Signer for RsaSigner {
    type Error = SignError;

    #[allow(clippy::manual_async_fn)]
    fn auth_sign(
        &mut self,
        _key: &russh::keys::agent::AgentIdentity,
        hash_alg: Option<HashAlg>,
        to_sign: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, Self::Error>> + Send {
        async move { self.sign_appended(hash_alg, to_sign) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::signature::Verifier;
    use russh::keys::ssh_key::Signature;
    use russh::keys::PrivateKey;

    /// A fresh RSA key from OpenSSH's own ssh-keygen (what a customer has).
    fn rsa_key(bits: u32) -> PrivateKey {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id_rsa");
        let ok = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "rsa", "-b", &bits.to_string(), "-N", "", "-f"])
            .arg(&path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "ssh-keygen failed");
        PrivateKey::read_openssh_file(&path).unwrap()
    }

    /// What ring signs, the public key verifies (through ssh-key and the `rsa` crate), for
    /// both hashes: the conversion kept the key, and the encoding is SSH's.
    #[test]
    fn ring_signs_what_the_public_key_verifies() {
        let key = rsa_key(3072);
        let signer = RsaSigner::new(key.key_data().rsa().unwrap()).unwrap();
        assert_eq!(signer.bits(), 3072);
        assert_eq!(format!("{signer:?}"), "RsaSigner(3072 bits)");
        for (hash, name) in [
            (Some(HashAlg::Sha256), "rsa-sha2-256"),
            (Some(HashAlg::Sha512), "rsa-sha2-512"),
        ] {
            let data = b"session id and userauth request".to_vec();
            let out = signer.sign_appended(hash, data.clone()).unwrap();
            assert_eq!(&out[..data.len()], &data[..]);
            let len = u32::from_be_bytes(out[data.len()..data.len() + 4].try_into().unwrap());
            let blob = &out[data.len() + 4..];
            assert_eq!(len as usize, blob.len());
            let sig = Signature::try_from(blob).unwrap();
            assert_eq!(sig.algorithm().as_str(), name);
            Verifier::verify(key.public_key().key_data(), &data, &sig).unwrap();
            let mut other = data.clone();
            other[0] ^= 1;
            assert!(Verifier::verify(key.public_key().key_data(), &other, &sig).is_err());
        }
    }

    #[test]
    fn a_key_under_2048_bits_is_refused_with_its_size() {
        let key = rsa_key(1024);
        let err = RsaSigner::new(key.key_data().rsa().unwrap()).unwrap_err();
        assert!(err.contains("1024 bits"), "{err}");
    }
}
