//! Failures of the tunnel, logged without flooding the journal.

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::constants::REPEAT_LOG_LIMIT;
use crate::error::TunnelError;

/// Logs a failure at every attempt for the first few, then only a periodic summary, so a
/// tunnel that is down for a day does not flood the journal with the same line.
#[derive(Default)]
pub(super) struct FailureLog {
    last: Option<(String, u32, Instant)>,
}

impl FailureLog {
    /// Whether the last attempt failed (and nothing has recovered since).
    pub(super) fn failing(&self) -> bool {
        self.last.is_some()
    }

    pub(super) fn report(&mut self, e: &TunnelError, delay: Duration, cfg: &Config) {
        let text = e.to_string();
        let count = match &mut self.last {
            Some((last, n, _)) if *last == text => {
                *n += 1;
                *n
            }
            _ => {
                self.last = Some((text.clone(), 1, Instant::now()));
                1
            }
        };
        let since = self
            .last
            .as_ref()
            .map(|l| l.2.elapsed().as_secs())
            .unwrap_or(0);
        let t = &cfg.tunnel;
        if count <= REPEAT_LOG_LIMIT {
            log::error!(
                tunnel_host = t.host.as_str(), tunnel_port = t.port, listen_port = t.listen_port, error_class = e.class();
                "{text}; retrying in {:.1}s", delay.as_secs_f64());
        } else if count.is_power_of_two() {
            log::error!(
                tunnel_host = t.host.as_str(), tunnel_port = t.port, listen_port = t.listen_port, error_class = e.class();
                "still failing after {count} attempts over {since}s: {text}; retrying in {:.1}s (repeats are logged at debug level)", delay.as_secs_f64());
        } else {
            log::debug!("attempt {count}: {text}");
        }
    }

    pub(super) fn recovered(&mut self) {
        if let Some((_, n, since)) = self.last.take() {
            if n > 1 {
                log::info!(
                    "recovered after {n} failed attempts over {}s",
                    since.elapsed().as_secs()
                );
            }
        }
    }
}
