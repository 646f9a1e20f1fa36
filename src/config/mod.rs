//! Configuration: `agent.toml`, the Docker-compatible `agent.env`, and the process environment,
//! merged, validated and turned into ready-to-use values (parsed keys, durations, sizes).
//!
//! Precedence, highest first: process environment (`SSH_*`), the env file, `agent.toml`,
//! built-in defaults. Either file alone can be a complete configuration. `sources.rs` reads
//! them; `tunnel.rs` and `forward` below validate each section; `keys.rs` loads keys and pins;
//! `values.rs` parses single values.
//!
//! Every problem is collected (not just the first) and names the file and key at fault.

mod keys;
mod sources;
mod tunnel;
mod values;

pub use keys::{credential_file, credential_unit_setting, fingerprint, ClientKey, SecretKey};
pub use sources::parse_env_file;
pub use values::{parse_duration, parse_level, parse_size};

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use russh::keys::PublicKey;

use crate::constants::*;
use crate::policy::Policy;
use crate::proxy::Proxy;
use sources::Layers;
use values::duration_setting;

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
    /// While the server refuses the forward, how often to ask for it again.
    pub standby_retry: Duration,
    /// This host is one of a pair running the same tunnel: a refused forward means the other
    /// host serves, and this one stands by quietly. Without it a refused forward is an error.
    pub pair: bool,
    /// Offer only post-quantum key exchanges: a server without one is refused before
    /// authentication (tunnel/ssh.rs).
    pub require_post_quantum: bool,
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
    /// Channels open at once to one target (address and port connected); 0: no bound.
    pub max_connections_per_target: usize,
    /// New connections per second to one target; 0: no bound (limits.rs).
    pub connect_rate_per_target: u32,
    pub max_pending: u64,
    /// A slow target's backlog beyond `max_pending`, on disk; 0: none.
    pub max_spill: u64,
    pub stall_timeout: Duration,
    /// A target connection idle this long is probed (TCP keepalive), and one that answers
    /// no probe, or acknowledges nothing for as long, is closed (connect.rs).
    pub target_keepalive: Duration,
    pub shutdown_timeout: Duration,
    /// How long a session's (or an old process's) open channels may finish after a reload
    /// opened a new session or an upgrade handed the tunnel to a new binary.
    pub drain_timeout: Duration,
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
/// Load and validate. Reads the files afresh each call (this is also the reload path).
pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let l = Layers::read(sources, &mut errors, &mut warnings);
    let tunnel = tunnel::settings(&l, &mut errors);
    let mut forward = forward(&l, &mut errors);
    // systemd kills the agent TimeoutStopSec after asking it to stop; a drain longer than that
    // is cut mid-way. A warning, not an error: a drop-in may have raised the unit's timeout.
    if forward.shutdown_timeout + STOP_MARGIN > UNIT_STOP_TIMEOUT {
        let stop = UNIT_STOP_TIMEOUT.as_secs();
        warnings.push(format!(
            "{}: {:?} does not fit the packaged unit, whose TimeoutStopSec={stop}s kills the agent {stop}s after asking it to stop, cutting the drain: set at most {}s, or raise TimeoutStopSec to at least {}s (systemctl edit secoda-agent)",
            l.toml_at("forward", "shutdown_timeout"),
            forward.shutdown_timeout,
            (UNIT_STOP_TIMEOUT - STOP_MARGIN).as_secs(),
            (forward.shutdown_timeout + STOP_MARGIN).as_secs_f64().ceil() as u64,
        ));
    }
    let (toml_name, env_name, raw) = (&l.toml_name, &l.env_name, &l.raw);
    let toml_at = |section: &str, key: &str| l.toml_at(section, key);

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

    forward.policy = forward.policy.with_own_listeners(metrics_listen);

    if l.origin.is_empty() && errors.is_empty() {
        errors.push(format!(
            "no configuration found: neither {toml_name} nor {env_name} exists, and no SSH_* variables are set"
        ));
    }
    if !errors.is_empty() {
        return Err(ConfigError { errors });
    }
    let Some(tunnel) = tunnel else {
        return Err(ConfigError { errors });
    };
    Ok(Config {
        tunnel,
        forward,
        log: LogConfig { level },
        metrics: MetricsConfig {
            listen: metrics_listen,
        },
        origin: l.origin.join(", "),
        warnings,
    })
}

/// `[forward]`: applied per channel, live on reload.
fn forward(l: &Layers, errors: &mut Vec<String>) -> ForwardConfig {
    let toml_at = |section: &str, key: &str| l.toml_at(section, key);
    let raw = &l.raw;
    let f = &raw.forward;
    let connect_timeout = duration_setting(
        &f.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
        &toml_at("forward", "connect_timeout"),
        errors,
    );
    let shutdown_timeout = duration_setting(
        &f.shutdown_timeout,
        DEFAULT_SHUTDOWN_TIMEOUT,
        &toml_at("forward", "shutdown_timeout"),
        errors,
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
    let per_target = |key: &str, value: Option<i64>, max: i64, errors: &mut Vec<String>| match value
    {
        None => 0,
        Some(n) if (0..=max).contains(&n) => n,
        Some(n) => {
            errors.push(format!(
                "{}: {n} is out of range (0 for no limit, to {max})",
                toml_at("forward", key)
            ));
            0
        }
    };
    let max_connections_per_target = per_target(
        "max_connections_per_target",
        f.max_connections_per_target,
        1_000_000,
        errors,
    ) as usize;
    let connect_rate_per_target = per_target(
        "connect_rate_per_target",
        f.connect_rate_per_target,
        100_000,
        errors,
    ) as u32;
    let max_pending = match &f.max_pending {
        None => DEFAULT_MAX_PENDING,
        Some(s) => match parse_size(s) {
            Ok(n) if (MAX_PENDING_MIN..=MAX_PENDING_MAX).contains(&n) => n,
            Ok(n) => {
                errors.push(format!(
                    "{}: \"{s}\" is too {} (64KiB to 1GiB: a channel's SSH window is a 32-bit count, and one channel holding more than 1 GiB in memory is never what a database needs)",
                    toml_at("forward", "max_pending"),
                    if n < MAX_PENDING_MIN { "small" } else { "large" }
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
        errors,
    );
    let target_keepalive = duration_setting(
        &f.target_keepalive,
        DEFAULT_TARGET_KEEPALIVE,
        &toml_at("forward", "target_keepalive"),
        errors,
    );
    if !(TARGET_KEEPALIVE_MIN..=TARGET_KEEPALIVE_MAX).contains(&target_keepalive) {
        errors.push(format!(
            "{}: {target_keepalive:?} is out of range ({TARGET_KEEPALIVE_MIN:?} to {TARGET_KEEPALIVE_MAX:?})",
            toml_at("forward", "target_keepalive")
        ));
    }
    let drain_timeout = duration_setting(
        &f.drain_timeout,
        DEFAULT_DRAIN_TIMEOUT,
        &toml_at("forward", "drain_timeout"),
        errors,
    );
    if drain_timeout > DRAIN_TIMEOUT_MAX {
        errors.push(format!(
            "{}: {drain_timeout:?} is out of range (at most {DRAIN_TIMEOUT_MAX:?})",
            toml_at("forward", "drain_timeout")
        ));
    }
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
    ForwardConfig {
        connect_timeout,
        max_connections,
        max_connections_per_target,
        connect_rate_per_target,
        max_pending,
        max_spill,
        stall_timeout,
        target_keepalive,
        shutdown_timeout,
        drain_timeout,
        policy,
    }
}

impl Config {
    /// A one-screen summary for `check-config`: no secret appears in it.
    pub fn summary(&self) -> String {
        let t = &self.tunnel;
        let f = &self.forward;
        let pins: Vec<String> = t.host_keys.iter().map(fingerprint).collect();
        format!(
            "configuration OK (from {origin})\n\
             server:        {user}@{host}:{port}\n\
             proxy:         {proxy}\n\
             remote listen: {la}:{lp}\n\
             client key:    {key}\n\
             host key pins: {pins}\n\
             keepalive:     every {ki:?}, dead after {km} unanswered\n\
             pair:          {pair}\n\
             key exchange:  {kex}\n\
             forward:       connect timeout {ct:?}, at most {mc} connections, {mp} pending per channel in memory, then {ms} on disk; a target idle {stall:?} with data waiting is cut; a silent target probed after {ka:?} idle\n\
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
            pair = if t.pair {
                format!("yes: a refused port is a quiet standby (the other host serves); asked for every {:?}", t.standby_retry)
            } else {
                format!("no: a refused port is an error, asked for again every {:?}", t.standby_retry)
            },
            kex = if t.require_post_quantum {
                "post-quantum only (require_post_quantum): mlkem768x25519-sha256"
            } else {
                "post-quantum first (mlkem768x25519-sha256), then curve25519 and others"
            },
            ct = f.connect_timeout,
            mc = f.max_connections,
            mp = show_size(f.max_pending),
            ms = match f.max_spill {
                0 => "none".to_string(),
                n => show_size(n),
            },
            stall = f.stall_timeout,
            ka = f.target_keepalive,
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

#[cfg(test)]
mod tests {
    use super::keys::parse_host_keys;
    use super::sources::unknown_env_names;
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

    /// The shutdown_timeout warning reasons from the packaged units' stop timeout.
    #[test]
    fn the_units_stop_timeout_is_the_one_the_warning_names() {
        let want = format!("TimeoutStopSec={}s", UNIT_STOP_TIMEOUT.as_secs());
        for unit in [
            include_str!("../../systemd/secoda-agent.service"),
            include_str!("../../systemd/secoda-agent@.service"),
        ] {
            let lines: Vec<&str> = unit
                .lines()
                .filter(|l| l.starts_with("TimeoutStopSec="))
                .collect();
            assert_eq!(lines, [want.as_str()]);
        }
    }
}
