//! The sidecar's certificate: obtained from the control plane with the workload token,
//! renewed at about half its lifetime with a fresh key each time, and published to the
//! listeners through a watch channel as ready-made TLS configurations.
//!
//! The private key is made here and never leaves this task except inside the rustls
//! configurations. While renewal fails, the current certificate is kept (and retried with
//! backoff); once it expires the data path refuses mesh traffic ([`Creds::valid_at`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use meshlet_identity::cert::{self, CertSummary};
use meshlet_identity::csr::build_csr;
use meshlet_identity::{Expected, MESH_ALPN, POOLED_ALPN, SpiffeId, TrustDomain, tls};
use meshlet_proto::identity::v1::CertifyRequest;
use meshlet_proto::identity::v1::identity_client::IdentityClient;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::metrics::{Metrics, RotationLabels, RotationResult};

/// How long one Certify call may take.
pub const CERTIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest wait between failed attempts.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The longest wait between attempts while the sidecar has no valid certificate.
pub const UNCERTIFIED_RETRY: Duration = Duration::from_secs(1);

/// What the data path needs to speak mutual TLS, as of one certificate and bundle.
#[derive(Debug)]
pub struct Creds {
    pub id: SpiffeId,
    pub trust_domain: TrustDomain,
    /// Inbound: requires a client SVID of our trust domain.
    pub server: Arc<rustls::ServerConfig>,
    /// Outbound: presents our SVID, accepts servers of our trust domain; the exact
    /// expected SPIFFE ID is checked after the handshake.
    pub client: Arc<rustls::ClientConfig>,
    /// As `client`, offering the pooled protocol first (see [`crate::pool`]).
    pub pooled_client: Arc<rustls::ClientConfig>,
    pub not_after: SystemTime,
}

impl Creds {
    /// Whether the certificate may still be used at `now`.
    pub fn valid_at(&self, now: SystemTime) -> bool {
        now < self.not_after
    }
}

/// The certificate state shown on `GET /certs`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CertStatus {
    pub spiffe_id: Option<String>,
    pub serial: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub not_before: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub not_after: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub renew_at: Option<OffsetDateTime>,
    /// Renewals after the first certificate.
    pub rotations: u64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_rotation: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    pub trust_bundle: Vec<RootStatus>,
}

/// `/certs` as served: the status and the certificate's state at the time of asking.
#[derive(Debug, Serialize)]
pub struct CertView<'a> {
    #[serde(flatten)]
    pub status: &'a CertStatus,
    /// `null` before the first certificate, else `valid|overdue|expiring|expired`.
    pub state: Option<meshlet_identity::cert::CertState>,
}

impl CertStatus {
    pub fn view(&self, now: OffsetDateTime) -> CertView<'_> {
        use meshlet_identity::cert::{DEFAULT_EXPIRING_SHARE, state};
        let state = self
            .not_before
            .zip(self.not_after)
            .map(|(nb, na)| state(nb, na, now, DEFAULT_EXPIRING_SHARE, true));
        CertView {
            status: self,
            state,
        }
    }
}

/// One root of the trust bundle on `/certs`.
#[derive(Debug, Clone, Serialize)]
pub struct RootStatus {
    pub subject: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

/// Why getting a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("reading the token file {0}: {1}")]
    TokenFile(PathBuf, std::io::Error),
    #[error("making a key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("calling the control plane: {0}")]
    Refused(tonic::Status),
    #[error("the control plane did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the control plane's answer is unusable: {0}")]
    BadResponse(String),
    #[error("building TLS configurations: {0}")]
    Tls(#[from] tls::TlsConfigError),
}

/// When to renew a certificate received at `received` and valid until `not_after`: between
/// 45% and 55% of the time it has left, placed by `jitter` in [0, 1], so sidecars started
/// together do not renew together. (`received`, not `not_before`: the CA backdates
/// `not_before` for clock skew, which would skew short lifetimes.)
pub fn renew_at(received: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let life = not_after.duration_since(received).unwrap_or_default();
    received + life.mul_f64(0.45 + 0.10 * jitter.clamp(0.0, 1.0))
}

/// The wait before the next attempt after `failures` failures in a row: doubling from
/// [`BACKOFF_MIN`], at most [`BACKOFF_MAX`].
pub fn backoff(failures: u32) -> Duration {
    BACKOFF_MIN
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_MAX)
}

/// One issued certificate with its key, kept only inside [`maintain`].
struct Issued {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    summary: CertSummary,
    id: SpiffeId,
    bundle: Vec<CertificateDer<'static>>,
}

/// What [`maintain`] needs.
#[derive(Debug)]
pub struct IdentityTask {
    pub client: IdentityClient<Channel>,
    pub token_file: PathBuf,
    /// Registered for discovery: "ip" or "ip:port".
    pub address: Option<String>,
    pub creds: watch::Sender<Option<Arc<Creds>>>,
    pub status: Arc<ArcSwap<CertStatus>>,
    pub metrics: Arc<Metrics>,
    /// The roots the control plane connection trusts; kept equal to the current bundle.
    pub control_roots: tls::LiveRoots,
}

/// Gets the first certificate, renews it forever, and folds in trust bundle updates,
/// until `stop`.
pub async fn maintain(
    mut task: IdentityTask,
    mut bundles: watch::Receiver<Vec<CertificateDer<'static>>>,
    stop: CancellationToken,
) {
    let mut current: Option<Issued> = None;
    let mut failures = 0u32;
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {
                match certify(&mut task).await {
                    Ok(issued) => {
                        failures = 0;
                        let renew = renew_at(SystemTime::now(), issued.summary.not_after.into(), jitter());
                        next = tokio::time::Instant::now() + renew.duration_since(SystemTime::now()).unwrap_or_default();
                        let first = current.is_none();
                        task.metrics.rotations.get_or_create(&RotationLabels { result: RotationResult::success }).inc();
                        task.metrics.cert_expiry.set(issued.summary.not_after.unix_timestamp());
                        tracing::info!(spiffe_id = %issued.id, serial = %issued.summary.serial, not_after = %issued.summary.not_after, first, "certificate obtained");
                        publish(&task, &issued, Some(renew), !first, None);
                        current = Some(issued);
                    }
                    Err(e) => {
                        task.metrics.rotations.get_or_create(&RotationLabels { result: RotationResult::failure }).inc();
                        // Without a valid certificate nothing is meshed: retry at least every second.
                        let valid = current.as_ref().is_some_and(|i| SystemTime::from(i.summary.not_after) > SystemTime::now());
                        let wait = if valid { backoff(failures) } else { backoff(failures).min(UNCERTIFIED_RETRY) };
                        failures = failures.saturating_add(1);
                        next = tokio::time::Instant::now() + wait;
                        if current.is_some() && !valid {
                            tracing::error!(error = %e, retry_in = ?wait, "the certificate has expired and renewal fails: mesh traffic is refused until it succeeds");
                        } else {
                            tracing::warn!(error = %e, retry_in = ?wait, have_certificate = valid, "certificate request failed");
                        }
                        let mut status = (**task.status.load()).clone();
                        status.last_error = Some(e.to_string());
                        task.status.store(Arc::new(status));
                    }
                }
            }
            changed = bundles.changed() => {
                if changed.is_err() {
                    // The bundle source ended (shutdown); keep serving what we have.
                    bundles = watch::channel(Vec::new()).1;
                    continue;
                }
                let bundle = bundles.borrow_and_update().clone();
                if let Some(issued) = current.as_mut().filter(|i| !bundle.is_empty() && i.bundle != bundle) {
                    tracing::info!(roots = bundle.len(), "trust bundle updated");
                    issued.bundle = bundle;
                    let renew = task.status.load().renew_at.map(SystemTime::from);
                    publish(&task, issued, renew, false, task.status.load().last_rotation);
                }
            }
        }
    }
}

/// Builds the TLS configurations for `issued`, publishes them, and updates the status.
fn publish(
    task: &IdentityTask,
    issued: &Issued,
    renew: Option<SystemTime>,
    rotated: bool,
    last_rotation: Option<OffsetDateTime>,
) {
    match creds(issued) {
        Ok(c) => {
            task.creds.send_replace(Some(Arc::new(c)));
            if let Ok(roots) = tls::root_store(&issued.bundle) {
                task.control_roots.store(roots);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot build TLS configurations");
            return;
        }
    }
    let old = task.status.load();
    let now = OffsetDateTime::now_utc();
    task.status.store(Arc::new(CertStatus {
        spiffe_id: Some(issued.id.to_string()),
        serial: Some(issued.summary.serial.clone()),
        not_before: Some(issued.summary.not_before),
        not_after: Some(issued.summary.not_after),
        renew_at: renew.map(OffsetDateTime::from),
        rotations: old.rotations + u64::from(rotated),
        last_rotation: if rotated {
            Some(now)
        } else {
            last_rotation.or(old.last_rotation)
        },
        last_error: None,
        trust_bundle: issued
            .bundle
            .iter()
            .filter_map(|c| cert::summarize(c).ok())
            .map(|s| RootStatus {
                subject: s.subject,
                not_after: s.not_after,
            })
            .collect(),
    }));
}

fn creds(issued: &Issued) -> Result<Creds, tls::TlsConfigError> {
    let roots = tls::root_store(&issued.bundle)?;
    let td = TrustDomain::parse(issued.id.trust_domain())
        .map_err(|_| tls::TlsConfigError::EmptyBundle)?;
    let server = tls::server_config(
        issued.chain.clone(),
        issued.key.clone_key(),
        Some((roots.clone(), Expected::TrustDomain(td.clone()))),
        &[POOLED_ALPN, MESH_ALPN],
    )?;
    let client = tls::client_config(
        roots,
        Expected::TrustDomain(td.clone()),
        Some((issued.chain.clone(), issued.key.clone_key())),
        &[MESH_ALPN],
    )?;
    let mut pooled_client = client.clone();
    pooled_client.alpn_protocols = vec![POOLED_ALPN.to_vec(), MESH_ALPN.to_vec()];
    Ok(Creds {
        id: issued.id.clone(),
        trust_domain: td,
        server: Arc::new(server),
        client: Arc::new(client),
        pooled_client: Arc::new(pooled_client),
        not_after: issued.summary.not_after.into(),
    })
}

/// One Certify round trip with a fresh key.
async fn certify(task: &mut IdentityTask) -> Result<Issued, CertifyError> {
    let token = tokio::fs::read_to_string(&task.token_file)
        .await
        .map_err(|e| CertifyError::TokenFile(task.token_file.clone(), e))?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let request = CertifyRequest {
        csr: build_csr(&key, None)?,
        token: token.trim().to_owned(),
        pod_ip: task.address.clone().unwrap_or_default(),
    };
    let response = tokio::time::timeout(CERTIFY_TIMEOUT, task.client.certify(request))
        .await
        .map_err(|_| CertifyError::Timeout(CERTIFY_TIMEOUT))?
        .map_err(CertifyError::Refused)?
        .into_inner();
    let chain: Vec<CertificateDer<'static>> = response
        .certificate_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let bundle: Vec<CertificateDer<'static>> = response
        .trust_bundle
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let leaf = chain
        .first()
        .ok_or_else(|| CertifyError::BadResponse("no certificate".into()))?;
    let id = cert::svid_id(leaf).map_err(|e| CertifyError::BadResponse(e.to_string()))?;
    let summary = cert::summarize(leaf).map_err(|e| CertifyError::BadResponse(e.to_string()))?;
    if bundle.is_empty() {
        return Err(CertifyError::BadResponse("no trust bundle".into()));
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok(Issued {
        chain,
        key,
        summary,
        id,
        bundle,
    })
}

/// A uniform number in [0, 1) from the OS RNG.
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    if rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut b)
        .is_err()
    {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_near_half_of_the_lifetime() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        let cases = [
            (day, 0.0, 0.45),
            (day, 0.5, 0.50),
            (day, 1.0, 0.55),
            (day, 7.0, 0.55), // clamped
            (Duration::from_secs(100), 0.5, 0.50),
            (Duration::ZERO, 0.5, 0.0),
        ];
        for (life, jitter, share) in cases {
            let at = renew_at(nb, nb + life, jitter);
            let got = at.duration_since(nb).unwrap_or_default().as_secs_f64();
            assert!(
                (got - life.as_secs_f64() * share).abs() < 1e-3,
                "{life:?} {jitter}: {got}"
            );
        }
        // A not_after before not_before renews at once.
        assert_eq!(renew_at(nb, nb - day, 0.5), nb);
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let got: Vec<u64> = (0..10).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(
            got,
            vec![
                500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000
            ]
        );
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}
