//! Handing the tunnel over to a new binary, so that an upgrade cuts no sync. A package upgrade
//! replaces `/usr/bin/secoda-agent` and reloads the unit; the running agent sees on SIGHUP that
//! its executable is no longer the installed file ([`replaced_binary`]) and, instead of being
//! restarted:
//! 1. starts the new binary with its own arguments and environment, in its own unit (a child:
//!    same cgroup, same `NOTIFY_SOCKET`), passing it a socket pair to talk over and its
//!    listeners (the status socket, the metrics endpoint), so that nothing is re-bound;
//! 2. the new process connects and authenticates, then says `connected`;
//! 3. the old one gives the port back (cancels its forward; it takes no new channel) and says
//!    `released`; the new one asks for the port at once and says `serving`;
//! 4. the old one names it systemd's main process (`MAINPID=`) and says `main`: from then on
//!    `READY`, `STATUS` and the watchdog are the new process's;
//! 5. the old one lets its open channels finish (up to `[forward] drain_timeout`), telling the
//!    new one how many remain (`draining PID N`, shown by `status`), then exits.
//!
//! A new process that is not serving within `HANDOVER_TIMEOUT` (a configuration it refuses,
//! a server it cannot reach, a crash) is ended, and the old one takes its port back and keeps
//! serving, saying so. An agent that serves nothing is simply replaced by the new binary in
//! place (exec): there is nothing to keep.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::sys;

/// The new process finds its channel to the old one, and its inherited listeners, here.
pub const ENV_CHANNEL: &str = "SECODA_AGENT_HANDOVER_FD";
pub const ENV_STATUS: &str = "SECODA_AGENT_STATUS_FD";
pub const ENV_METRICS: &str = "SECODA_AGENT_METRICS_FD";

/// The binary installed where this process's executable was, when it is another file (a
/// package upgrade unlinked ours and put a new one at its path).
pub fn replaced_binary() -> Option<PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe").ok()?;
    let text = exe.to_string_lossy();
    let path = PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(&text));
    let running = std::fs::metadata("/proc/self/exe").ok()?;
    let installed = std::fs::metadata(&path).ok()?;
    use std::os::unix::fs::MetadataExt;
    let replaced = (running.dev(), running.ino()) != (installed.dev(), installed.ino());
    replaced.then_some(path)
}

/// Replace this process with `binary`, same arguments and environment (an agent that serves
/// nothing: no channel to keep, no port held). Returns only if the exec failed.
pub fn exec_in_place(binary: &Path) -> io::Error {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    std::process::Command::new(binary).args(args).exec()
}

/// What the new process said.
#[derive(Debug, PartialEq, Eq)]
pub enum Said {
    Connected,
    Serving,
    Failed(String),
    /// It closed the channel (exited) without saying why.
    Gone,
}

/// The old process's side: the new process, and the channel to it.
pub struct Predecessor {
    pub child_pid: u32,
    child: std::process::Child,
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl Predecessor {
    /// Start `binary` with this process's arguments and environment, handing it the channel
    /// and `listeners` (status socket, metrics endpoint; either may be absent).
    pub fn spawn(
        binary: &Path,
        status: Option<RawFd>,
        metrics: Option<RawFd>,
    ) -> io::Result<Predecessor> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let mut fds = vec![theirs.as_raw_fd()];
        let mut cmd = std::process::Command::new(binary);
        cmd.args(std::env::args_os().skip(1))
            .env(ENV_CHANNEL, "3")
            .env_remove(ENV_STATUS)
            .env_remove(ENV_METRICS);
        for (name, fd) in [(ENV_STATUS, status), (ENV_METRICS, metrics)] {
            if let Some(fd) = fd {
                cmd.env(name, (3 + fds.len()).to_string());
                fds.push(fd);
            }
        }
        sys::pass_fds(&mut cmd, fds);
        let child = cmd.spawn()?;
        drop(theirs);
        ours.set_nonblocking(true)?;
        let (read, write) = UnixStream::from_std(ours)?.into_split();
        Ok(Predecessor {
            child_pid: child.id(),
            child,
            read: BufReader::new(read),
            write,
        })
    }

    /// The new process's next word. Cancellation-safe only between lines, which is how the
    /// supervisor uses it (one `next` at a time, never dropped mid-line in practice: lines
    /// are short and written at once).
    pub async fn next(&mut self) -> Said {
        let mut line = String::new();
        match self.read.read_line(&mut line).await {
            Ok(0) | Err(_) => Said::Gone,
            Ok(_) => match line.trim_end() {
                "connected" => Said::Connected,
                "serving" => Said::Serving,
                other => Said::Failed(
                    other
                        .strip_prefix("failed ")
                        .unwrap_or(other)
                        .chars()
                        .take(500)
                        .collect(),
                ),
            },
        }
    }

    pub async fn say(&mut self, line: &str) {
        let _ = self.write.write_all(format!("{line}\n").as_bytes()).await;
    }

    /// End a new process that did not take over, and collect it.
    pub fn end(mut self) {
        let _ = self.child.kill();
        let mut child = self.child;
        std::thread::spawn(move || {
            let _ = child.wait();
        });
    }

    /// The new process took over: it outlives this one (and is reparented when this exits).
    pub fn release(self) -> OwnedWriteHalf {
        std::mem::forget(self.child);
        self.write
    }
}

/// The new process's side, when it was started by a handover.
pub struct Successor {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

/// A descriptor this process was given under `name` (and no one else's: the variables go).
fn inherited(name: &str) -> Option<OwnedFd> {
    let fd: RawFd = std::env::var(name).ok()?.parse().ok()?;
    // Read before the runtime starts any thread (main.rs), so removing it races nothing.
    std::env::remove_var(name);
    (fd >= 3).then(|| sys::own_fd(fd))
}

/// The status socket and metrics listener a handover passed, if any.
pub fn inherited_listeners() -> (
    Option<std::os::unix::net::UnixListener>,
    Option<std::net::TcpListener>,
) {
    let status = inherited(ENV_STATUS).map(std::os::unix::net::UnixListener::from);
    let metrics = inherited(ENV_METRICS).map(std::net::TcpListener::from);
    (status, metrics)
}

impl Successor {
    /// This process was started by a handover (before the runtime: it reads the environment).
    pub fn from_env() -> Option<OwnedFd> {
        inherited(ENV_CHANNEL)
    }

    pub fn new(fd: OwnedFd) -> io::Result<Successor> {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)?;
        let (read, write) = UnixStream::from_std(std)?.into_split();
        Ok(Successor {
            read: BufReader::new(read),
            write,
        })
    }

    pub async fn say(&mut self, line: &str) {
        let _ = self.write.write_all(format!("{line}\n").as_bytes()).await;
    }

    /// Wait for `word` from the old process, at most `within`.
    pub async fn expect(&mut self, word: &str, within: Duration) -> bool {
        let mut line = String::new();
        matches!(
            tokio::time::timeout(within, self.read.read_line(&mut line)).await,
            Ok(Ok(n)) if n > 0 && line.trim_end() == word
        )
    }

    /// After the takeover: the old process's reports of its drain (`draining PID N`), until
    /// it exits; `on_report` gets `Some((pid, open channels))`, then `None`.
    pub async fn follow_drain(mut self, on_report: impl Fn(Option<(u32, usize)>)) {
        let mut line = String::new();
        loop {
            line.clear();
            match self.read.read_line(&mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let mut parts = line.split_whitespace().skip(1);
                    let pid = parts.next().and_then(|p| p.parse().ok());
                    let open = parts.next().and_then(|n| n.parse().ok());
                    if let (Some(pid), Some(open)) = (pid, open) {
                        on_report(Some((pid, open)));
                    }
                }
            }
        }
        on_report(None);
    }
}

/// The old process tells the new one how its drain goes.
pub async fn report_drain(write: &mut OwnedWriteHalf, open: usize) {
    let line = format!("draining {} {open}\n", std::process::id());
    let _ = write.write_all(line.as_bytes()).await;
}

/// A listener's descriptor, to pass on in a handover.
pub fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}
