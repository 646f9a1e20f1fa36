//! Load through a tunnel's SOCKS port, for the benchmarks: bulk each way (against
//! `counting_sink` and `sized_source`), downloads until told to stop, and paced ping-pong.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::socks5;

/// One 100-byte exchange every this long in paced ping-pong.
pub const PING_EVERY: Duration = Duration::from_millis(10);

/// `bulk` bytes through the tunnel on `listen` to the sink on `sink` (server -> target):
/// MiB/s, once the sink has counted every byte.
pub async fn upload(listen: u16, sink: u16, bulk: u64) -> f64 {
    let (code, s) = socks5(listen, "127.0.0.1", sink).await;
    assert_eq!(code, 0);
    send_counted(s.unwrap(), bulk).await
}

/// `bulk` bytes into `s`, a connection to a `counting_sink`: MiB/s, once it counted them.
pub async fn send_counted(mut s: TcpStream, bulk: u64) -> f64 {
    let block = vec![0xa5u8; 256 << 10];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bulk {
        s.write_all(&block).await.unwrap();
        sent += block.len() as u64;
    }
    s.shutdown().await.unwrap();
    assert_eq!(s.read_u64().await.unwrap(), sent);
    sent as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

/// `bulk` bytes from the source on `source` through the tunnel (target -> server): MiB/s.
pub async fn download(listen: u16, source: u16, bulk: u64) -> f64 {
    let (code, s) = socks5(listen, "127.0.0.1", source).await;
    assert_eq!(code, 0);
    let mut s = s.unwrap();
    let t = Instant::now();
    s.write_u64(bulk).await.unwrap();
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    loop {
        let k = s.read(&mut buf).await.unwrap();
        if k == 0 {
            break;
        }
        got += k as u64;
    }
    assert_eq!(got, bulk);
    got as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

/// Downloads from `source` until `stop` is set: MiB/s.
pub async fn download_until(listen: u16, source: u16, stop: Arc<AtomicBool>) -> f64 {
    let (code, s) = socks5(listen, "127.0.0.1", source).await;
    assert_eq!(code, 0);
    let mut s = s.unwrap();
    let t = Instant::now();
    s.write_u64(u64::MAX).await.unwrap();
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(k) => got += k as u64,
        }
    }
    got as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

/// One channel to the echo service on `echo`, a 100-byte exchange every `PING_EVERY`, until
/// `done` (given the count so far): each exchange's time, ms. An exchange that takes longer
/// than `PING_EVERY` is followed by the next at once (the interval catches up), so on a long
/// path the count is the phase's length over the exchange's time, not over `PING_EVERY`.
pub async fn paced_pings(listen: u16, echo: u16, done: impl Fn(usize) -> bool) -> Vec<f64> {
    let (code, s) = socks5(listen, "127.0.0.1", echo).await;
    assert_eq!(code, 0);
    let mut s = s.unwrap();
    let msg = [7u8; 100];
    let mut back = [0u8; 100];
    let mut lat = Vec::new();
    let mut tick = tokio::time::interval(PING_EVERY);
    while !done(lat.len()) {
        tick.tick().await;
        let t = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat
}

/// Paced pings until `stop` is set.
pub async fn pings_until(listen: u16, echo: u16, stop: Arc<AtomicBool>) -> Vec<f64> {
    paced_pings(listen, echo, move |_| stop.load(Ordering::Relaxed)).await
}

/// The bench's own tunnel port (`ssh -R`, the agent) on the server's side is open; panics
/// after 30 s.
pub async fn wait_listening(port: u16) {
    assert!(
        super::listening(([127, 0, 0, 1], port).into(), Duration::from_secs(30)).await,
        "nothing listens on the server's port {port}"
    );
}

/// The `p` quantile (0 to 1) of `v`, the nearest rank; sorts `v`. 0 for no values.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn median(mut v: Vec<f64>) -> f64 {
    percentile(&mut v, 0.5)
}
