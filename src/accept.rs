//! The accept loops of the local interfaces (status socket, metrics endpoint): a bounded
//! number of connections at a time, and a pause after a failed accept. A listener whose
//! accept fails (out of descriptors) stays readable, so retrying at once would spin the
//! agent's single worker thread and starve the tunnel.

use std::future::Future;
use std::io;
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::constants::{ACCEPT_ERROR_PAUSE, LOCAL_MAX_CONNECTIONS};

/// Accept with `accept` forever, serving each connection with `serve` in its own task.
pub async fn serve_each<C, A, AF, S, SF>(what: &'static str, mut accept: A, serve: S)
where
    A: FnMut() -> AF,
    AF: Future<Output = io::Result<C>>,
    S: Fn(C) -> SF,
    SF: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(LOCAL_MAX_CONNECTIONS));
    let mut failures = 0u64;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match accept().await {
            Ok(conn) => {
                failures = 0;
                let task = serve(conn);
                tokio::spawn(async move {
                    task.await;
                    drop(slot);
                });
            }
            Err(e) => {
                failures += 1;
                if failures.is_power_of_two() {
                    log::warn!("{what}: cannot accept a connection: {e} ({failures} in a row); retrying every {ACCEPT_ERROR_PAUSE:?}");
                }
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}
