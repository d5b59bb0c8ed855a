//! The live CA and its rotation, with no restart anywhere.
//!
//! The CA's state is its folder. Each step changes the files (`identity::ca::{add_root,
//! new_intermediate, retire_root}`), then [`CaHandle::apply`] reloads the folder, swaps the
//! CA that signs, streams the new trust bundle to every sidecar (Discovery), re-issues the
//! control plane's own serving certificate, and updates the CA expiry metrics. A CA mounted
//! read-only (`--ca-dir`, a Kubernetes Secret) is rotated by updating the Secret and asking
//! for a reload.
//!
//! Who may rotate: a caller with a bearer token (a workload JWT, verified like any token)
//! whose SPIFFE ID is in `--admin-identity`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshlet_identity::ca::{self, Ca, CaError};
use meshlet_identity::{SpiffeId, TrustDomain, tls};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::discovery_service::Bundle;
use crate::token::Authenticator;

/// Why a rotation request failed.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(
        "the CA is mounted read-only from {0}: update its files (bundle.crt, issuer.crt, issuer.key), then POST /v1/ca/reload"
    )]
    ReadOnly(PathBuf),
    #[error("{0}")]
    Ca(#[from] CaError),
    #[error("serving TLS: {0}")]
    Tls(#[from] tls::TlsConfigError),
}

/// Why a caller may not rotate.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("send Authorization: Bearer <token> (a token for an admin identity)")]
    NoToken,
    #[error("the token is not valid: {0}")]
    BadToken(String),
    #[error("{0} is not an admin identity (--admin-identity)")]
    NotAllowed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CaRole {
    root,
    intermediate,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CaCertLabels {
    pub role: CaRole,
    pub serial: String,
}

/// The live CA.
#[derive(Debug)]
pub struct CaHandle {
    pub dir: PathBuf,
    pub writable: bool,
    pub trust_domain: TrustDomain,
    pub ca: Arc<ArcSwap<Ca>>,
    pub bundle: watch::Sender<Bundle>,
    pub serving: Arc<ArcSwap<rustls::ServerConfig>>,
    pub identity: SpiffeId,
    pub cert_ttl: Duration,
    pub admins: Vec<SpiffeId>,
    pub expiry: Family<CaCertLabels, Gauge>,
    /// One rotation step at a time: each rewrites files the next one reads.
    pub rotating: std::sync::Mutex<()>,
}

impl CaHandle {
    /// Rotation step 1: a new root joins the bundle.
    pub fn add_root(&self) -> Result<(), RotateError> {
        let _one = self.rotating.lock().unwrap_or_else(|p| p.into_inner());
        self.writable()?;
        ca::add_root(&self.dir, &self.trust_domain, OffsetDateTime::now_utc())?;
        self.apply()
    }

    /// Rotation step 2: a new intermediate under the newest root issues from now on.
    pub fn rotate_intermediate(&self) -> Result<(), RotateError> {
        let _one = self.rotating.lock().unwrap_or_else(|p| p.into_inner());
        self.writable()?;
        ca::new_intermediate(&self.dir, &self.trust_domain, OffsetDateTime::now_utc())?;
        self.apply()
    }

    /// Rotation step 3: the root with `serial` leaves the bundle.
    pub fn retire_root(&self, serial: &str) -> Result<(), RotateError> {
        let _one = self.rotating.lock().unwrap_or_else(|p| p.into_inner());
        self.writable()?;
        ca::retire_root(&self.dir, serial)?;
        self.apply()
    }

    /// Re-reads the CA folder (after its files were changed from outside).
    pub fn reload(&self) -> Result<(), RotateError> {
        let _one = self.rotating.lock().unwrap_or_else(|p| p.into_inner());
        self.apply()
    }

    fn writable(&self) -> Result<(), RotateError> {
        match self.writable {
            true => Ok(()),
            false => Err(RotateError::ReadOnly(self.dir.clone())),
        }
    }

    /// Loads the folder and makes it live everywhere.
    pub fn apply(&self) -> Result<(), RotateError> {
        let loaded = Ca::load(&self.dir)?;
        let serving = self.serving_config(&loaded)?;
        let bundle: Vec<Vec<u8>> = loaded.trust_bundle().iter().map(|c| c.to_vec()).collect();
        self.ca.store(Arc::new(loaded));
        self.serving.store(Arc::new(serving));
        self.bundle.send_if_modified(|b| {
            let changed = **b != bundle;
            *b = Arc::new(bundle);
            changed
        });
        self.update_metrics();
        let ca = self.ca.load();
        tracing::info!(
            roots = ca.trust_bundle().len(),
            issuer_root = ca.issuer_root(),
            "CA applied"
        );
        Ok(())
    }

    /// The gRPC server's TLS under `ca`.
    pub fn serving_config(&self, ca: &Ca) -> Result<rustls::ServerConfig, RotateError> {
        serving_config(ca, &self.identity, self.cert_ttl)
    }

    /// Sets the CA expiry gauges (stale series of retired certificates are dropped).
    pub fn update_metrics(&self) {
        let ca = self.ca.load();
        self.expiry.clear();
        for root in ca.roots() {
            self.expiry
                .get_or_create(&CaCertLabels {
                    role: CaRole::root,
                    serial: root.serial,
                })
                .set(root.not_after.unix_timestamp());
        }
        if let Some(issuer) = ca.issuer() {
            self.expiry
                .get_or_create(&CaCertLabels {
                    role: CaRole::intermediate,
                    serial: issuer.serial,
                })
                .set(issuer.not_after.unix_timestamp());
        }
    }

    /// Checks an `Authorization` header value: a bearer token for an admin identity.
    pub fn authorize(
        &self,
        auth: &Authenticator,
        header: Option<&str>,
    ) -> Result<SpiffeId, AuthzError> {
        let token = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthzError::NoToken)?;
        let workload = auth
            .authenticate(token)
            .map_err(|e| AuthzError::BadToken(e.to_string()))?;
        let id = SpiffeId::for_service_account(
            &self.trust_domain,
            &workload.namespace,
            &workload.service_account,
        )
        .map_err(|e| AuthzError::BadToken(e.to_string()))?;
        match self.admins.contains(&id) {
            true => Ok(id),
            false => Err(AuthzError::NotAllowed(id.to_string())),
        }
    }
}

/// The gRPC server's TLS: a fresh key and SVID for the control plane's own identity.
pub fn serving_config(
    ca: &Ca,
    identity: &SpiffeId,
    ttl: Duration,
) -> Result<rustls::ServerConfig, RotateError> {
    let (svid, key) = ca.issue_with_new_key(identity, ttl, OffsetDateTime::now_utc())?;
    Ok(tls::server_config(
        svid.chain,
        key,
        None,
        &[meshlet_proto::connect::GRPC_ALPN],
    )?)
}
