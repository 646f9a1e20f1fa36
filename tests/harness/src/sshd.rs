//! A private OpenSSH sshd on a free loopback port, with generated keys; OpenSSH's own client
//! against it for comparisons.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const SSHD: &str = "/usr/sbin/sshd";

/// `SECODA_TEST_OPENSSH10`: a Debian 13 root filesystem (tests/openssh10-root.sh) whose sshd,
/// OpenSSH 10, every [`Sshd`] runs instead of this system's (OpenSSH 9.2), in a chroot. Its
/// files (keys, config, log) live inside that root; the agent reads the client key there.
pub fn openssh10_root() -> Option<PathBuf> {
    std::env::var_os("SECODA_TEST_OPENSSH10")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A loopback port nothing listens on now, never one this process handed out before: a port
/// is free again once its sshd is killed, and the kernel may offer it to the next caller,
/// which (as a listen port) would then clash with the sshd when it restarts on its port.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
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
    /// The chroot of an OpenSSH 10 sshd ([`openssh10_root`]).
    root: Option<PathBuf>,
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
        let root = openssh10_root();
        let mut dir = tempfile::Builder::new();
        dir.prefix("sa-sshd");
        let dir = match &root {
            Some(r) => dir.tempdir_in(r.join("tmp")),
            None => dir.tempdir(),
        }
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
            root,
        };
        sshd.spawn_on_free_port();
        sshd
    }

    fn write_config(&self) {
        // The one sshd_config of the tests (tests/sshd-lib.sh fills in the same file). The
        // test's own lines go first: for sshd the first value of an option wins.
        // The paths as sshd sees them (inside its chroot, if any).
        let inside = match &self.root {
            Some(r) => Path::new("/").join(self.dir.path().strip_prefix(r).unwrap()),
            None => self.dir.path().to_path_buf(),
        };
        let d = inside.display().to_string();
        let template = include_str!("../../sshd_config.in")
            .replace("@PORT@", &self.port.to_string())
            .replace("@HOST_KEY@", &format!("{d}/host_ed25519"))
            .replace("@DIR@", &d);
        let cfg = format!("{}\n{template}", self.extra_config);
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
        let mut cmd = match &self.root {
            Some(root) => {
                let mut c = command_in(self.netns.as_deref(), "chroot");
                c.arg(root).arg(SSHD).args(["-D", "-e", "-f"]).arg(
                    Path::new("/")
                        .join(self.dir.path().strip_prefix(root).unwrap())
                        .join("sshd_config"),
                );
                c
            }
            None => {
                let mut c = command_in(self.netns.as_deref(), SSHD);
                c.args(["-D", "-e", "-f"])
                    .arg(self.dir.path().join("sshd_config"));
                c
            }
        };
        let child = cmd
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

    /// OpenSSH's own client holding `listen` (as a previous session or an old container
    /// would), once the server listens there; killed with the returned child.
    pub async fn hold_port(&self, listen: u16) -> Child {
        let holder = self
            .openssh_forward(listen, &[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            crate::eventually(Duration::from_secs(10), || async {
                std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok()
            })
            .await,
            "OpenSSH's client did not take port {listen}"
        );
        holder
    }

    /// OpenSSH's own client holding a dynamic remote forward on `listen`, as the Docker image
    /// runs it (`ssh -N -R PORT`), with this server's host key pinned; `extra` options go
    /// before the destination.
    pub fn openssh_forward(&self, listen: u16, extra: &[&str]) -> Command {
        self.openssh_forward_in(None, ("127.0.0.1", self.port), listen, extra)
    }

    /// As [`Sshd::openssh_forward`], run inside network namespace `netns` and connecting to
    /// this server at `(host, port)` (across a [`DelayLine`](crate::DelayLine), or through a
    /// relay to it).
    pub fn openssh_forward_in(
        &self,
        netns: Option<&str>,
        (host, port): (&str, u16),
        listen: u16,
        extra: &[&str],
    ) -> Command {
        let known = self.dir.path().join("known_hosts");
        std::fs::write(&known, format!("[{host}]:{port} {}\n", self.host_key)).unwrap();
        let mut ssh = command_in(netns, "ssh");
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
        .args(["-p", &port.to_string()])
        .args(["-R", &format!("127.0.0.1:{listen}")])
        .args(extra)
        .arg(format!("{}@{host}", self.user))
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

    /// An agent.toml for this server; `extra` is appended (extra sections or keys). Keepalives
    /// are 2 s x 3, so that a dead server is seen quickly, unless `extra` sets
    /// `keepalive_interval` itself (its keys before any section header belong to `[tunnel]`).
    pub fn agent_toml(&self, listen_port: u16, extra: &str) -> String {
        self.agent_toml_at(("127.0.0.1", self.port), listen_port, extra)
    }

    /// As [`Sshd::agent_toml`], for this server reached at `(host, port)` (across a
    /// [`DelayLine`](crate::DelayLine), or through a relay to it).
    pub fn agent_toml_at(
        &self,
        (host, port): (&str, u16),
        listen_port: u16,
        extra: &str,
    ) -> String {
        let keepalive = if extra.contains("keepalive_interval") {
            ""
        } else {
            "keepalive_interval = \"2s\"\nkeepalive_max = 3\n"
        };
        format!(
            "[tunnel]\nhost = \"{host}\"\nport = {port}\nuser = \"{}\"\nlisten_port = {listen_port}\n\
             listen_address = \"127.0.0.1\"\nkey_file = \"{}\"\nhost_keys = [\"{}\"]\n\
             {keepalive}{extra}",
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
