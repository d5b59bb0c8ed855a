//! The mutating admission webhook: HTTPS on port 15017, `POST /inject`, AdmissionReview v1
//! in, an AdmissionReview with a JSON Patch out ([`crate::inject`] decides the patch).
//!
//! A review that cannot be read gets HTTP 400 with the reason (the API server then applies
//! the webhook's failurePolicy); a pod that is left alone is allowed without a patch.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::inject::{self, InjectConfig};

/// The largest AdmissionReview read (the API server caps objects at about 1.5 MiB).
pub const MAX_REVIEW: usize = 3 * 1024 * 1024;

/// Answers one AdmissionReview (JSON bytes): the response review, or why it is unreadable.
pub fn review(body: &[u8], cfg: &InjectConfig) -> Result<Value, String> {
    let review: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if review.get("apiVersion").and_then(Value::as_str) != Some("admission.k8s.io/v1")
        || review.get("kind").and_then(Value::as_str) != Some("AdmissionReview")
    {
        return Err("not an admission.k8s.io/v1 AdmissionReview".into());
    }
    let request = review.get("request").ok_or("the review has no request")?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or("the request has no uid")?;
    let mut response = json!({"uid": uid, "allowed": true});
    let is_pod = request
        .get("kind")
        .and_then(|k| k.get("kind"))
        .and_then(Value::as_str)
        == Some("Pod");
    if is_pod {
        let pod = request.get("object").ok_or("the request has no object")?;
        match inject::patch(pod, cfg) {
            Ok(Ok(ops)) => {
                let patch = serde_json::to_vec(&ops).map_err(|e| e.to_string())?;
                response["patchType"] = json!("JSONPatch");
                response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
            }
            Ok(Err(skip)) => tracing::debug!(?skip, "pod left alone"),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
    )
}

/// Serves the webhook over TLS on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    cfg: Arc<InjectConfig>,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Some((tcp, _)) = meshlet_telemetry::process::accept(&listener, &stop, "webhook").await
        else {
            return;
        };
        let (acceptor, cfg) = (acceptor.clone(), cfg.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let cfg = cfg.clone();
                async move { Ok::<_, Infallible>(handle(req, &cfg).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>, cfg: &InjectConfig) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Vec<u8>, json: bool| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        let ct = if json {
            "application/json"
        } else {
            "text/plain; charset=utf-8"
        };
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ct),
        );
        r
    };
    if req.method() != Method::POST || req.uri().path() != "/inject" {
        return reply(StatusCode::NOT_FOUND, b"POST /inject\n".to_vec(), false);
    }
    let body = match Limited::new(req.into_body(), MAX_REVIEW).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{e}\n").into_bytes(),
                false,
            );
        }
    };
    match review(&body, cfg) {
        Ok(v) => reply(
            StatusCode::OK,
            serde_json::to_vec(&v).unwrap_or_default(),
            true,
        ),
        Err(e) => {
            tracing::warn!(error = %e, "unreadable admission review");
            reply(
                StatusCode::BAD_REQUEST,
                format!("{e}\n").into_bytes(),
                false,
            )
        }
    }
}

/// A TLS 1.3 server configuration from the webhook's PEM certificate and key files.
pub fn tls_from_files(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--webhook-tls-cert {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--webhook-tls-key {}: {e}", key.display()))?;
    rustls::ServerConfig::builder_with_provider(meshlet_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("webhook certificate: {e}"))
}
