//! meshlet's control plane: the mesh CA behind `meshlet.identity.v1.Identity/Certify`, and
//! the admin API that shows what it issued.
//!
//! # Layout
//! - [`run`]: starts everything on already-bound listeners and returns what it serves.
//! - [`config`]: `serve` flags (`MESHLET_*`) and the validated [`Config`].
//! - [`token`]: workload JWT authentication; the local signing key (`meshletctl token`).
//! - [`jwks`]: fetching a cluster's JWKS over HTTP(S).
//! - [`identity_service`]: the Certify checks, in order, and issuance.
//! - [`discovery_service`]: Watch: a destination's identity and the trust bundle, streamed.
//! - [`registry`]: what was issued, per workload; certificate states.
//! - [`grpc`]: TLS accept loop feeding tonic; [`admin`]: the admin HTTP API.
//! - [`metrics`]: Prometheus metrics with closed label sets.
//! - [`inject`]: the sidecar injection patch (pure); [`webhook`]: the admission webhook.
//! - [`cluster`]: TokenReview, pod IP ownership, the trust bundle ConfigMap (`--kubernetes`).
//! - [`policy`]: authorization policy from a file or custom resources, per workload.
//! - [`services`]: Services' ClusterIPs and their backends, for discovery.

pub mod admin;
pub mod ca_admin;
pub mod cluster;
pub mod config;
pub mod discovery_service;
pub mod grpc;
pub mod identity_service;
pub mod inject;
pub mod jwks;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod services;
pub mod token;
pub mod webhook;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshlet_identity::SpiffeId;
use meshlet_identity::ca::{Ca, CaError};
use meshlet_identity::tls::TlsConfigError;
use meshlet_proto::discovery::v1::discovery_server::DiscoveryServer;
use meshlet_proto::identity::v1::identity_server::IdentityServer;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{Config, ServeArgs};

use crate::ca_admin::CaHandle;
use crate::discovery_service::DiscoveryService;
use crate::identity_service::IdentityService;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::token::{Authenticator, LocalSigner, SignerError};

/// Largest Certify request accepted (a CSR and a token are a few KiB).
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// How often the JWKS is fetched again.
pub const JWKS_REFRESH: Duration = Duration::from_secs(600);

/// Why the control plane could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("CA: {0}")]
    Ca(#[from] CaError),
    #[error("local token key: {0}")]
    Signer(#[from] SignerError),
    #[error("--jwks-file {0}: {1}")]
    JwksFile(PathBuf, String),
    #[error("{0}")]
    Jwks(#[from] jwks::JwksError),
    #[error("--jwks-url: {0}")]
    JwksKeys(String),
    #[error("serving TLS: {0}")]
    Tls(#[from] TlsConfigError),
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("{0}")]
    Rotate(ca_admin::RotateError),
    #[error("webhook TLS: {0}")]
    Webhook(String),
    #[error("{0}")]
    Policy(#[from] policy::PolicyError),
}

/// The listeners the control plane serves on, bound by the caller (port 0 in tests).
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
    /// The admission webhook's listener, when it is served.
    pub webhook: Option<TcpListener>,
}

impl Listeners {
    /// Binds the gRPC and admin listeners.
    pub async fn bind(grpc: SocketAddr, admin: SocketAddr) -> std::io::Result<Self> {
        Ok(Self {
            grpc: TcpListener::bind(grpc).await?,
            admin: TcpListener::bind(admin).await?,
            webhook: None,
        })
    }
}

/// A started control plane.
#[derive(Debug)]
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Where the admission webhook is served, if it is.
    pub webhook_addr: Option<SocketAddr>,
    /// The SPIFFE ID the gRPC server presents.
    pub identity: SpiffeId,
    /// The trust bundle, PEM: what sidecars need to trust the control plane.
    pub trust_bundle_pem: String,
    /// Without a cluster to learn Services from, an embedder (the demo, tests) publishes
    /// its own ClusterIP:port to backends map here; `None` with `--kubernetes`.
    pub services: Option<tokio::sync::watch::Sender<Option<Arc<services::ServiceMap>>>>,
    tasks: JoinSet<Result<(), ControlError>>,
}

impl Running {
    /// Waits until every server has stopped (after shutdown), returning the first error.
    pub async fn wait(mut self) -> Result<(), ControlError> {
        while let Some(done) = self.tasks.join_next().await {
            if let Ok(Err(e)) = done {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Starts the control plane on `listeners`; it stops when `shutdown` completes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, ControlError> {
    let (ca_dir, writable) = match &config.ca_dir {
        Some(dir) => (dir.clone(), false),
        None => (config.data_dir.join("ca"), true),
    };
    let loaded = match writable {
        true => Ca::load_or_create(&ca_dir, &config.trust_domain)?,
        false => Ca::load(&ca_dir)?,
    };
    let auth = Arc::new(authenticator(&config).await?);
    let registry = Arc::new(Registry::default());
    let metrics = Arc::new(Metrics::default());
    let mut prom = prometheus_client::registry::Registry::default();
    metrics.register(&mut prom);

    let bundle_der: Vec<Vec<u8>> = loaded.trust_bundle().iter().map(|c| c.to_vec()).collect();
    let (bundle_tx, bundle_rx) = tokio::sync::watch::channel(Arc::new(bundle_der));
    let first_serving = ca_admin::serving_config(&loaded, &config.identity, config.cert_ttl)
        .map_err(ControlError::Rotate)?;
    let ca_handle = Arc::new(CaHandle {
        dir: ca_dir,
        writable,
        trust_domain: config.trust_domain.clone(),
        ca: Arc::new(ArcSwap::from_pointee(loaded)),
        bundle: bundle_tx,
        serving: Arc::new(ArcSwap::from_pointee(first_serving)),
        identity: config.identity.clone(),
        cert_ttl: config.cert_ttl,
        admins: config.admin_identities.clone(),
        expiry: Default::default(),
        rotating: Default::default(),
    });
    ca_handle.update_metrics();
    prom.sub_registry_with_prefix("meshlet").register(
        "ca_cert_expiry_timestamp_seconds",
        "When each root and the issuing intermediate expire (Unix time)",
        ca_handle.expiry.clone(),
    );
    let serving = ca_handle.serving.clone();
    let service = Arc::new(IdentityService {
        ca: ca_handle.ca.clone(),
        auth: auth.clone(),
        registry: registry.clone(),
        metrics,
        trust_domain: config.trust_domain.clone(),
        cert_ttl: config.cert_ttl,
        cluster: config.cluster.clone(),
        token_review: config.token_review,
        control_identity: config.identity.clone(),
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(meshlet_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ControlError::Reflection(e.to_string()))?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(meshlet_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ControlError::Reflection(e.to_string()))?;
    let stop = CancellationToken::new();
    let initial_policy = match &config.policy_file {
        Some(path) => policy::read_file(path)?,
        None => Default::default(),
    };
    let (policy_tx, policy_rx) = tokio::sync::watch::channel(Arc::new(initial_policy));
    match (&config.policy_file, &config.cluster) {
        (Some(path), _) => {
            tokio::spawn(policy::follow_file(path.clone(), policy_tx, stop.clone()));
        }
        (None, Some(cluster)) => {
            tokio::spawn(policy::follow_cluster(
                cluster.clone(),
                policy_tx,
                stop.clone(),
            ));
        }
        // No source: the policy never changes, but the sender must live (a closed channel
        // would end every sidecar's bundle stream).
        (None, None) => {
            let stop = stop.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                drop(policy_tx);
            });
        }
    }
    // With a cluster, no address is answered before its Services are read once.
    let (services_tx, services_rx) = tokio::sync::watch::channel(match &config.cluster {
        Some(_) => None,
        None => Some(Arc::default()),
    });
    let services_tx = match &config.cluster {
        Some(cluster) => {
            tokio::spawn(services::follow_cluster(
                cluster.clone(),
                services_tx,
                stop.clone(),
            ));
            None
        }
        None => Some(services_tx),
    };
    let discovery = DiscoveryService {
        trust_domain: config.trust_domain.clone(),
        cluster: config.cluster.clone(),
        token_review: config.token_review,
        auth: auth.clone(),
        registry: registry.clone(),
        bundle: bundle_rx,
        policy: policy_rx.clone(),
        services: services_rx,
        withdraw_grace: config.withdraw_grace,
        stop: stop.clone(),
    };
    let routes = tonic::service::Routes::new(
        IdentityServer::from_arc(service).max_decoding_message_size(MAX_REQUEST_LEN),
    )
    .add_service(DiscoveryServer::new(discovery).max_decoding_message_size(MAX_REQUEST_LEN))
    .add_service(reflection)
    .add_service(reflection_alpha);

    let running_grpc = listeners.grpc.local_addr()?;
    let running_admin = listeners.admin.local_addr()?;
    let running_webhook = match &listeners.webhook {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let webhook_tls = match &config.webhook_tls {
        Some((cert, key)) => Some(Arc::new(
            webhook::tls_from_files(cert, key).map_err(ControlError::Webhook)?,
        )),
        None => None,
    };
    let mut tasks = JoinSet::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
    }
    {
        let stop = stop.clone();
        let serving = serving.clone();
        tasks.spawn(async move { Ok(grpc::serve(listeners.grpc, serving, routes, stop).await?) });
    }
    let admin_state = Arc::new(admin::AdminState {
        ca: ca_handle.clone(),
        auth: auth.clone(),
        registry: registry.clone(),
        metrics: prom,
        expiring_share: config.expiring_share,
        ca_expiring_within: config.ca_expiring_within,
        policy: policy_rx,
    });
    {
        let stop = stop.clone();
        tasks.spawn(async move {
            admin::serve(listeners.admin, admin_state, stop).await;
            Ok(())
        });
    }
    if let (Some(listener), Some(tls)) = (listeners.webhook, webhook_tls) {
        let (stop, inject) = (stop.clone(), Arc::new(config.inject.clone()));
        tasks.spawn(async move {
            webhook::serve(listener, tls, inject, stop).await;
            Ok(())
        });
    }
    let trust_bundle_pem = ca_handle.ca.load().trust_bundle_pem();
    let identity = config.identity.clone();
    tasks.spawn(background(config, ca_handle, auth, registry, stop));
    tracing::info!(grpc = %running_grpc, admin = %running_admin, %identity, "control plane serving");
    Ok(Running {
        grpc_addr: running_grpc,
        admin_addr: running_admin,
        webhook_addr: running_webhook,
        identity,
        trust_bundle_pem,
        services: services_tx,
        tasks,
    })
}

/// The trusted token keys: the local signing key (when enabled), a JWKS file, a JWKS URL.
async fn authenticator(config: &Config) -> Result<Authenticator, ControlError> {
    let mut keys = local_keys(config)?;
    if let Some(path) = &config.jwks_file {
        let json =
            std::fs::read(path).map_err(|e| ControlError::JwksFile(path.clone(), e.to_string()))?;
        keys.extend(
            token::keys_from_jwks(&json).map_err(|e| ControlError::JwksFile(path.clone(), e))?,
        );
    }
    if let Some(source) = &config.jwks {
        let json = source.fetch().await?;
        keys.extend(token::keys_from_jwks(&json).map_err(ControlError::JwksKeys)?);
    }
    Ok(Authenticator::new(keys, config.token_issuer.clone()))
}

fn local_keys(config: &Config) -> Result<Vec<token::TrustedKey>, ControlError> {
    Ok(match config.local_tokens {
        true => vec![LocalSigner::load_or_create(&config.data_dir)?.trusted_key()],
        false => vec![],
    })
}

/// Periodic work until `stop`: renew the serving certificate at half its life, prune the
/// registry, refresh the JWKS. Failures are logged and retried; serving goes on.
async fn background(
    config: Config,
    ca: Arc<CaHandle>,
    auth: Arc<Authenticator>,
    registry: Arc<Registry>,
    stop: CancellationToken,
) -> Result<(), ControlError> {
    let mut renew = tokio::time::interval(config.cert_ttl / 2);
    let mut bundle = ca.bundle.subscribe();
    let mut resync = tokio::time::interval(Duration::from_secs(30));
    let mut prune = tokio::time::interval(Duration::from_secs(60));
    let mut jwks = tokio::time::interval(JWKS_REFRESH);
    // Each interval fires at once; the first tick of each is the start-up state.
    renew.tick().await;
    jwks.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = renew.tick() => match ca.serving_config(&ca.ca.load()) {
                Ok(c) => ca.serving.store(Arc::new(c)),
                Err(e) => tracing::error!(error = %e, "renewing the control plane's serving certificate failed"),
            },
            _ = prune.tick() => registry.prune(OffsetDateTime::now_utc()),
            changed = bundle.changed(), if config.cluster.is_some() => {
                if changed.is_ok() {
                    sync_bundle(&config, &ca).await;
                }
            }
            _ = resync.tick(), if config.cluster.is_some() => sync_bundle(&config, &ca).await,
            _ = jwks.tick(), if config.jwks.is_some() => {
                if let Err(e) = refresh_jwks(&config, &auth).await {
                    tracing::warn!(error = %e, "JWKS refresh failed; keeping the previous keys");
                }
            }
        }
    }
}

/// Applies the trust bundle ConfigMap in every namespace labelled for injection.
async fn sync_bundle(config: &Config, ca: &CaHandle) {
    let Some(cluster) = &config.cluster else {
        return;
    };
    let pem = ca.ca.load().trust_bundle_pem();
    match cluster.sync_trust_bundle(&pem).await {
        Ok(n) => tracing::debug!(namespaces = n, "trust bundle ConfigMaps applied"),
        Err(e) => {
            tracing::warn!(error = %e, "applying the trust bundle ConfigMaps failed; retrying in 30 s")
        }
    }
}

async fn refresh_jwks(config: &Config, auth: &Authenticator) -> Result<(), ControlError> {
    let Some(source) = &config.jwks else {
        return Ok(());
    };
    let mut keys = local_keys(config)?;
    if let Some(path) = &config.jwks_file {
        let json =
            std::fs::read(path).map_err(|e| ControlError::JwksFile(path.clone(), e.to_string()))?;
        keys.extend(
            token::keys_from_jwks(&json).map_err(|e| ControlError::JwksFile(path.clone(), e))?,
        );
    }
    let json = source.fetch().await?;
    keys.extend(token::keys_from_jwks(&json).map_err(ControlError::JwksKeys)?);
    auth.set_keys(keys);
    Ok(())
}
