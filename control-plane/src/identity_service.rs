//! `meshlet.identity.v1.Identity/Certify`: a CSR and a workload token in, an X509-SVID out.
//!
//! The order of checks is the security argument: authenticate the token, derive the SPIFFE
//! ID from it (never from the CSR), check the CSR against that ID, then sign. Every refusal
//! is a gRPC status whose message says what was wrong (never the token) and a counted
//! metric.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use meshlet_identity::ca::Ca;
use meshlet_identity::csr::{CsrError, check_csr};
use meshlet_identity::{SpiffeId, TrustDomain};
use meshlet_proto::identity::v1::identity_server::Identity;
use meshlet_proto::identity::v1::{CertifyRequest, CertifyResponse};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;
use crate::metrics::{Metrics, RejectReason};
use crate::registry::{Issued, Registry};
use crate::token::{Authenticator, Workload};

/// The Identity service and what it needs.
#[derive(Debug)]
pub struct IdentityService {
    pub ca: Arc<arc_swap::ArcSwap<Ca>>,
    pub auth: Arc<Authenticator>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub trust_domain: TrustDomain,
    pub cert_ttl: Duration,
    /// With `--kubernetes`: pod IP ownership checks, and TokenReview when `token_review`.
    pub cluster: Option<Cluster>,
    pub token_review: bool,
    /// The control plane's own SPIFFE ID: never issued to a workload (sidecars trust it).
    pub control_identity: SpiffeId,
}

impl IdentityService {
    /// In a cluster, a workload registers only its own pod's IP.
    async fn check_owner(
        &self,
        cluster: &Cluster,
        workload: &Workload,
        address: &str,
    ) -> Result<(), Status> {
        let ip = address
            .parse::<IpAddr>()
            .or_else(|_| address.parse::<std::net::SocketAddr>().map(|a| a.ip()))
            .map_err(|_| {
                self.refuse(
                    "bad_pod_ip",
                    Status::invalid_argument("pod_ip is not an address"),
                )
            })?;
        let Some(pod) = &workload.pod else {
            return Err(self.refuse(
                "address_not_owned",
                Status::permission_denied(
                    "the token names no pod, so it cannot register an address",
                ),
            ));
        };
        match cluster.pod_owns(&workload.namespace, pod, ip).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.refuse(
                "address_not_owned",
                Status::permission_denied(format!(
                    "pod {}/{pod} does not have IP {ip}",
                    workload.namespace
                )),
            )),
            Err(e) => Err(self.refuse("cluster_unavailable", Status::unavailable(e.to_string()))),
        }
    }

    fn refuse(&self, reason: &str, status: Status) -> Status {
        self.metrics.reject(RejectReason::from_reason(reason));
        tracing::info!(reason, error = status.message(), "certify refused");
        status
    }

    /// The whole Certify decision, without the gRPC wrapping.
    pub async fn certify_at(
        &self,
        req: CertifyRequest,
        now: OffsetDateTime,
    ) -> Result<CertifyResponse, Status> {
        let authenticated = match (&self.cluster, self.token_review) {
            (Some(cluster), true) => cluster.review_token(&req.token).await,
            _ => self.auth.authenticate(&req.token),
        };
        let workload = authenticated.map_err(|e| {
            let status = match e {
                crate::token::TokenError::Unavailable(_) => Status::unavailable(e.to_string()),
                _ => Status::unauthenticated(e.to_string()),
            };
            self.refuse(e.reason(), status)
        })?;
        let id = SpiffeId::for_service_account(
            &self.trust_domain,
            &workload.namespace,
            &workload.service_account,
        )
        .map_err(|e| {
            self.refuse(
                "token_claims",
                Status::unauthenticated(format!("the token's names do not form a SPIFFE ID: {e}")),
            )
        })?;
        if id == self.control_identity {
            return Err(self.refuse(
                "reserved_identity",
                Status::permission_denied(format!(
                    "{id} is the control plane's identity and is never issued to a workload"
                )),
            ));
        }
        let key = check_csr(&req.csr, &id).map_err(|e| {
            let status = match e {
                CsrError::IdentityMismatch { .. } => Status::permission_denied(e.to_string()),
                _ => Status::invalid_argument(e.to_string()),
            };
            self.refuse(e.reason(), status)
        })?;
        let address =
            parse_address(&req.pod_ip).map_err(|status| self.refuse("bad_pod_ip", status))?;
        if let (Some(cluster), Some(address)) = (&self.cluster, &address) {
            self.check_owner(cluster, &workload, address).await?;
        }
        let ca = self.ca.load();
        let svid = ca.issue(&id, &key, self.cert_ttl, now).map_err(|e| {
            self.refuse(
                "ca_error",
                Status::internal(format!("the CA could not sign: {e}")),
            )
        })?;
        self.registry.record(Issued {
            spiffe_id: id.clone(),
            namespace: workload.namespace,
            pod: workload.pod,
            address,
            serial: svid.serial.clone(),
            issued_at: svid.not_before + meshlet_identity::ca::BACKDATE,
            not_before: svid.not_before,
            not_after: svid.not_after,
        });
        self.metrics.certificates_issued.inc();
        tracing::debug!(spiffe_id = %id, serial = %svid.serial, "issued");
        Ok(CertifyResponse {
            certificate_chain: svid.chain.into_iter().map(|c| c.to_vec()).collect(),
            trust_bundle: ca.trust_bundle().iter().map(|c| c.to_vec()).collect(),
            expires_at_unix: svid.not_after.unix_timestamp(),
        })
    }
}

/// Reads `pod_ip`: an IP address (a pod), or an address and port (explicit mode, where
/// several sidecars share one IP), into the canonical form the address index uses.
pub fn parse_address(raw: &str) -> Result<Option<String>, Status> {
    if raw.is_empty() {
        return Ok(None);
    }
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Ok(Some(ip.to_string()));
    }
    match raw.parse::<std::net::SocketAddr>() {
        Ok(addr) => Ok(Some(addr.to_string())),
        Err(_) => Err(Status::invalid_argument(format!(
            "pod_ip {raw:?} is neither an IP address nor an address:port"
        ))),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        self.certify_at(request.into_inner(), OffsetDateTime::now_utc())
            .await
            .map(Response::new)
    }
}
