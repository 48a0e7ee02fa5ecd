//! `/metrics`, `/healthz` and `/readyz` over HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::health::Watches;
use crate::metrics::SharedMetrics;

/// What `/readyz` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Ready {
    /// Starting, or leading with caches not yet filled: 503.
    No = 0,
    /// A standby waiting for the lease, able to take over: 200 `standby`.
    /// (Ready, so that a rolling update of several replicas completes.)
    Standby = 1,
    /// Leading (or without leader election) with every cache filled once:
    /// 200 `ok` while every watch is synced, 503 while one is not.
    Yes = 2,
}

/// The operator's readiness, shared with the HTTP server.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicU8>);

impl Readiness {
    pub fn set(&self, ready: Ready) {
        self.0.store(ready as u8, Ordering::SeqCst);
    }

    pub fn get(&self) -> Ready {
        match self.0.load(Ordering::SeqCst) {
            1 => Ready::Standby,
            2 => Ready::Yes,
            _ => Ready::No,
        }
    }
}

#[derive(Clone)]
struct AppState {
    metrics: SharedMetrics,
    ready: Readiness,
    watches: Watches,
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match state.ready.get() {
        Ready::Yes if state.watches.all_synced() => (StatusCode::OK, "ok"),
        Ready::Yes => (StatusCode::SERVICE_UNAVAILABLE, "not ready: a watch is listing anew"),
        Ready::Standby => (StatusCode::OK, "standby: waiting for the leader lease"),
        Ready::No => (StatusCode::SERVICE_UNAVAILABLE, "not ready"),
    }
}

/// 503 naming the stalled watch once one has been out of sync, or without
/// an answer from the API server, for longer than the stall limit.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match state.watches.live() {
        Ok(()) => (StatusCode::OK, "ok".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// Serves until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    metrics: SharedMetrics,
    ready: Readiness,
    watches: Watches,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, ready, watches });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
