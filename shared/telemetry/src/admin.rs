//! Pieces of the admin HTTP API common to both processes: serving a router until shutdown,
//! the `/metrics` and `/healthz` handlers, and the flow-event endpoints.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::{FlowLog, Metrics, TelemetryError};

/// Binds the admin listener. Separate from [`serve`] so callers learn the bound address
/// (port 0 in tests) before they start serving.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, TelemetryError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| TelemetryError::Bind { address, source })
}

/// Serves `router` until `shutdown` resolves, then lets requests in progress finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TelemetryError> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(TelemetryError::Serve)
}

/// `/healthz` (the process is alive), `/metrics`, and `/v1/flows` (recent flow events as JSON).
pub fn common_routes(metrics: Metrics, flows: Arc<FlowLog>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|State(metrics): State<Metrics>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    metrics.render(),
                )
            })
            .with_state(metrics),
        )
        .route(
            "/v1/flows",
            get(|State(flows): State<Arc<FlowLog>>| async move {
                axum::Json(flows.recent()).into_response()
            })
            .with_state(flows),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
}
