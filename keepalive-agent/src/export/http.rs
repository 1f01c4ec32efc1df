//! The scrape endpoint and the probes a DaemonSet needs, and the server loop that keeps them
//! answering while other clients misbehave.
//!
//! A node agent's port is reachable by every pod on the node, so the server assumes hostile
//! clients: a request's headers must arrive within [`HEADER_READ_TIMEOUT`] (which also closes
//! idle keep-alive connections, since hyper starts that timer whenever it waits for a request),
//! and at most [`MAX_CONNECTIONS`] are open at once. A new connection beyond the cap closes the
//! oldest one that is not inside a request (a slowloris or idle client), so a scraper that
//! sends its request right away always gets in; only when every connection is mid-request is
//! the new one refused. Either way nothing waits in a queue and the agent's file descriptors
//! stay bounded whatever the clients do.

use std::{
    collections::VecDeque,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{info, warn};
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

use crate::export::web_config::WebConfig;

pub(crate) struct HttpState {
    pub registry: Registry,
    /// Every required kernel program is attached and the ring buffer is being drained.
    pub ready: AtomicBool,
}

pub(crate) fn router(state: Arc<HttpState>, telemetry_path: &str) -> Router {
    let landing = landing_page(telemetry_path);
    Router::new()
        .route(
            "/",
            get(|| async move {
                (
                    [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    landing,
                )
            }),
        )
        .route(telemetry_path, get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

/// What someone who opens the agent's port in a browser sees: where the metrics and probes are
/// and which build answers. `telemetry_path` is safe in HTML as it is (`--web.telemetry-path`
/// allows only letters, digits and `-_.~/`).
fn landing_page(telemetry_path: &str) -> String {
    let version = env!("CARGO_PKG_VERSION");
    let revision = env!("KEEPALIVE_GIT_REVISION");
    format!(
        "<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\"><title>keepalive-agent</title></head>\n\
         <body>\n<h1>keepalive-agent</h1>\n\
         <p>Per-connection TCP keepalive visibility from eBPF.</p>\n\
         <p>Version {version}, revision {revision}</p>\n<ul>\n\
         <li><a href=\"{telemetry_path}\">{telemetry_path}</a>: Prometheus metrics</li>\n\
         <li><a href=\"/healthz\">/healthz</a>: liveness</li>\n\
         <li><a href=\"/readyz\">/readyz</a>: readiness (every required kernel program attached)</li>\n\
         </ul>\n</body>\n</html>\n"
    )
}

async fn metrics(
    State(state): State<Arc<HttpState>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let format = crate::export::exposition::negotiate(accept);
    match format.encode(&state.registry) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, format.content_type())],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "encoding metrics failed\n".to_owned(),
        ),
    }
}

async fn ready(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "kernel programs not attached yet\n",
        )
    }
}

/// Connections open at once; a few scrapers and probes need a handful.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this; it is also how long an idle keep-alive
/// connection stays open (Prometheus reconnects at its next scrape).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, how long requests in flight get to finish.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Repeated server warnings (accept errors, shed connections) are logged at most this often.
const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// What bind's errno means for the operator.
pub(crate) fn bind_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => {
            "another process listens on it (another agent?): stop it or choose another \
             --web.listen-address"
        }
        Some(libc::EADDRNOTAVAIL) => {
            "no interface of this host (or of this network namespace) has that address: \
             use one it has, or 0.0.0.0"
        }
        Some(libc::EACCES | libc::EPERM) => {
            "ports below 1024 need CAP_NET_BIND_SERVICE: choose a port above 1023"
        }
        Some(libc::EAFNOSUPPORT) => "this host has no IPv6 (or IPv4): use the other family",
        _ => "check --web.listen-address",
    }
}

/// Connections the server closed or refused to stay within [`MAX_CONNECTIONS`].
#[derive(Debug, Clone, Default)]
pub(crate) struct ServerMetrics {
    pub shed_connections: Counter,
}

impl ServerMetrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "keepalive_agent_http_connections_shed",
            "HTTP connections closed early (idle or slow, to make room) or refused (every slot mid-request) to stay within the connection limit",
            self.shed_connections.clone(),
        );
    }
}

/// One open connection as the accept loop sees it.
struct Slot {
    id: u64,
    /// Requests of this connection inside the router (0: idle, reading headers, or writing).
    in_request: Arc<AtomicUsize>,
    close: Arc<tokio::sync::Notify>,
}

/// Logs the first occurrence at once, then at most one line per [`WARN_INTERVAL`] with the
/// count since the last line.
struct RateLimitedWarning {
    what: &'static str,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedWarning {
    const fn new(what: &'static str) -> Self {
        Self {
            what,
            last: None,
            suppressed: 0,
        }
    }

    fn hit(&mut self, detail: impl std::fmt::Display) {
        self.suppressed += 1;
        if self.last.is_none_or(|at| at.elapsed() >= WARN_INTERVAL) {
            warn!(
                "{} ({} in the last {}s): {detail}",
                self.what,
                self.suppressed,
                WARN_INTERVAL.as_secs()
            );
            self.suppressed = 0;
            self.last = Some(Instant::now());
        }
    }
}

/// Serves `router` on `listener` until `shutdown` turns true; then stops accepting, lets
/// requests in flight finish (at most [`SHUTDOWN_GRACE`]) and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    web: WebConfig,
    metrics: ServerMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots: Arc<Mutex<VecDeque<Slot>>> = Arc::default();
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    let mut accept_errors = RateLimitedWarning::new("accepting HTTP connections failed");
    let mut shed = RateLimitedWarning::new("HTTP connections shed at the connection limit");
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // EMFILE/ENFILE/ENOBUFS: the connection stays in the backlog; retrying at
                    // once would spin.
                    accept_errors.hit(&err);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            () = stopped(&mut shutdown) => break,
        };
        let Ok(mut open) = slots.lock() else {
            break;
        };
        if open.len() >= MAX_CONNECTIONS {
            let idle = open
                .iter()
                .position(|slot| slot.in_request.load(Ordering::Relaxed) == 0);
            metrics.shed_connections.inc();
            match idle.and_then(|i| open.remove(i)) {
                Some(oldest) => {
                    oldest.close.notify_one();
                    shed.hit(format!(
                        "closed the oldest idle or slow one to admit a new one (limit {MAX_CONNECTIONS})"
                    ));
                }
                None => {
                    shed.hit(format!(
                        "refused a new one: all {MAX_CONNECTIONS} are inside a request"
                    ));
                    continue;
                }
            }
        }
        let slot = Slot {
            id: next_id,
            in_request: Arc::default(),
            close: Arc::default(),
        };
        next_id += 1;
        let connection = serve_connection(
            stream,
            router.clone(),
            web.clone(),
            Arc::clone(&slot.in_request),
            Arc::clone(&slot.close),
            shutdown.clone(),
        );
        let id = slot.id;
        open.push_back(slot);
        drop(open);
        let slots = Arc::clone(&slots);
        tasks.spawn(async move {
            connection.await;
            if let Ok(mut open) = slots.lock() {
                open.retain(|slot| slot.id != id);
            }
        });
    }
    drop(listener);
    let open = tasks.len();
    if open > 0 {
        info!("HTTP: waiting up to {SHUTDOWN_GRACE:?} for {open} open connections");
        let finished = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            warn!(
                "HTTP: {} connections still open after {SHUTDOWN_GRACE:?}, closing them",
                tasks.len()
            );
        }
    }
}

/// Serves one connection until the client closes it, a timeout fires, the accept loop needs its
/// slot (`close`), or shutdown (then the request in flight finishes first). With TLS the
/// handshake comes first, under the same deadline as a request's headers: a client that
/// connects and sends nothing (or plain HTTP) holds its slot no longer than a slowloris.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    router: Router,
    web: WebConfig,
    in_request: Arc<AtomicUsize>,
    close: Arc<tokio::sync::Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(tls) = web.tls.clone() else {
        serve_http(stream, router, web, in_request, close, shutdown).await;
        return;
    };
    let handshake = tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream));
    let stream = tokio::select! {
        result = handshake => match result {
            Ok(Ok(stream)) => stream,
            // Not TLS, a certificate the client CA does not sign, or too slow: the client
            // sees the connection closed (its TLS library says why), nothing to log per client.
            Ok(Err(_)) | Err(_) => return,
        },
        () = close.notified() => return,
        () = stopped(&mut shutdown) => return,
    };
    serve_http(stream, router, web, in_request, close, shutdown).await;
}

async fn serve_http<S>(
    stream: S,
    router: Router,
    web: WebConfig,
    in_request: Arc<AtomicUsize>,
    close: Arc<tokio::sync::Notify>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: axum::http::Request<_>| {
        let mut router = router.clone();
        let basic_auth = web.basic_auth.clone();
        let guard = InRequest::enter(Arc::clone(&in_request));
        async move {
            if let Some(auth) = basic_auth {
                let authorization = request
                    .headers()
                    .get(header::AUTHORIZATION)
                    .map(|value| value.as_bytes().to_vec());
                // bcrypt takes tens of milliseconds by design: off the async workers.
                let allowed =
                    tokio::task::spawn_blocking(move || auth.allows(authorization.as_deref()))
                        .await
                        .unwrap_or(false);
                if !allowed {
                    drop(guard);
                    return Ok(unauthorized());
                }
            }
            let response = tower_service::Service::call(&mut router, request).await;
            drop(guard);
            response
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        // Dropping the connection closes the socket.
        () = close.notified() => {}
        () = stopped(&mut shutdown) => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// 401 with the challenge browsers and curl answer with credentials.
fn unauthorized() -> axum::response::Response {
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::WWW_AUTHENTICATE, "Basic realm=\"keepalive-agent\""),
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        ],
        "Unauthorized\n",
    )
        .into_response()
}

/// Resolves once `stop` is true (or its sender is gone, which also means stop).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Marks a connection as inside a request for as long as the router handles it.
struct InRequest(Arc<AtomicUsize>);

impl InRequest {
    fn enter(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for InRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landing_page_links_every_endpoint_and_names_the_build() {
        let page = landing_page("/v1/keepalive");
        for needle in [
            "href=\"/v1/keepalive\"",
            "href=\"/healthz\"",
            "href=\"/readyz\"",
            env!("CARGO_PKG_VERSION"),
            &format!("revision {}", env!("KEEPALIVE_GIT_REVISION")),
        ] {
            assert!(page.contains(needle), "{needle:?} missing from\n{page}");
        }
    }

    #[test]
    fn bind_hints_follow_the_errno() {
        let hint = |errno| bind_hint(&io::Error::from_raw_os_error(errno));
        assert!(hint(libc::EADDRINUSE).contains("another process"));
        assert!(hint(libc::EADDRNOTAVAIL).contains("no interface"));
        assert!(hint(libc::EACCES).contains("CAP_NET_BIND_SERVICE"));
    }
}
