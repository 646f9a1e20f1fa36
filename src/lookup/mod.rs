//! Name lookups for targets, bounded so that names whose DNS never answers cannot hold up
//! anyone else's.
//!
//! The system resolver (`getaddrinfo`) blocks a thread of tokio's blocking pool until it
//! answers, which for a domain whose DNS never answers is 10-30 s, whatever our own timeout
//! says: the thread cannot be taken back. Unbounded, 700 requests for such names filled the
//! pool's 512 threads, and a request for a name in `/etc/hosts` waited 6.8 s for a thread
//! (the tunnel's own lookups share that pool too). So, for targets:
//! - one lookup per name at a time: later requests for the same name wait for its answer;
//! - at most `TARGET_LOOKUPS_MAX` lookups at once, a request beyond that waiting its turn
//!   within its own `connect_timeout`;
//! - a lookup still unanswered after `LOOKUP_STUCK_AFTER` stops counting towards that, so
//!   hung names do not keep the others waiting, up to `TARGET_LOOKUPS_STUCK_MAX` of them;
//!   past that they keep counting, and the threads in all stay bounded by the sum.
//!
//! A name the hosts file knows is answered from it at once (hosts.rs), never waiting here.
//!
//! The tunnel's own lookups (the server, the proxy) go straight to the resolver, so they
//! never wait here, and the pool always has room for them (512 threads against at most 96).

mod hosts;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::connect::ResolveError;
use crate::constants::{LOOKUP_STUCK_AFTER, TARGET_LOOKUPS_MAX, TARGET_LOOKUPS_STUCK_MAX};
use crate::lock;

/// A lookup's result, shared by every request for the name (an `io::Error` is not `Clone`).
type Answer = Result<Vec<IpAddr>, (io::ErrorKind, String)>;

/// One lookup under way: its answer to come, and its turn among `TARGET_LOOKUPS_MAX` (taken
/// away early when it is set aside).
#[derive(Clone)]
struct Lookup {
    answer: watch::Receiver<Option<Answer>>,
    turn: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    since: tokio::time::Instant,
}

/// The lookups under way, by name.
struct Lookups {
    by_name: Mutex<HashMap<String, Lookup>>,
    turns: Arc<Semaphore>,
    stuck: AtomicUsize,
    /// Lookups started, ever: what the tests see sharing save.
    #[cfg(test)]
    started: AtomicUsize,
}

static TARGETS: LazyLock<Arc<Lookups>> = LazyLock::new(|| Arc::new(Lookups::new()));

/// `host`'s addresses for a target (an IP literal is its own). The caller bounds the time.
pub async fn resolve_target(host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
    if let Some(ips) = hosts::lookup(host) {
        return Ok(ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect());
    }
    TARGETS.resolve(host, port).await
}

impl Lookups {
    fn new() -> Self {
        Lookups {
            by_name: Mutex::new(HashMap::new()),
            turns: Arc::new(Semaphore::new(TARGET_LOOKUPS_MAX)),
            stuck: AtomicUsize::new(0),
            #[cfg(test)]
            started: AtomicUsize::new(0),
        }
    }

    async fn resolve(
        self: &Arc<Self>,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, ResolveError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let name = host.to_ascii_lowercase();
        let mut lookup = self.subscribe(&name);
        let stuck_at = lookup.since + LOOKUP_STUCK_AFTER;
        let first = tokio::time::timeout_at(stuck_at, lookup.answer.wait_for(Option::is_some))
            .await
            .map(|a| a.map(|a| a.clone()));
        let answer = match first {
            Ok(a) => a,
            Err(_) => {
                self.set_aside(&lookup.turn, &name);
                let a = lookup.answer.wait_for(Option::is_some).await;
                a.map(|a| a.clone())
            }
        };
        match answer {
            Ok(Some(Ok(ips))) if ips.is_empty() => Err(ResolveError::NoAddresses),
            Ok(Some(Ok(ips))) => Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect()),
            Ok(Some(Err((kind, text)))) => Err(ResolveError::Failed(io::Error::new(kind, text))),
            // The lookup ended without an answer: only when the runtime shuts down.
            _ => Err(ResolveError::Failed(io::ErrorKind::Interrupted.into())),
        }
    }

    /// The lookup under way for `name`, or a new one: started at once when a turn is free
    /// (the common case: no task of its own), else by a task that waits for one, so that
    /// requests giving up meanwhile leave it waiting for the others.
    fn subscribe(self: &Arc<Self>, name: &str) -> Lookup {
        let mut by_name = lock(&self.by_name);
        if let Some(lookup) = by_name.get(name) {
            return lookup.clone();
        }
        let (tx, rx) = watch::channel(None);
        let lookup = Lookup {
            answer: rx,
            turn: Arc::new(Mutex::new(None)),
            since: tokio::time::Instant::now(),
        };
        by_name.insert(name.to_string(), lookup.clone());
        drop(by_name);
        match self.turns.clone().try_acquire_owned() {
            Ok(turn) => self.start(name.to_string(), tx, &lookup.turn, turn),
            Err(_) => {
                let (me, name, slot) = (self.clone(), name.to_string(), lookup.turn.clone());
                tokio::spawn(async move {
                    let Ok(turn) = me.turns.clone().acquire_owned().await else {
                        return;
                    };
                    // Everyone who asked may have given up meanwhile (the table holds one
                    // receiver of its own).
                    if tx.receiver_count() <= 1 {
                        lock(&me.by_name).remove(&name);
                        return;
                    }
                    me.start(name, tx, &slot, turn);
                });
            }
        }
        lookup
    }

    /// Run the lookup on the blocking pool, holding `turn` until the resolver answers (or
    /// the lookup is set aside); the thread itself publishes the answer.
    fn start(
        self: &Arc<Self>,
        name: String,
        tx: watch::Sender<Option<Answer>>,
        slot: &Arc<Mutex<Option<OwnedSemaphorePermit>>>,
        turn: OwnedSemaphorePermit,
    ) {
        *lock(slot) = Some(turn);
        #[cfg(test)]
        self.started.fetch_add(1, Ordering::Relaxed);
        let (me, slot) = (self.clone(), slot.clone());
        // Detached: the thread runs until the resolver answers, whoever still waits.
        drop(tokio::task::spawn_blocking(move || {
            let answer = (name.as_str(), 0)
                .to_socket_addrs()
                .map(|addrs| addrs.map(|a| a.ip()).collect::<Vec<_>>())
                .map_err(|e| (e.kind(), e.to_string()));
            if lock(&slot).take().is_none() {
                // It had been set aside: its turn went back then.
                me.stuck.fetch_sub(1, Ordering::AcqRel);
            }
            // The next request for the name starts a lookup of its own: answers are not
            // cached here (the system's resolver, or nscd, may cache them).
            lock(&me.by_name).remove(&name);
            tx.send_replace(Some(answer));
        }));
    }

    /// A lookup unanswered for `LOOKUP_STUCK_AFTER` gives its turn back, so that names
    /// whose DNS never answers do not hold up the others (up to `TARGET_LOOKUPS_STUCK_MAX`
    /// such lookups; past that they keep their turns).
    fn set_aside(&self, slot: &Mutex<Option<OwnedSemaphorePermit>>, name: &str) {
        let mut slot = lock(slot);
        if slot.is_none() {
            return;
        }
        let room = self
            .stuck
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < TARGET_LOOKUPS_STUCK_MAX).then_some(n + 1)
            })
            .is_ok();
        if room {
            log::debug!("the lookup of {name} has taken {LOOKUP_STUCK_AFTER:?}: it no longer holds up other names' lookups");
            *slot = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_and_local_names() {
        let got = resolve_target("127.0.0.1", 80).await.unwrap();
        assert_eq!(got, [SocketAddr::from(([127, 0, 0, 1], 80))]);
        let got = resolve_target("fd00::1", 5432).await.unwrap();
        assert_eq!(got[0].port(), 5432);
        let got = resolve_target("localhost", 22).await.unwrap();
        assert!(got.iter().all(|a| a.ip().is_loopback() && a.port() == 22));
        assert!(resolve_target("no-such-host.invalid", 1).await.is_err());
    }

    /// Concurrent requests for one name (in any case) share one lookup, and every one of them
    /// gets its answer; the lookup is gone from the table once answered.
    #[tokio::test]
    async fn concurrent_requests_for_a_name_share_its_lookup() {
        let lookups = Arc::new(Lookups::new());
        let mut requests = tokio::task::JoinSet::new();
        for i in 0..50 {
            let (lookups, name) = (lookups.clone(), ["LocalHost", "localhost"][i % 2]);
            requests.spawn(async move { lookups.resolve(name, 7).await });
        }
        while let Some(r) = requests.join_next().await {
            assert!(r.unwrap().unwrap().iter().all(|a| a.port() == 7));
        }
        // One lookup, unless the resolver answered (localhost: from the hosts file, in
        // microseconds) before the last requests were scheduled, as on a loaded machine.
        let started = lookups.started.load(Ordering::Relaxed);
        assert!(started <= 3, "{started} lookups for 50 requests");
        assert!(lookups.by_name.lock().unwrap().is_empty());
        lookups.resolve("localhost", 7).await.unwrap();
        assert_eq!(
            lookups.started.load(Ordering::Relaxed),
            started + 1,
            "an answer was cached"
        );
    }
}
