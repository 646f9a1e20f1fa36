//! The agent against OpenSSH's own client (`ssh -N -R PORT`) across a long path, as a
//! customer's is: the agent and its targets in one network namespace, sshd and the clients of
//! the tunnel in another, joined by a line that passes IP packets after a delay and drops a
//! share of them (tests/harness/src/delayline.rs; this kernel has no netem). Both clients
//! through the same sshd, in alternating rounds; medians reported, and plain TCP across the
//! same path as the ceiling.
//!
//!     cargo bench --bench longpath                        # 40 ms round trip, no loss
//!     BENCH_RTT_MS=100 cargo bench --bench longpath       # 100 ms
//!     BENCH_LOSS=1 cargo bench --bench longpath           # 1 % of packets lost each way
//!     BENCH_HOP=1 cargo bench --bench longpath            # through a hop that terminates TCP
//!     BENCH_ROUNDS=3 BENCH_BULK_MIB=256 ...               # the defaults
//!     BENCH_MIXED_S=30 ...                                # the mixed phase's length
//!     BENCH_LOG=debug ...                                 # print the agent's window lines
//!
//! Writes target/bench-longpath.json.

use std::time::Duration;

use secoda_agent_harness::load::*;
use secoda_agent_harness::*;

/// The tunnel's listen port on the server's side (namespaces are private: no clash).
const LISTEN: u16 = 10130;
/// How long the two downloads and the ping run side by side, in seconds (`BENCH_MIXED_S`): 10,
/// or 30 with loss. The ping's exchanges follow each other (each waits behind the downloads'
/// queue, 80-120 ms on a 40 ms path), so a 10 s phase holds only 80-120 of them; with loss
/// their tail is the few that met a retransmission, so it takes longer to see enough.
const MIXED_S: f64 = 10.0;
const MIXED_S_WITH_LOSS: f64 = 30.0;

fn env_f64(k: &str, default: f64) -> f64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy)]
struct Ports {
    sink: u16,
    source: u16,
    echo: u16,
}

#[derive(Default)]
struct Round {
    upload: f64,
    download: f64,
    mixed_bulk: f64,
    /// The ping's exchanges, ms.
    pings: Vec<f64>,
}

fn main() {
    raise_nofile();
    let rtt_ms = env_f64("BENCH_RTT_MS", 40.0);
    let loss_pct = env_f64("BENCH_LOSS", 0.0);
    let rounds = env_f64("BENCH_ROUNDS", 3.0) as usize;
    let bulk = (env_f64("BENCH_BULK_MIB", 256.0) as u64) << 20;
    let mixed_for = Duration::from_secs_f64(env_f64(
        "BENCH_MIXED_S",
        if loss_pct > 0.0 {
            MIXED_S_WITH_LOSS
        } else {
            MIXED_S
        },
    ));
    let line = DelayLine::new(
        "lp",
        Duration::from_secs_f64(rtt_ms / 2000.0),
        loss_pct / 100.0,
    );
    let sshd = line.sshd("MaxStartups 100\n");
    // BENCH_HOP=1: both clients reach sshd through a relay next to them that terminates TCP
    // (a transparent proxy, a TCP load balancer): their kernels see the hop's round trip.
    let hop = env_f64("BENCH_HOP", 0.0) != 0.0;
    let server = if hop {
        ("127.0.0.1", line.hop(sshd.port))
    } else {
        (FAR_ADDR, sshd.port)
    };

    // The targets, in the agent's namespace, for the whole run (on all addresses: plain TCP
    // reaches the sink from the far side).
    let (tx, rx) = std::sync::mpsc::channel();
    let _services = line.near.within(move || async move {
        let ports = Ports {
            sink: counting_sink("0.0.0.0").await,
            source: sized_source("0.0.0.0").await,
            echo: echo_server().await.port(),
        };
        tx.send(ports).unwrap();
        std::future::pending::<()>().await
    });
    let ports = rx.recv().unwrap();

    let tcp = line
        .far
        .within(move || async move { plain_tcp(ports.sink, bulk).await })
        .join()
        .unwrap();
    eprintln!("plain TCP across the path: {tcp:.1} MiB/s");

    let mut agent_rounds = Vec::new();
    let mut ssh_rounds = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_agent in order {
            let (mut agent, mut ssh) = (None, None);
            if is_agent {
                let toml = sshd
                    .agent_toml_at(server, LISTEN, "[forward]\nmax_connections = 2048\n")
                    .replace("keepalive_interval = \"2s\"\nkeepalive_max = 3\n", "");
                // BENCH_LOG=debug: the agent's debug lines about windows are printed.
                let toml = match std::env::var("BENCH_LOG") {
                    Ok(level) => format!("{toml}[log]\nlevel = \"{level}\"\n"),
                    Err(_) => toml,
                };
                agent = Some(Agent::start_in(Some(&line.near.name), &toml, &[], &[]));
            } else {
                let extra = [
                    "-o",
                    "ServerAliveInterval=15",
                    "-o",
                    "ServerAliveCountMax=4",
                ];
                ssh = Some(
                    sshd.openssh_forward_in(Some(&line.near.name), server, LISTEN, &extra)
                        .spawn()
                        .unwrap(),
                );
            }
            let name = if is_agent { "agent" } else { "openssh" };
            line.far.within(|| wait_listening(LISTEN)).join().unwrap();
            eprintln!("round {} {name}", round + 1);
            let r = line
                .far
                .within(move || measure(ports, bulk, mixed_for))
                .join()
                .unwrap();
            let mut pings = r.pings.clone();
            eprintln!(
                "  upload {:.1} download {:.1} mixed {:.1} MiB/s, ping p50 {:.1} p99 {:.1} ms ({} exchanges)",
                r.upload,
                r.download,
                r.mixed_bulk,
                percentile(&mut pings, 0.5),
                percentile(&mut pings, 0.99),
                pings.len()
            );
            if is_agent {
                agent_rounds.push(r);
            } else {
                ssh_rounds.push(r);
            }
            if let Some(a) = &agent {
                for l in a
                    .output()
                    .lines()
                    .filter(|l| l.contains("window") || l.contains("round trip"))
                {
                    eprintln!("  agent: {l}");
                }
            }
            drop(agent);
            if let Some(mut c) = ssh {
                let _ = c.kill();
                let _ = c.wait();
            }
            // The server frees the port once the client's session is gone.
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    // Throughput: the median of the rounds. The ping: percentiles of every round's exchanges
    // together (one round's p99 is its worst exchange or two: see MIXED_S).
    type Pick = fn(&[Round]) -> f64;
    let rows: [(&str, Pick); 5] = [
        ("bulk upload, MiB/s (server -> target)", |r| {
            median(r.iter().map(|r| r.upload).collect())
        }),
        ("bulk download, MiB/s (target -> server)", |r| {
            median(r.iter().map(|r| r.download).collect())
        }),
        ("2 downloads + ping-pong: total bulk MiB/s", |r| {
            median(r.iter().map(|r| r.mixed_bulk).collect())
        }),
        ("2 downloads + ping-pong: ping p50 ms", |r| {
            percentile(&mut pooled(r), 0.5)
        }),
        ("2 downloads + ping-pong: ping p99 ms", |r| {
            percentile(&mut pooled(r), 0.99)
        }),
    ];
    println!(
        "\nsecoda-agent vs OpenSSH client across a {rtt_ms} ms path with {loss_pct} % loss each way{}; \
         medians of {rounds} alternating rounds (the ping: percentiles of all rounds' exchanges, \
         agent {}, OpenSSH {}, over {:.0} s a round); bulk {} MiB; plain TCP across the path {tcp:.1} MiB/s",
        if hop { ", through a hop that terminates TCP" } else { "" },
        pooled(&agent_rounds).len(),
        pooled(&ssh_rounds).len(),
        mixed_for.as_secs_f64(),
        bulk >> 20
    );
    println!("\n| measure | agent | OpenSSH | agent / OpenSSH |\n| --- | ---: | ---: | ---: |");
    let mut json = Vec::new();
    for (name, pick) in rows {
        let a = pick(&agent_rounds);
        let o = pick(&ssh_rounds);
        let ratio = if o > 0.0 { a / o } else { 0.0 };
        println!("| {name} | {a:.2} | {o:.2} | {ratio:.2} |");
        json.push(format!(
            "{{\"measure\":\"{name}\",\"agent\":{a:.4},\"openssh\":{o:.4}}}"
        ));
    }
    let out = format!(
        "{{\"rtt_ms\":{rtt_ms},\"loss_pct\":{loss_pct},\"hop\":{hop},\"rounds\":{rounds},\"tcp_mibs\":{tcp:.2},\"rows\":[{}]}}\n",
        json.join(",")
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-longpath.json");
    std::fs::write(&path, out).unwrap();
    println!("written: {}", path.display());
    // The services' thread never ends, so the process exits here; exit runs no destructors, so
    // sshd and the namespaces go first.
    drop(sshd);
    drop(line);
    std::process::exit(0);
}

async fn measure(p: Ports, bulk: u64, mixed_for: Duration) -> Round {
    let mut r = Round {
        upload: upload(LISTEN, p.sink, bulk).await,
        download: download(LISTEN, p.source, bulk).await,
        ..Round::default()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let a = tokio::spawn(download_until(LISTEN, p.source, stop.clone()));
    let b = tokio::spawn(download_until(LISTEN, p.source, stop.clone()));
    let pings = tokio::spawn(pings_until(LISTEN, p.echo, stop.clone()));
    tokio::time::sleep(mixed_for).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    r.mixed_bulk = a.await.unwrap() + b.await.unwrap();
    r.pings = pings.await.unwrap();
    r
}

fn pooled(rounds: &[Round]) -> Vec<f64> {
    rounds
        .iter()
        .flat_map(|r| r.pings.iter().copied())
        .collect()
}

/// Straight across the path to the sink, no tunnel: the ceiling.
async fn plain_tcp(sink: u16, bulk: u64) -> f64 {
    let s = tokio::net::TcpStream::connect((NEAR_ADDR, sink))
        .await
        .unwrap();
    send_counted(s, bulk).await
}
