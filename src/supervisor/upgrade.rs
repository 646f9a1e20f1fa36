//! An upgrade's handover, as the supervisor runs it (the mechanism and the protocol are in
//! handover.rs): the old process hands its port to a new binary's process and drains its open
//! channels; the new process takes the port and becomes systemd's main process.

use std::path::PathBuf;
use std::time::Duration;

use super::{Control, Flow, Supervisor};
use crate::constants::{HANDOVER_RETRY, HANDOVER_TAKE_WITHIN, HANDOVER_TIMEOUT};
use crate::handover::{self, Predecessor, Said};
use crate::systemd;
use crate::telemetry::Draining;
use crate::tunnel::Session;

impl Supervisor {
    /// SIGHUP after a package upgrade replaced the binary: hand the tunnel to the new one.
    pub(super) async fn hand_over(&mut self, binary: PathBuf) -> Flow {
        let shown = binary.display().to_string();
        let serving = self
            .session
            .as_ref()
            .is_some_and(|s| s.refused_since().is_none() || s.open_channels() > 0);
        if !serving {
            // Nothing to keep: no port held, no channel open. The new binary simply starts
            // in this process's place (same PID: systemd follows it as it is).
            log::info!("{shown} was replaced by a new version: nothing is open here, so the new binary starts in this process's place");
            let e = handover::exec_in_place(&binary);
            log::error!(error_class = "handover"; "could not start the new binary {shown}: {e}; this process keeps running");
            self.reload().await;
            return Flow::Continue;
        }
        let spawned = Predecessor::spawn(
            &binary,
            self.opts.local.status_fd,
            self.opts.local.metrics_fd,
        );
        let mut new = match spawned {
            Ok(p) => p,
            Err(e) => {
                self.handover_failed(&shown, &format!("cannot start it: {e}"), false)
                    .await;
                return Flow::Continue;
            }
        };
        // The reload itself is done: READY=1, so `systemctl reload` returns.
        let note = format!(
            "handing the tunnel over to the new binary (pid {})",
            new.child_pid
        );
        log::info!(
            "{shown} was replaced by a new version: {note}; open channels stay in this process until they end"
        );
        systemd::ready(&note);
        self.last_status = note;
        self.ready_by = None;

        let deadline = tokio::time::Instant::now() + HANDOVER_TIMEOUT;
        let mut released = false;
        let outcome = loop {
            tokio::select! {
                said = new.next() => match said {
                    Said::Connected => {
                        if let Some(s) = self.session.as_mut() {
                            if s.refused_since().is_none() {
                                s.stop_accepting().await;
                                s.released();
                            }
                        }
                        released = true;
                        new.say("released").await;
                    }
                    Said::Serving => break Ok(()),
                    Said::Failed(why) => break Err(why),
                    Said::Gone => break Err("it exited".to_string()),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    break Err(format!("it was not serving within {HANDOVER_TIMEOUT:?}"));
                }
                c = self.control.recv() => match c {
                    Some(Control::Reload) => log::info!("reload ignored: a handover is under way"),
                    Some(Control::Shutdown) | None => {
                        new.end();
                        self.shutdown().await;
                        return Flow::Stop;
                    }
                },
            }
        };
        if let Err(why) = outcome {
            new.end();
            self.handover_failed(&shown, &why, released).await;
            return Flow::Continue;
        }

        // The new process serves: it is the main one from now on.
        systemd::main_pid(new.child_pid);
        new.say("main").await;
        let pid = new.child_pid;
        let mut channel = new.release();
        self.opts.local.stop();
        self.opts.telemetry.stopping();
        self.refusals.cancel();
        let Some(session) = self.session.take() else {
            return Flow::Stop;
        };
        let timeout = self.cfg.forward.drain_timeout;
        let open = session.open_channels();
        log::info!(
            "the new binary's process (pid {pid}) serves the tunnel; this process takes no new channel and stays until its {open} open channels end (up to {timeout:?}, [forward] drain_timeout)"
        );
        let count = session.channel_count();
        let retire = session.retire(timeout);
        tokio::pin!(retire);
        let mut report = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                cut = &mut retire => {
                    if cut > 0 {
                        log::warn!("drained: {cut} channels were still open after {timeout:?} ([forward] drain_timeout) and were cut");
                    } else {
                        log::info!("drained: every channel of the previous binary ended; exiting");
                    }
                    return Flow::Stop;
                }
                _ = report.tick() => handover::report_drain(&mut channel, count.get()).await,
                c = self.control.recv() => match c {
                    Some(Control::Reload) => log::info!("reload ignored: this process only drains its channels (the new binary's process serves)"),
                    Some(Control::Shutdown) | None => {
                        let stop = self.cfg.forward.shutdown_timeout;
                        log::info!("stopping: {} channels still open, cut after {stop:?}", count.get());
                        let _ = tokio::time::timeout(stop, &mut retire).await;
                        return Flow::Stop;
                    }
                },
            }
        }
    }

    /// The new binary did not take over: keep serving here, take the port back if it was
    /// given, and say so loudly.
    async fn handover_failed(&mut self, shown: &str, why: &str, released: bool) {
        let note = format!(
            "the upgrade's handover to {shown} failed ({why}); this process (pid {}) keeps serving with the previous binary; restart the unit to run the new one once it can",
            std::process::id()
        );
        log::error!(error_class = "handover"; "{note}");
        self.opts.telemetry.error(&note);
        self.reload_error = Some(note.clone());
        if released {
            if let Some(s) = self.session.as_mut() {
                s.resume_accepting();
                retake(s).await;
                if s.refused_since().is_none() {
                    self.opts.telemetry.up();
                } else {
                    // Asked again on the usual schedule (standby.rs).
                    self.refusals.retry_at = tokio::time::Instant::now();
                }
            }
        }
        let status = match &self.session {
            Some(s) => super::status_line(&self.cfg, s, Some(&note)),
            None => note,
        };
        self.last_status = status.clone();
        systemd::ready(&status);
    }

    /// A handover's new process: the session is up (no forward asked for yet); take the port
    /// the old process gives back, and become the main process.
    pub(super) async fn take_over_from_predecessor(&mut self, mut session: Session) -> Flow {
        let Some(mut old) = self.opts.successor.take() else {
            return Flow::Stop;
        };
        old.say("connected").await;
        if !old.expect("released", HANDOVER_TIMEOUT).await {
            old.say("failed the previous process did not give the port back")
                .await;
            return Flow::Stop;
        }
        if !retake(&mut session).await {
            let why = format!(
                "the server still refused the port {HANDOVER_TAKE_WITHIN:?} after the previous process gave it back"
            );
            log::error!(error_class = "handover"; "{why}");
            old.say(&format!("failed {why}")).await;
            return Flow::Stop;
        }
        old.say("serving").await;
        if !old.expect("main", Duration::from_secs(10)).await {
            log::error!(error_class = "handover"; "the previous process did not make this one the main process; exiting");
            return Flow::Stop;
        }
        systemd::speak();
        self.opts.local.go_live();
        let (addr, port) = &session.listen;
        self.opts.telemetry.set_session(session.negotiated());
        self.opts.telemetry.up();
        let how = format!(
            "took the tunnel over from the previous binary, the server listens on {addr}:{port}"
        );
        super::tunnel_up(&self.cfg, &session, &how);
        self.session = Some(session);
        let status = self.connected_status();
        self.last_status = status.clone();
        systemd::ready(&status);
        self.ready_by = None;
        let telemetry = self.opts.telemetry.clone();
        tokio::spawn(old.follow_drain(move |d| {
            telemetry.set_draining(d.map(|(pid, channels)| Draining { pid, channels }));
        }));
        Flow::Continue
    }
}

/// Ask for the port until the server grants it, for at most `HANDOVER_TAKE_WITHIN`: the other
/// process has just cancelled its forward, and sshd frees the port as it answers that.
async fn retake(session: &mut Session) -> bool {
    let deadline = tokio::time::Instant::now() + HANDOVER_TAKE_WITHIN;
    loop {
        match session.ask_again().await {
            Ok(Ok(true)) => {
                session.granted();
                return true;
            }
            Ok(Ok(false)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(HANDOVER_RETRY).await;
            }
            _ => return false,
        }
    }
}
