//! Real forward proxies on loopback, each from its Debian package with a private
//! configuration: squid (HTTP CONNECT, basic authentication) and Dante (SOCKS5, RFC 1929).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::free_port;

/// Start `cmd` on a free port until it listens there; `start` builds the command for a port.
fn spawn_listening(mut start: impl FnMut(u16) -> Command, what: &str) -> (Child, u16) {
    for _ in 0..10 {
        let port = free_port();
        let mut child = start(port)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (child, port);
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("{what} did not start listening");
}

fn private_dir(prefix: &str) -> TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    // squid drops to its own user (proxy) and must write its logs here.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

fn crypt(flag: &str, password: &str) -> String {
    let out = Command::new("openssl")
        .args(["passwd", flag, password])
        .output()
        .expect("openssl passwd");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// squid as an HTTP CONNECT proxy that allows CONNECT to `allowed_port` only; with `user`,
/// basic authentication is required.
pub struct Squid {
    pub dir: TempDir,
    pub port: u16,
    child: Child,
}

impl Squid {
    pub fn start(allowed_port: u16, user: Option<(&str, &str)>) -> Squid {
        let dir = private_dir("sa-squid");
        let d = dir.path().display();
        let auth = match user {
            Some((name, password)) => {
                let file = dir.path().join("passwd");
                std::fs::write(&file, format!("{name}:{}\n", crypt("-apr1", password))).unwrap();
                format!(
                    "auth_param basic program /usr/lib/squid/basic_ncsa_auth {d}/passwd\n\
                     acl authed proxy_auth REQUIRED\nhttp_access allow authed\n"
                )
            }
            None => "http_access allow localhost\n".to_string(),
        };
        let (child, port) = spawn_listening(
            |port| {
                std::fs::write(
                    dir.path().join("squid.conf"),
                    format!(
                        "http_port 127.0.0.1:{port}\npid_filename {d}/squid.pid\n\
                         cache_log {d}/cache.log\naccess_log stdio:{d}/access.log squid\n\
                         coredump_dir {d}\ncache deny all\npinger_enable off\n\
                         shutdown_lifetime 0 seconds\n\
                         acl allowed_ports port {allowed_port}\nacl CONNECT method CONNECT\n\
                         http_access deny CONNECT !allowed_ports\n{auth}http_access deny all\n"
                    ),
                )
                .unwrap();
                let mut c = Command::new("squid");
                c.args(["-N", "-f"]).arg(dir.path().join("squid.conf"));
                c
            },
            "squid",
        );
        Squid { dir, port, child }
    }

    /// squid writes a line per finished request (a CONNECT when its tunnel closes).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Dante (`danted`) as a SOCKS5 proxy; with `user`, RFC 1929 username/password is required.
/// Dante checks the system's password database, so it runs in a private mount namespace with
/// its own /etc/passwd and /etc/shadow bound over the host's.
pub struct Dante {
    pub dir: TempDir,
    pub port: u16,
    child: Child,
}

impl Dante {
    pub fn start(user: Option<(&str, &str)>) -> Dante {
        let dir = private_dir("sa-dante");
        let d = dir.path().display();
        let mut passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let mut shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
        let method = match user {
            Some((name, password)) => {
                passwd += &format!("{name}:x:4242:4242::/nonexistent:/usr/sbin/nologin\n");
                shadow += &format!("{name}:{}:19000:0:99999:7:::\n", crypt("-6", password));
                "username"
            }
            None => "none",
        };
        std::fs::write(dir.path().join("passwd"), passwd).unwrap();
        std::fs::write(dir.path().join("shadow"), shadow).unwrap();
        let (child, port) = spawn_listening(
            |port| {
                std::fs::write(
                    dir.path().join("danted.conf"),
                    format!(
                        "logoutput: {d}/danted.log\ninternal: 127.0.0.1 port = {port}\n\
                         external: 127.0.0.1\nsocksmethod: {method}\nclientmethod: none\n\
                         user.privileged: root\nuser.unprivileged: root\n\
                         client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\n\
                         socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect }}\n"
                    ),
                )
                .unwrap();
                let mut c = Command::new("unshare");
                c.process_group(0);
                c.args([
                    "--mount",
                    "sh",
                    "-c",
                    &format!(
                        "mount --bind {d}/passwd /etc/passwd && mount --bind {d}/shadow /etc/shadow && exec danted -f {d}/danted.conf"
                    ),
                ]);
                c
            },
            "danted",
        );
        Dante { dir, port, child }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("danted.log")).unwrap_or_default()
    }
}

impl Drop for Dante {
    fn drop(&mut self) {
        // danted forks its workers: its process group goes as a whole.
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// The peer port of each established TCP connection of process `pid` (from `ss`).
pub fn peer_ports(pid: u32) -> Vec<u16> {
    let out = Command::new("ss")
        .args(["-Htnp", "state", "established"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter_map(|l| {
            let peer = l.split_whitespace().nth(3)?;
            peer.rsplit_once(':')?.1.parse().ok()
        })
        .collect()
}
