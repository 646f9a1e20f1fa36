//! One forwarded channel: read its SOCKS request, check the destination policy, resolve and
//! connect, answer, then splice bytes both ways with half-close (splice.rs). The channel's
//! input arrives through its inbox (inbox.rs).

mod inbox;
mod splice;
mod window;

pub use inbox::{inbox, ChannelInput, Inbound, Inbox};
pub use window::{initial_window, Window};

use std::io;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use russh::client::Msg;
use russh::ChannelWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::audit;
use crate::config::ForwardConfig;
use crate::connect;
use crate::constants::{CHANNEL_CLOSE_WAIT, CONNECT_STAGGER, SOCKS_HANDSHAKE_TIMEOUT};
use crate::count::OpenGuard;
use crate::limits::{LimitHit, Permit, TargetLimits};
use crate::lookup;
use crate::session::SessionShared;
use crate::socks::{self, Host, Reply, Request};
use crate::telemetry::Telemetry;
use inbox::Duplex;
use splice::{splice, End};

/// What every channel shares: the live forward settings, the channel count and telemetry.
pub struct Forwarder {
    /// Open channels watch it: a reload's policy ends those whose target it denies.
    settings: watch::Sender<Arc<ForwardConfig>>,
    /// The agent's own TCP listeners as bound (`[metrics] listen` at start): never a target,
    /// whatever a reload's `[metrics]` says (it moves the endpoint only at restart).
    own_listeners: Vec<SocketAddr>,
    /// Open channels and connection rates per target, across sessions and reloads.
    pub limits: Arc<TargetLimits>,
    pub telemetry: Arc<Telemetry>,
}

impl Forwarder {
    pub fn new(
        settings: ForwardConfig,
        own_listeners: Vec<SocketAddr>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        let settings = Self::protect(settings, &own_listeners);
        Self::publish(&telemetry, &settings);
        Forwarder {
            settings: watch::Sender::new(Arc::new(settings)),
            own_listeners,
            limits: Arc::new(TargetLimits::default()),
            telemetry,
        }
    }

    fn protect(mut settings: ForwardConfig, own: &[SocketAddr]) -> ForwardConfig {
        settings.policy = settings.policy.with_own_listeners(own.iter().copied());
        settings
    }

    /// The bounds the monitoring rules compare against (packaging/monitoring/).
    fn publish(telemetry: &Telemetry, settings: &ForwardConfig) {
        let limit = i64::try_from(settings.max_spill).unwrap_or(i64::MAX);
        telemetry.metrics.spill_limit_bytes.set(limit);
    }

    pub fn settings(&self) -> Arc<ForwardConfig> {
        self.settings.borrow().clone()
    }

    /// Applies to channels opened from now on; open channels keep their settings, except
    /// that those whose target the new policy denies are ended (see [`revoked`]).
    pub fn update(&self, settings: ForwardConfig) {
        let settings = Self::protect(settings, &self.own_listeners);
        Self::publish(&self.telemetry, &settings);
        self.settings.send_replace(Arc::new(settings));
    }
}

/// Resolves once a reloaded policy denies `name` at `peer` (the address the channel is
/// connected to), with the reason. Revoking access must take effect at once, not when the
/// sync ends.
async fn revoked(
    mut settings: watch::Receiver<Arc<ForwardConfig>>,
    name: Option<String>,
    peer: SocketAddr,
) -> String {
    settings.mark_unchanged();
    while settings.changed().await.is_ok() {
        let policy = &settings.borrow_and_update().policy;
        if let Err(denial) = policy.check(name.as_deref(), peer.ip(), peer.port()) {
            return format!("{peer} {denial}");
        }
    }
    std::future::pending().await
}

/// What a channel task gets from its session: where it came from (for logs) and what the
/// session shares (its output backlog).
pub struct ChannelContext {
    pub originator: String,
    pub session: Arc<SessionShared>,
}

/// Run one channel to its end, with the settings its inbox was made with. `guard` is
/// released when the channel is done, or when its session is torn down: then the channel
/// ends at once, its target connection closed.
pub async fn serve_channel(
    input: ChannelInput,
    channel: ChannelWriteHalf<Msg>,
    fwd: Arc<Forwarder>,
    settings: Arc<ForwardConfig>,
    guard: OpenGuard,
    origin: ChannelContext,
) {
    let session = origin.session.clone();
    let originator = origin.originator.clone();
    tokio::select! {
        () = serve(input, channel, fwd, settings, guard, origin) => {}
        () = session.torn_down() => log::info!(
            originator = originator.as_str(), error_class = "session_torn_down";
            "channel from {originator} cut: its SSH session was torn down"),
    }
}

async fn serve(
    mut input: ChannelInput,
    channel: ChannelWriteHalf<Msg>,
    fwd: Arc<Forwarder>,
    settings: Arc<ForwardConfig>,
    guard: OpenGuard,
    origin: ChannelContext,
) {
    let metrics = &fwd.telemetry.metrics;
    let mut writer = channel.make_writer();
    let started = Instant::now();
    let over_limit = fwd.telemetry.active.get() > settings.max_connections;
    // Exactly one end event per request, whatever path it leaves by (audit.rs).
    let mut audit = audit::Request::new(&origin.originator);

    let request = {
        let mut stream = Duplex {
            input: &mut input,
            output: &mut writer,
        };
        match tokio::time::timeout(SOCKS_HANDSHAKE_TIMEOUT, socks::read_request(&mut stream)).await
        {
            Ok(Ok(r)) => {
                metrics
                    .socks_handshake
                    .observe(started.elapsed().as_secs_f64());
                r
            }
            Ok(Err(e)) => {
                metrics.channel_outcome("socks_error");
                log::info!(originator = origin.originator.as_str(), error_class = "socks"; "channel from {} closed: {e}", origin.originator);
                audit.end("socks_error", "bad_request");
                return refuse(&channel, &mut input, guard).await;
            }
            Err(_) => {
                metrics.channel_outcome("socks_timeout");
                log::info!(originator = origin.originator.as_str(), error_class = "socks_timeout"; "channel from {} closed: no complete SOCKS request within {SOCKS_HANDSHAKE_TIMEOUT:?}", origin.originator);
                audit.end("socks_error", "timeout");
                return refuse(&channel, &mut input, guard).await;
            }
        }
    };
    let target = format!("{}:{}", request.host, request.port);
    let version = match (request.version, &request.host) {
        (socks::Version::V5, _) => "5",
        (socks::Version::V4, Host::Name(_)) => "4a",
        (socks::Version::V4, Host::Ip(_)) => "4",
    };
    audit.asked(version, request.host.to_string(), request.port);

    let connecting = Instant::now();
    let connected = if over_limit {
        audit.decided(false, "limit: [forward] max_connections".to_string());
        Err(Refusal {
            reply: Reply::GeneralFailure,
            why: format!(
                "refused: {} channels are open, [forward] max_connections is {}",
                fwd.telemetry.active.get() - 1,
                settings.max_connections
            ),
            class: "over_limit",
        })
    } else {
        connect_target(&request, &settings, &fwd, &mut audit).await
    };
    let (stream, _permit) = match connected {
        Ok(s) => {
            metrics
                .target_connect
                .observe(connecting.elapsed().as_secs_f64());
            s
        }
        Err(Refusal { reply, why, class }) => {
            metrics.channel_outcome(class);
            log::warn!(channel_target = target.as_str(), error_class = class; "connection to {target} failed: {why}");
            let _ = socks::write_reply(&mut writer, request.version, reply, None).await;
            audit.end(audit_outcome(class), "not_opened");
            return refuse(&channel, &mut input, guard).await;
        }
    };
    let bound = stream.local_addr().ok();
    let peer = stream.peer_addr().ok();
    if socks::write_reply(&mut writer, request.version, Reply::Succeeded, bound)
        .await
        .is_err()
    {
        drop(stream);
        audit.end("failed", "client_closed");
        return refuse(&channel, &mut input, guard).await;
    }
    log::debug!(channel_target = target.as_str(); "channel open to {target}");
    metrics.channel_outcome("ok");

    let counts = fwd
        .telemetry
        .open_channel(target.clone(), origin.originator.clone());
    audit.opened(peer, counts.clone());
    let cut = input.cut.clone();
    let name = match &request.host {
        Host::Name(n) => Some(n.clone()),
        Host::Ip(_) => None,
    };
    let peer = peer.unwrap_or_else(|| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), request.port));
    let end = tokio::select! {
        end = splice(&mut input, stream, &channel, &mut writer, &origin.session, &counts, settings.stall_timeout) => end,
        _ = cut.notified() => End::Overflow(input.pending.load(Ordering::Acquire)),
        why = revoked(fwd.settings.subscribe(), name, peer) => End::Revoked(why),
    };
    let spilled = input.spilled_total;
    // A normal end means both sides sent EOF: the server closes the channel.
    if matches!(end, End::Normal { .. }) {
        close_after_server(&channel, &mut input).await;
    } else {
        let _ = channel.close().await;
    }
    drop(guard);
    let secs = started.elapsed().as_secs_f64();
    let up = counts.to_target.load(Ordering::Relaxed);
    let down = counts.from_target.load(Ordering::Relaxed);
    let on_disk = if spilled > 0 {
        format!("; {spilled} bytes waited for the target in a spill file")
    } else {
        String::new()
    };
    let reason = match &end {
        End::Normal { client_first: true } => "client_closed",
        End::Normal {
            client_first: false,
        } => "target_closed",
        End::Overflow(_) => "overflow",
        End::Stalled(_) => "stalled",
        End::Revoked(_) => "policy_revoked",
        End::Error(_) => "error",
    };
    match end {
        End::Normal { .. } => log::info!(
            channel_target = target.as_str(), bytes_to_target = up, bytes_from_target = down, duration_s = secs, bytes_spilled = spilled;
            "channel to {target} closed after {secs:.1}s: {up} bytes to target, {down} bytes from target{on_disk}"),
        End::Overflow(pending) => log::warn!(
            channel_target = target.as_str(), bytes_to_target = up, bytes_from_target = down, duration_s = secs, error_class = "overflow";
            "channel to {target} cut: the target fell {pending} bytes behind in memory with its spill file full ([forward] max_pending is {}, max_spill {}); other channels are unaffected", settings.max_pending, settings.max_spill),
        End::Stalled(backlog) => log::warn!(
            channel_target = target.as_str(), bytes_to_target = up, bytes_from_target = down, duration_s = secs, error_class = "stalled";
            "channel to {target} cut: the target took no data for {:?} ([forward] stall_timeout); {backlog} bytes for it were dropped ({up} bytes reached it)", settings.stall_timeout),
        End::Revoked(why) => log::warn!(
            channel_target = target.as_str(), bytes_to_target = up, bytes_from_target = down, duration_s = secs, error_class = "policy_revoked";
            "channel to {target} cut after {secs:.1}s: the reloaded [forward] policy denies it: {why} ({up} bytes to target, {down} bytes from target)"),
        End::Error(e) => log::info!(
            channel_target = target.as_str(), bytes_to_target = up, bytes_from_target = down, duration_s = secs, error_class = "io";
            "channel to {target} ended after {secs:.1}s: {e} ({up} bytes to target, {down} bytes from target)"),
    }
    audit.end("ok", reason);
    drop(counts);
}

/// A request the agent did not open a channel for: the SOCKS reply, why (for the log) and
/// the `channels_opened_total` outcome.
struct Refusal {
    reply: Reply,
    why: String,
    class: &'static str,
}

/// The audit trail's outcome for a channel outcome (the metric's label).
fn audit_outcome(class: &str) -> &'static str {
    match class {
        "denied" => "denied",
        "refused" => "refused",
        "timeout" => "timeout",
        "host_unreachable" | "network_unreachable" => "unreachable",
        "over_limit" => "over_limit",
        _ => "failed",
    }
}

/// End a channel the agent will not serve (a bad or late SOCKS request, a denied or failed
/// target) the way the normal path ends one: send EOF and let the server close it (see
/// [`close_after_server`]). The channel no longer counts as open meanwhile.
async fn refuse(channel: &ChannelWriteHalf<Msg>, input: &mut ChannelInput, guard: OpenGuard) {
    drop(guard);
    if channel.eof().await.is_ok() {
        close_after_server(channel, input).await;
    } else {
        let _ = channel.close().await;
    }
}

/// Once both sides sent EOF the server closes the channel itself; wait for that close.
/// russh (0.65) forgets a channel only when the close comes from the server: one the agent
/// closed first stayed in its tables for good (about 4 KiB each). A server that has not closed
/// within `CHANNEL_CLOSE_WAIT` (or an overflow meanwhile) gets our close after all.
async fn close_after_server(channel: &ChannelWriteHalf<Msg>, input: &mut ChannelInput) {
    let closed_by_server = tokio::time::timeout(CHANNEL_CLOSE_WAIT, input.closed())
        .await
        .is_ok_and(|overflow| overflow.is_none());
    if !closed_by_server {
        let _ = channel.close().await;
    }
}

fn reply_class(r: Reply) -> &'static str {
    match r {
        Reply::NotAllowed => "denied",
        Reply::ConnectionRefused => "refused",
        Reply::TtlExpired => "timeout",
        Reply::HostUnreachable => "host_unreachable",
        Reply::NetworkUnreachable => "network_unreachable",
        _ => "failed",
    }
}

/// Resolve (on this host, with the system resolver), apply the policy to each address and the
/// target's limits (limits.rs), and connect to the first that answers, all within
/// `connect_timeout`. The decision and its rule go to the audit record.
async fn connect_target(
    req: &Request,
    settings: &ForwardConfig,
    fwd: &Arc<Forwarder>,
    audit: &mut audit::Request,
) -> Result<(TcpStream, Permit), Refusal> {
    let deadline = tokio::time::Instant::now() + settings.connect_timeout;
    let refusal = |reply: Reply, why: String| Refusal {
        reply,
        why,
        class: reply_class(reply),
    };
    let attempt = async {
        let (name, addrs): (Option<&str>, Vec<SocketAddr>) = match &req.host {
            Host::Ip(ip) => (None, vec![SocketAddr::new(*ip, req.port)]),
            Host::Name(n) => {
                // The caller's connect_timeout bounds the wait for the lookup too.
                let addrs = lookup::resolve_target(n, req.port).await.map_err(|e| {
                    refusal(
                        Reply::HostUnreachable,
                        format!("name {n} not resolved: {e}"),
                    )
                })?;
                (Some(n.as_str()), addrs)
            }
        };
        // The policy decides on each address; the allowed ones race (see connect.rs).
        let mut denied = None;
        let mut allowed_by = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(
                |addr| match settings.policy.decide(name, addr.ip(), addr.port()) {
                    Ok(rule) => {
                        allowed_by.get_or_insert(rule);
                        true
                    }
                    Err(denial) => {
                        denied = Some((denial.rule(), format!("{addr} {denial}")));
                        false
                    }
                },
            )
            .collect();
        let Some(&first) = allowed.first() else {
            return Err(match denied {
                Some((rule, why)) => {
                    audit.decided(false, rule);
                    refusal(Reply::NotAllowed, why)
                }
                None => refusal(
                    Reply::HostUnreachable,
                    "the name has no addresses".to_string(),
                ),
            });
        };
        audit.decided(true, allowed_by.unwrap_or_default());
        // Limits per target: the first address the policy allows, as the target.
        let limited = |hit: LimitHit, audit: &mut audit::Request| {
            fwd.telemetry.metrics.limited(hit.reason());
            audit.decided(false, format!("limit: [forward] {}", hit.reason()));
            Refusal {
                reply: Reply::NotAllowed,
                why: format!("{first}: {hit}"),
                class: "over_limit",
            }
        };
        let permit = match fwd.limits.open(first, settings.max_connections_per_target) {
            Ok(p) => p,
            Err(hit) => return Err(limited(hit, audit)),
        };
        if let Err(hit) = fwd
            .limits
            .pace(first, settings.connect_rate_per_target, deadline)
            .await
        {
            return Err(limited(hit, audit));
        }
        match connect::first_of(&allowed, CONNECT_STAGGER).await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                // A database that vanishes without a reset must not hold its channel (and a
                // max_connections slot on a failed-over primary) for ever.
                if let Err(e) = connect::keep_alive(&s, settings.target_keepalive) {
                    log::debug!("target keepalive not set: {e}");
                }
                Ok((s, permit))
            }
            Err(errors) => Err(errors.last().map_or(
                refusal(Reply::GeneralFailure, "no address answered".to_string()),
                |(addr, e)| refusal(io_reply(e), format!("{addr}: {e}")),
            )),
        }
    };
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(r) => r,
        Err(_) => Err(refusal(
            Reply::TtlExpired,
            format!(
                "timed out after {:?} ([forward] connect_timeout)",
                settings.connect_timeout
            ),
        )),
    }
}

fn io_reply(e: &io::Error) -> Reply {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Reply::ConnectionRefused,
        io::ErrorKind::NetworkUnreachable => Reply::NetworkUnreachable,
        io::ErrorKind::HostUnreachable => Reply::HostUnreachable,
        io::ErrorKind::TimedOut => Reply::TtlExpired,
        _ => Reply::GeneralFailure,
    }
}
