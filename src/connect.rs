//! Connecting to one of several addresses the way RFC 8305 ("Happy Eyeballs") describes: the
//! addresses in turn, families interleaved, each attempt started `CONNECT_STAGGER` after the
//! previous one (or at once when it fails), the first connection winning and the others
//! dropped. One black-holed address (an unroutable AAAA record, a stale DNS entry) then costs a
//! quarter of a second, not the whole timeout. Used for the SSH server, the proxy, targets and
//! `doctor`, after [`resolve`], the one name lookup they all share.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::{AbortHandle, JoinSet};

use crate::backoff::Backoff;
use crate::constants::CONNECT_ATTEMPTS_PER_ADDRESS;

/// Why a name gave no addresses.
#[derive(Debug)]
pub enum ResolveError {
    Failed(io::Error),
    /// The resolver did not answer within the time given.
    TimedOut(Duration),
    NoAddresses,
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::Failed(e) => e.fmt(f),
            ResolveError::TimedOut(d) => write!(f, "the resolver did not answer within {d:?}"),
            ResolveError::NoAddresses => f.write_str("the name has no addresses"),
        }
    }
}

/// `host`'s addresses (an IP literal is its own), with the system resolver, within `within`.
pub async fn resolve(
    host: &str,
    port: u16,
    within: Duration,
) -> Result<Vec<SocketAddr>, ResolveError> {
    tokio::time::timeout(within, resolve_unbounded(host, port))
        .await
        .unwrap_or(Err(ResolveError::TimedOut(within)))
}

/// As [`resolve`], for a caller that bounds the whole step (resolve and connect) itself.
pub async fn resolve_unbounded(host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(ResolveError::Failed)?
        .collect();
    if addrs.is_empty() {
        Err(ResolveError::NoAddresses)
    } else {
        Ok(addrs)
    }
}

/// The connection, and which address it went to; or every address's error, in the order the
/// attempts ended.
pub async fn first_of(
    addrs: &[SocketAddr],
    stagger: Duration,
) -> Result<(TcpStream, SocketAddr), Vec<(SocketAddr, io::Error)>> {
    first_of_probing(addrs, stagger, None).await
}

/// As [`first_of`]; with `reprobe`, once every address has its attempt, each address with no
/// answer yet gets a fresh one about every `reprobe` (give or take a quarter, so a fleet of
/// agents does not probe in step; the caller bounds the whole). The kernel retransmits a SYN
/// 1, 3 and 7 s after the first, then gives up for 8 s more, so a path that comes back after a
/// blackout would otherwise be seen only seconds later. At most
/// `CONNECT_ATTEMPTS_PER_ADDRESS` attempts per address are in flight, the oldest dropped for
/// a fresh one: otherwise up to eight sockets per address, retransmitting on their own
/// schedules, could all be answered when the path returns, and the server would see several
/// connections opened and closed at once (log noise, `MaxStartups`).
pub async fn first_of_probing(
    addrs: &[SocketAddr],
    stagger: Duration,
    reprobe: Option<Duration>,
) -> Result<(TcpStream, SocketAddr), Vec<(SocketAddr, io::Error)>> {
    let order = interleave_families(addrs);
    let mut queue = order.clone().into_iter();
    let mut attempts = JoinSet::new();
    let mut errors: Vec<(SocketAddr, io::Error)> = Vec::new();
    // Each address's attempts in flight, oldest first.
    let mut in_flight: HashMap<SocketAddr, VecDeque<AbortHandle>> = HashMap::new();
    let mut start = |attempts: &mut JoinSet<_>, addr: SocketAddr| {
        let handle = attempts.spawn(async move { (addr, TcpStream::connect(addr).await) });
        let mine = in_flight.entry(addr).or_default();
        mine.retain(|h| !h.is_finished());
        mine.push_back(handle);
        while mine.len() > CONNECT_ATTEMPTS_PER_ADDRESS {
            mine.pop_front().inspect(AbortHandle::abort);
        }
    };
    match queue.next() {
        Some(addr) => start(&mut attempts, addr),
        None => return Err(errors),
    }
    let mut jitter = Backoff::default();
    let mut next_reprobe = move || reprobe.map(|d| tokio::time::Instant::now() + jitter.around(d));
    let mut reprobe_at = next_reprobe();
    loop {
        let more = queue.len() > 0;
        tokio::select! {
            done = attempts.join_next() => match done {
                Some(Ok((addr, Ok(stream)))) => return Ok((stream, addr)),
                Some(Ok((addr, Err(e)))) => {
                    errors.push((addr, e));
                    if let Some(next) = queue.next() {
                        start(&mut attempts, next);
                    }
                }
                // A connect task cannot panic; were it cancelled, the others still run.
                Some(Err(_)) => {}
                None => return Err(errors),
            },
            _ = tokio::time::sleep(stagger), if more => {
                if let Some(next) = queue.next() {
                    start(&mut attempts, next);
                }
            }
            _ = sleep_until(reprobe_at), if !more && reprobe_at.is_some() => {
                // An address that answered with an error is not asked again.
                for addr in order.iter().filter(|a| !errors.iter().any(|(e, _)| e == *a)) {
                    start(&mut attempts, *addr);
                }
                reprobe_at = next_reprobe();
            }
        }
    }
}

/// Resolves at `at`; never without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The resolver's order, with address families alternating from the first one (RFC 8305,
/// section 4), so that a family that does not work costs one stagger, not one per address.
fn interleave_families(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return Vec::new();
    };
    let (mut same, mut other) = addrs
        .iter()
        .partition::<Vec<&SocketAddr>, _>(|a| a.is_ipv6() == first.is_ipv6());
    same.reverse();
    other.reverse();
    let mut out = Vec::with_capacity(addrs.len());
    while !same.is_empty() || !other.is_empty() {
        out.extend(same.pop().copied());
        out.extend(other.pop().copied());
    }
    out
}

/// TCP keepalive on a target connection, idle `idle` then `TARGET_KEEPALIVE_PROBES` probes a
/// sixth of it apart, and the same bound on data it never acknowledges (see constants.rs).
/// Returns the bound, after which a silent target's connection fails.
pub fn keep_alive(stream: &TcpStream, idle: Duration) -> io::Result<Duration> {
    use crate::constants::TARGET_KEEPALIVE_PROBES;
    let interval = (idle / 6).max(Duration::from_secs(1));
    let bound = idle + interval * TARGET_KEEPALIVE_PROBES;
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(interval)
            .with_retries(TARGET_KEEPALIVE_PROBES),
    )?;
    sock.set_tcp_user_timeout(Some(bound))?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn families_alternate_from_the_first() {
        let got = interleave_families(&[
            a("[fd00::1]:1"),
            a("[fd00::2]:1"),
            a("[fd00::3]:1"),
            a("10.0.0.1:1"),
        ]);
        assert_eq!(
            got,
            [
                a("[fd00::1]:1"),
                a("10.0.0.1:1"),
                a("[fd00::2]:1"),
                a("[fd00::3]:1")
            ]
        );
        assert!(interleave_families(&[]).is_empty());
    }

    #[tokio::test]
    async fn a_refused_address_falls_through_to_the_next_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = listener.local_addr().unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let started = tokio::time::Instant::now();
        let (_, addr) = first_of(&[closed, good], Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(addr, good);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "waited for the stagger after a refusal"
        );
        let errors = first_of(&[closed], Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].1.kind(), io::ErrorKind::ConnectionRefused);
    }
}
