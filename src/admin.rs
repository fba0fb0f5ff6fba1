//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive), `/readyz` (partitions restored and a model loaded), `/v1/features/{user}`,
//! and, behind a bearer token, `POST /v1/models/{name}/promote/{version}` and
//! `POST /v1/models/{name}/rollback`. A deliberately tiny HTTP/1.1 server: one request
//! per connection, bounded request size.

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

/// What the model endpoints need: the registry, this worker's model manager, the
/// control topic to announce changes on, and the token that guards them.
pub struct ModelAdmin {
    pub registry: Arc<dyn crate::model::ModelRegistry>,
    pub name: String,
    /// Requests must carry `Authorization: Bearer <token>`; None disables the endpoints.
    pub token: Option<String>,
    pub commands: tokio::sync::mpsc::Sender<crate::serving::ModelCommand>,
    /// Producer settings and topic for the control-topic announcement.
    pub control: (rdkafka::ClientConfig, String),
}

/// Binds the admin port and serves it in the background; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    ready: Arc<AtomicBool>,
    features: Option<FeatureReader>,
    models: Option<Arc<ModelAdmin>>,
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
                    let models = models.clone();
                    tokio::spawn(async move {
                        let served = respond(
                            stream,
                            &metrics,
                            &ready,
                            features.as_ref(),
                            models.as_deref(),
                        );
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
    models: Option<&ModelAdmin>,
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
        ("POST", p) if p.starts_with("/v1/models/") => {
            let head = String::from_utf8_lossy(&request);
            let token = bearer_token(&head);
            change_models(&p["/v1/models/".len()..], token.as_deref(), models).await
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

/// The token of an `Authorization: Bearer <token>` header.
fn bearer_token(head: &str) -> Option<String> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("authorization") {
            return None;
        }
        let value = value.trim();
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned())
    })
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn same_token(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// `{name}/promote/{version}` or `{name}/rollback`: changes the registry, tells this
/// worker's manager at once, and announces the change on the control topic.
async fn change_models(
    path: &str,
    token: Option<&str>,
    models: Option<&ModelAdmin>,
) -> (&'static str, &'static str, String) {
    use crate::serving::{AliasOp, ModelCommand};
    let text = |status, body: String| (status, "text/plain", body + "\n");
    let Some(admin) = models else {
        return text("404 Not Found", "no model registry on this server".into());
    };
    let Some(expected) = &admin.token else {
        return text(
            "403 Forbidden",
            "model changes over HTTP are disabled: start the worker with AUGUR_ADMIN_TOKEN set"
                .into(),
        );
    };
    if !token.is_some_and(|t| same_token(t, expected)) {
        return text("401 Unauthorized", "missing or wrong bearer token".into());
    }
    let parts: Vec<&str> = path.split('/').collect();
    let (name, op) = match parts.as_slice() {
        [name, "promote", version] => match version.parse() {
            Ok(version) => (
                *name,
                AliasOp::Promote {
                    alias: crate::model::registry::CHAMPION.into(),
                    version,
                },
            ),
            Err(_) => return text("400 Bad Request", format!("\"{version}\" is not a version")),
        },
        [name, "rollback"] => (*name, AliasOp::Rollback),
        _ => {
            return text(
                "404 Not Found",
                "expected /v1/models/{name}/promote/{version} or /v1/models/{name}/rollback".into(),
            )
        }
    };
    if name != admin.name {
        return text(
            "404 Not Found",
            format!(
                "this worker serves model \"{}\", not \"{name}\"",
                admin.name
            ),
        );
    }
    let (summary, aliases) =
        match crate::serving::change_aliases(admin.registry.as_ref(), name, &op) {
            Ok(x) => x,
            Err(e) => return text("409 Conflict", e.to_string()),
        };
    let _ = admin.commands.send(ModelCommand::Reload).await;
    let change = crate::serving::control::AliasChange {
        model: name.to_owned(),
        aliases,
        by: "admin api".into(),
        at_ms: crate::codec::now_ms(),
    };
    let (config, topic) = &admin.control;
    let announced = match crate::serving::control::publish(config.clone(), topic, &change).await {
        Ok(()) => format!("announced on {topic}"),
        Err(e) => format!(
            "not announced on {topic} ({e}); other workers see it when they poll the registry"
        ),
    };
    tracing::info!(%summary, %announced, "model change over the admin API");
    text("200 OK", format!("{summary}; {announced}"))
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

    #[test]
    fn bearer_tokens_are_found_and_compared_exactly() {
        let head = "POST /v1/models/ctr/rollback HTTP/1.1\r\nHost: x\r\nauthorization: Bearer s3cret\r\n\r\n";
        assert_eq!(super::bearer_token(head).as_deref(), Some("s3cret"));
        assert_eq!(super::bearer_token("GET / HTTP/1.1\r\n\r\n"), None);
        assert!(super::same_token("s3cret", "s3cret"));
        assert!(!super::same_token("s3cre", "s3cret"));
        assert!(!super::same_token("s3cret!", "s3cret"));
        assert!(!super::same_token("", "s3cret"));
    }
}
