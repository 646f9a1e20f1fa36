//! `[metrics] listen`: a minimal HTTP endpoint serving the counters of [`Telemetry`] in the
//! Prometheus/OpenMetrics text format (encoded by the `prometheus-client` crate). One request
//! per connection; `GET /metrics` (or `/`) answers, anything else is 404.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::accept;
use crate::constants::METRICS_REQUEST_TIMEOUT;
use crate::telemetry::Telemetry;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub async fn serve(listener: TcpListener, telemetry: Arc<Telemetry>) {
    accept::serve_each(
        "metrics endpoint",
        || async { listener.accept().await.map(|(conn, _)| conn) },
        |conn| {
            let telemetry = telemetry.clone();
            async move {
                let _ =
                    tokio::time::timeout(METRICS_REQUEST_TIMEOUT, answer(conn, &telemetry)).await;
            }
        },
    )
    .await
}

async fn answer(mut conn: TcpStream, telemetry: &Telemetry) -> std::io::Result<()> {
    // The request head only; a scraper sends no body with GET.
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 || head.len() > 8192 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next().unwrap_or_default());
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    let response = match (method, path) {
        (Some(b"GET"), b"/metrics" | b"/") => {
            let body = telemetry.encode_metrics();
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        (Some(b"GET"), _) => {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n".to_string()
        }
        _ => "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
    };
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await
}
