//! A long path on one machine: two network namespaces joined by a pair of TUN devices, with
//! this process passing each IP packet from one to the other after a fixed delay, dropping a
//! share of them at random, or all of them during a blackout. This kernel has no `netem`;
//! unlike a relay that terminates TCP, the line passes packets, so both ends' TCP (and the
//! agent's own round-trip reading) see the true path: its delay, its losses, its silence.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{NetNs, Sshd};

/// The near end's address (the agent's side).
pub const NEAR_ADDR: &str = "10.201.0.1";
/// The far end's address (the server's side).
pub const FAR_ADDR: &str = "10.201.0.2";

/// Two namespaces and the line between them; everything goes when dropped.
pub struct DelayLine {
    /// The agent's side.
    pub near: NetNs,
    /// The server's side.
    pub far: NetNs,
    blackout: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DelayLine {
    /// A path with `one_way` delay in each direction (the round trip is twice that), losing
    /// each packet with probability `loss` (0.01 for 1 %).
    pub fn new(tag: &str, one_way: Duration, loss: f64) -> DelayLine {
        let near = NetNs::new(&format!("{tag}n"));
        let far = NetNs::new(&format!("{tag}f"));
        // Device names are global while they are created: unique per process and line.
        static LINES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LINES.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id() % 100_000;
        let (near_dev, far_dev) = (format!("sdn{pid}x{n}"), format!("sdf{pid}x{n}"));
        let near_tun = open_tun(&near_dev);
        let far_tun = open_tun(&far_dev);
        for (ns, dev, addr, peer) in [
            (&near, &near_dev, NEAR_ADDR, FAR_ADDR),
            (&far, &far_dev, FAR_ADDR, NEAR_ADDR),
        ] {
            run(&["ip", "link", "set", dev, "netns", &ns.name]);
            ns.run(&["ip", "addr", "add", addr, "peer", peer, "dev", dev]);
            ns.run(&["ip", "link", "set", dev, "up"]);
        }
        let blackout = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let near_tun = Arc::new(near_tun);
        let far_tun = Arc::new(far_tun);
        for (from, to, seed) in [
            (near_tun.clone(), far_tun.clone(), 1),
            (far_tun, near_tun, 2),
        ] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let (blackout, stop1, stop2) = (blackout.clone(), stop.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                carry(&from, tx, one_way, loss, seed, &blackout, &stop1)
            }));
            threads.push(std::thread::spawn(move || deliver(&to, rx, &stop2)));
        }
        DelayLine {
            near,
            far,
            blackout,
            stop,
            threads,
        }
    }

    /// An sshd on the far side, listening on `FAR_ADDR` (for [`Sshd::agent_toml_at`]).
    pub fn sshd(&self, extra_config: &str) -> Sshd {
        Sshd::start_in(
            Some(&self.far.name),
            &format!("ListenAddress {FAR_ADDR}\n{extra_config}"),
        )
    }

    /// A hop that terminates TCP (a transparent proxy, a TCP load balancer) on the near side,
    /// next to the agent: each connection to `127.0.0.1:PORT` there (the port returned) is
    /// answered by the hop, which opens its own connection across the line to
    /// `FAR_ADDR:to_port` and copies bytes both ways. The near side's kernel then sees the
    /// hop's round trip, not the path's. It runs until the process ends.
    pub fn hop(&self, to_port: u16) -> u16 {
        let (tx, rx) = mpsc::channel();
        let _ = self.near.within(move || async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            while let Ok((mut near, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut far) = tokio::net::TcpStream::connect((FAR_ADDR, to_port)).await
                    else {
                        return;
                    };
                    let _ = near.set_nodelay(true);
                    let _ = far.set_nodelay(true);
                    // Buffers as large as a proxy's: the hop must not be the bottleneck.
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut near,
                        &mut far,
                        256 << 10,
                        256 << 10,
                    )
                    .await;
                });
            }
        });
        rx.recv().unwrap()
    }

    /// While on, every packet in either direction is dropped (a cut cable, a dead route).
    pub fn set_blackout(&self, on: bool) {
        self.blackout.store(on, Ordering::SeqCst);
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Read packets from `from`, keep or drop each, and hand the kept ones on with the moment
/// they are due.
fn carry(
    from: &File,
    due: mpsc::Sender<(Instant, Vec<u8>)>,
    delay: Duration,
    loss: f64,
    seed: u64,
    blackout: &AtomicBool,
    stop: &AtomicBool,
) {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(seed) | 1;
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        if !readable(from, 100) {
            continue;
        }
        let Ok(n) = (&*from).read(&mut buf) else {
            continue;
        };
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let lost = ((rng >> 11) as f64 / (1u64 << 53) as f64) < loss;
        if lost || blackout.load(Ordering::Relaxed) {
            continue;
        }
        if due
            .send((Instant::now() + delay, buf[..n].to_vec()))
            .is_err()
        {
            return;
        }
    }
}

/// Write each packet to `to` when it is due (in the order read: the delay is the same for all).
fn deliver(to: &File, due: mpsc::Receiver<(Instant, Vec<u8>)>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let Ok((at, packet)) = due.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        // A packet the far kernel refuses is a lost packet, as on a real path.
        let _ = (&*to).write(&packet);
    }
}

fn readable(f: &File, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for a descriptor we own.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) == 1 }
}

/// A TUN device named `name` (raw IP packets, no extra header), in this process's namespace.
fn open_tun(name: &str) -> File {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun (tests run as root)");
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `IfReq` lays out exactly.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    tun
}

fn run(args: &[&str]) {
    let ok = std::process::Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap()
        .success();
    assert!(ok, "{args:?}");
}
