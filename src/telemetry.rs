//! What the agent knows about itself: the session's state, its open channels and counters.
//! `status` (status.rs) shows a [`Snapshot`] of it; the metrics endpoint (metrics.rs) encodes
//! the counters. Channel tasks and the supervisor write here; nothing here waits.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::algorithms::Negotiated;
use crate::count::OpenCount;
use crate::lock;

/// The tunnel's state as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Connecting,
    Up,
    /// One of a pair (`[tunnel] pair`): connected and healthy, but the server refuses the
    /// port, normally because the other host holds it.
    Standby,
    /// Not one of a pair: connected, but the server refuses the port. An error.
    Refused,
    Reconnecting,
    Stopping,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Up => "up",
            State::Standby => "standby",
            State::Refused => "refused",
            State::Reconnecting => "reconnecting",
            State::Stopping => "stopping",
        }
    }
}

/// Everything `status` prints, as sent over the status socket (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: String,
    pub pid: u32,
    pub instance: Option<String>,
    pub state: State,
    /// `host:port` of the SSH server.
    pub server: String,
    /// Where the server listens for Secoda's connections, `address:port`.
    pub listen: String,
    /// The proxy the tunnel goes through (`scheme://host:port`, no credentials), if any.
    #[serde(default)]
    pub proxy: Option<String>,
    /// Unix seconds; set while the tunnel is up (or standing by).
    pub connected_since: Option<u64>,
    /// Unix seconds; set while standing by or refused: since when the server refuses the port.
    #[serde(default)]
    pub standby_since: Option<u64>,
    /// `[tunnel] pair`: a refused port is a standby (the other host serves), not an error.
    #[serde(default)]
    pub pair: bool,
    /// What the current session negotiated (key exchange, cipher, host key, server version).
    #[serde(default)]
    pub session: Option<Negotiated>,
    /// After an upgrade's handover: the previous binary's process, still finishing channels.
    #[serde(default)]
    pub draining: Option<Draining>,
    /// This agent hands the tunnel over to a new binary on reload (handover.rs); the package
    /// scripts reload rather than restart an agent that says so (an older one: false).
    #[serde(default)]
    pub handover: bool,
    /// Sessions established after the first one.
    pub reconnects: u64,
    pub last_error: Option<LastError>,
    pub channels: Vec<ChannelSnapshot>,
    /// Unix seconds when this snapshot was taken.
    pub now: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draining {
    pub pid: u32,
    pub channels: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastError {
    pub message: String,
    /// Unix seconds.
    pub at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelSnapshot {
    pub target: String,
    pub originator: String,
    pub age_s: f64,
    pub bytes_to_target: u64,
    pub bytes_from_target: u64,
}

/// Which per-target limit refused a request, for `limited_total{reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Why a channel ended before or at its start, for `channels_opened_total{outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Which server and proxy the tunnel uses (`proxy` is empty when it connects directly).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    server: String,
    proxy: String,
}

/// What the current session negotiated, as labels of `secoda_agent_session_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    kex: String,
    cipher: String,
    host_key: String,
    server_version: String,
    post_quantum: String,
}

/// The tunnel a host serves, the same on both hosts of a pair: the alert rules group by it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    tunnel: String,
    pair: String,
}

/// Where the tunnel goes, as `status` and the metrics show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// `host:port` of the SSH server.
    pub server: String,
    /// Where the server listens for Secoda's connections, `address:port`.
    pub listen: String,
    /// `scheme://host:port` of the proxy, without credentials.
    pub proxy: Option<String>,
    /// `[tunnel] pair`.
    pub pair: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// The counters, registered once; the hot path holds clones of the handles (atomics).
pub struct Metrics {
    registry: Registry,
    tunnel_up: Gauge,
    standby: Gauge,
    route: Family<RouteLabels, Gauge>,
    tunnel: Family<TunnelLabels, Gauge>,
    session: Family<SessionLabels, Gauge>,
    reconnects: Counter,
    session_age: Gauge<f64, AtomicU64>,
    channels_active: Gauge,
    /// Bytes of slow targets' backlogs in spill files now (channel/inbox.rs keeps it).
    pub spill_bytes: Gauge,
    /// `[forward] max_spill`, what one channel's spill file may hold (Forwarder keeps it).
    pub spill_limit_bytes: Gauge,
    /// Bytes sent towards the server that it has not yet passed on (session/flight.rs).
    pub in_flight_bytes: Gauge,
    opened: Family<OutcomeLabels, Counter>,
    limited: Family<ReasonLabels, Counter>,
    pub bytes_to_target: Counter,
    pub bytes_from_target: Counter,
    pub socks_handshake: Histogram,
    pub target_connect: Histogram,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("secoda_agent");
        let tunnel_up = Gauge::default();
        let standby = Gauge::default();
        let route = Family::<RouteLabels, Gauge>::default();
        let tunnel = Family::<TunnelLabels, Gauge>::default();
        let session = Family::<SessionLabels, Gauge>::default();
        let reconnects = Counter::default();
        let session_age = Gauge::<f64, AtomicU64>::default();
        let channels_active = Gauge::default();
        let spill_bytes = Gauge::default();
        let spill_limit_bytes = Gauge::default();
        let in_flight_bytes = Gauge::default();
        let opened = Family::<OutcomeLabels, Counter>::default();
        let limited = Family::<ReasonLabels, Counter>::default();
        let bytes = Family::<DirectionLabels, Counter>::default();
        // 100 us .. ~6.5 s: a SOCKS request arrives in well under a millisecond on a healthy
        // tunnel; a target connect is a LAN round trip or a timeout.
        let socks_handshake = Histogram::new(exponential_buckets(0.0001, 4.0, 9));
        let target_connect = Histogram::new(exponential_buckets(0.0001, 4.0, 9));
        registry.register(
            "tunnel_up",
            "1 while the SSH session is established with the remote forward in place",
            tunnel_up.clone(),
        );
        registry.register(
            "standby",
            "1 while one host of a pair ([tunnel] pair) has its session up but the server refuses the port (normally: the other host holds it): standing by to take it over",
            standby.clone(),
        );
        registry.register(
            "tunnel_route",
            "1 for the SSH server and the proxy (empty: none) the tunnel goes through",
            route.clone(),
        );
        registry.register(
            "tunnel_info",
            "1, labelled with the tunnel this host serves (server/listen address, the same on both hosts of a pair) and whether it is one of a pair",
            tunnel.clone(),
        );
        registry.register(
            "session_info",
            "1 while a session is established, labelled with what it negotiated: key exchange (post_quantum: whether it is a post-quantum hybrid), cipher, the server's host key type and version",
            session.clone(),
        );
        registry.register(
            "reconnects",
            "Sessions established after the first one",
            reconnects.clone(),
        );
        registry.register(
            "session_age_seconds",
            "How long the current session has been up (0 while down)",
            session_age.clone(),
        );
        registry.register(
            "channels_active",
            "Forwarded channels open now, including those still in their SOCKS handshake",
            channels_active.clone(),
        );
        registry.register(
            "spill_bytes",
            "Bytes waiting for slow targets in spill files (on disk) now",
            spill_bytes.clone(),
        );
        registry.register(
            "spill_limit_bytes",
            "What one channel's spill file may hold ([forward] max_spill; 0: no spill files)",
            spill_limit_bytes.clone(),
        );
        registry.register(
            "in_flight_bytes",
            "Bytes sent towards the server that it has not yet passed on to Secoda",
            in_flight_bytes.clone(),
        );
        registry.register(
            "channels_opened",
            "Channels by how they started: ok, or why they were refused",
            opened.clone(),
        );
        registry.register(
            "limited",
            "Requests refused by a per-target limit, by the limit ([forward] max_connections_per_target, connect_rate_per_target)",
            limited.clone(),
        );
        registry.register(
            "bytes",
            "Bytes moved through channels, by direction (to_target: from Secoda to the target)",
            bytes.clone(),
        );
        registry.register(
            "socks_handshake_seconds",
            "Time from channel open to a complete SOCKS request",
            socks_handshake.clone(),
        );
        registry.register(
            "target_connect_seconds",
            "Time to resolve and connect to a target (successful connects)",
            target_connect.clone(),
        );
        let bytes_to_target = bytes
            .get_or_create(&DirectionLabels {
                direction: "to_target",
            })
            .clone();
        let bytes_from_target = bytes
            .get_or_create(&DirectionLabels {
                direction: "from_target",
            })
            .clone();
        Metrics {
            registry,
            tunnel_up,
            standby,
            route,
            tunnel,
            session,
            reconnects,
            session_age,
            channels_active,
            spill_bytes,
            spill_limit_bytes,
            in_flight_bytes,
            opened,
            limited,
            bytes_to_target,
            bytes_from_target,
            socks_handshake,
            target_connect,
        }
    }

    pub fn limited(&self, reason: &'static str) {
        self.limited.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn channel_outcome(&self, outcome: &'static str) {
        self.opened.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    fn set_route(&self, e: &Endpoints) {
        self.route.clear();
        self.route
            .get_or_create(&RouteLabels {
                server: e.server.clone(),
                proxy: e.proxy.clone().unwrap_or_default(),
            })
            .set(1);
        self.tunnel.clear();
        self.tunnel
            .get_or_create(&TunnelLabels {
                tunnel: format!("{}/{}", e.server, e.listen),
                pair: e.pair.to_string(),
            })
            .set(1);
    }
}

struct Inner {
    state: State,
    session: Option<Negotiated>,
    draining: Option<Draining>,
    endpoints: Endpoints,
    connected: Option<(SystemTime, Instant)>,
    standby_since: Option<SystemTime>,
    sessions: u64,
    last_error: Option<LastError>,
}

/// One open channel, as listed by `status`. Unlisted when dropped.
pub struct ChannelStat {
    pub target: String,
    pub originator: String,
    opened: Instant,
    pub to_target: AtomicU64,
    pub from_target: AtomicU64,
    id: u64,
    owner: Arc<Telemetry>,
}

impl ChannelStat {
    pub fn add_to_target(&self, n: u64) {
        self.to_target.fetch_add(n, Ordering::Relaxed);
        self.owner.metrics.bytes_to_target.inc_by(n);
    }

    pub fn add_from_target(&self, n: u64) {
        self.from_target.fetch_add(n, Ordering::Relaxed);
        self.owner.metrics.bytes_from_target.inc_by(n);
    }
}

impl Drop for ChannelStat {
    fn drop(&mut self) {
        lock(&self.owner.channels).remove(&self.id);
    }
}

pub struct Telemetry {
    instance: Option<String>,
    inner: Mutex<Inner>,
    channels: Mutex<BTreeMap<u64, std::sync::Weak<ChannelStat>>>,
    next_id: AtomicU64,
    /// Every open channel, across sessions (the forwarder counts into it).
    pub active: Arc<OpenCount>,
    pub metrics: Metrics,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Telemetry {
    pub fn new(instance: Option<String>, endpoints: Endpoints) -> Arc<Self> {
        let metrics = Metrics::new();
        metrics.set_route(&endpoints);
        Arc::new(Telemetry {
            instance,
            inner: Mutex::new(Inner {
                state: State::Connecting,
                session: None,
                draining: None,
                endpoints,
                connected: None,
                standby_since: None,
                sessions: 0,
                last_error: None,
            }),
            channels: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            active: Arc::new(OpenCount::default()),
            metrics,
        })
    }

    /// The tunnel's endpoints, when a reload changes them.
    pub fn set_endpoints(&self, endpoints: Endpoints) {
        self.metrics.set_route(&endpoints);
        lock(&self.inner).endpoints = endpoints;
    }

    /// What the established session negotiated (`None` when it is gone).
    pub fn set_session(&self, negotiated: Option<Negotiated>) {
        self.metrics.session.clear();
        if let Some(n) = &negotiated {
            self.metrics
                .session
                .get_or_create(&SessionLabels {
                    kex: n.kex.clone(),
                    cipher: n.cipher.clone(),
                    host_key: n.host_key.clone(),
                    server_version: n.server_version.clone(),
                    post_quantum: n.post_quantum.to_string(),
                })
                .set(1);
        }
        lock(&self.inner).session = negotiated;
    }

    /// The previous binary's process and its open channels, while it drains (handover.rs).
    pub fn set_draining(&self, draining: Option<Draining>) {
        lock(&self.inner).draining = draining;
    }

    pub fn connecting(&self) {
        let mut i = lock(&self.inner);
        if i.state != State::Reconnecting {
            i.state = State::Connecting;
        }
    }

    pub fn up(&self) {
        let mut i = lock(&self.inner);
        // A standby (or refused) session that takes the port over is the same session.
        if !matches!(i.state, State::Standby | State::Refused) {
            i.connected = Some((SystemTime::now(), Instant::now()));
            self.count_session(&mut i);
        }
        i.state = State::Up;
        i.standby_since = None;
        self.metrics.tunnel_up.set(1);
        self.metrics.standby.set(0);
    }

    /// A session is established, but the server's port is held by another session.
    pub fn standby(&self) {
        let mut i = lock(&self.inner);
        i.state = State::Standby;
        i.connected = Some((SystemTime::now(), Instant::now()));
        i.standby_since = Some(SystemTime::now());
        self.count_session(&mut i);
        self.metrics.tunnel_up.set(0);
        self.metrics.standby.set(1);
    }

    /// A session is established, but the server refuses the port and this host is not one
    /// of a pair: the tunnel is down, with `error` saying why.
    pub fn refused(&self, error: &str) {
        let mut i = lock(&self.inner);
        if i.state != State::Refused {
            i.connected = Some((SystemTime::now(), Instant::now()));
            i.standby_since = Some(SystemTime::now());
            self.count_session(&mut i);
        }
        i.state = State::Refused;
        self.metrics.tunnel_up.set(0);
        self.metrics.standby.set(0);
        drop(i);
        self.error(error);
    }

    fn count_session(&self, i: &mut Inner) {
        i.sessions += 1;
        if i.sessions > 1 {
            self.metrics.reconnects.inc();
        }
    }

    /// A failed attempt or a lost session: the tunnel is down and retrying.
    pub fn down(&self, error: &str) {
        self.set_session(None);
        let mut i = lock(&self.inner);
        i.state = State::Reconnecting;
        i.connected = None;
        i.standby_since = None;
        self.metrics.tunnel_up.set(0);
        self.metrics.standby.set(0);
        drop(i);
        self.error(error);
    }

    /// Record an error without changing the state (e.g. a failed reload).
    pub fn error(&self, error: &str) {
        lock(&self.inner).last_error = Some(LastError {
            message: error.to_string(),
            at: unix(SystemTime::now()),
        });
    }

    pub fn stopping(&self) {
        lock(&self.inner).state = State::Stopping;
        self.metrics.tunnel_up.set(0);
        self.metrics.standby.set(0);
    }

    /// List a channel (once its target is connected) until the returned handle is dropped.
    pub fn open_channel(self: &Arc<Self>, target: String, originator: String) -> Arc<ChannelStat> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stat = Arc::new(ChannelStat {
            target,
            originator,
            opened: Instant::now(),
            to_target: AtomicU64::new(0),
            from_target: AtomicU64::new(0),
            id,
            owner: self.clone(),
        });
        lock(&self.channels).insert(id, Arc::downgrade(&stat));
        stat
    }

    pub fn snapshot(&self) -> Snapshot {
        let i = lock(&self.inner);
        let channels = lock(&self.channels)
            .values()
            .filter_map(|w| w.upgrade())
            .map(|c| ChannelSnapshot {
                target: c.target.clone(),
                originator: c.originator.clone(),
                age_s: c.opened.elapsed().as_secs_f64(),
                bytes_to_target: c.to_target.load(Ordering::Relaxed),
                bytes_from_target: c.from_target.load(Ordering::Relaxed),
            })
            .collect();
        Snapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            instance: self.instance.clone(),
            state: i.state,
            server: i.endpoints.server.clone(),
            listen: i.endpoints.listen.clone(),
            proxy: i.endpoints.proxy.clone(),
            connected_since: i.connected.map(|(t, _)| unix(t)),
            standby_since: i.standby_since.map(unix),
            pair: i.endpoints.pair,
            session: i.session.clone(),
            draining: i.draining,
            handover: true,
            reconnects: i.sessions.saturating_sub(1),
            last_error: i.last_error.clone(),
            channels,
            now: unix(SystemTime::now()),
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode_metrics(&self) -> String {
        let age = lock(&self.inner)
            .connected
            .map(|(_, t)| t.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        self.metrics.session_age.set(age);
        self.metrics.channels_active.set(self.active.get() as i64);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.metrics.registry);
        out
    }
}
