//! The admin HTTP API (port 15014): `/ready`, `/live`, `/metrics`, `/v1/trust-bundle` and
//! `/v1/certs`. Read-only; plain HTTP/1.1.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use meshlet_identity::ca::Ca;
use meshlet_identity::cert::CertSummary;
use meshlet_telemetry::admin::{self, Body};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::registry::{CertState, Registry, WorkloadStatus};

/// What the admin handlers read.
#[derive(Debug)]
pub struct AdminState {
    pub ca: Arc<Ca>,
    pub registry: Arc<Registry>,
    pub metrics: prometheus_client::registry::Registry,
    /// Share of the lifetime left below which a certificate is `expiring`.
    pub expiring_share: f64,
}

/// `GET /v1/certs`.
#[derive(Debug, Serialize)]
pub struct CertsResponse {
    pub workloads: Vec<WorkloadStatus>,
    pub ca: CaStatus,
}

/// The CA part of `/v1/certs`.
#[derive(Debug, Serialize)]
pub struct CaStatus {
    pub roots: Vec<RootStatus>,
    #[serde(with = "time::serde::rfc3339")]
    pub intermediate_not_after: OffsetDateTime,
}

/// One root of the trust bundle.
#[derive(Debug, Serialize)]
pub struct RootStatus {
    pub subject: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

impl From<CertSummary> for RootStatus {
    fn from(c: CertSummary) -> Self {
        Self {
            subject: c.subject,
            not_after: c.not_after,
        }
    }
}

/// Serves the admin API on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let route = move |req: &Request<Incoming>| route(&state, req, OffsetDateTime::now_utc());
    admin::serve(listener, Arc::new(route), shutdown).await;
}

fn route(state: &AdminState, req: &Request<Incoming>, now: OffsetDateTime) -> Response<Body> {
    if req.method() != Method::GET {
        return admin::text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match req.uri().path() {
        "/ready" | "/live" => admin::text(StatusCode::OK, "ok\n"),
        "/metrics" => admin::metrics(&state.metrics),
        "/v1/trust-bundle" => admin::respond(
            StatusCode::OK,
            "application/x-pem-file",
            state.ca.trust_bundle_pem(),
        ),
        "/v1/certs" => {
            let filter = match CertsFilter::parse(req.uri().query().unwrap_or("")) {
                Ok(f) => f,
                Err(msg) => {
                    return admin::respond(
                        StatusCode::BAD_REQUEST,
                        "text/plain; charset=utf-8",
                        msg,
                    );
                }
            };
            let mut workloads = state.registry.snapshot(now, state.expiring_share);
            workloads.retain(|w| filter.keeps(w));
            admin::json(&CertsResponse {
                workloads,
                ca: CaStatus {
                    roots: state.ca.roots().into_iter().map(RootStatus::from).collect(),
                    intermediate_not_after: state.ca.issuer_not_after(),
                },
            })
        }
        _ => admin::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `?namespace=NS&state=valid|expiring|expired` on `/v1/certs`.
#[derive(Debug, Default, PartialEq)]
struct CertsFilter {
    namespace: Option<String>,
    state: Option<CertState>,
}

impl CertsFilter {
    fn parse(query: &str) -> Result<Self, String> {
        let mut f = Self::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "namespace" => f.namespace = Some(v.to_owned()),
                "state" => {
                    f.state = Some(match v {
                        "valid" => CertState::Valid,
                        "expiring" => CertState::Expiring,
                        "expired" => CertState::Expired,
                        _ => {
                            return Err(format!(
                                "state must be valid, expiring or expired, not {v:?}\n"
                            ));
                        }
                    })
                }
                _ => {
                    return Err(format!(
                        "unknown query parameter {k:?} (namespace, state)\n"
                    ));
                }
            }
        }
        Ok(f)
    }

    fn keeps(&self, w: &WorkloadStatus) -> bool {
        let ns_ok = self
            .namespace
            .as_ref()
            .is_none_or(|ns| w.spiffe_id.path().starts_with(&format!("/ns/{ns}/")));
        ns_ok && self.state.is_none_or(|s| s == w.state)
    }
}
