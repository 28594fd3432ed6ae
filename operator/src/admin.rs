//! The admin HTTP server: `/healthz` (the process serves), `/readyz` (the lease loop
//! and client are up, so a second replica is ready too while it waits as a follower),
//! `/metrics` (the Prometheus text of the operator's OTel instruments, the same values
//! OTLP exports).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Set once the operator is ready to serve (lease loop running).
    pub ready: Arc<AtomicBool>,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            tether_telemetry::PrometheusText::CONTENT_TYPE,
        )],
        state.metrics.encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn readiness_follows_the_flag_and_metrics_are_served() {
        let state = AdminState {
            metrics: Arc::new(Metrics::new()),
            ready: Arc::new(AtomicBool::new(false)),
        };
        let app = router(state.clone());
        let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
        let res = app.clone().oneshot(get("/readyz")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        state.ready.store(true, Ordering::Relaxed);
        let res = app.clone().oneshot(get("/readyz")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        state
            .metrics
            .observe_reconcile(std::time::Duration::from_millis(1), false);
        let res = app.oneshot(get("/metrics")).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("tether_operator_reconciles_total 1"));
    }
}
