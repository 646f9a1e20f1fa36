//! The agent against OpenSSH's own client (`ssh -N -R PORT`, what the Docker image runs)
//! through the same sshd, in the same run, in alternating rounds; medians reported.
//!
//!     cargo bench --bench tunnel                 # full run (5 rounds; BENCH_ROUNDS=N)
//!     BENCH_QUICK=1 cargo bench --bench tunnel   # small sizes, a smoke check
//!     BENCH_CIPHER=aes256-gcm@openssh.com ...    # like for like: sshd offers only that cipher
//!     BENCH_PROXY=squid ...                      # both through one squid (HTTP CONNECT);
//!                                                # OpenSSH with ProxyCommand nc -X connect
//!
//! By default sshd makes its default cipher offer and each client chooses as it would in
//! production; the cipher each side negotiated is read from sshd's log and printed.
//! Prints a table (agent, OpenSSH, ratio) and writes target/bench.json.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use secoda_agent_harness::load::*;
use secoda_agent_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// `BENCH_CIPHER=<ssh cipher name>`: the server offers only that cipher, so both clients use
/// it (like for like). Unset: sshd's default offer and each client's own preference, which is
/// what a customer gets (the Docker image runs `ssh` without `-c`).
fn forced_cipher() -> Option<String> {
    std::env::var("BENCH_CIPHER").ok().filter(|c| !c.is_empty())
}

struct Scale {
    bulk: u64,
    connects: usize,
    pings: usize,
    fanout: usize,
    fanout_size: usize,
    rounds: usize,
    /// `BENCH_ONLY=upload|download|bulk|latency|fanout|idle|slow|mixed` (comma-separated;
    /// `bulk` is both directions): skip the other measures, for tuning one thing quickly.
    only: Option<String>,
}

impl Scale {
    /// Whether the measure `part` (upload, download, latency, fanout) runs.
    fn runs(&self, part: &str) -> bool {
        let Some(only) = &self.only else {
            return true;
        };
        only.split(',')
            .any(|o| o == part || (o == "bulk" && matches!(part, "upload" | "download")))
    }
}

fn scale() -> Scale {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let mut sc = if std::env::var_os("BENCH_QUICK").is_some() {
        Scale {
            bulk: 64 << 20,
            connects: 50,
            pings: 200,
            fanout: 100,
            fanout_size: 64 << 10,
            rounds: 1,
            only: None,
        }
    } else {
        Scale {
            bulk: 1 << 30,
            connects: 1000,
            pings: 1000,
            fanout: 1000,
            fanout_size: 1 << 20,
            rounds: 5,
            only: None,
        }
    };
    if let Some(r) = env("BENCH_ROUNDS") {
        sc.rounds = r as usize;
    }
    if let Some(m) = env("BENCH_BULK_MIB") {
        sc.bulk = m << 20;
    }
    sc.only = std::env::var("BENCH_ONLY").ok();
    sc
}

/// The client side's services: a sink that answers with the byte count, a source that sends
/// as many bytes as asked, an echo.
struct Services {
    /// Reads no faster than `SLOW_SINK_MIBS` (a database ingesting a COPY), then answers with
    /// the byte count.
    slow_sink: u16,
    sink: u16,
    source: u16,
    echo: u16,
}

/// The slow target's pace, MiB/s, and what is sent to it: 16 MiB/s and 256 MiB, or
/// `BENCH_SLOW_MIBS` and `BENCH_SLOW_MIB` (a long COPY: 64 and 1536).
fn slow_sink_mibs() -> u64 {
    env_u64("BENCH_SLOW_MIBS", 16)
}
fn slow_upload() -> u64 {
    env_u64("BENCH_SLOW_MIB", 256) << 20
}
fn env_u64(k: &str, default: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Disk blocks held by the files process `pid` has open that have no name (a spill file is
/// created with O_TMPFILE), KiB.
fn unnamed_file_kib(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().ends_with("(deleted)"))
        })
        .filter_map(|fd| std::fs::metadata(fd.path()).ok())
        .map(|m| m.blocks() / 2)
        .sum()
}

async fn services() -> Services {
    let slow_sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_sink_port = slow_sink.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = slow_sink.accept().await {
            tokio::spawn(async move {
                // 64 KiB reads, each followed by the pause that keeps the average at the pace;
                // a small receive buffer so TCP holds the rest back, as a busy database does.
                let _ = socket2::SockRef::from(&s).set_recv_buffer_size(64 << 10);
                let mut buf = vec![0u8; 64 << 10];
                let start = Instant::now();
                let mut n = 0u64;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                    let due = Duration::from_secs_f64(n as f64 / (slow_sink_mibs() << 20) as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
            });
        }
    });
    Services {
        slow_sink: slow_sink_port,
        sink: counting_sink("127.0.0.1").await,
        source: sized_source("127.0.0.1").await,
        echo: echo_server().await.port(),
    }
}

/// A client under test: the agent or `ssh -N -R`. Dropping it stops the client.
struct Client {
    name: &'static str,
    ssh: Option<Child>,
    agent: Option<Agent>,
}

impl Client {
    fn pid(&self) -> u32 {
        match (&self.agent, &self.ssh) {
            (Some(a), _) => a.child.id(),
            (None, Some(c)) => c.id(),
            (None, None) => 0,
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(c) = self.ssh.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `BENCH_PROXY=squid`: both clients reach sshd through one squid on loopback.
fn proxied() -> bool {
    std::env::var("BENCH_PROXY").is_ok_and(|p| p == "squid")
}

fn start_agent(sshd: &Sshd, listen: u16, proxy: Option<u16>) -> Client {
    // Default max_pending: the agent paces the server when targets fall behind (see
    // transport.rs), so a sink descheduled for a moment no longer cuts the bulk upload.
    let proxy = proxy
        .map(|p| format!("proxy = \"http://127.0.0.1:{p}\"\n"))
        .unwrap_or_default();
    let agent = Agent::start(&sshd.agent_toml(
        listen,
        &format!("{proxy}[forward]\nmax_connections = 2048\n"),
    ));
    Client {
        name: "agent",
        ssh: None,
        agent: Some(agent),
    }
}

fn start_openssh(sshd: &Sshd, listen: u16, cipher: Option<&str>, proxy: Option<u16>) -> Client {
    let mut extra = vec![
        "-o",
        "ServerAliveInterval=15",
        "-o",
        "ServerAliveCountMax=4",
    ];
    if let Some(c) = cipher {
        extra.extend(["-c", c]);
    }
    // What an operator hand-builds today (netcat-openbsd).
    let via = proxy.map(|p| format!("ProxyCommand=nc -X connect -x 127.0.0.1:{p} %h %p"));
    if let Some(v) = &via {
        extra.extend(["-o", v]);
    }
    let child = sshd.openssh_forward(listen, &extra).spawn().unwrap();
    Client {
        name: "openssh",
        ssh: Some(child),
        agent: None,
    }
}

/// CPU time of all the client's threads, in seconds: the scheduler's own run time
/// (`/proc/PID/task/*/schedstat`, nanoseconds), not the 10 ms ticks of `/proc/PID/stat`,
/// which sample too coarsely for a run of a second or two.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// CPU time of every running `sshd` process (the benchmark's server is the only one).
fn sshd_cpu_secs() -> f64 {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    procs
        .flatten()
        .filter(|p| {
            std::fs::read_to_string(p.path().join("comm")).is_ok_and(|c| c.trim() == "sshd")
        })
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .map(cpu_secs)
        .sum()
}

/// Busy CPU time of the whole machine, in seconds (`/proc/stat`: user, nice, system, irq,
/// softirq; not idle, iowait or time stolen by the hypervisor).
fn machine_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| ticks.get(i)).sum();
    busy as f64 / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[derive(Default, Clone)]
struct Round {
    upload_mibs: f64,
    download_mibs: f64,
    connect_p50_ms: f64,
    connect_p99_ms: f64,
    ping_p50_ms: f64,
    ping_p99_ms: f64,
    fanout_s: f64,
    fanout_errors: usize,
    cpu_s_per_gib: f64,
    machine_cpu_s_per_gib: f64,
    sshd_cpu_s_per_gib: f64,
    rss_idle_mib: f64,
    rss_fanout_mib: f64,
    idle_ping_p50_ms: f64,
    idle_ping_p99_ms: f64,
    slow_ping_p50_ms: f64,
    slow_ping_p99_ms: f64,
    slow_download_mibs: f64,
    slow_download_share: f64,
    slow_upload_exact: f64,
    slow_rss_peak_mib: f64,
    slow_spill_peak_mib: f64,
    mixed_ping_p50_ms: f64,
    mixed_ping_p99_ms: f64,
    mixed_bulk_mibs: f64,
}

async fn measure(c: &Client, listen: u16, svc: &Services, sc: &Scale) -> Round {
    let pid = c.pid();
    let mut r = Round::default();
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.rss_idle_mib = rss_kib(pid) as f64 / 1024.0;
    bulk(pid, listen, svc, sc, &mut r).await;
    if sc.runs("latency") {
        latency(listen, svc, sc, &mut r).await;
    }
    if sc.runs("fanout") {
        fanout(pid, listen, svc, sc, &mut r).await;
    }
    if sc.runs("idle") {
        let mut lat = paced_pings(listen, svc.echo, |n| n >= 300).await;
        r.idle_ping_p50_ms = percentile(&mut lat, 0.5);
        r.idle_ping_p99_ms = percentile(&mut lat, 0.99);
    }
    if sc.runs("slow") {
        slow_target(pid, listen, svc, &mut r).await;
    }
    if sc.runs("mixed") {
        mixed(listen, svc, &mut r).await;
    }
    r
}

/// A download alone for `d`, MiB/s.
async fn download_for(listen: u16, source: u16, d: Duration) -> f64 {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let down = tokio::spawn(download_until(listen, source, stop.clone()));
    tokio::time::sleep(d).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    down.await.unwrap()
}

/// How long the download beside the slow target runs alone just before and just after it.
const SLOW_ALONE: Duration = Duration::from_secs(3);

/// A slow target (16 MiB/s, or BENCH_SLOW_MIBS) is sent 256 MiB (or BENCH_SLOW_MIB) while another channel downloads and a third
/// pings: the others must not slow down, the upload must arrive whole, memory stays bounded.
/// The download's speed alone is taken just before and just after: this machine's speed
/// drifts between the bench's phases more than the effect measured here.
async fn slow_target(pid: u32, listen: u16, svc: &Services, r: &mut Round) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let alone_before = download_for(listen, svc.source, SLOW_ALONE).await;
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let spill = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (peak, spill, stop) = (peak.clone(), spill.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                spill.fetch_max(unnamed_file_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let down = tokio::spawn(download_until(listen, svc.source, stop.clone()));
    let pings = tokio::spawn(pings_until(listen, svc.echo, stop.clone()));
    let (code, s) = socks5(listen, "127.0.0.1", svc.slow_sink).await;
    assert_eq!(code, 0);
    let mut s = s.unwrap();
    let block = vec![0xa5u8; 256 << 10];
    let mut sent = 0u64;
    while sent < slow_upload() {
        s.write_all(&block).await.unwrap();
        sent += block.len() as u64;
    }
    s.shutdown().await.unwrap();
    let got = s.read_u64().await.unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    r.slow_upload_exact = if got == sent { 1.0 } else { 0.0 };
    r.slow_download_mibs = down.await.unwrap();
    let mut lat = pings.await.unwrap();
    r.slow_ping_p50_ms = percentile(&mut lat, 0.5);
    r.slow_ping_p99_ms = percentile(&mut lat, 0.99);
    let _ = sampler.await;
    let alone_after = download_for(listen, svc.source, SLOW_ALONE).await;
    r.slow_download_share = 100.0 * r.slow_download_mibs / ((alone_before + alone_after) / 2.0);
    r.slow_rss_peak_mib = peak.load(Ordering::Relaxed) as f64 / 1024.0;
    r.slow_spill_peak_mib = spill.load(Ordering::Relaxed) as f64 / 1024.0;
}

/// Two bulk downloads and a paced ping-pong at once, for 5 s.
async fn mixed(listen: u16, svc: &Services, r: &mut Round) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let a = tokio::spawn(download_until(listen, svc.source, stop.clone()));
    let b = tokio::spawn(download_until(listen, svc.source, stop.clone()));
    let pings = tokio::spawn(pings_until(listen, svc.echo, stop.clone()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    r.mixed_bulk_mibs = a.await.unwrap() + b.await.unwrap();
    let mut lat = pings.await.unwrap();
    r.mixed_ping_p50_ms = percentile(&mut lat, 0.5);
    r.mixed_ping_p99_ms = percentile(&mut lat, 0.99);
}

/// Bulk, both ways, and the client's CPU for it.
async fn bulk(pid: u32, listen: u16, svc: &Services, sc: &Scale, r: &mut Round) {
    let (cpu0, machine0, sshd0) = (cpu_secs(pid), machine_cpu_secs(), sshd_cpu_secs());
    let mut moved = 0;
    if sc.runs("upload") {
        r.upload_mibs = upload(listen, svc.sink, sc.bulk).await;
        moved += sc.bulk;
    }
    if sc.runs("download") {
        r.download_mibs = download(listen, svc.source, sc.bulk).await;
        moved += sc.bulk;
    }
    if moved > 0 {
        let gib = moved as f64 / (1u64 << 30) as f64;
        r.cpu_s_per_gib = (cpu_secs(pid) - cpu0) / gib;
        r.machine_cpu_s_per_gib = (machine_cpu_secs() - machine0) / gib;
        r.sshd_cpu_s_per_gib = (sshd_cpu_secs() - sshd0) / gib;
    }
}

/// Connection setup and request/response latency.
async fn latency(listen: u16, svc: &Services, sc: &Scale, r: &mut Round) {
    // Connection setup: SOCKS5 by name to the first byte back.
    let mut lat = Vec::with_capacity(sc.connects);
    for _ in 0..sc.connects {
        let t = Instant::now();
        let (code, s) = socks5(listen, "localhost", svc.echo).await;
        assert_eq!(code, 0);
        let mut s = s.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    r.connect_p50_ms = percentile(&mut lat, 0.5);
    r.connect_p99_ms = percentile(&mut lat, 0.99);

    // Request/response on one open channel.
    let (_, s) = socks5(listen, "127.0.0.1", svc.echo).await;
    let mut s = s.unwrap();
    let msg = [7u8; 100];
    let mut back = [0u8; 100];
    let mut lat = Vec::with_capacity(sc.pings);
    for _ in 0..sc.pings {
        let t = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    r.ping_p50_ms = percentile(&mut lat, 0.5);
    r.ping_p99_ms = percentile(&mut lat, 0.99);
}

/// Fan-out: many concurrent checksummed channels; RSS sampled meanwhile.
async fn fanout(pid: u32, listen: u16, svc: &Services, sc: &Scale, r: &mut Round) {
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..sc.fanout {
        let (echo, size) = (svc.echo, sc.fanout_size);
        tasks.push(tokio::spawn(async move {
            let data = payload(size, i as u64);
            match socks5(listen, "127.0.0.1", echo).await {
                (0, Some(s)) => echo_roundtrip(s, &data).await,
                _ => false,
            }
        }));
    }
    for t in tasks {
        if !t.await.unwrap_or(false) {
            r.fanout_errors += 1;
        }
    }
    r.fanout_s = t.elapsed().as_secs_f64();
    sampler.abort();
    let peak = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .max(rss_kib(pid));
    r.rss_fanout_mib = peak as f64 / 1024.0;
}

fn loopback_ceiling(bytes: u64) -> f64 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        std::io::copy(&mut s, &mut std::io::sink()).unwrap()
    });
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let block = vec![1u8; 256 << 10];
    let t = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        std::io::Write::write_all(&mut c, &block).unwrap();
        sent += block.len() as u64;
    }
    drop(c);
    reader.join().unwrap();
    sent as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

/// The cipher's own speed (`openssl speed`, 32 KiB blocks), MiB/s, for an SSH cipher name.
fn cipher_ceiling(ssh_name: &str) -> Option<f64> {
    let evp = match ssh_name {
        "aes256-gcm@openssh.com" => "aes-256-gcm",
        "aes128-gcm@openssh.com" => "aes-128-gcm",
        "chacha20-poly1305@openssh.com" => "chacha20-poly1305",
        "aes256-ctr" => "aes-256-ctr",
        "aes128-ctr" => "aes-128-ctr",
        _ => return None,
    };
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "2", "-bytes", "32768", "-evp", evp])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.to_ascii_lowercase().starts_with(evp))?;
    let k: f64 = line
        .split_whitespace()
        .last()?
        .trim_end_matches('k')
        .parse()
        .ok()?;
    Some(k * 1000.0 / (1 << 20) as f64)
}

/// The cipher each client negotiates with this server offer, as sshd itself logs it: a probe
/// sshd with the same configuration at `LogLevel DEBUG1` (the measured sshd stays at its
/// quieter level, so logging costs nothing during the rounds). Returns (agent, OpenSSH).
async fn negotiated_ciphers(sshd_config: &str, cipher: Option<&str>) -> (String, String) {
    // For sshd the first value of an option wins.
    let probe = Sshd::start_with(&format!("LogLevel DEBUG1\n{sshd_config}"));
    let mut found = Vec::new();
    for is_agent in [true, false] {
        let listen = free_port();
        let c = if is_agent {
            start_agent(&probe, listen, None)
        } else {
            start_openssh(&probe, listen, cipher, None)
        };
        wait_listening(listen).await;
        drop(c);
        // One session at a time, so the log's order is the clients' order.
        let names = probe.negotiated_ciphers();
        assert_eq!(
            names.len(),
            found.len() + 1,
            "expected one negotiated cipher per session in sshd's log:\n{}",
            probe.log()
        );
        found = names;
    }
    (found[0].clone(), found[1].clone())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    raise_nofile();
    let sc = scale();
    let forced = forced_cipher();
    let sshd_config = match &forced {
        // Like for like: the server offers only this cipher.
        Some(c) => format!("Ciphers {c}\nMaxStartups 100\n"),
        None => "MaxStartups 100\n".to_string(),
    };
    let (agent_cipher, ssh_cipher) = negotiated_ciphers(&sshd_config, forced.as_deref()).await;
    let sshd = Sshd::start_with(&sshd_config);
    let squid = proxied().then(|| secoda_agent_harness::proxies::Squid::start(sshd.port, None));
    let proxy = squid.as_ref().map(|s| s.port);
    let svc = services().await;
    let mut agent_rounds = Vec::new();
    let mut ssh_rounds = Vec::new();
    for round in 0..sc.rounds {
        // Alternate who goes first, so drift on a noisy machine hits both alike.
        let order: [bool; 2] = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_agent in order {
            let listen = free_port();
            let c = if is_agent {
                start_agent(&sshd, listen, proxy)
            } else {
                start_openssh(&sshd, listen, forced.as_deref(), proxy)
            };
            wait_listening(listen).await;
            eprintln!("round {} {}", round + 1, c.name);
            let r = measure(&c, listen, &svc, &sc).await;
            if is_agent {
                agent_rounds.push(r)
            } else {
                ssh_rounds.push(r)
            }
            drop(c);
        }
    }

    type Pick = fn(&Round) -> f64;
    let rows: [(&str, Pick); 25] = [
        ("bulk upload, MiB/s (server -> target)", |r| r.upload_mibs),
        ("bulk download, MiB/s (target -> server)", |r| {
            r.download_mibs
        }),
        ("SOCKS5 connect to first byte, p50 ms", |r| r.connect_p50_ms),
        ("SOCKS5 connect to first byte, p99 ms", |r| r.connect_p99_ms),
        ("100-byte ping-pong, p50 ms", |r| r.ping_p50_ms),
        ("100-byte ping-pong, p99 ms", |r| r.ping_p99_ms),
        ("fan-out wall time, s", |r| r.fanout_s),
        ("fan-out errors", |r| r.fanout_errors as f64),
        ("client CPU s per GiB moved", |r| r.cpu_s_per_gib),
        ("sshd CPU s per GiB moved", |r| r.sshd_cpu_s_per_gib),
        (
            "whole machine CPU s per GiB moved (sshd, load, sink too)",
            |r| r.machine_cpu_s_per_gib,
        ),
        ("client RSS idle, MiB", |r| r.rss_idle_mib),
        ("client peak RSS during fan-out, MiB", |r| r.rss_fanout_mib),
        ("paced ping-pong (every 10 ms), p50 ms", |r| {
            r.idle_ping_p50_ms
        }),
        ("paced ping-pong (every 10 ms), p99 ms", |r| {
            r.idle_ping_p99_ms
        }),
        ("slow target: others' ping-pong p50 ms", |r| {
            r.slow_ping_p50_ms
        }),
        ("slow target: others' ping-pong p99 ms", |r| {
            r.slow_ping_p99_ms
        }),
        ("slow target: other download, MiB/s", |r| {
            r.slow_download_mibs
        }),
        (
            "slow target: other download, % of it alone just before and after",
            |r| r.slow_download_share,
        ),
        ("slow target: all of it arrived (1 = yes)", |r| {
            r.slow_upload_exact
        }),
        ("slow target: client peak RSS, MiB", |r| r.slow_rss_peak_mib),
        (
            "slow target: client's unnamed files on disk, peak MiB",
            |r| r.slow_spill_peak_mib,
        ),
        ("2 downloads + ping-pong: ping p50 ms", |r| {
            r.mixed_ping_p50_ms
        }),
        ("2 downloads + ping-pong: ping p99 ms", |r| {
            r.mixed_ping_p99_ms
        }),
        ("2 downloads + ping-pong: total bulk MiB/s", |r| {
            r.mixed_bulk_mibs
        }),
    ];
    let loopback = loopback_ceiling(sc.bulk.min(4 << 30));
    let mut ciphers = vec![agent_cipher.clone()];
    if ssh_cipher != agent_cipher {
        ciphers.push(ssh_cipher.clone());
    }
    let ceilings: Vec<(String, Option<f64>)> = ciphers
        .iter()
        .map(|c| (c.clone(), cipher_ceiling(c)))
        .collect();
    let offer = match &forced {
        Some(c) => format!("the server offers only {c}"),
        None => "sshd's default offer, each client's own preference".to_string(),
    };
    println!("\nsecoda-agent vs OpenSSH client, through one OpenSSH sshd; {offer}");
    if proxy.is_some() {
        println!("both through one squid (HTTP CONNECT); OpenSSH with ProxyCommand nc -X connect");
    }
    println!("cipher negotiated (from sshd's log): agent {agent_cipher}, OpenSSH {ssh_cipher}");
    println!("medians of {} alternating rounds; bulk {} MiB each way; {} connects; {} pings; fan-out {} x {} KiB",
        sc.rounds, sc.bulk >> 20, sc.connects, sc.pings, sc.fanout, sc.fanout_size >> 10);
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::env::consts::ARCH
    );
    println!("\n| measure | agent | OpenSSH | agent / OpenSSH |\n| --- | ---: | ---: | ---: |");
    let mut json = Vec::new();
    for (name, pick) in &rows {
        let a = median(agent_rounds.iter().map(pick).collect());
        let o = median(ssh_rounds.iter().map(pick).collect());
        let ratio = if o > 0.0 {
            format!("{:.2}", a / o)
        } else {
            "-".into()
        };
        // Three decimals for sub-millisecond latencies, two for the rest.
        let shown = |v: f64| {
            if v > 0.0 && v < 1.0 {
                format!("{v:.3}")
            } else {
                format!("{v:.2}")
            }
        };
        println!("| {name} | {} | {} | {ratio} |", shown(a), shown(o));
        json.push(format!(
            "{{\"measure\":\"{name}\",\"agent\":{a:.4},\"openssh\":{o:.4}}}"
        ));
    }
    let shown: Vec<String> = ceilings
        .iter()
        .map(|(c, v)| match v {
            Some(v) => format!("{c} alone {v:.0} MiB/s"),
            None => format!("{c} alone n/a"),
        })
        .collect();
    println!(
        "\nceilings in the same run: raw loopback TCP {loopback:.0} MiB/s; {} (openssl speed, 32 KiB blocks)",
        shown.join("; ")
    );
    let cipher_json: Vec<String> = ceilings
        .iter()
        .map(|(c, v)| {
            let v = v.map(|v| format!("{v:.1}")).unwrap_or("null".into());
            format!("\"{c}\":{v}")
        })
        .collect();
    let out = format!(
        "{{\"proxy\":{},\"forced_cipher\":{},\"cipher_agent\":\"{agent_cipher}\",\"cipher_openssh\":\"{ssh_cipher}\",\"rounds\":{},\"loopback_mibs\":{loopback:.1},\"cipher_mibs\":{{{}}},\"rows\":[{}]}}\n",
        proxy.is_some(),
        forced.as_ref().map(|c| format!("\"{c}\"")).unwrap_or("null".into()),
        sc.rounds,
        cipher_json.join(","),
        json.join(",")
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench.json");
    std::fs::write(&path, out).unwrap();
    println!("written: {}", path.display());
}
