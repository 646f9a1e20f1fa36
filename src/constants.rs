//! Every timeout, limit and backoff figure in one place, so that a reader can see the agent's
//! timing at a glance and tests can reason about it.

use std::time::Duration;

/// One worker thread runs the agent (DNS lookups still get the blocking pool). All of a
/// session's encryption happens in russh's one session task anyway; a second worker only added
/// cross-thread wake-ups, and measured slower at more CPU per GiB (docs/performance.md).
pub const RUNTIME_WORKER_THREADS: usize = 1;
/// Freed heap memory up to this much is kept for reuse rather than returned to the kernel
/// (glibc's M_TRIM_THRESHOLD; see main.rs).
pub const MALLOC_TRIM_THRESHOLD: usize = 4 * 1024 * 1024;
/// Where the packages put the configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/secoda-agent/agent.toml";
/// Where the Docker-compatible `KEY=VALUE` file lives; used only when present.
pub const DEFAULT_ENV_FILE_PATH: &str = "/etc/secoda-agent/agent.env";

/// Secoda's published tunnel host key: the pin when none is configured.
pub const SECODA_HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBo2+mYwlNTvJXrNCETYHrrHyUGMnWdQO5vEhFVU833o";
pub const DEFAULT_SSH_PORT: u16 = 22;
pub const DEFAULT_USER: &str = "tunnel";
pub const DEFAULT_LISTEN_ADDRESS: &str = "0.0.0.0";
/// Same as the Docker image's `ServerAliveInterval=15` / `ServerAliveCountMax=4`.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
pub const DEFAULT_KEEPALIVE_MAX: u32 = 4;
/// Standby (the server's listen port held by another session, e.g. the other host of a pair):
/// the port is asked for again this often, with jitter (supervisor.rs) ...
pub const DEFAULT_STANDBY_RETRY: Duration = Duration::from_secs(5);
/// ... within these bounds (`[tunnel] standby_retry`).
pub const STANDBY_RETRY_MIN: Duration = Duration::from_secs(1);
pub const STANDBY_RETRY_MAX: Duration = Duration::from_secs(600);

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Bytes from the server waiting for a slow target, per channel, before that channel is cut.
/// Traffic toward a database is mostly small queries, so 8 MiB is generous.
pub const DEFAULT_MAX_PENDING: u64 = 8 * 1024 * 1024;
/// A slow target's backlog beyond `max_pending`, held in a spill file (spill.rs): 1 GiB.
pub const DEFAULT_MAX_SPILL: u64 = 1024 * 1024 * 1024;
/// A target that takes no data for this long, with data waiting for it, is cut.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// `[forward] max_pending` bounds: a channel's SSH window is a `u32` count (the window
/// accounting must never pass it), and 1 GiB of one channel in memory is already absurd.
pub const MAX_PENDING_MIN: u64 = 64 * 1024;
pub const MAX_PENDING_MAX: u64 = 1024 * 1024 * 1024;
/// A target connection idle this long gets TCP keepalive probes ([forward] target_keepalive),
/// `TARGET_KEEPALIVE_PROBES` of them a sixth of it apart (at least a second): a database
/// host that vanished without a reset (power loss, a failover) is noticed within about twice
/// this, and its channel ends. The same bound applies to data it never acknowledges
/// (TCP_USER_TIMEOUT), which keepalives do not cover.
pub const DEFAULT_TARGET_KEEPALIVE: Duration = Duration::from_secs(60);
pub const TARGET_KEEPALIVE_MIN: Duration = Duration::from_secs(1);
pub const TARGET_KEEPALIVE_MAX: Duration = Duration::from_secs(2 * 3600);
pub const TARGET_KEEPALIVE_PROBES: u32 = 6;
/// A spill file that has been read to the end is truncated (its blocks freed) when it had
/// grown to at least this; smaller ones are reused as they are.
pub const SPILL_SHRINK_AT: u64 = 64 * 1024 * 1024;
/// How long open channels may drain on stop or when a session is retired.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long channels may still finish in the process (or session) they started in, after an
/// upgrade handed the tunnel to a new binary or a reload opened a new session: a large table's
/// sync runs for hours.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
pub const DRAIN_TIMEOUT_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// A new binary's process must serve the tunnel within this after the old one started it
/// (connect, authenticate, take the port), or the handover is abandoned (handover.rs).
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// After the old process gave the port back, the new one asks for it again this often ...
pub const HANDOVER_RETRY: Duration = Duration::from_millis(200);
/// ... for at most this long (sshd frees the port as it answers the cancel).
pub const HANDOVER_TAKE_WITHIN: Duration = Duration::from_secs(10);
/// The packaged units' `TimeoutStopSec=`: systemd sends SIGKILL this long after SIGTERM.
pub const UNIT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// What a stop needs beside the drain (the forward's cancel, the disconnect, exit): a
/// `shutdown_timeout` longer than `UNIT_STOP_TIMEOUT` less this is warned about.
pub const STOP_MARGIN: Duration = Duration::from_secs(5);

/// At start, READY=1 waits for the tunnel at most this long: `systemctl start` (and so a
/// package upgrade's restart, or `enable --now`) returns once the tunnel is up, or after this
/// with the unit active and STATUS saying why it is not up yet; the agent keeps retrying.
/// Well inside the unit's `TimeoutStartSec=`.
pub const READY_WAIT_MAX: Duration = Duration::from_secs(30);
/// Happy Eyeballs (RFC 8305): the next address is tried this long after the previous attempt
/// started, if that has not connected (the RFC recommends 250 ms).
pub const CONNECT_STAGGER: Duration = Duration::from_millis(250);
/// TCP connect to the SSH server (all of its addresses).
pub const SSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Through a proxy, resolving and connecting to the proxy and its answer to our CONNECT (or
/// SOCKS5 request) together: the proxy's own connect to the server is inside this.
pub const PROXY_CONNECT_TIMEOUT: Duration = SSH_CONNECT_TIMEOUT;
/// A proxy's answer to CONNECT longer than this is not one.
pub const PROXY_MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// From TCP connect to an authenticated session with the forward in place. A server that
/// accepts TCP and then says nothing (Secoda's "stuck on the version number") ends here.
pub const SSH_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// After both sides sent EOF, how long a channel waits for the server to close it before
/// closing it itself.
pub const CHANNEL_CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Target name lookups at once (lookup.rs); one per name, later requests share its answer.
pub const TARGET_LOOKUPS_MAX: usize = 32;
/// A target lookup unanswered this long (glibc's first retry is due after 5 s) stops
/// counting towards `TARGET_LOOKUPS_MAX` ...
pub const LOOKUP_STUCK_AFTER: Duration = Duration::from_secs(5);
/// ... for up to this many such lookups at once.
pub const TARGET_LOOKUPS_STUCK_MAX: usize = 64;
/// A retiring session's disconnect (sent, and the session's task ended) may take this long;
/// then it is torn down regardless (tunnel/mod.rs).
pub const SESSION_CLOSE_WAIT: Duration = Duration::from_secs(5);
/// A channel must finish its SOCKS request within this time.
pub const SOCKS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the session is probed with a ping that must come back, to catch a session whose
/// event loop is wedged (a dead server is already caught by the keepalives).
pub const LIVENESS_INTERVAL: Duration = Duration::from_secs(10);
/// The first probes of a session come this far apart, this many of them: each answered probe
/// is a sample of the path's round trip (the shortest kept, session/flight.rs), and the
/// forward request's, the first sample, includes the server's own work on it (about 1 ms on
/// loopback, where the path takes 0.05).
pub const PATH_PROBE_INTERVAL: Duration = Duration::from_millis(100);
pub const PATH_PROBES: u32 = 3;
/// The first of them is sent as soon as the forward is granted, waiting at most this long.
pub const PATH_PROBE_WAIT: Duration = Duration::from_secs(2);
/// The server's own handling in an SSH round trip (sshd's reply to a request, its Nagle):
/// up to this much more than the kernel's round trip is still the same path (session/flight.rs).
pub const SSH_HANDLING_SLACK: Duration = Duration::from_millis(1);

/// Reconnect backoff: full jitter between zero and min(ceiling, initial * 2^attempt).
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
pub const BACKOFF_CEILING: Duration = Duration::from_secs(60);
/// After an established session is lost, retry at most this far apart ...
pub const FAST_RETRY_MAX: Duration = Duration::from_secs(1);
/// ... for this long (a server restart is back within about a second of accepting again).
pub const FAST_RETRY_WINDOW: Duration = Duration::from_secs(30);
/// After a connect timeout (nothing answered; the attempt itself sent a SYN every
/// `CONNECT_REPROBE`), the next attempt follows within this, so that probing never stops.
pub const PROBE_DELAY_MAX: Duration = Duration::from_secs(1);
/// A connect attempt with no answer yet sends a fresh SYN about this often (give or take a
/// quarter) beside the kernel's own retransmissions (1, 3, 7 s after the first), so that a path
/// that comes back is seen within about this ...
pub const CONNECT_REPROBE: Duration = Duration::from_secs(2);
/// ... keeping at most this many attempts per address in flight (the oldest dropped): when
/// the path returns, one connection is answered, not one per socket still retransmitting.
pub const CONNECT_ATTEMPTS_PER_ADDRESS: usize = 2;
/// After resetting our own lost session's connection (tunnel/mod.rs, `Stale`), a refused
/// forward is asked for again this often ...
pub const QUICK_STANDBY_RETRY: Duration = Duration::from_secs(1);
/// ... for this long: the server frees the port once its session process has seen the reset.
pub const QUICK_STANDBY_FOR: Duration = Duration::from_secs(10);
/// A session that stayed up this long resets the backoff.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);
/// The same failure is logged at every attempt this many times, then summarised.
pub const REPEAT_LOG_LIMIT: u32 = 3;

/// SSH flow control: OpenSSH's own 2 MiB channel window (16 MiB made sshd spend its time
/// moving buffers, 4 MiB gained nothing; docs/performance.md) and 32 KiB packets, OpenSSH's
/// channel packet size.
pub const SSH_WINDOW_SIZE: u32 = 2 * 1024 * 1024;
pub const SSH_MAX_PACKET_SIZE: u32 = 32 * 1024;
/// A channel's consumed bytes are granted back to the server once this many add up (or once
/// half its window is used up), as OpenSSH's client does: three packets (channel/window.rs).
pub const GRANT_STEP: u64 = 3 * SSH_MAX_PACKET_SIZE as u64;
/// Key re-exchange, initiated by us only past these bounds: twice OpenSSH's own bound for
/// AES-GCM (2^32 blocks = 64 GiB; 1 GiB for chacha20-poly1305), so that the server, which
/// rekeys at its bound, always starts it. russh 0.65 drops a session when more than twice the
/// window of the server's data arrives between our KEXINIT and the server's (`Error::Pending`,
/// client/mod.rs); under load the socket buffers alone hold more than that, so a rekey we start
/// cut every open channel (seen in the soak: once every few GiB). A rekey the server starts has
/// no such window. Like OpenSSH's client, no time-based rekey.
pub const REKEY_AFTER_BYTES: usize = 128 << 30;
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Channel tasks stop producing output for the server while this much is already waiting in
/// the transport's buffer (see transport.rs): bounds memory without ever blocking the session.
pub const SSH_BACKLOG_HIGH: usize = 256 * 1024;
/// While small exchanges are under way, a session's channels keep at most what one round trip
/// carries at this rate in flight towards the server, but at least `FLIGHT_BUDGET_MIN`
/// (session/flight.rs): 1 GiB/s is more than a tunnel moves here, so the budget binds only on
/// paths shorter than 2 ms.
pub const FLIGHT_RATE: u64 = 1 << 30;
/// sshd takes at most 256 KiB from the socket per pass of its loop, and under the agent's bulk
/// it took 192-256 KiB: a batch and a half keeps one batch arriving while it decrypts the last.
/// Set by measurement (docs/performance.md, "The budget, once more"): 384 KiB kept the ping
/// beside two downloads under OpenSSH's in every run and cost the download beside a ping no
/// more than 512 KiB did; 256 KiB cost it 30-40 % of its speed alone.
pub const FLIGHT_BUDGET_MIN: u64 = 384 * 1024;
/// A channel with less than this in flight may always send. Above OpenSSH's 96 KiB: sshd
/// adjusts a channel's window only once more than that of it waits for an adjustment.
pub const FLIGHT_FREE: u64 = 128 * 1024;
/// The budget applies for this long after a small reply went to the server.
pub const FLIGHT_INTERACTIVE_HOLD: Duration = Duration::from_millis(100);
/// A channel that waits this long for a window adjustment goes on outside the budget.
pub const FLIGHT_ACK_WAIT: Duration = Duration::from_millis(50);
/// A target's read that returns less than this is a small message (a reply), sent at once
/// rather than after a turn behind bulk data (channel/splice.rs).
pub const SMALL_READ: usize = 4 * 1024;
/// Unsent bytes the kernel may hold for the SSH socket (`TCP_NOTSENT_LOWAT`, transport.rs).
pub const SSH_NOTSENT_LOWAT: usize = 128 * 1024;
/// At most this many channel tasks hand data to the session at once (see transport.rs).
pub const SSH_OUTPUT_TURNS: usize = 16;
/// The transport stops reading the SSH socket while more than this waits for targets, across
/// all channels of a session (see transport.rs) ...
pub const INTAKE_HIGH: usize = 4 * 1024 * 1024;
/// ... for at most this long without progress, then reads on regardless.
pub const INTAKE_PAUSE_MAX: Duration = Duration::from_millis(500);
/// Of each channel's in-memory backlog, only the first this-many bytes count toward that mark
/// (plus anything beyond `max_pending`, see channel/inbox.rs): many busy channels pace the session
/// together, one slow target does not.
pub const INTAKE_SHARE: u64 = 256 * 1024;
/// russh's queue of packets from channel writers to the session loop.
pub const SSH_SESSION_QUEUE: usize = 16;
/// The transport's write buffer is released once drained if it grew beyond this.
pub const TRANSPORT_BUFFER_KEEP: usize = 1024 * 1024;
/// One read from the SSH socket takes up to this much (russh then reads it in small pieces).
pub const SSH_READ_BUFFER: usize = 256 * 1024;
// When the coalescing mark drops, what waits below it is read in one go (transport.rs).
const _: () = assert!(SSH_READ_BUFFER >= COALESCE_BYTES);
/// Bulk data from the server: after two reads of at least `COALESCE_AFTER_READ` bytes, the
/// SSH socket wakes the agent only once `COALESCE_BYTES` are waiting, or after `COALESCE_WAIT`
/// at the latest (see transport.rs).
pub const COALESCE_AFTER_READ: usize = 32 * 1024;
pub const COALESCE_BYTES: usize = 256 * 1024;
pub const COALESCE_WAIT: Duration = Duration::from_millis(1);
// One channel alone must be able to fill the mark with half its window in flight (the
// reasoning is at transport.rs `Coalesce::for_window`, which lowers the mark for the smaller
// windows a max_pending under 1 MiB gives): the default window allows the whole mark.
const _: () = assert!(2 * COALESCE_BYTES <= SSH_WINDOW_SIZE as usize / 2);
/// ... and only once the socket's receive buffer has grown to this (see transport.rs).
pub const COALESCE_MIN_RCVBUF: usize = 4 * COALESCE_BYTES;
/// While the buffer is smaller, the check is repeated every this many large reads.
pub const COALESCE_RETRY_READS: u8 = 32;
/// Server -> target: queued packets go out in one vectored write of up to this many bytes
/// and `SPLICE_IOVECS` pieces.
pub const SPLICE_BATCH: usize = 256 * 1024;
pub const SPLICE_IOVECS: usize = 32;
/// Target -> server copies read this much at a time: one SSH packet (russh copies it again).
pub const SPLICE_BUFFER_SIZE: usize = 32 * 1024;
/// The runtime directory when systemd does not name one (`-NAME` is added for an instance).
pub const RUNTIME_DIR_BASE: &str = "/run/secoda-agent";
pub const STATUS_SOCKET_NAME: &str = "status.sock";
/// `status` waits this long for the agent's answer.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// Each `doctor` step gives up after this long.
pub const DOCTOR_STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// The metrics endpoint drops a client that has not sent its request within this time.
pub const METRICS_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A config file larger than this is refused before it is parsed.
pub const MAX_CONFIG_FILE_SIZE: u64 = 1024 * 1024;
/// The status socket and the metrics endpoint serve at most this many connections at once;
/// further ones wait in the kernel's accept queue.
pub const LOCAL_MAX_CONNECTIONS: usize = 16;
/// After a failed accept (out of descriptors: EMFILE, ENFILE), wait this long before the next,
/// instead of retrying at once on the agent's single worker thread.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
