//! Test harness: a real OpenSSH `sshd` on a free loopback port, the real agent binary, a
//! systemd-style notify socket, local target services and a small SOCKS client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub mod proxies;

pub const SSHD: &str = "/usr/sbin/sshd";

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `ssh-keygen` a key pair; returns (private key path, public key line).
pub fn keygen(dir: &Path, name: &str, kind: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-N", "", "-C", name, "-t", kind, "-f"])
        .arg(&path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    let st = cmd.stdin(Stdio::null()).status().expect("ssh-keygen");
    assert!(st.success(), "ssh-keygen failed");
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    (path, public.trim().to_string())
}

/// A private sshd on loopback, killed when dropped.
pub struct Sshd {
    pub dir: TempDir,
    pub port: u16,
    pub host_key: String,
    pub client_key: PathBuf,
    pub client_pub: String,
    pub user: String,
    extra_config: String,
    child: Option<Child>,
    netns: Option<String>,
}

/// `program` run inside network namespace `netns`, or directly. `ip netns exec` execs the
/// program, so the child's pid is the program's.
pub fn command_in(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

impl Sshd {
    pub fn start() -> Sshd {
        Self::start_with("")
    }

    /// `extra_config` lines are added to sshd_config.
    pub fn start_with(extra_config: &str) -> Sshd {
        Self::start_in(None, extra_config)
    }

    /// An sshd inside network namespace `netns` (see [`NetNs`]).
    pub fn start_in(netns: Option<&str>, extra_config: &str) -> Sshd {
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd (tests run as root)");
        let dir = tempfile::Builder::new()
            .prefix("sa-sshd")
            .tempdir()
            .unwrap();
        let (_, host_key) = keygen(dir.path(), "host_ed25519", "ed25519");
        let (client_key, client_pub) = keygen(dir.path(), "client_ed25519", "ed25519");
        std::fs::write(
            dir.path().join("authorized_keys"),
            format!("{client_pub}\n"),
        )
        .unwrap();
        let mut sshd = Sshd {
            dir,
            port: 0,
            host_key,
            client_key,
            client_pub,
            user: user(),
            extra_config: extra_config.to_string(),
            child: None,
            netns: netns.map(String::from),
        };
        sshd.spawn_on_free_port();
        sshd
    }

    fn write_config(&self) {
        let d = self.dir.path().display();
        // The test's own lines first: for sshd the first value of an option wins.
        let cfg = format!(
            "{extra}\nPort {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\n\
             AuthorizedKeysFile {d}/authorized_keys\nPidFile none\nStrictModes no\nUsePAM no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nGatewayPorts clientspecified\nAllowTcpForwarding remote\n\
             LogLevel VERBOSE\n",
            port = self.port,
            extra = self.extra_config
        );
        std::fs::write(self.dir.path().join("sshd_config"), cfg).unwrap();
    }

    fn spawn_on_free_port(&mut self) {
        for _ in 0..20 {
            self.port = free_port();
            if self.spawn() {
                return;
            }
        }
        panic!("sshd did not start; log:\n{}", self.log());
    }

    /// Start sshd on `self.port`; false if it exited (e.g. the port was taken).
    fn spawn(&mut self) -> bool {
        self.write_config();
        let log = std::fs::File::create(self.dir.path().join("sshd.log")).unwrap();
        let child = command_in(self.netns.as_deref(), SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.dir.path().join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sshd (is openssh-server installed?)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log().contains("Server listening on") {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kill the listener and every session process under it, as a crash or reboot would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let mut pids = vec![c.id() as i32];
            let mut i = 0;
            while i < pids.len() {
                pids.extend(children(pids[i]));
                i += 1;
            }
            for pid in pids {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let _ = c.wait();
        }
    }

    /// Start again on the same port (after `kill`).
    pub fn restart(&mut self) {
        assert!(self.spawn(), "sshd did not restart on port {}", self.port);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// OpenSSH's own client holding a dynamic remote forward on `listen`, as the Docker image
    /// runs it (`ssh -N -R PORT`), with this server's host key pinned; `extra` options go
    /// before the destination.
    pub fn openssh_forward(&self, listen: u16, extra: &[&str]) -> Command {
        let known = self.dir.path().join("known_hosts");
        std::fs::write(
            &known,
            format!("[127.0.0.1]:{} {}\n", self.port, self.host_key),
        )
        .unwrap();
        let mut ssh = Command::new("ssh");
        ssh.args([
            "-N",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .args(["-o", "ExitOnForwardFailure=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .arg("-i")
        .arg(&self.client_key)
        .args(["-p", &self.port.to_string()])
        .args(["-R", &format!("127.0.0.1:{listen}")])
        .args(extra)
        .arg(format!("{}@127.0.0.1", self.user))
        .stdin(Stdio::null());
        ssh
    }

    /// The cipher of each session so far, in order, as sshd logs it (needs `LogLevel DEBUG1`).
    pub fn negotiated_ciphers(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| l.split("kex: server->client cipher: ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(String::from)
            .collect()
    }

    pub fn authorize(&self, public: &str) {
        let path = self.dir.path().join("authorized_keys");
        let mut keys = std::fs::read_to_string(&path).unwrap();
        keys.push_str(public);
        keys.push('\n');
        std::fs::write(path, keys).unwrap();
    }

    /// An agent.toml for this server; `extra` is appended (extra sections or keys).
    pub fn agent_toml(&self, listen_port: u16, extra: &str) -> String {
        format!(
            "[tunnel]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nlisten_port = {listen_port}\n\
             listen_address = \"127.0.0.1\"\nkey_file = \"{}\"\nhost_keys = [\"{}\"]\n\
             keepalive_interval = \"2s\"\nkeepalive_max = 3\n{extra}",
            self.port,
            self.user,
            self.client_key.display(),
            self.host_key
        )
    }
}

/// Direct children of `pid`, from /proc.
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(pid) {
            if let Ok(child) = entry.file_name().to_string_lossy().parse() {
                out.push(child);
            }
        }
    }
    out
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill();
    }
}

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

/// The agent binary under test; `SECODA_AGENT_BIN` points the benchmark at another build
/// (for A/B comparisons in one run).
pub fn agent_bin() -> String {
    std::env::var("SECODA_AGENT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_secoda-agent").into())
}

impl Agent {
    /// Write `toml` as the config and start `secoda-agent run --config ...`.
    pub fn start(toml: &str) -> Agent {
        Self::start_with(toml, &[], &[])
    }

    pub fn start_with(toml: &str, args: &[&str], env: &[(&str, &str)]) -> Agent {
        Self::start_in(None, toml, args, env)
    }

    /// The agent inside network namespace `netns`.
    pub fn start_in(netns: Option<&str>, toml: &str, args: &[&str], env: &[(&str, &str)]) -> Agent {
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
        let mut cmd = command_in(netns, &agent_bin());
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
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(m) = self
                .notifications()
                .into_iter()
                .skip(from)
                .find(|m| pred(m))
            {
                return Some(m);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
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
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.output().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
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

/// A network namespace with loopback up, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!("sa-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success(),
            "ip netns add (tests run as root)"
        );
        assert!(Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success());
        NetNs { name }
    }

    /// Run a command inside; panics if it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let out = command_in(Some(&self.name), args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl NetNs {
    /// Drop TCP packets matching each `(direction, port)` (e.g. `("dport", 22)`) on `hook`
    /// (`input` or `output`), in nft table `table` (delete the table to let them through).
    pub fn drop_tcp(&self, table: &str, hook: &str, matches: &[(&str, u16)]) {
        self.run(&["nft", "add", "table", "inet", table]);
        let chain = format!("{{ type filter hook {hook} priority 0 ; }}");
        self.run(&["nft", "add", "chain", "inet", table, hook, &chain]);
        for (direction, port) in matches {
            let port = port.to_string();
            self.run(&[
                "nft", "add", "rule", "inet", table, hook, "tcp", direction, &port, "drop",
            ]);
        }
    }
}

impl NetNs {
    /// `python3 -m http.server` on port 8080 at `bind` inside, serving `dir`; kill it when done.
    pub fn serve_http(&self, dir: &Path, bind: &str) -> std::process::Child {
        command_in(Some(&self.name), "python3")
            .args(["-m", "http.server", "8080", "--bind", bind, "--directory"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Raise this process's open-file limit to the hard limit (1,000-channel tests need it).
pub fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// An echo service on loopback: every byte comes back.
pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A minimal HTTP server answering every request with `body`.
pub async fn http_server(body: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

/// SOCKS5 CONNECT (no auth) to `host:port` through `proxy`; returns the reply code and, on
/// success, the stream.
pub async fn socks5(proxy: u16, host: &str, port: u16) -> (u8, Option<TcpStream>) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", proxy)).await else {
        // Nothing listens on the proxy port (the tunnel is down): no SOCKS reply at all.
        return (0xff, None);
    };
    s.set_nodelay(true).unwrap();
    let mut req = vec![5, 1, 0, 5, 1, 0];
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.octets());
        }
        Ok(std::net::IpAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.octets());
        }
        Err(_) => {
            req.push(3);
            req.push(host.len() as u8);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    if s.write_all(&req).await.is_err() {
        return (0xff, None);
    }
    let mut method = [0u8; 2];
    if s.read_exact(&mut method).await.is_err() {
        return (0xff, None);
    }
    assert_eq!(method, [5, 0], "method selection");
    let mut head = [0u8; 4];
    if s.read_exact(&mut head).await.is_err() {
        return (0xff, None);
    }
    assert_eq!(head[0], 5);
    let rest = match head[3] {
        1 => 6,
        4 => 18,
        t => panic!("bad address type {t} in reply"),
    };
    let mut tail = vec![0u8; rest];
    s.read_exact(&mut tail).await.unwrap();
    if head[1] == 0 {
        (0, Some(s))
    } else {
        (head[1], None)
    }
}

/// SOCKS4 (or 4a when `host` is a name) CONNECT; returns the reply code and the stream.
pub async fn socks4(proxy: u16, host: &str, port: u16) -> (u8, Option<TcpStream>) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", proxy)).await else {
        // Nothing listens on the proxy port (the tunnel is down): no SOCKS reply at all.
        return (0xff, None);
    };
    let mut req = vec![4, 1];
    req.extend_from_slice(&port.to_be_bytes());
    match host.parse::<std::net::Ipv4Addr>() {
        Ok(a) => {
            req.extend_from_slice(&a.octets());
            req.extend_from_slice(b"user\0");
        }
        Err(_) => {
            req.extend_from_slice(&[0, 0, 0, 1]);
            req.extend_from_slice(b"user\0");
            req.extend_from_slice(host.as_bytes());
            req.push(0);
        }
    }
    s.write_all(&req).await.unwrap();
    let mut reply = [0u8; 8];
    if s.read_exact(&mut reply).await.is_err() {
        return (0xff, None);
    }
    if reply[1] == 0x5a {
        (reply[1], Some(s))
    } else {
        (reply[1], None)
    }
}

/// Deterministic pseudo-random payload.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, enough to compare payloads.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Send `data` through an open stream to an echo service and check it all comes back.
pub async fn echo_roundtrip(mut s: TcpStream, data: &[u8]) -> bool {
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut back = Vec::with_capacity(data.len());
    let recv = r.read_to_end(&mut back);
    let (sent, got) = tokio::join!(send, recv);
    sent.is_ok() && got.is_ok() && checksum(&back) == checksum(data) && back.len() == data.len()
}

/// Poll until `f` is true or the timeout passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The tunnel serves: a SOCKS5 channel to a fresh echo service round-trips byte-exact.
pub async fn assert_serves(listen: u16) {
    let echo = echo_server().await;
    let (code, s) = socks5(listen, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 0, "the tunnel does not serve");
    assert!(echo_roundtrip(s.unwrap(), &payload(10_000, 9)).await);
}

/// A fresh sshd and an agent connected to it (extra agent.toml lines appended), once READY.
pub async fn tunnel_up(extra: &str) -> (Sshd, Agent, u16) {
    let sshd = Sshd::start();
    let listen = free_port();
    let agent = Agent::start(&sshd.agent_toml(listen, extra));
    agent.wait_ready().await;
    (sshd, agent, listen)
}
