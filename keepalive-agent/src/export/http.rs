//! The scrape endpoint and the probes a DaemonSet needs.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;

pub(crate) struct HttpState {
    pub registry: Registry,
    /// Every required kernel program is attached and the ring buffer is being drained.
    pub ready: AtomicBool,
}

pub(crate) fn router(state: Arc<HttpState>, telemetry_path: &str) -> Router {
    Router::new()
        .route(telemetry_path, get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

async fn metrics(
    State(state): State<Arc<HttpState>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let mut body = String::new();
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        // Only for clients that ask for the classic format (promtool check metrics).
        Ok(()) if crate::export::exposition::wants_text_0_0_4(accept) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, crate::export::exposition::TEXT_0_0_4)],
            crate::export::exposition::openmetrics_to_text(&body),
        ),
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
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
