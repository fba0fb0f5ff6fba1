//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive) and `/readyz` (partitions restored and a model loaded). A deliberately tiny
//! HTTP/1.1 server: GET only, one request per connection, bounded request size.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_REQUEST: usize = 8 * 1024;

/// Online-store reads for `GET /v1/features/{user_id}`.
pub type FeatureReader = Arc<tokio::sync::Mutex<crate::online_store::OnlineStore>>;

/// Binds the admin port and serves it in the background; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    ready: Arc<AtomicBool>,
    features: Option<FeatureReader>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let metrics = metrics.clone();
                    let ready = Arc::clone(&ready);
                    let features = features.clone();
                    tokio::spawn(async move {
                        let served = respond(stream, &metrics, &ready, features.as_ref());
                        let _ = tokio::time::timeout(Duration::from_secs(10), served).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(bound)
}

async fn respond(
    mut stream: TcpStream,
    metrics: &PrometheusHandle,
    ready: &AtomicBool,
    features: Option<&FeatureReader>,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || request.len() + n > MAX_REQUEST {
            break;
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") if ready.load(Ordering::SeqCst) => {
            ("200 OK", "text/plain", "ready\n".to_owned())
        }
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            "not ready\n".to_owned(),
        ),
        ("GET", p) if p.starts_with("/v1/features/") => {
            read_features(&p["/v1/features/".len()..], features).await
        }
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// `GET /v1/features/{user_id}`: the user's hash in the online store, as JSON.
async fn read_features(
    encoded_user: &str,
    features: Option<&FeatureReader>,
) -> (&'static str, &'static str, String) {
    let Some(store) = features else {
        return (
            "404 Not Found",
            "text/plain",
            "no online store configured\n".to_owned(),
        );
    };
    let Some(user) = percent_decode(encoded_user) else {
        return (
            "400 Bad Request",
            "text/plain",
            "user id is not valid percent-encoded UTF-8\n".to_owned(),
        );
    };
    match store.lock().await.read(&user).await {
        Ok(Some(fields)) => {
            let body = serde_json::json!({ "user_id": user, "features": fields });
            ("200 OK", "application/json", body.to_string())
        }
        Ok(None) => (
            "404 Not Found",
            "application/json",
            serde_json::json!({ "user_id": user, "features": null }).to_string(),
        ),
        Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
    }
}

/// Decodes `%XX` escapes (user ids may be any UTF-8, e.g. `%C3%BC-7-%C3%A9`).
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_decoding_handles_utf8_and_refuses_garbage() {
        assert_eq!(
            super::percent_decode("%C3%BC-7-%C3%A9").as_deref(),
            Some("ü-7-é")
        );
        assert_eq!(super::percent_decode("u-1").as_deref(), Some("u-1"));
        assert_eq!(super::percent_decode("%zz"), None);
        assert_eq!(super::percent_decode("%C3"), None);
    }
}
