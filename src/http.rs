//! HTTP for operators: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (ready, with why not).
//!
//! Why separate from the pipeline: probes must answer while a batch is stuck on a slow provider;
//! they only read [`Health`] and the metrics registry, never the queue.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::guard::health::Health;

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install_metrics() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let buckets = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .expect("static buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (tests); ours still renders its own.
            let _ = metrics::set_global_recorder(recorder);
            crate::meter::describe();
            crate::meter::build_info();
            handle
        })
        .clone()
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

/// The routes: /metrics, /healthz, /readyz.
pub fn router(health: Arc<Health>) -> Router {
    let state = AppState {
        health,
        metrics: install_metrics(),
    };
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move {
                let mut text = s.metrics.render();
                text.push_str(&crate::meter::render_extra());
                text
            }),
        )
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    let detail = s
        .health
        .detail()
        .map(|d| format!("{d}\n"))
        .unwrap_or_default();
    match s.health.readiness() {
        Ok(()) => (StatusCode::OK, format!("ready\n{detail}")),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n{detail}", why.join("; ")),
        ),
    }
}

/// Serves on `addr` until the process ends; returns the bound address (port 0 picks one).
pub async fn serve(addr: &str, health: Arc<Health>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot serve /metrics, /healthz, /readyz on {addr} (http.addr, EMBED_WORKER__HTTP__ADDR; empty disables): {e}")
    })?;
    let bound = listener.local_addr()?;
    let app = router(health);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    tracing::info!(%bound, "serving /metrics, /healthz, /readyz");
    Ok(bound)
}
