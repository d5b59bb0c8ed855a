//! The control plane's Prometheus metrics. Label values come from closed enums.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Why a Certify request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RejectReason {
    token_malformed,
    token_algorithm,
    token_signature,
    token_expired,
    token_not_yet_valid,
    token_audience,
    token_issuer,
    token_claims,
    csr_too_large,
    csr_malformed,
    csr_unsupported_key,
    csr_bad_signature,
    csr_identity_mismatch,
    bad_pod_ip,
    address_not_owned,
    cluster_unavailable,
    reserved_identity,
    ca_error,
}

impl RejectReason {
    /// Maps the `reason()` strings of the token and CSR errors onto the closed set.
    pub fn from_reason(reason: &str) -> Self {
        match reason {
            "token_malformed" => Self::token_malformed,
            "token_algorithm" => Self::token_algorithm,
            "token_signature" => Self::token_signature,
            "token_expired" => Self::token_expired,
            "token_not_yet_valid" => Self::token_not_yet_valid,
            "token_audience" => Self::token_audience,
            "token_issuer" => Self::token_issuer,
            "token_claims" => Self::token_claims,
            "csr_too_large" => Self::csr_too_large,
            "csr_malformed" => Self::csr_malformed,
            "csr_unsupported_key" => Self::csr_unsupported_key,
            "csr_bad_signature" => Self::csr_bad_signature,
            "csr_identity_mismatch" => Self::csr_identity_mismatch,
            "bad_pod_ip" => Self::bad_pod_ip,
            "address_not_owned" => Self::address_not_owned,
            "cluster_unavailable" => Self::cluster_unavailable,
            "reserved_identity" => Self::reserved_identity,
            _ => Self::ca_error,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RejectLabels {
    pub reason: RejectReason,
}

/// Every metric the control plane exports.
#[derive(Debug, Default)]
pub struct Metrics {
    pub certificates_issued: Counter,
    pub csr_rejected: Family<RejectLabels, Counter>,
}

impl Metrics {
    /// Registers the metrics under the `meshlet_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("meshlet");
        sub.register(
            "certificates_issued",
            "Certificates issued to workloads",
            self.certificates_issued.clone(),
        );
        sub.register(
            "csr_rejected",
            "Certify requests refused, by reason",
            self.csr_rejected.clone(),
        );
    }

    pub fn reject(&self, reason: RejectReason) {
        self.csr_rejected
            .get_or_create(&RejectLabels { reason })
            .inc();
    }
}
