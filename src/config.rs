//! Configuration: `agent.toml`, the Docker-compatible `agent.env`, and the process environment,
//! merged, validated and turned into ready-to-use values (parsed keys, durations, sizes).
//!
//! Precedence, highest first: process environment (`SSH_*`), the env file, `agent.toml`,
//! built-in defaults. Either file alone can be a complete configuration.
//!
//! Every problem is collected (not just the first) and names the file and key at fault.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use serde::Deserialize;

use crate::constants::*;
use crate::policy::Policy;
use crate::proxy::{self, Proxy};

/// The names the Docker image reads, in the order they are documented.
pub const ENV_KEYS: &[&str] = &[
    "SSH_HOST",
    "SSH_PORT",
    "SSH_HOST_PORT",
    "SSH_LISTEN_PORT",
    "SSH_KEY_BASE64",
    "SSH_KEY_CREDENTIAL",
    "SSH_USER",
    "SSH_HOST_KEY",
    "SSH_PROXY",
];

/// Where the configuration comes from. `None` paths mean "the default, if it exists".
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub config: Option<PathBuf>,
    pub env_file: Option<PathBuf>,
    /// The process environment's `SSH_*` values (injected so tests need not touch the real one).
    pub env: BTreeMap<String, String>,
    /// `--instance NAME`: the default paths become `/etc/secoda-agent/NAME.toml` and `NAME.env`.
    pub instance: Option<String>,
    /// `$CREDENTIALS_DIRECTORY`: where systemd put the unit's credentials (`key_credential`);
    /// `None` outside a unit that has any.
    pub credentials: Option<PathBuf>,
    /// Whether a key in a credential must be readable: `run` (and its reloads) needs the key;
    /// `check-config` and `doctor` also run from a shell, outside the unit that holds it.
    pub key_required: bool,
}

impl Sources {
    /// The `SSH_*` variables of this process.
    pub fn process_env() -> BTreeMap<String, String> {
        ENV_KEYS
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect()
    }
}

/// Everything the agent needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub tunnel: TunnelConfig,
    pub forward: ForwardConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    /// Which files were read, for messages and `check-config`.
    pub origin: String,
    pub warnings: Vec<String>,
}

/// Settings of the SSH session itself: changing any of them means a new session.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub listen_address: String,
    pub listen_port: u16,
    pub key: ClientKey,
    pub host_keys: Vec<PublicKey>,
    pub keepalive_interval: Duration,
    pub keepalive_max: u32,
    /// `None`: connect to the server directly.
    pub proxy: Option<Proxy>,
}

impl TunnelConfig {
    /// `host:port` of the server, and the proxy it is reached through: for logs and STATUS.
    pub fn route(&self) -> String {
        let server = crate::proxy::host_port(&self.host, self.port);
        match &self.proxy {
            Some(p) => format!("{server} via {}", p.endpoint()),
            None => server,
        }
    }
}

/// Settings applied per channel: they change live on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardConfig {
    pub connect_timeout: Duration,
    pub max_connections: usize,
    pub max_pending: u64,
    /// A slow target's backlog beyond `max_pending`, on disk; 0: none.
    pub max_spill: u64,
    pub stall_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub policy: Policy,
}

/// `[metrics]`: off unless `listen` is set. Read at start only.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricsConfig {
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: log::LevelFilter,
}

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
    /// Where it came from (`key_file = ...` or `key_base64`), for messages.
    pub origin: String,
}

impl SecretKey {
    pub fn key(&self) -> Arc<PrivateKey> {
        self.key.clone()
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

/// Every configuration problem found, each naming its file and key.
#[derive(Debug)]
pub struct ConfigError {
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    tunnel: RawTunnel,
    #[serde(default)]
    forward: RawForward,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    host: Option<String>,
    port: Option<i64>,
    user: Option<String>,
    listen_port: Option<i64>,
    listen_address: Option<String>,
    key_file: Option<PathBuf>,
    key_base64: Option<String>,
    key_credential: Option<String>,
    host_keys: Option<Vec<String>>,
    keepalive_interval: Option<String>,
    keepalive_max: Option<i64>,
    proxy: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    connect_timeout: Option<String>,
    max_connections: Option<i64>,
    max_pending: Option<String>,
    max_spill: Option<String>,
    stall_timeout: Option<String>,
    shutdown_timeout: Option<String>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
}

/// A value and the place it came from, e.g. `/etc/secoda-agent/agent.toml: [tunnel] host`.
struct Val<T> {
    value: T,
    at: String,
}

/// Load and validate. Reads the files afresh each call (this is also the reload path).
pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut origin = Vec::new();

    let (toml_path, toml_required) = match &sources.config {
        Some(p) => (p.clone(), true),
        None => (default_path(sources, DEFAULT_CONFIG_PATH, "toml"), false),
    };
    let (env_path, env_required) = match &sources.env_file {
        Some(p) => (p.clone(), true),
        None => (default_path(sources, DEFAULT_ENV_FILE_PATH, "env"), false),
    };

    let mut raw = RawFile::default();
    let toml_name = toml_path.display().to_string();
    match read_small_file(&toml_path, toml_required) {
        Ok(Some(text)) => {
            origin.push(toml_name.clone());
            match toml::from_str::<RawFile>(&text) {
                Ok(r) => raw = r,
                Err(e) => errors.push(format!("{toml_name}: {}", one_line_toml_error(&e))),
            }
        }
        Ok(None) => {}
        Err(e) => errors.push(format!("{toml_name}: {e}")),
    }

    let env_name = env_path.display().to_string();
    let mut env_file = BTreeMap::new();
    match read_small_file(&env_path, env_required) {
        Ok(Some(text)) => {
            origin.push(env_name.clone());
            match parse_env_file(&text) {
                Ok(vars) => env_file = vars,
                Err(e) => errors.push(format!("{env_name}: {e}")),
            }
        }
        Ok(None) => {}
        Err(e) => errors.push(format!("{env_name}: {e}")),
    }
    if !sources.env.is_empty() {
        origin.push("the process environment".to_string());
    }
    warnings.extend(unknown_env_names(&env_name, &env_file));

    // Resolve each setting: process env > env file > toml > default.
    let env_val = |names: &[&str]| -> Option<Val<String>> {
        for n in names {
            if let Some(v) = sources.env.get(*n) {
                return Some(Val {
                    value: v.clone(),
                    at: format!("environment variable {n}"),
                });
            }
        }
        for n in names {
            if let Some(v) = env_file.get(*n) {
                return Some(Val {
                    value: v.clone(),
                    at: format!("{env_name}: {n}"),
                });
            }
        }
        None
    };
    let toml_at = |section: &str, key: &str| format!("{toml_name}: [{section}] {key}");
    let t = &raw.tunnel;

    let host = match env_val(&["SSH_HOST"]).or_else(|| {
        t.host.clone().map(|v| Val {
            value: v,
            at: toml_at("tunnel", "host"),
        })
    }) {
        Some(v) if v.value.trim().is_empty() => {
            errors.push(format!("{}: must not be empty", v.at));
            String::new()
        }
        Some(v) => v.value.trim().to_string(),
        None => {
            errors.push(format!(
                "no tunnel host configured: set [tunnel] host in {toml_name} or SSH_HOST in {env_name}"
            ));
            String::new()
        }
    };

    let port = match env_val(&["SSH_PORT", "SSH_HOST_PORT"]) {
        Some(v) => parse_port(&v.value, &v.at, &mut errors),
        None => t.port.map_or(DEFAULT_SSH_PORT, |p| {
            int_port(p, &toml_at("tunnel", "port"), &mut errors)
        }),
    };

    let listen_port = match env_val(&["SSH_LISTEN_PORT"]) {
        Some(v) => parse_port(&v.value, &v.at, &mut errors),
        None => match t.listen_port {
            Some(p) => int_port(p, &toml_at("tunnel", "listen_port"), &mut errors),
            None => {
                errors.push(format!(
                    "no listen port configured: set [tunnel] listen_port in {toml_name} or SSH_LISTEN_PORT in {env_name} (Secoda shows it on the tunnel's page)"
                ));
                0
            }
        },
    };

    let user = match env_val(&["SSH_USER"]) {
        Some(v) => v.value,
        None => t.user.clone().unwrap_or_else(|| DEFAULT_USER.to_string()),
    };
    if user.is_empty() {
        errors.push(format!(
            "{}: user must not be empty",
            toml_at("tunnel", "user")
        ));
    }

    let listen_address = t
        .listen_address
        .clone()
        .unwrap_or_else(|| DEFAULT_LISTEN_ADDRESS.to_string());

    // Key: SSH_KEY_BASE64 or SSH_KEY_CREDENTIAL (environment, then env file) overrides the
    // toml's key_file / key_base64 / key_credential; each place holds exactly one. A file that
    // holds the key itself is refused when every user may read it, as a key file is (copying
    // an example with cp leaves it 0644).
    let from_env_file = |name: &str| !sources.env.contains_key(name);
    let key = match (
        env_val(&["SSH_KEY_BASE64"]),
        env_val(&["SSH_KEY_CREDENTIAL"]),
    ) {
        (Some(b64), Some(cred)) => Err(format!(
            "{} and {} are both set: keep exactly one",
            b64.at, cred.at
        )),
        (Some(v), None) if from_env_file("SSH_KEY_BASE64") => {
            private_to_group(&env_path, &env_name, "SSH_KEY_BASE64")
                .and_then(|()| load_key_base64(&v.value, &v.at))
                .map(ClientKey::Loaded)
        }
        (Some(v), None) => load_key_base64(&v.value, &v.at).map(ClientKey::Loaded),
        (None, Some(v)) => load_key_credential(&v.value, &v.at, sources),
        (None, None) => match (&t.key_file, &t.key_base64, &t.key_credential) {
            (Some(path), None, None) => {
                load_key_file(path, &toml_at("tunnel", "key_file")).map(ClientKey::Loaded)
            }
            (None, Some(b64), None) => private_to_group(&toml_path, &toml_name, "key_base64")
                .and_then(|()| load_key_base64(b64, &toml_at("tunnel", "key_base64")))
                .map(ClientKey::Loaded),
            (None, None, Some(name)) => {
                load_key_credential(name, &toml_at("tunnel", "key_credential"), sources)
            }
            (None, None, None) => Err(format!(
                "no private key configured: set [tunnel] key_file, key_base64 or key_credential in {toml_name}, or SSH_KEY_BASE64 in {env_name}"
            )),
            (file, b64, cred) => {
                let set: Vec<&str> = [
                    file.as_ref().map(|_| "key_file"),
                    b64.as_ref().map(|_| "key_base64"),
                    cred.as_ref().map(|_| "key_credential"),
                ]
                .into_iter()
                .flatten()
                .collect();
                Err(format!(
                    "{toml_name}: [tunnel] {} are {} set: keep exactly one of key_file, key_base64 and key_credential",
                    set.join(" and "),
                    if set.len() == 2 { "both" } else { "all" }
                ))
            }
        },
    };
    let key = match key {
        Ok(k) => Some(k),
        Err(e) => {
            errors.push(e);
            None
        }
    };

    let host_keys = match env_val(&["SSH_HOST_KEY"]) {
        Some(v) => {
            let lines: Vec<String> = v
                .value
                .split(['\n', ','])
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            parse_host_keys(&lines, &v.at, &mut errors)
        }
        None => match &t.host_keys {
            Some(list) if list.is_empty() => {
                errors.push(format!(
                    "{}: the list is empty; the agent always pins the server's key (remove the key to use Secoda's published one)",
                    toml_at("tunnel", "host_keys")
                ));
                Vec::new()
            }
            Some(list) => parse_host_keys(list, &toml_at("tunnel", "host_keys"), &mut errors),
            None => parse_host_keys(
                &[SECODA_HOST_KEY.to_string()],
                "built-in Secoda host key",
                &mut errors,
            ),
        },
    };

    let keepalive_interval = duration_setting(
        &t.keepalive_interval,
        DEFAULT_KEEPALIVE_INTERVAL,
        &toml_at("tunnel", "keepalive_interval"),
        &mut errors,
    );
    let keepalive_max = match t.keepalive_max {
        None => DEFAULT_KEEPALIVE_MAX,
        Some(n) if (1..=1000).contains(&n) => n as u32,
        Some(n) => {
            errors.push(format!(
                "{}: {n} is out of range (1 to 1000)",
                toml_at("tunnel", "keepalive_max")
            ));
            DEFAULT_KEEPALIVE_MAX
        }
    };

    // A proxy URL may carry a password: the file holding it must then be private, as for a key.
    let proxy = match env_val(&["SSH_PROXY"]).or_else(|| {
        t.proxy.clone().map(|v| Val {
            value: v,
            at: toml_at("tunnel", "proxy"),
        })
    }) {
        None => None,
        Some(v) if v.value.trim().is_empty() => None,
        Some(v) => match Proxy::parse(v.value.trim()) {
            Ok(p) => {
                let file = if sources.env.contains_key("SSH_PROXY") {
                    None
                } else if env_file.contains_key("SSH_PROXY") {
                    Some((&env_path, &env_name, "SSH_PROXY with a password"))
                } else {
                    Some((&toml_path, &toml_name, "[tunnel] proxy with a password"))
                };
                match file {
                    Some((path, name, holds)) if p.has_credentials() => {
                        match private_to_group(path, name, holds) {
                            Ok(()) => Some(p),
                            Err(e) => {
                                errors.push(e);
                                None
                            }
                        }
                    }
                    _ => Some(p),
                }
            }
            Err(e) => {
                errors.push(format!("{}: {e}", v.at));
                None
            }
        },
    };
    if matches!(&proxy, Some(p) if p.scheme == proxy::Scheme::Socks5) && host.len() > 255 {
        errors.push(format!(
            "the tunnel host name is {} bytes; a SOCKS5 proxy takes at most 255",
            host.len()
        ));
    }

    let f = &raw.forward;
    let connect_timeout = duration_setting(
        &f.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
        &toml_at("forward", "connect_timeout"),
        &mut errors,
    );
    let shutdown_timeout = duration_setting(
        &f.shutdown_timeout,
        DEFAULT_SHUTDOWN_TIMEOUT,
        &toml_at("forward", "shutdown_timeout"),
        &mut errors,
    );
    let max_connections = match f.max_connections {
        None => DEFAULT_MAX_CONNECTIONS,
        Some(n) if (1..=1_000_000).contains(&n) => n as usize,
        Some(n) => {
            errors.push(format!(
                "{}: {n} is out of range (1 to 1000000)",
                toml_at("forward", "max_connections")
            ));
            DEFAULT_MAX_CONNECTIONS
        }
    };
    let max_pending = match &f.max_pending {
        None => DEFAULT_MAX_PENDING,
        Some(s) => match parse_size(s) {
            Ok(n) if n >= 64 * 1024 => n,
            Ok(_) => {
                errors.push(format!(
                    "{}: \"{s}\" is too small (at least 64KiB)",
                    toml_at("forward", "max_pending")
                ));
                DEFAULT_MAX_PENDING
            }
            Err(e) => {
                errors.push(format!("{}: {e}", toml_at("forward", "max_pending")));
                DEFAULT_MAX_PENDING
            }
        },
    };
    let max_spill = match &f.max_spill {
        None => DEFAULT_MAX_SPILL,
        Some(s) => parse_size(s).unwrap_or_else(|e| {
            errors.push(format!("{}: {e}", toml_at("forward", "max_spill")));
            DEFAULT_MAX_SPILL
        }),
    };
    let stall_timeout = duration_setting(
        &f.stall_timeout,
        DEFAULT_STALL_TIMEOUT,
        &toml_at("forward", "stall_timeout"),
        &mut errors,
    );
    let policy = Policy::parse(
        f.allow.as_deref().unwrap_or(&[]),
        f.deny.as_deref().unwrap_or(&[]),
    )
    .unwrap_or_else(|errs| {
        for (key, e) in errs {
            errors.push(format!("{}: {e}", toml_at("forward", key)));
        }
        Policy::default()
    });

    let level = match &raw.log.level {
        None => log::LevelFilter::Info,
        Some(s) => parse_level(s).unwrap_or_else(|e| {
            errors.push(format!("{}: {e}", toml_at("log", "level")));
            log::LevelFilter::Info
        }),
    };

    let metrics_listen = raw.metrics.listen.as_deref().and_then(|l| {
        l.parse::<std::net::SocketAddr>()
            .map_err(|_| {
                errors.push(format!(
                    "{}: '{l}' is not an address and port (e.g. \"127.0.0.1:9810\")",
                    toml_at("metrics", "listen")
                ))
            })
            .ok()
    });

    if origin.is_empty() && errors.is_empty() {
        errors.push(format!(
            "no configuration found: neither {toml_name} nor {env_name} exists, and no SSH_* variables are set"
        ));
    }
    if !errors.is_empty() {
        return Err(ConfigError { errors });
    }
    let Some(key) = key else {
        return Err(ConfigError { errors });
    };

    Ok(Config {
        tunnel: TunnelConfig {
            host,
            port,
            user,
            listen_address,
            listen_port,
            key,
            host_keys,
            keepalive_interval,
            keepalive_max,
            proxy,
        },
        forward: ForwardConfig {
            connect_timeout,
            max_connections,
            max_pending,
            max_spill,
            stall_timeout,
            shutdown_timeout,
            policy,
        },
        log: LogConfig { level },
        metrics: MetricsConfig {
            listen: metrics_listen,
        },
        origin: origin.join(", "),
        warnings,
    })
}

impl Config {
    /// A one-screen summary for `check-config`: no secret appears in it.
    pub fn summary(&self) -> String {
        let t = &self.tunnel;
        let f = &self.forward;
        let pins: Vec<String> = t
            .host_keys
            .iter()
            .map(|k| {
                format!(
                    "{} {}",
                    k.algorithm().as_str(),
                    k.fingerprint(HashAlg::Sha256)
                )
            })
            .collect();
        format!(
            "configuration OK (from {origin})\n\
             server:        {user}@{host}:{port}\n\
             proxy:         {proxy}\n\
             remote listen: {la}:{lp}\n\
             client key:    {key}\n\
             host key pins: {pins}\n\
             keepalive:     every {ki:?}, dead after {km} unanswered\n\
             forward:       connect timeout {ct:?}, at most {mc} connections, {mp} pending per channel in memory, then {ms} on disk; a target idle {stall:?} with data waiting is cut\n\
             policy:        {policy}\n\
             shutdown:      channels drain for up to {st:?}\n\
             metrics:       {metrics}\n\
             log level:     {lvl}",
            origin = self.origin,
            user = t.user,
            host = t.host,
            port = t.port,
            proxy = match &t.proxy {
                Some(p) => p.to_string(),
                None => "none (direct)".to_string(),
            },
            la = t.listen_address,
            lp = t.listen_port,
            key = t.key,
            pins = pins.join(", "),
            ki = t.keepalive_interval,
            km = t.keepalive_max,
            ct = f.connect_timeout,
            mc = f.max_connections,
            mp = show_size(f.max_pending),
            ms = match f.max_spill {
                0 => "none".to_string(),
                n => show_size(n),
            },
            stall = f.stall_timeout,
            policy = f.policy,
            st = f.shutdown_timeout,
            lvl = self.log.level,
            metrics = match self.metrics.listen {
                Some(a) => format!("http://{a}/metrics"),
                None => "off".to_string(),
            },
        )
    }
}

fn show_size(n: u64) -> String {
    match n {
        n if n % (1 << 30) == 0 => format!("{}GiB", n >> 30),
        n if n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

/// The default file, or the instance's file of that kind beside it.
fn default_path(sources: &Sources, default: &str, ext: &str) -> PathBuf {
    let default = PathBuf::from(default);
    match &sources.instance {
        Some(name) => default.with_file_name(format!("{name}.{ext}")),
        None => default,
    }
}

/// `Ok(None)` when an optional file is absent.
fn read_small_file(path: &Path, required: bool) -> Result<Option<String>, String> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(None),
        Err(e) => return Err(describe_io(&e)),
    };
    if meta.is_dir() {
        return Err("is a directory, expected a file".to_string());
    }
    if meta.len() > MAX_CONFIG_FILE_SIZE {
        return Err(format!(
            "is {} bytes, larger than the {} bytes a configuration file may have",
            meta.len(),
            MAX_CONFIG_FILE_SIZE
        ));
    }
    let mut text = String::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_FILE_SIZE).read_to_string(&mut text))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => "is not valid UTF-8 text".to_string(),
            _ => describe_io(&e),
        })?;
    Ok(Some(text))
}

fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".to_string(),
        std::io::ErrorKind::PermissionDenied => {
            "permission denied (the agent runs as user secoda-agent: make the file readable by group secoda-agent)".to_string()
        }
        _ => format!("cannot be read: {e}"),
    }
}

/// Warnings for names in the env file that the agent does not read. A name is shown only when
/// it looks like a variable name: a line of a pasted key can parse as `NAME=` too, and must
/// not reach the journal.
fn unknown_env_names(env_name: &str, env_file: &BTreeMap<String, String>) -> Vec<String> {
    let (named, unnamed): (Vec<&String>, Vec<&String>) = env_file
        .keys()
        .filter(|k| !ENV_KEYS.contains(&k.as_str()))
        .partition(|k| {
            k.len() <= 64
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        });
    let mut warnings: Vec<String> = named
        .iter()
        .map(|k| {
            format!(
                "{env_name}: {k} is not a setting the agent reads (known: {})",
                ENV_KEYS.join(", ")
            )
        })
        .collect();
    if !unnamed.is_empty() {
        warnings.push(format!(
            "{env_name}: {} lines set something that is not an upper-case variable name, which the agent ignores (not shown: it may be pasted key text; a key goes on one line as SSH_KEY_BASE64=...)",
            unnamed.len()
        ));
    }
    warnings
}

/// A configuration file that holds the private key may be read by its group (the agent's),
/// never by every user.
fn private_to_group(path: &Path, name: &str, holds: &str) -> Result<(), String> {
    let mode = fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    if mode & 0o004 == 0 {
        return Ok(());
    }
    Err(format!(
        "{name} holds {holds} and is readable by every user (permissions {mode:04o}): chmod 0640 \"{name}\" (owner root, group secoda-agent), as for a key file"
    ))
}

/// TOML errors span several lines (with a source excerpt); keep the position and the message.
fn one_line_toml_error(e: &toml::de::Error) -> String {
    let full = e.to_string();
    let position = full
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("TOML parse error at "))
        .filter(|_| e.span().is_some());
    match position {
        Some(p) => format!("{p}: {}", e.message().trim()),
        None => e.message().trim().to_string(),
    }
}

/// Docker-compose style `KEY=VALUE` lines: comments, blank lines, `export`, optional quotes.
pub fn parse_env_file(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut vars = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!(
                "line {}: expected KEY=VALUE, found text without '='",
                i + 1
            ));
        };
        let k = k.trim();
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            // Not echoed: a line of a pasted key (base64 ends in '=') lands here.
            return Err(format!(
                "line {}: the text before '=' is not a variable name (letters, digits and _ only)",
                i + 1
            ));
        }
        let v = v.trim();
        let v = if v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"'))
                || (v.starts_with('\'') && v.ends_with('\'')))
        {
            &v[1..v.len() - 1]
        } else {
            // An unquoted value ends at an inline " #" comment, as in docker compose.
            v.split(" #").next().unwrap_or(v).trim_end()
        };
        vars.insert(k.to_string(), v.to_string());
    }
    Ok(vars)
}

fn parse_port(s: &str, at: &str, errors: &mut Vec<String>) -> u16 {
    match s.trim().parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => {
            errors.push(format!("{at}: \"{s}\" is not a port number (1 to 65535)"));
            0
        }
    }
}

fn int_port(p: i64, at: &str, errors: &mut Vec<String>) -> u16 {
    match u16::try_from(p) {
        Ok(p) if p != 0 => p,
        _ => {
            errors.push(format!("{at}: {p} is not a port number (1 to 65535)"));
            0
        }
    }
}

fn duration_setting(
    raw: &Option<String>,
    default: Duration,
    at: &str,
    errors: &mut Vec<String>,
) -> Duration {
    match raw {
        None => default,
        Some(s) => match parse_duration(s) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                errors.push(format!("{at}: must be longer than zero"));
                default
            }
            Err(e) => {
                errors.push(format!("{at}: {e}"));
                default
            }
        },
    }
}

/// `"15s"`, `"2m"`, `"500ms"`, `"1h30m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("\"{s}\" is not a duration (examples: \"500ms\", \"15s\", \"2m\", \"1h\")");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(d);
    }
    if total > Duration::from_secs(7 * 24 * 3600) {
        return Err(format!("\"{s}\" is longer than a week"));
    }
    Ok(total)
}

/// `"8MiB"`, `"512KiB"`, `"1GiB"`, `"65536"` (bytes); KB/MB/GB are taken as their binary cousins.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let bad = || format!("\"{s}\" is not a size (examples: \"512KiB\", \"8MiB\", \"1GiB\")");
    if digits == 0 {
        return Err(bad());
    }
    let n: u64 = t[..digits].parse().map_err(|_| bad())?;
    let mult: u64 = match t[digits..].trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

pub fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("\"{s}\" is not a log level (error, warn, info, debug, trace)"))
}

/// Where the documented flow keeps credential `name`, encrypted (README "The key encrypted at
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
fn load_key_credential(name: &str, at: &str, sources: &Sources) -> Result<ClientKey, String> {
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
            "the unit must provide it: `systemctl edit {unit}` and add [Service] {} (made with `systemd-creds encrypt --name={name} KEYFILE {}`; README: \"The key encrypted at rest\")",
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

fn load_key_file(path: &Path, at: &str) -> Result<SecretKey, String> {
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

fn load_key_base64(b64: &str, at: &str) -> Result<SecretKey, String> {
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
    Ok(SecretKey {
        key: Arc::new(key),
        origin: at.to_string(),
    })
}

/// Accepts `TYPE BASE64 [comment]` and known_hosts lines (`HOST TYPE BASE64`).
fn parse_host_keys(lines: &[String], at: &str, errors: &mut Vec<String>) -> Vec<PublicKey> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        for bad in ["", "15", "s", "1x", "-1s", "1.5s", "99999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8MiB").unwrap(), 8 << 20);
        assert_eq!(parse_size("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("65536").unwrap(), 65536);
        for bad in ["", "MiB", "8 TiB", "1.5MiB", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn env_file_syntax() {
        let vars = parse_env_file(
            "# comment\n\nSSH_HOST=a.example\nexport SSH_PORT='2222'\nSSH_USER=\"tun nel\"\nSSH_LISTEN_PORT=10123 # note\n",
        )
        .unwrap();
        assert_eq!(vars["SSH_HOST"], "a.example");
        assert_eq!(vars["SSH_PORT"], "2222");
        assert_eq!(vars["SSH_USER"], "tun nel");
        assert_eq!(vars["SSH_LISTEN_PORT"], "10123");
        let err = parse_env_file("SSH_HOST=a\nnonsense\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn host_key_lines() {
        let mut errors = Vec::new();
        let keys = parse_host_keys(
            &[
                SECODA_HOST_KEY.to_string(),
                format!("[tunnel.example]:22 {SECODA_HOST_KEY} comment"),
                "ssh-ed25519 notbase64".to_string(),
            ],
            "test",
            &mut errors,
        );
        assert_eq!(keys.len(), 2);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("notbase64"));
    }

    #[test]
    fn revoked_and_ca_lines_are_never_pins() {
        for marker in ["@revoked", "@cert-authority"] {
            let mut errors = Vec::new();
            let keys = parse_host_keys(
                &[format!("{marker} * {SECODA_HOST_KEY}")],
                "test",
                &mut errors,
            );
            assert!(keys.is_empty(), "{marker} became a pin");
            assert!(errors[0].contains(marker), "{errors:?}");
        }
    }

    /// Lines of a key pasted into agent.env: neither an error nor a warning may echo them.
    #[test]
    fn an_env_file_never_echoes_pasted_key_text() {
        let err = parse_env_file("SSH_HOST=a\nb3BlbnNzaC1+rZXktdjEAAAAABG5v=\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains("b3BlbnNzaC1"), "{err}");

        let vars =
            parse_env_file("SSH_HOST=a\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=\nSSH_TYPO=1\n").unwrap();
        let text = unknown_env_names("agent.env", &vars).join("\n");
        assert!(text.contains("SSH_TYPO is not a setting"), "{text}");
        assert!(text.contains("1 lines set something"), "{text}");
        assert!(!text.contains("b3BlbnNzaC1"), "{text}");
    }
}
