//! The sidecar's admin API (port 15000): `/ready` (only once it has a certificate, and not
//! while draining), `/live`, `/certs`, `/policy` (what it enforces) and `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use meshlet_telemetry::admin::{self, Body};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::identity::{CertStatus, Creds};

/// What the admin handlers read.
#[derive(Debug)]
pub struct AdminState {
    pub creds: watch::Receiver<Option<Arc<Creds>>>,
    pub status: Arc<ArcSwap<CertStatus>>,
    pub metrics: prometheus_client::registry::Registry,
    pub draining: Arc<AtomicBool>,
    /// The authorization policy being enforced.
    pub policy: crate::relay::PolicyRx,
}

/// Serves the admin API until `stop`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    admin::serve(
        listener,
        Arc::new(move |req: &Request<Incoming>| route(&state, req)),
        stop,
    )
    .await;
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        return admin::text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match req.uri().path() {
        "/live" => admin::text(StatusCode::OK, "ok\n"),
        "/ready" => {
            let has_cert = state
                .creds
                .borrow()
                .as_ref()
                .is_some_and(|c| c.valid_at(std::time::SystemTime::now()));
            let has_policy = state.policy.borrow().is_some();
            match (has_cert, has_policy, state.draining.load(Ordering::Relaxed)) {
                (_, _, true) => admin::text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
                (true, true, false) => admin::text(StatusCode::OK, "ready\n"),
                (false, _, false) => admin::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no valid certificate yet\n",
                ),
                (true, false, false) => admin::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no policy from the control plane yet\n",
                ),
            }
        }
        "/certs" => admin::json(&state.status.load().view(time::OffsetDateTime::now_utc())),
        "/policy" => admin::json(&state.policy.borrow().as_deref()),
        "/metrics" => admin::metrics(&state.metrics),
        _ => admin::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
