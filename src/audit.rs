//! The audit trail: one event when a channel to a target opens, and exactly one when a SOCKS
//! request ends, accepted or not, in a documented, versioned schema (docs/audit.md). The
//! channel code says what happened; this module says it in the schema. In the journal each
//! event type has its own `MESSAGE_ID`, so `journalctl MESSAGE_ID=...` lists one kind.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::telemetry::ChannelStat;

/// The schema's version (`AUDIT_SCHEMA`): fields are only ever added within a version.
pub const SCHEMA: u32 = 1;
/// `channel.open`: a channel to a target opened (the target accepted the connection).
pub const MESSAGE_ID_OPEN: &str = "1f7a8e5dc5b44f8791c5a552ab2494d2";
/// `request.end`: a SOCKS request ended, whatever its outcome.
pub const MESSAGE_ID_END: &str = "d5a50c4f02b24110ab2d6264ab54dbdd";

/// Channel ids, unique for the agent's life.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One SOCKS request's audit record, from its channel's opening to its end. Dropped without
/// an end (its session torn down, the agent stopping), it ends as `shutdown`.
pub struct Request {
    pub id: u64,
    originator: String,
    socks_version: &'static str,
    host: String,
    port: u16,
    connected: Option<SocketAddr>,
    decision: &'static str,
    rule: String,
    started: Instant,
    counts: Option<Arc<ChannelStat>>,
    ended: bool,
}

impl Request {
    pub fn new(originator: &str) -> Request {
        Request {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            originator: originator.to_string(),
            socks_version: "",
            host: String::new(),
            port: 0,
            connected: None,
            decision: "",
            rule: String::new(),
            started: Instant::now(),
            counts: None,
            ended: false,
        }
    }

    /// What was asked for (`host` as it is logged everywhere: escaped).
    pub fn asked(&mut self, socks_version: &'static str, host: String, port: u16) {
        self.socks_version = socks_version;
        self.host = host;
        self.port = port;
    }

    /// The decision and the rule that made it (an allow or deny entry, "metadata default",
    /// "own listener", "limit: ...").
    pub fn decided(&mut self, allowed: bool, rule: String) {
        self.decision = if allowed { "allow" } else { "deny" };
        self.rule = rule;
    }

    /// The channel opened: connected to `address`.
    pub fn opened(&mut self, address: Option<SocketAddr>, counts: Arc<ChannelStat>) {
        self.connected = address;
        self.counts = Some(counts);
        let connected = self.connected_text();
        log::info!(
            target: "secoda_agent::audit",
            message_id = MESSAGE_ID_OPEN, audit_schema = SCHEMA, audit_event = "channel.open",
            channel_id = self.id, originator = self.originator.as_str(), socks_version = self.socks_version,
            requested_host = self.host.as_str(), requested_port = self.port, connected_address = connected.as_str(),
            decision = self.decision, rule = self.rule.as_str();
            "audit: channel {} open: {} asked for {}:{} (SOCKS{}), connected to {connected}, allowed by {}",
            self.id, self.originator, self.host, self.port, self.socks_version, self.rule);
    }

    fn connected_text(&self) -> String {
        self.connected.map(|a| a.to_string()).unwrap_or_default()
    }

    /// The request ended: its outcome (ok, denied, refused, timeout, unreachable,
    /// over_limit, socks_error, failed) and why (client_closed, target_closed, stalled,
    /// overflow, policy_revoked, shutdown, error, or for a refused request the refusal).
    pub fn end(mut self, outcome: &str, reason: &str) {
        self.emit(outcome, reason);
    }

    fn emit(&mut self, outcome: &str, reason: &str) {
        self.ended = true;
        let (up, down) = self.counts.as_ref().map_or((0, 0), |c| {
            (
                c.to_target.load(Ordering::Relaxed),
                c.from_target.load(Ordering::Relaxed),
            )
        });
        let secs = self.started.elapsed().as_secs_f64();
        let connected = self.connected_text();
        log::info!(
            target: "secoda_agent::audit",
            message_id = MESSAGE_ID_END, audit_schema = SCHEMA, audit_event = "request.end",
            channel_id = self.id, originator = self.originator.as_str(), socks_version = self.socks_version,
            requested_host = self.host.as_str(), requested_port = self.port, connected_address = connected.as_str(),
            decision = self.decision, rule = self.rule.as_str(), outcome = outcome, end_reason = reason,
            bytes_to_target = up, bytes_from_target = down, duration_s = secs;
            "audit: request {} ended: {outcome} ({reason}); {} asked for {}:{}, connected to {}, {} by {}; {up} bytes to target, {down} from it, {secs:.1}s",
            self.id, self.originator, self.host, self.port,
            if connected.is_empty() { "nothing" } else { connected.as_str() },
            if self.decision.is_empty() { "no decision" } else { self.decision },
            if self.rule.is_empty() { "no rule" } else { self.rule.as_str() });
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.ended {
            let outcome = if self.counts.is_some() {
                "ok"
            } else {
                "failed"
            };
            self.emit(outcome, "shutdown");
        }
    }
}
