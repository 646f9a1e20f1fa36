//! The service manager protocol (sd_notify): READY, STATUS, RELOADING, STOPPING and the
//! watchdog. Every call is a no-op when the agent is not run by systemd (no NOTIFY_SOCKET).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Tell systemd that `pid` (the new binary's process, handover.rs) is the service's main
/// process from now on: its READY, STATUS and watchdog pings count, this process's no longer.
pub fn main_pid(pid: u32) {
    send(&[NotifyState::MainPid(pid)]);
}

/// While a new binary's process waits to take a tunnel over it is not yet the main process,
/// and systemd (`NotifyAccess=main`) would log each of its messages as refused: it says
/// nothing until the old process has named it (`speak`).
static SILENT: AtomicBool = AtomicBool::new(false);

pub fn keep_silent() {
    SILENT.store(true, Ordering::Relaxed);
}

pub fn speak() {
    SILENT.store(false, Ordering::Relaxed);
}

fn send(states: &[NotifyState]) {
    if SILENT.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        log::debug!("sd_notify failed: {e}");
    }
}

/// The ping interval when systemd asked for a watchdog: half of `WATCHDOG_USEC`. Like
/// libsystemd's `sd_watchdog_enabled`, `WATCHDOG_PID` must name this process when it is set.
/// A new binary's process (handover.rs) inherits the old one's `WATCHDOG_PID`: it pings once
/// it is the main process, so `successor` skips that check.
pub fn watchdog_interval(successor: bool) -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let (Ok(pid), false) = (std::env::var("WATCHDOG_PID"), successor) {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Ping the watchdog from a task on the agent's own runtime: if the runtime stops making
/// progress, the pings stop and systemd restarts the agent. A tunnel that is merely
/// reconnecting keeps pinging, since its runtime is fine.
pub async fn watchdog(interval: Duration, mut ping: impl FnMut()) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A second task must get scheduled too: a runtime whose workers are all stuck
        // fails this even if this task happens to be polled.
        if tokio::time::timeout(interval, tokio::spawn(async {}))
            .await
            .is_ok()
        {
            ping();
        }
    }
}

pub fn watchdog_ping() {
    send(&[NotifyState::Watchdog]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    #[test]
    fn a_blocked_runtime_stops_the_pings() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let pings = Arc::new(AtomicUsize::new(0));
        let p = pings.clone();
        rt.spawn(watchdog(Duration::from_millis(20), move || {
            p.fetch_add(1, Ordering::SeqCst);
        }));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            pings.load(Ordering::SeqCst) >= 3,
            "too few pings from a healthy runtime"
        );

        // Occupy both workers with blocking code; this thread watches from outside.
        let barrier = Arc::new(Barrier::new(3));
        let release = Arc::new(AtomicBool::new(false));
        for _ in 0..2 {
            let (b, r) = (barrier.clone(), release.clone());
            rt.spawn(async move {
                b.wait();
                while !r.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        barrier.wait();
        let before = pings.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            pings.load(Ordering::SeqCst),
            before,
            "pinged while the runtime was wedged"
        );

        release.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            pings.load(Ordering::SeqCst) > before,
            "pings did not resume"
        );
        rt.shutdown_timeout(Duration::from_secs(1));
    }
}
