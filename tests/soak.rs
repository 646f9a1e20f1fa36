//! Soak, not part of CI (see docs/performance.md):
//!
//!     SOAK_SECS=1800 cargo test --release --test soak -- --ignored --nocapture
//!
//! Mixed traffic (32 workers, transfers of 1 KiB to 4 MiB through an echo service) for
//! SOAK_SECS, with sshd killed and restarted every SOAK_RESTART_SECS (default 300). Prints bytes
//! moved, transfers, reconnects, the agent's RSS and open descriptors every 10 s, and fails if
//! any channel not cut by a restart lost or changed a byte, or if a SOCKS request failed while
//! the server was up. (Requests that find the tunnel down while it reconnects are counted as
//! "unavailable", not as errors.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use secoda_agent_harness::*;

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

fn proc_status(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| l[field.len()..].trim().to_string())
        .unwrap_or_default()
}

#[derive(Default)]
struct Stats {
    bytes: AtomicU64,
    transfers: AtomicU64,
    cut_by_restart: AtomicU64,
    /// Channel requests that found the tunnel down (reconnecting after a restart); a failed
    /// request while the server is up counts as an error.
    unavailable: AtomicU64,
    errors: AtomicU64,
    /// Odd while sshd is down: a transfer that saw it change may have been cut legitimately.
    epoch: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long-running soak; run it by hand, see the file's header"]
async fn soak() {
    raise_nofile();
    let duration = env_secs("SOAK_SECS", 1800);
    let restart_every = env_secs("SOAK_RESTART_SECS", 300);
    let sshd = Arc::new(std::sync::Mutex::new(Sshd::start()));
    let listen = free_port();
    let toml = sshd.lock().unwrap().agent_toml(listen, "");
    let agent = Arc::new(Agent::start(&toml));
    agent.wait_ready().await;
    let echo = echo_server().await;
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let end = started + duration;

    let mut workers = Vec::new();
    for w in 0..32u64 {
        let stats = stats.clone();
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                let size = 1024usize << ((w + n) % 13); // 1 KiB .. 4 MiB
                let data = payload(size, w * 1_000_003 + n);
                let epoch = stats.epoch.load(Ordering::SeqCst);
                let stream = match tokio::time::timeout(
                    Duration::from_secs(60),
                    socks5(listen, "127.0.0.1", echo.port()),
                )
                .await
                {
                    Ok((0, Some(s))) => s,
                    other => {
                        if stats.epoch.load(Ordering::SeqCst) != epoch || epoch % 2 == 1 {
                            // No channel while the tunnel reconnects: nothing was lost.
                            stats.unavailable.fetch_add(1, Ordering::Relaxed);
                        } else {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            eprintln!(
                                "a SOCKS request failed with the server up: {:?}",
                                other.map(|(code, _)| code)
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if echo_roundtrip(stream, &data).await {
                    stats.bytes.fetch_add(2 * size as u64, Ordering::Relaxed);
                    stats.transfers.fetch_add(1, Ordering::Relaxed);
                } else if stats.epoch.load(Ordering::SeqCst) != epoch || epoch % 2 == 1 {
                    stats.cut_by_restart.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("transfer of {size} bytes lost or changed bytes with the server up");
                }
            }
        }));
    }

    let restarter = {
        let (stats, sshd) = (stats.clone(), sshd.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(restart_every).await;
                if Instant::now() + Duration::from_secs(5) > end {
                    return;
                }
                stats.epoch.fetch_add(1, Ordering::SeqCst);
                sshd.lock().unwrap().kill();
                tokio::time::sleep(Duration::from_secs(1)).await;
                sshd.lock().unwrap().restart();
                // Give the agent time to come back before transfers count as errors again.
                tokio::time::sleep(Duration::from_secs(5)).await;
                stats.epoch.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    let pid = agent.child.id();
    println!("secs  MiB_moved  transfers  cut_by_restart  unavailable  errors  reconnects  rss        fds");
    while Instant::now() < end {
        tokio::time::sleep(
            Duration::from_secs(10).min(end.saturating_duration_since(Instant::now())),
        )
        .await;
        println!(
            "{:>4}  {:>9}  {:>9}  {:>14}  {:>11}  {:>6}  {:>10}  {:>9}  {:>3}",
            started.elapsed().as_secs(),
            stats.bytes.load(Ordering::Relaxed) >> 20,
            stats.transfers.load(Ordering::Relaxed),
            stats.cut_by_restart.load(Ordering::Relaxed),
            stats.unavailable.load(Ordering::Relaxed),
            stats.errors.load(Ordering::Relaxed),
            agent
                .output()
                .matches("tunnel up")
                .count()
                .saturating_sub(1),
            proc_status(pid, "VmRSS:"),
            agent.fd_count(),
        );
    }
    for w in workers {
        w.await.unwrap();
    }
    restarter.abort();
    assert_eq!(
        stats.errors.load(Ordering::Relaxed),
        0,
        "transfers lost bytes with the server up"
    );
    assert!(stats.transfers.load(Ordering::Relaxed) > 0);
}
