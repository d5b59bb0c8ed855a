//! The admin HTTP API (port 15014): `/ready`, `/live`, `/metrics`, `/v1/trust-bundle` and
//! `/v1/certs`. Read-only; plain HTTP/1.1.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use meshlet_identity::ca::Ca;
use meshlet_identity::cert::CertSummary;
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
    loop {
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req, OffsetDateTime::now_utc())) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn route(
    state: &AdminState,
    req: &Request<Incoming>,
    now: OffsetDateTime,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match req.uri().path() {
        "/ready" | "/live" => text(StatusCode::OK, "ok\n"),
        "/metrics" => match meshlet_telemetry::prometheus_text(&state.metrics) {
            Ok(body) => respond(
                StatusCode::OK,
                meshlet_telemetry::PROMETHEUS_CONTENT_TYPE,
                body,
            ),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics encoding failed\n",
            ),
        },
        "/v1/trust-bundle" => respond(
            StatusCode::OK,
            "application/x-pem-file",
            state.ca.trust_bundle_pem(),
        ),
        "/v1/certs" => {
            let filter = match CertsFilter::parse(req.uri().query().unwrap_or("")) {
                Ok(f) => f,
                Err(msg) => return text(StatusCode::BAD_REQUEST, &msg),
            };
            let mut workloads = state.registry.snapshot(now, state.expiring_share);
            workloads.retain(|w| filter.keeps(w));
            let body = CertsResponse {
                workloads,
                ca: CaStatus {
                    roots: state.ca.roots().into_iter().map(RootStatus::from).collect(),
                    intermediate_not_after: state.ca.issuer_not_after(),
                },
            };
            match serde_json::to_string(&body) {
                Ok(json) => respond(StatusCode::OK, "application/json", json),
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
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

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body.to_owned())
}
