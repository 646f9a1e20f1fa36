//! The client key (a file, base64, or a systemd credential), the server's pinned host keys, and
//! their fingerprints: loaded here for `run`, `check-config` and `doctor` alike. Key material
//! never appears in an error, `Debug` or `Display`.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use russh::keys::{HashAlg, PrivateKey, PublicKey};

use crate::constants::*;
use crate::rsa_sign::RsaSigner;

use super::sources::describe_io;
use super::Sources;

/// The client key as this process sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientKey {
    Loaded(SecretKey),
    /// `key_credential` seen from outside the unit that provides it (`check-config` or
    /// `doctor` from a shell): only the service can read it.
    InCredential(String),
}

impl ClientKey {
    pub fn loaded(&self) -> Option<&SecretKey> {
        match self {
            ClientKey::Loaded(k) => Some(k),
            ClientKey::InCredential(_) => None,
        }
    }

    /// The public fingerprint, or where the key is when this process cannot read it.
    pub fn fingerprint(&self) -> String {
        match self {
            ClientKey::Loaded(k) => k.fingerprint(),
            ClientKey::InCredential(name) => format!("in systemd credential \"{name}\""),
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientKey::Loaded(k) => k.fmt(f),
            ClientKey::InCredential(name) => write!(
                f,
                "from systemd credential \"{name}\", which only the service can read (not checked here; the running agent checks it on reload)"
            ),
        }
    }
}

/// The client's private key. Its `Debug` and `Display` say only what kind of key it is and its
/// public fingerprint: the private half never reaches a log, an error or a panic message.
#[derive(Clone)]
pub struct SecretKey {
    key: Arc<PrivateKey>,
    /// An RSA key's signer (rsa_sign.rs): RSA signatures are ring's, never the `rsa` crate's.
    rsa: Option<RsaSigner>,
    /// Where it came from (`key_file = ...` or `key_base64`), for messages.
    pub origin: String,
}

impl SecretKey {
    pub fn key(&self) -> Arc<PrivateKey> {
        self.key.clone()
    }

    /// For an RSA key, what signs with it.
    pub fn rsa_signer(&self) -> Option<RsaSigner> {
        self.rsa.clone()
    }

    pub fn fingerprint(&self) -> String {
        self.key
            .public_key()
            .fingerprint(HashAlg::Sha256)
            .to_string()
    }

    pub fn algorithm(&self) -> String {
        self.key.algorithm().as_str().to_string()
    }
}

impl PartialEq for SecretKey {
    fn eq(&self, other: &Self) -> bool {
        self.key.public_key() == other.key.public_key()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({self})")
    }
}

impl fmt::Display for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} key {} from {}",
            self.algorithm(),
            self.fingerprint(),
            self.origin
        )
    }
}

/// Where the documented flow keeps credential `name`, encrypted (docs/security.md, "The key encrypted at
/// rest").
pub fn credential_file(name: &str) -> PathBuf {
    Path::new(DEFAULT_CONFIG_PATH).with_file_name(format!("{name}.cred"))
}

/// The unit setting that hands the service credential `name` from [`credential_file`].
pub fn credential_unit_setting(name: &str) -> String {
    format!(
        "LoadCredentialEncrypted={name}:{}",
        credential_file(name).display()
    )
}

/// The key systemd hands the unit as credential `name` (`LoadCredentialEncrypted=` or
/// `LoadCredential=`): `$CREDENTIALS_DIRECTORY/name`, which only the service's processes see.
pub(super) fn load_key_credential(
    name: &str,
    at: &str,
    sources: &Sources,
) -> Result<ClientKey, String> {
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if !valid {
        return Err(format!(
            "{at} = \"{name}\": not a credential name (letters, digits, '-', '_', '.', '@'; e.g. \"ssh-key\")"
        ));
    }
    let remedy = || {
        let unit = match &sources.instance {
            Some(i) => format!("secoda-agent@{i}"),
            None => "secoda-agent".to_string(),
        };
        format!(
            "the unit must provide it: `systemctl edit {unit}` and add [Service] {} (made with `systemd-creds encrypt --name={name} KEYFILE {}`; docs/security.md: \"The key encrypted at rest\")",
            credential_unit_setting(name),
            credential_file(name).display()
        )
    };
    let Some(dir) = &sources.credentials else {
        if sources.key_required {
            return Err(format!(
                "{at} = \"{name}\": no systemd credentials here ($CREDENTIALS_DIRECTORY is not set): {}",
                remedy()
            ));
        }
        return Ok(ClientKey::InCredential(name.to_string()));
    };
    let path = dir.join(name);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        // systemd lets the service's main process read its credentials, not always the
        // other processes of the unit (ExecReload=check-config saw EACCES on systemd 252);
        // the main process checks the key itself when it reloads.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && !sources.key_required => {
            return Ok(ClientKey::InCredential(name.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "{at} = \"{name}\": the unit provides no credential \"{name}\" (none in $CREDENTIALS_DIRECTORY): {}",
                remedy()
            ))
        }
        Err(e) => {
            return Err(format!(
                "{at} = \"{name}\": credential {}: {}",
                path.display(),
                describe_io(&e)
            ))
        }
    };
    let mut key = decode_key(&bytes, &format!("{at} = \"{name}\" (systemd credential)"))?;
    key.origin = format!("systemd credential \"{name}\"");
    Ok(ClientKey::Loaded(key))
}

pub(super) fn load_key_file(path: &Path, at: &str) -> Result<SecretKey, String> {
    let shown = path.display();
    let meta =
        fs::metadata(path).map_err(|e| format!("{at} = \"{shown}\": {}", describe_io(&e)))?;
    if meta.is_dir() {
        return Err(format!(
            "{at} = \"{shown}\": is a directory, expected a private key file"
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{at} = \"{shown}\": permissions {mode:04o} are too open: a private key must be readable by its owner only (chmod 600 \"{shown}\"; chown secoda-agent \"{shown}\")"
        ));
    }
    if meta.len() > MAX_CONFIG_FILE_SIZE {
        return Err(format!("{at} = \"{shown}\": too large to be a private key"));
    }
    let bytes = fs::read(path).map_err(|e| format!("{at} = \"{shown}\": {}", describe_io(&e)))?;
    decode_key(&bytes, &format!("{at} = \"{shown}\""))
}

pub(super) fn load_key_base64(b64: &str, at: &str) -> Result<SecretKey, String> {
    let compact: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| {
            // The decoder's message names only a position and a character class, never content.
            let why = match e {
                base64::DecodeError::InvalidByte(pos, _) => {
                    format!("invalid character at position {pos}")
                }
                base64::DecodeError::InvalidLength(_) => "the length is not valid base64".into(),
                base64::DecodeError::InvalidLastSymbol(pos, _) => {
                    format!("invalid last symbol at position {pos}")
                }
                base64::DecodeError::InvalidPadding => "invalid padding".into(),
            };
            format!("{at}: not valid base64 ({why}); it must be the base64 of the whole private key file (base64 -w0 id_ed25519)")
        })?;
    decode_key(&bytes, at)
}

fn decode_key(bytes: &[u8], at: &str) -> Result<SecretKey, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| {
        format!(
            "{at}: not a text private key file (expected \"-----BEGIN OPENSSH PRIVATE KEY-----\")"
        )
    })?;
    if !text.contains("-----BEGIN ") {
        if text.trim_start().starts_with("ssh-") || text.trim_start().starts_with("ecdsa-") {
            return Err(format!(
                "{at}: this is a public key; the agent needs the private key file (the one without .pub)"
            ));
        }
        return Err(format!(
            "{at}: not a private key file (expected \"-----BEGIN OPENSSH PRIVATE KEY-----\")"
        ));
    }
    let key = russh::keys::decode_secret_key(text, None).map_err(|e| match e {
        russh::keys::Error::KeyIsEncrypted => format!(
            "{at}: the private key is encrypted with a passphrase; the agent runs unattended, so remove it (ssh-keygen -p -N '' -f KEYFILE) or generate a key without one"
        ),
        russh::keys::Error::UnsupportedKeyType { key_type_string, .. } => {
            format!("{at}: unsupported key type {key_type_string} (use ed25519, ECDSA or RSA)")
        }
        _ => format!(
            "{at}: the private key could not be parsed (expected an OpenSSH, PEM or PKCS#8 ed25519, ECDSA or RSA key)"
        ),
    })?;
    let rsa = match key.key_data().rsa() {
        Some(pair) => Some(RsaSigner::new(pair).map_err(|e| format!("{at}: {e}"))?),
        None => None,
    };
    Ok(SecretKey {
        key: Arc::new(key),
        rsa,
        origin: at.to_string(),
    })
}

/// Accepts `TYPE BASE64 [comment]` and known_hosts lines (`HOST TYPE BASE64`).
pub(super) fn parse_host_keys(
    lines: &[String],
    at: &str,
    errors: &mut Vec<String>,
) -> Vec<PublicKey> {
    let mut keys = Vec::new();
    for line in lines {
        let line = line.trim();
        let fields: Vec<&str> = line.split_whitespace().collect();
        // known_hosts markers: a revoked key must never become the pin, and a CA key is not
        // the server's own key (certificates are pinned by their own key).
        if let Some(marker) = fields.first().filter(|f| f.starts_with('@')) {
            errors.push(format!(
                "{at}: \"{line}\" starts with {marker}: a pin is the server's own key; remove the line (a @revoked key is never trusted)"
            ));
            continue;
        }
        let start = fields
            .iter()
            .position(|f| f.starts_with("ssh-") || f.starts_with("ecdsa-") || f.starts_with("sk-"));
        let parsed = start.and_then(|i| {
            let candidate = fields[i..].join(" ");
            PublicKey::from_openssh(&candidate).ok()
        });
        match parsed {
            Some(k) => keys.push(k),
            None => errors.push(format!(
                "{at}: \"{line}\" is not an OpenSSH public key line (expected e.g. \"ssh-ed25519 AAAA...\")"
            )),
        }
    }
    keys
}

/// `ALGORITHM SHA256:...`, as OpenSSH prints a key's fingerprint.
pub fn fingerprint(key: &PublicKey) -> String {
    format!(
        "{} {}",
        key.algorithm().as_str(),
        key.fingerprint(HashAlg::Sha256)
    )
}
