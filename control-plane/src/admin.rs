//! The admin API (port 15014). Read-only status for anyone who can reach the port:
//! `/ready`, `/live`, `/metrics`, `/v1/trust-bundle`, `/v1/certs`. CA rotation needs an
//! admin bearer token (see [`crate::ca_admin`]): `POST /v1/ca/roots` (add a root),
//! `POST /v1/ca/intermediate` (issue from a new intermediate under the newest root),
//! `POST /v1/ca/retire-root?serial=HEX`, `POST /v1/ca/reload`.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use meshlet_identity::cert::{self, CertState, CertSummary};
use meshlet_telemetry::admin::{self, Body};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ca_admin::{CaHandle, RotateError};
use crate::registry::{Registry, WorkloadStatus};
use crate::token::Authenticator;

/// What the admin handlers read.
#[derive(Debug)]
pub struct AdminState {
    pub ca: Arc<CaHandle>,
    pub auth: Arc<Authenticator>,
    pub registry: Arc<Registry>,
    pub metrics: prometheus_client::registry::Registry,
    /// Share of the lifetime left below which a workload certificate is `expiring`.
    pub expiring_share: f64,
    /// A root or intermediate expiring within this is `expiring`.
    pub ca_expiring_within: Duration,
    /// The authorization policy in force.
    pub policy: tokio::sync::watch::Receiver<Arc<meshlet_identity::authz::PolicySet>>,
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
    pub roots: Vec<CaCertStatus>,
    #[serde(with = "time::serde::rfc3339")]
    pub intermediate_not_after: OffsetDateTime,
    pub intermediate: Option<CaCertStatus>,
}

/// A root or the intermediate.
#[derive(Debug, Serialize)]
pub struct CaCertStatus {
    pub subject: String,
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    pub state: CertState,
    /// For roots: whether it signed the intermediate that issues now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuing: Option<bool>,
}

fn ca_cert(
    c: CertSummary,
    now: OffsetDateTime,
    within: Duration,
    issuing: Option<bool>,
) -> CaCertStatus {
    let state = match cert::state(c.not_before, c.not_after, now, 0.0, false) {
        CertState::Valid if c.not_after - now < within => CertState::Expiring,
        s => s,
    };
    CaCertStatus {
        subject: c.subject,
        serial: c.serial,
        not_after: c.not_after,
        state,
        issuing,
    }
}

/// Serves the admin API on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let route = move |req: &Request<Incoming>| route(&state, req, OffsetDateTime::now_utc());
    admin::serve(listener, Arc::new(route), shutdown).await;
}

fn route(state: &AdminState, req: &Request<Incoming>, now: OffsetDateTime) -> Response<Body> {
    if req.method() == Method::POST && req.uri().path().starts_with("/v1/ca/") {
        return rotate(state, req);
    }
    if req.method() != Method::GET {
        return admin::text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match req.uri().path() {
        "/ready" | "/live" => admin::text(StatusCode::OK, "ok\n"),
        "/v1/policy" => admin::json(&**state.policy.borrow()),
        "/metrics" => admin::metrics(&state.metrics),
        "/v1/trust-bundle" => admin::respond(
            StatusCode::OK,
            "application/x-pem-file",
            state.ca.ca.load().trust_bundle_pem(),
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
            let ca = state.ca.ca.load();
            let within = state.ca_expiring_within;
            admin::json(&CertsResponse {
                workloads,
                ca: CaStatus {
                    roots: ca
                        .roots()
                        .into_iter()
                        .map(|r| {
                            let issuing = r.serial == ca.issuer_root();
                            ca_cert(r, now, within, Some(issuing))
                        })
                        .collect(),
                    intermediate_not_after: ca.issuer_not_after(),
                    intermediate: ca.issuer().map(|i| ca_cert(i, now, within, None)),
                },
            })
        }
        _ => admin::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `POST /v1/ca/...`: authorise, then one rotation step.
fn rotate(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    let caller = match state.ca.authorize(&state.auth, header) {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(error = %e, path = req.uri().path(), "CA rotation refused");
            let status = match e {
                crate::ca_admin::AuthzError::NotAllowed(_) => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            return admin::respond(status, "text/plain; charset=utf-8", format!("{e}\n"));
        }
    };
    let query = req.uri().query().unwrap_or("");
    let result = match req.uri().path() {
        "/v1/ca/roots" => state.ca.add_root(),
        "/v1/ca/intermediate" => state.ca.rotate_intermediate(),
        "/v1/ca/reload" => state.ca.reload(),
        "/v1/ca/retire-root" => match query.split('&').find_map(|p| p.strip_prefix("serial=")) {
            Some(serial) => state.ca.retire_root(serial),
            None => return admin::text(StatusCode::BAD_REQUEST, "retire-root needs ?serial=HEX\n"),
        },
        _ => return admin::text(StatusCode::NOT_FOUND, "not found\n"),
    };
    tracing::info!(%caller, path = req.uri().path(), ok = result.is_ok(), "CA rotation step");
    match result {
        Ok(()) => {
            let ca = state.ca.ca.load();
            let roots: Vec<String> = ca.roots().into_iter().map(|r| r.serial).collect();
            admin::json(&serde_json::json!({"roots": roots, "issuing_root": ca.issuer_root()}))
        }
        Err(e @ RotateError::ReadOnly(_)) => admin::respond(
            StatusCode::CONFLICT,
            "text/plain; charset=utf-8",
            format!("{e}\n"),
        ),
        Err(e) => admin::respond(
            StatusCode::BAD_REQUEST,
            "text/plain; charset=utf-8",
            format!("{e}\n"),
        ),
    }
}

/// `?namespace=NS&state=valid|expiring|overdue|expired` on `/v1/certs`.
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
                        "overdue" => CertState::Overdue,
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
