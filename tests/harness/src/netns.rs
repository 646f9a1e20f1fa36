//! Network namespaces, for black holes (nft) and private /etc/hosts.

use std::path::Path;
use std::process::{Command, Stdio};

use super::command_in;

/// A network namespace with loopback up, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!("sa-{tag}-{}", std::process::id());
        // A namespace left by a killed run of this pid, if any (usually none: quiet).
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
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
    /// `python3 -m http.server` on port 8080 at `bind` inside, serving `dir`, once it listens
    /// (a test's first request must not race its start: a refused second address would leave
    /// only a black-holed first); kill it when done.
    pub fn serve_http(&self, dir: &Path, bind: &str) -> std::process::Child {
        let child = command_in(Some(&self.name), "python3")
            .args(["-m", "http.server", "8080", "--bind", bind, "--directory"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let at = if bind == "0.0.0.0" { "127.0.0.1" } else { bind };
        let addr = std::net::SocketAddr::new(at.parse().unwrap(), 8080);
        let listening = self
            .within(move || super::listening(addr, std::time::Duration::from_secs(20)))
            .join()
            .unwrap();
        assert!(
            listening,
            "python3 -m http.server did not listen on {at}:8080 in 20 s"
        );
        child
    }
}

impl NetNs {
    /// Run `f` on a thread of its own inside the namespace, with a runtime of its own, so
    /// that the sockets it makes (SOCKS clients, local services) belong to the namespace.
    pub fn within<T, F, Fut>(&self, f: F) -> std::thread::JoinHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: a valid descriptor of a network namespace; only this thread moves.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
