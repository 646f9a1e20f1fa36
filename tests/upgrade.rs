//! Upgrades and reloads cut no sync: a package upgrade replaces the binary and reloads, and the
//! running agent hands its tunnel to a process of the new binary while its own open channels
//! finish; a new binary that cannot serve leaves the old one serving; a reload that changes a
//! tunnel setting lets the old session's channels finish. (Under systemd, with the packages:
//! packaging/test-packages.sh.)

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use secoda_agent_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A copy of the agent binary in `dir`, to run and later replace.
fn installed_copy(dir: &Path) -> PathBuf {
    let path = dir.join("secoda-agent");
    std::fs::copy(agent_bin(), &path).unwrap();
    path
}

/// Replace `path` as dpkg does: a new file renamed over it (the running one is unlinked).
fn replace(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("dpkg-new");
    std::fs::write(&tmp, contents).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A transfer of `secs` seconds at about 1 MiB/s through the tunnel to an echo service, every
/// byte checked on its way back.
async fn transfer(listen: u16, echo: u16, secs: u64, seed: u64) -> Result<(), String> {
    let (code, s) = socks5(listen, "127.0.0.1", echo).await;
    let s = s.ok_or(format!("SOCKS reply {code}"))?;
    let data = payload(secs as usize * 1024 * 1024, seed);
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(10 * 1024) {
            w.write_all(chunk).await?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        w.shutdown().await
    });
    let mut back = Vec::with_capacity(data.len());
    let read = r.read_to_end(&mut back).await;
    let wrote = writer.await.unwrap();
    wrote.map_err(|e| format!("send failed: {e} after {} bytes back", back.len()))?;
    read.map_err(|e| format!("receive failed: {e} after {} bytes", back.len()))?;
    if back.len() != data.len() || checksum(&back) != checksum(&data) {
        return Err(format!(
            "{} of {} bytes came back intact?",
            back.len(),
            data.len()
        ));
    }
    Ok(())
}

/// Requests every 100 ms until `stop`; the time during which they failed, in all.
fn requests(
    listen: u16,
    echo: u16,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Duration, u64)> {
    tokio::spawn(async move {
        let mut failing_since: Option<Instant> = None;
        let mut failed = Duration::ZERO;
        let mut count = 0;
        while !stop.load(Ordering::Relaxed) {
            let ok = match tokio::time::timeout(
                Duration::from_secs(2),
                socks5(listen, "127.0.0.1", echo),
            )
            .await
            {
                Ok((0, Some(s))) => echo_roundtrip(s, b"ping").await,
                _ => false,
            };
            count += 1;
            match (ok, failing_since) {
                (false, None) => failing_since = Some(Instant::now()),
                (true, Some(t)) => {
                    failed += t.elapsed();
                    failing_since = None;
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(t) = failing_since {
            failed += t.elapsed();
        }
        (failed, count)
    })
}

/// SIGHUP after the binary was replaced by one that will not serve: the old process's line
/// saying the handover failed.
async fn failed_handover_line(agent: &Agent) -> String {
    agent.signal(libc::SIGHUP);
    assert!(
        agent
            .wait_output("handover to", Duration::from_secs(20))
            .await,
        "{}",
        agent.output()
    );
    let out = agent.output();
    out.lines()
        .find(|l| l.contains("handover to"))
        .unwrap()
        .to_string()
}

fn status_json(agent: &Agent) -> serde_json::Value {
    let (_, text) = agent.status(&["--json"]);
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

/// Kills the new binary's process (not the harness's child) when the test ends.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_hands_the_tunnel_to_the_new_binary_and_cuts_no_transfer() {
    let sshd = Sshd::start();
    let listen = free_port();
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = installed_copy(bin_dir.path());
    let mut agent = Agent::start_bin(&bin, &sshd.agent_toml(listen, ""));
    agent.wait_ready().await;
    let old_pid = agent.child.id();
    let echo = echo_server().await.port();

    let stop = Arc::new(AtomicBool::new(false));
    let pings = requests(listen, echo, stop.clone());
    let transfers: Vec<_> = (0..3)
        .map(|i| tokio::spawn(transfer(listen, echo, 12, i)))
        .collect();
    assert!(
        agent
            .wait_channels(Duration::from_secs(5), |c| c.len() >= 3)
            .await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The package upgrade: a new file at the binary's path, then a reload.
    replace(&bin, &std::fs::read(agent_bin()).unwrap());
    let before = agent.notifications().len();
    agent.signal(libc::SIGHUP);
    let new_pid = until_some(Duration::from_secs(20), || async {
        let v = status_json(&agent);
        v["pid"]
            .as_u64()
            .filter(|p| *p as u32 != old_pid)
            .map(|p| p as u32)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no new process serves the status socket: {}",
            agent.output()
        )
    });
    let _cleanup = KillOnDrop(Some(new_pid));
    let said: Vec<String> = agent.notifications()[before..].to_vec();
    let main_at = said
        .iter()
        .position(|n| n.contains(&format!("MAINPID={new_pid}")))
        .unwrap_or_else(|| panic!("no MAINPID={new_pid}: {said:?}"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            agent.notifications()[before..]
                .iter()
                .skip(main_at + 1)
                .any(|n| n.contains("READY=1"))
        })
        .await,
        "no READY=1 after MAINPID: {:?}",
        agent.notifications()
    );
    let exe = std::fs::read_link(format!("/proc/{new_pid}/exe")).unwrap();
    assert_eq!(exe, bin, "the new process runs {exe:?}");

    // The old process drains, and the new one's status says so.
    let v = status_json(&agent);
    assert_eq!(v["state"], "up", "{v}");
    assert_eq!(v["draining"]["pid"], old_pid, "{v}");
    assert!(v["draining"]["channels"].as_u64().unwrap() >= 1, "{v}");
    let (_, text) = agent.status(&[]);
    assert!(
        text.contains(&format!(
            "draining:   the previous binary's process (pid {old_pid})"
        )),
        "{text}"
    );
    assert!(
        agent.output().contains("stays until its"),
        "{}",
        agent.output()
    );

    for t in transfers {
        t.await
            .unwrap()
            .unwrap_or_else(|e| panic!("a transfer was cut: {e}\n{}", agent.output()));
    }
    // The old process exits once its channels have ended.
    assert!(
        agent.wait_exit(Duration::from_secs(15)).await.is_some(),
        "the old process is still running: {}",
        agent.output()
    );
    assert!(agent
        .output()
        .contains("every channel of the previous binary ended"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (failed, count) = pings.await.unwrap();
    eprintln!("requests failed for {failed:?} in all ({count} requests)");
    assert!(count > 50, "{count} requests");
    assert!(
        failed <= Duration::from_secs(1),
        "requests failed for {failed:?}"
    );
    // The new process serves on; its status has forgotten the old one.
    assert_serves(listen).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_json(&agent)["draining"].is_null()
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_cannot_serve_leaves_the_old_one_serving() {
    let sshd = Sshd::start();
    let listen = free_port();
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = installed_copy(bin_dir.path());
    let agent = Agent::start_bin(&bin, &sshd.agent_toml(listen, ""));
    agent.wait_ready().await;
    let old_pid = agent.child.id();
    let echo = echo_server().await.port();
    let stop = Arc::new(AtomicBool::new(false));
    let pings = requests(listen, echo, stop.clone());
    let transfer = tokio::spawn(transfer(listen, echo, 8, 7));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A new version that refuses the configuration (exits 78 at once).
    replace(
        &bin,
        b"#!/bin/sh\necho 'configuration invalid: a stricter new version' >&2\nexit 78\n",
    );
    let line = failed_handover_line(&agent).await;
    assert!(line.starts_with("ERROR"), "{line}");
    assert!(
        line.contains("keeps serving with the previous binary"),
        "{line}"
    );
    transfer
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the transfer was cut: {e}\n{}", agent.output()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (failed, _) = pings.await.unwrap();
    assert!(
        failed <= Duration::from_secs(1),
        "requests failed for {failed:?}"
    );
    let v = status_json(&agent);
    assert_eq!(v["pid"], old_pid, "{v}");
    assert_eq!(v["state"], "up", "{v}");
    assert!(
        v["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("handover to"),
        "{v}"
    );
    assert!(
        agent
            .notifications()
            .iter()
            .any(|n| n.contains("handover to") && n.contains("failed")),
        "STATUS does not say so: {:?}",
        agent.notifications()
    );
    assert_serves(listen).await;
}

#[tokio::test]
async fn an_agent_that_serves_nothing_is_replaced_in_place() {
    // A standby of a pair: no port, no channel. The new binary takes its place (same pid).
    let sshd = Sshd::start();
    let listen = free_port();
    let toml = sshd.agent_toml(listen, "pair = true\nstandby_retry = \"1s\"\n");
    let first = Agent::start(&toml);
    first.wait_ready().await;
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = installed_copy(bin_dir.path());
    let second = Agent::start_bin(&bin, &toml);
    second.wait_ready().await;
    let pid = second.child.id();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    replace(&bin, &std::fs::read(agent_bin()).unwrap());
    assert!(std::fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap()
        .to_string_lossy()
        .ends_with("(deleted)"));
    second.signal(libc::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || async {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == exe)
        })
        .await,
        "still the old binary: {}",
        second.output()
    );
    assert!(
        second.output().contains("starts in this process's place"),
        "{}",
        second.output()
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            second.status(&[]).0 == 5
        })
        .await,
        "{}",
        second.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_a_tunnel_setting_cuts_no_transfer() {
    let sshd = Sshd::start();
    let listen = free_port();
    let toml = sshd.agent_toml(listen, "[forward]\nshutdown_timeout = \"2s\"\n");
    let agent = Agent::start(&toml);
    agent.wait_ready().await;
    let echo = echo_server().await.port();
    let long = tokio::spawn(transfer(listen, echo, 12, 3));
    assert!(
        agent
            .wait_channels(Duration::from_secs(5), |c| !c.is_empty())
            .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let changed = toml.replace("keepalive_interval = \"2s\"", "keepalive_interval = \"3s\"");
    assert_ne!(changed, toml);
    std::fs::write(agent.config_path(), changed).unwrap();
    agent.signal(libc::SIGHUP);
    assert!(
        agent
            .wait_output("tunnel settings changed", Duration::from_secs(10))
            .await
    );
    // Beyond shutdown_timeout (2 s), which used to cut the old session's channels.
    long.await.unwrap().unwrap_or_else(|e| {
        panic!(
            "the transfer was cut by the reload: {e}\n{}",
            agent.output()
        )
    });
    assert!(!agent.output().contains("were cut"), "{}", agent.output());
    assert_serves(listen).await;
}

/// A new version stricter about the configuration: it says why over the handover's channel,
/// and the old process keeps serving, naming the error; the file mended, a reload hands over.
#[tokio::test]
async fn a_new_binary_that_refuses_the_configuration_says_why_and_the_old_one_serves() {
    let sshd = Sshd::start();
    let listen = free_port();
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = installed_copy(bin_dir.path());
    let toml = sshd.agent_toml(listen, "");
    let agent = Agent::start_bin(&bin, &toml);
    agent.wait_ready().await;
    let old_pid = agent.child.id();
    // The file changed since the start (the running agent has not re-read it).
    let broken = toml.replace(&format!("listen_port = {listen}"), "listen_port = 0");
    assert_ne!(broken, toml);
    std::fs::write(agent.config_path(), broken).unwrap();
    replace(&bin, &std::fs::read(agent_bin()).unwrap());
    let line = failed_handover_line(&agent).await;
    assert!(line.contains("refuses the configuration"), "{line}");
    assert!(line.contains("listen_port"), "{line}");
    assert_eq!(status_json(&agent)["pid"], old_pid);
    assert_serves(listen).await;

    // Nothing retries a failed handover on its own; once the file is mended, the next reload
    // (the operator's `systemctl reload`) hands over to the new binary.
    std::fs::write(agent.config_path(), &toml).unwrap();
    agent.signal(libc::SIGHUP);
    let new_pid = until_some(Duration::from_secs(20), || async {
        status_json(&agent)["pid"]
            .as_u64()
            .filter(|p| *p as u32 != old_pid)
            .map(|p| p as u32)
    })
    .await
    .unwrap_or_else(|| panic!("the reload did not hand over: {}", agent.output()));
    let _cleanup = KillOnDrop(Some(new_pid));
    assert_eq!(
        std::fs::read_link(format!("/proc/{new_pid}/exe")).unwrap(),
        bin
    );
    assert_serves(listen).await;
}
