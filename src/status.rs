//! `secoda-agent status`: the running agent answers on a unix socket in its runtime directory
//! with a JSON [`Snapshot`]; the command prints it for people (or as JSON) and exits 0 when the
//! tunnel is up, 3 when it is down, 4 when no agent answers.
//!
//! The socket is mode 0660: root and the agent's group (`secoda-agent`) may ask, nobody else.

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

use crate::accept;
use crate::constants::{RUNTIME_DIR_BASE, STATUS_SOCKET_NAME, STATUS_TIMEOUT};
use crate::telemetry::{Snapshot, State, Telemetry};

/// Exit codes of `status`, as `systemctl status` and LSB init scripts use them.
pub mod exit {
    pub const UP: u8 = 0;
    pub const DOWN: u8 = 3;
    /// Healthy, standing by: the server's port is held by another session.
    pub const STANDBY: u8 = 5;
    pub const NOT_RUNNING: u8 = 4;
    /// The socket exists but this user may not connect (EX_NOPERM).
    pub const NO_PERMISSION: u8 = 77;
}

/// The runtime directory: `$RUNTIME_DIRECTORY` (set by systemd from `RuntimeDirectory=`, first
/// entry), else `/run/secoda-agent`, or `/run/secoda-agent-NAME` for an instance.
pub fn runtime_dir(instance: Option<&str>, env: Option<&str>) -> PathBuf {
    if let Some(dir) = env
        .and_then(|v| v.split(':').next())
        .filter(|d| !d.is_empty())
    {
        return PathBuf::from(dir);
    }
    match instance {
        Some(name) => PathBuf::from(format!("{RUNTIME_DIR_BASE}-{name}")),
        None => PathBuf::from(RUNTIME_DIR_BASE),
    }
}

pub fn socket_path(instance: Option<&str>, env: Option<&str>) -> PathBuf {
    runtime_dir(instance, env).join(STATUS_SOCKET_NAME)
}

/// The socket of this instance in the runtime directory systemd gave (`$RUNTIME_DIRECTORY`),
/// else in the default one.
pub fn default_socket(instance: Option<&str>) -> PathBuf {
    socket_path(instance, std::env::var("RUNTIME_DIRECTORY").ok().as_deref())
}

/// `secoda-agent status [--json]`: print the running agent's state; the exit code.
pub fn command(socket: &Path, json: bool) -> u8 {
    match query(socket) {
        Ok(snapshot) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&snapshot).unwrap_or_default()
                );
            } else {
                print!("{}", render(&snapshot));
            }
            exit_code(&snapshot)
        }
        Err(QueryError::NotRunning(m)) => {
            eprintln!("{m}");
            exit::NOT_RUNNING
        }
        Err(QueryError::NoPermission(m)) => {
            eprintln!("{m}");
            exit::NO_PERMISSION
        }
        Err(QueryError::Garbled(m)) => {
            eprintln!("{m}");
            crate::exit::FAILURE
        }
    }
}

/// Bind the status socket. A socket left by an agent that died is replaced; one that another
/// running agent answers on is left alone (an error says so).
pub async fn bind(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another agent answers on it (a second agent with the same runtime directory?)",
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
        }
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Answer each connection with one snapshot, then close it.
pub async fn serve(listener: UnixListener, telemetry: Arc<Telemetry>) {
    accept::serve_each(
        "status socket",
        || async { listener.accept().await.map(|(conn, _)| conn) },
        |mut conn| {
            let mut body = serde_json::to_vec(&telemetry.snapshot()).unwrap_or_default();
            body.push(b'\n');
            async move {
                let _ = tokio::time::timeout(STATUS_TIMEOUT, conn.write_all(&body)).await;
            }
        },
    )
    .await
}

/// Why `status` got no snapshot.
#[derive(Debug)]
pub enum QueryError {
    NotRunning(String),
    NoPermission(String),
    Garbled(String),
}

/// Ask the agent listening at `path` (blocking, with a timeout).
pub fn query(path: &Path) -> Result<Snapshot, QueryError> {
    let shown = path.display();
    let mut conn = std::os::unix::net::UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => QueryError::NoPermission(format!(
            "permission denied on {shown}: run as root or as a member of group secoda-agent"
        )),
        io::ErrorKind::NotFound => QueryError::NotRunning(format!(
            "secoda-agent is not running (no status socket at {shown})"
        )),
        _ => QueryError::NotRunning(format!(
            "secoda-agent is not running (status socket {shown}: {e})"
        )),
    })?;
    let _ = conn.set_read_timeout(Some(STATUS_TIMEOUT));
    let mut text = String::new();
    conn.read_to_string(&mut text).map_err(|e| {
        QueryError::NotRunning(format!(
            "secoda-agent did not answer on {shown} within {STATUS_TIMEOUT:?}: {e}"
        ))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| QueryError::Garbled(format!("unexpected answer on {shown}: {e}")))
}

pub fn exit_code(s: &Snapshot) -> u8 {
    match s.state {
        State::Up => exit::UP,
        State::Standby => exit::STANDBY,
        _ => exit::DOWN,
    }
}

/// The snapshot for people.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let name = match &s.instance {
        Some(i) => format!("secoda-agent@{i}"),
        None => "secoda-agent".to_string(),
    };
    out += &format!(
        "{name} {} (pid {}): tunnel {}\n",
        s.version,
        s.pid,
        s.state.as_str()
    );
    out += &format!(
        "  server:     {}, listening there on {}\n",
        s.server, s.listen
    );
    if let Some(proxy) = &s.proxy {
        out += &format!("  proxy:      {proxy}\n");
    }
    match s.connected_since {
        Some(t) => {
            out += &format!(
                "  connected:  since {} ({})\n",
                utc(t),
                span(s.now.saturating_sub(t))
            )
        }
        None => out += "  connected:  no\n",
    }
    if let Some(t) = s.standby_since {
        let (label, then) = match s.state {
            State::Refused => (
                "refused:   ",
                "an error: this host is not one of a pair ([tunnel] pair); asked for again, taken when granted",
            ),
            _ => ("standby:   ", "one of a pair: taken over when freed"),
        };
        out += &format!(
            "  {label} the server refuses the port since {} ({}): held by another session, or not permitted; {then}\n",
            utc(t),
            span(s.now.saturating_sub(t))
        );
    }
    if let Some(n) = &s.session {
        out += &format!("  session:    {n}\n");
    }
    if let Some(d) = &s.draining {
        out += &format!(
            "  draining:   the previous binary's process (pid {}) is finishing {} open channel{} it took before the upgrade\n",
            d.pid,
            d.channels,
            if d.channels == 1 { "" } else { "s" }
        );
    }
    out += &format!("  reconnects: {}\n", s.reconnects);
    match &s.last_error {
        Some(e) => {
            out += &format!(
                "  last error: {} ({} ago): {}\n",
                utc(e.at),
                span(s.now.saturating_sub(e.at)),
                e.message
            )
        }
        None => out += "  last error: none\n",
    }
    out += &format!("  channels:   {} open\n", s.channels.len());
    if !s.channels.is_empty() {
        let width = s
            .channels
            .iter()
            .map(|c| c.target.len())
            .max()
            .unwrap_or(6)
            .max(6);
        out += &format!(
            "    {:<width$}  {:>9}  {:>11}  {:>11}  PEER\n",
            "TARGET", "AGE", "TO TARGET", "FROM TARGET"
        );
        for c in &s.channels {
            out += &format!(
                "    {:<width$}  {:>9}  {:>11}  {:>11}  {}\n",
                c.target,
                span(c.age_s as u64),
                bytes(c.bytes_to_target),
                bytes(c.bytes_from_target),
                c.originator
            );
        }
    }
    out
}

fn span(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n} B"),
        n if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n if n < 1 << 30 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` from Unix seconds (civil-from-days, proleptic Gregorian).
pub fn utc(t: u64) -> String {
    let days = (t / 86400) as i64;
    let rem = t % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_615_322), "2026-11-25 14:02:02 UTC");
    }

    #[test]
    fn runtime_dir_rules() {
        assert_eq!(
            runtime_dir(None, Some("/run/x:/run/y")),
            PathBuf::from("/run/x")
        );
        assert_eq!(runtime_dir(None, None), PathBuf::from("/run/secoda-agent"));
        assert_eq!(
            runtime_dir(Some("eu"), None),
            PathBuf::from("/run/secoda-agent-eu")
        );
    }

    #[test]
    fn spans_and_sizes() {
        assert_eq!(span(59), "59s");
        assert_eq!(span(61), "1m 1s");
        assert_eq!(span(7200), "2h 0m");
        assert_eq!(bytes(2048), "2.0 KiB");
    }
}
