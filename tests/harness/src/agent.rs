//! The agent binary under test, with a systemd-style notify socket; every output is checked
//! for key material when it is dropped.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;

use super::{command_in, eventually, until_some};

/// The agent binary under test, with its own notify socket; killed when dropped.
pub struct Agent {
    pub dir: TempDir,
    pub child: Child,
    notify: Arc<Mutex<Vec<String>>>,
    output: Arc<Mutex<String>>,
    /// Private key material this agent was given; none of it may ever appear in its output.
    secrets: Vec<String>,
}

/// The private key material in a config: the body lines of key files it names, and
/// base64-encoded keys it holds.
fn secrets_in(text: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    for line in text.lines() {
        let value = line
            .split_once('=')
            .map(|(_, v)| v.trim().trim_matches('"').to_string());
        let Some(value) = value else { continue };
        if line.trim_start().starts_with("key_file") {
            if let Ok(key) = std::fs::read_to_string(&value) {
                secrets.extend(
                    key.lines()
                        .filter(|l| l.len() > 20 && !l.starts_with("-----"))
                        .map(String::from),
                );
            }
        } else if let Some(password) = url_password(&value) {
            // A proxy URL's password, and the basic-auth token it would be sent as.
            let user = value
                .split_once("://")
                .unwrap()
                .1
                .split(':')
                .next()
                .unwrap();
            use base64::Engine;
            secrets.push(
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")),
            );
            secrets.push(password);
        } else if (line.contains("KEY_BASE64") || line.trim_start().starts_with("key_base64"))
            && value.len() > 20
        {
            secrets.push(value);
        }
    }
    secrets
}

/// The password in `scheme://user:password@host:port`, when it is long enough to search for.
fn url_password(value: &str) -> Option<String> {
    let (_, rest) = value.split_once("://")?;
    let (userinfo, _) = rest.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (password.len() >= 6).then(|| password.to_string())
}

/// The agent binary under test: `SECODA_AGENT_BIN` if set (CI's pass against the shipped
/// binary; the benchmark's A/B runs), else the one cargo built beside this test binary.
/// Cargo builds a package's binaries before its integration tests and benchmarks, into the
/// parent of the `deps/` folder the test binary runs from (how assert_cmd finds them too).
pub fn agent_bin() -> String {
    if let Ok(bin) = std::env::var("SECODA_AGENT_BIN") {
        return bin;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().expect("the test binary's folder");
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let bin = dir.join("secoda-agent");
    assert!(
        bin.exists(),
        "no agent binary at {}: run the tests through cargo, or set SECODA_AGENT_BIN",
        bin.display()
    );
    bin.to_string_lossy().into_owned()
}

/// Run the agent binary once (`check-config`, `doctor`, `status`, ...), inside `netns` if
/// given: its exit code, and stdout followed by stderr.
pub fn run_agent(netns: Option<&str>, args: &[&str]) -> (i32, String) {
    let out = command_in(netns, &agent_bin())
        .args(args)
        // The runtime directory would point `doctor` and `status` at a real agent's socket.
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// `secoda-agent doctor` with `toml` as its config (a 0600 file) and `socket` as the status
/// socket of a running agent (a path where none listens, if not given).
pub fn doctor(netns: Option<&str>, toml: &str, socket: Option<&std::path::Path>) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, toml).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let none = dir.path().join("none.sock");
    let socket = socket.unwrap_or(&none);
    run_agent(
        netns,
        &[
            "doctor",
            "--config",
            config.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
        ],
    )
}

impl Agent {
    /// Write `toml` as the config and start `secoda-agent run --config ...`.
    pub fn start(toml: &str) -> Agent {
        Self::start_with(toml, &[], &[])
    }

    pub fn start_with(toml: &str, args: &[&str], env: &[(&str, &str)]) -> Agent {
        Self::start_in(None, toml, args, env)
    }

    /// The agent run from `bin` (a copy of the binary under test, which a test can then
    /// replace as a package upgrade does).
    pub fn start_bin(bin: &std::path::Path, toml: &str) -> Agent {
        Self::start_program(None, &bin.display().to_string(), toml, &[], &[])
    }

    /// The agent inside network namespace `netns`.
    pub fn start_in(netns: Option<&str>, toml: &str, args: &[&str], env: &[(&str, &str)]) -> Agent {
        Self::start_program(netns, &agent_bin(), toml, args, env)
    }

    fn start_program(
        netns: Option<&str>,
        program: &str,
        toml: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut secrets = secrets_in(toml);
        for (k, v) in env {
            secrets.extend(secrets_in(&format!("{k}={v}")));
        }
        if let Some(i) = args.iter().position(|a| *a == "--env-file") {
            secrets.extend(secrets_in(
                &std::fs::read_to_string(args[i + 1]).unwrap_or_default(),
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("sa-agent")
            .tempdir()
            .unwrap();
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, toml).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        let sock_path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        let notify = Arc::new(Mutex::new(Vec::new()));
        let n = notify.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(len) = sock.recv(&mut buf) {
                n.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..len]).to_string());
            }
        });
        let mut cmd = command_in(netns, program);
        cmd.arg("run");
        if !toml.is_empty() {
            cmd.arg("--config").arg(&config);
        }
        cmd.args(args)
            .env_remove("JOURNAL_STREAM")
            .env("NOTIFY_SOCKET", &sock_path)
            .env("RUNTIME_DIRECTORY", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the agent");
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let out = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("AGENT_LOG").is_some() {
                        eprintln!("agent: {line}");
                    }
                    let mut o = out.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        Agent {
            dir,
            child,
            notify,
            output,
            secrets,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    /// The agent's status socket (its runtime directory is its temporary directory).
    pub fn status_socket(&self) -> PathBuf {
        self.dir.path().join("status.sock")
    }

    /// `secoda-agent status --socket ... [args]`: exit code and stdout (stderr appended).
    pub fn status(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(agent_bin())
            .arg("status")
            .arg("--socket")
            .arg(self.status_socket())
            .args(args)
            .output()
            .unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).to_string();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }

    /// The open channels as `status --json` lists them (none when the agent does not answer).
    pub fn channels(&self) -> Vec<serde_json::Value> {
        let (_, text) = self.status(&["--json"]);
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["channels"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Wait until the open channels satisfy `pred`.
    pub async fn wait_channels(
        &self,
        timeout: Duration,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> bool {
        eventually(timeout, || async { pred(&self.channels()) }).await
    }

    /// Wait until a channel carries bytes to its target (a transfer is under way), or panic.
    pub async fn wait_transfer(&self) {
        let moving = |c: &[serde_json::Value]| {
            c.iter()
                .any(|c| c["bytes_to_target"].as_u64().unwrap_or(0) > 0)
        };
        assert!(
            self.wait_channels(Duration::from_secs(10), moving).await,
            "no channel carried data; output:\n{}",
            self.output()
        );
    }

    /// Wait until no channel is open (the agent has finished with every one), or panic.
    pub async fn wait_no_channels(&self) {
        assert!(
            self.wait_channels(Duration::from_secs(30), |c| c.is_empty())
                .await,
            "channels still open: {:?}",
            self.channels()
        );
    }

    pub fn notifications(&self) -> Vec<String> {
        self.notify.lock().unwrap().clone()
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Wait until a notification satisfying `pred` arrives (counting from index `from`).
    pub async fn wait_notify(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        until_some(timeout, || async {
            self.notifications()
                .into_iter()
                .skip(from)
                .find(|m| pred(m))
        })
        .await
    }

    /// Wait for READY=1 (the first one after notification index `from`).
    pub async fn wait_ready_from(&self, from: usize) {
        if self
            .wait_notify(from, Duration::from_secs(20), |m| {
                m.lines().any(|l| l == "READY=1")
            })
            .await
            .is_none()
        {
            panic!(
                "agent not ready; notifications: {:?}\noutput:\n{}",
                self.notifications(),
                self.output()
            );
        }
    }

    pub async fn wait_ready(&self) {
        self.wait_ready_from(0).await
    }

    pub async fn wait_output(&self, needle: &str, timeout: Duration) -> bool {
        eventually(timeout, || async { self.output().contains(needle) }).await
    }

    /// Wait until `needle` has appeared `count` times in the output.
    pub async fn wait_output_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        eventually(timeout, || async {
            self.output().matches(needle).count() >= count
        })
        .await
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = &mut self.child;
        until_some(timeout, || {
            std::future::ready(child.try_wait().ok().flatten())
        })
        .await
    }
}

impl Agent {
    /// Open file descriptors of the agent process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            // Every test that runs an agent also checks that no key material leaked.
            std::thread::sleep(Duration::from_millis(50));
            let out = self.output();
            for s in &self.secrets {
                assert!(
                    !out.contains(s.as_str()),
                    "private key material in the agent's output"
                );
            }
        }
    }
}
