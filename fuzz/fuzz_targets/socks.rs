//! The SOCKS server side against arbitrary client bytes: it must never panic, never allocate
//! beyond what one request can hold, and only ever write well-formed replies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(data).await.unwrap();
        client.shutdown().await.unwrap();
        let _ = secoda_agent::socks::read_request(&mut server).await;
        drop(server);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        // Method selection (2 bytes) and at most one reply (SOCKS4: 8, SOCKS5: 10 or 22).
        assert!(matches!(out.len(), 0 | 2 | 8 | 12 | 24), "reply of {} bytes", out.len());
    });
});
