//! meshlet's sidecar: captures a pod's TCP traffic, upgrades pod-to-pod connections to
//! mutual TLS with verified SPIFFE identities, and proxies HTTP per request.
//!
//! # Layout
//! - [`run`]: starts everything on already-bound listeners; drains on shutdown.
//! - [`config`]: `run` flags (`MESHLET_*`), explicit-mode routes.
//! - [`identity`]: the certificate: Certify, renewal at ~½ life, TLS configs via a watch.
//! - [`discovery`]: per-destination watches: meshed or not, and with which identity.
//! - [`outbound`], [`inbound`]: one `decide` (pure, table-tested) and one `handle` each.
//! - [`relay`]: protocol detection, then [`http`] (hyper, per request) or opaque TCP copy.
//! - [`pool`]: HTTP/2 connections between sidecars shared by many app connections;
//!   [`app_clients`]: inbound, their requests to the app in each one's own protocol;
//!   [`replay`]: a request the peer did not process (GOAWAY) is sent again.
//! - [`detect`]: ClientHello/ALPN and HTTP detection on first bytes; [`io`]: replay, sniff.
//! - [`init`]: the iptables capture rules (`meshlet-proxy init`); [`orig_dst`]: SO_ORIGINAL_DST.
//! - [`admin`]: `/ready`, `/live`, `/certs`, `/metrics`; [`metrics`]: closed label sets.
//! - [`trace`]: CLIENT/SERVER spans per request, `traceparent`/B3 propagation.

pub mod admin;
pub mod app_clients;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod io;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod pool;
pub mod relay;
pub mod replay;
pub mod trace;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use meshlet_identity::{Expected, tls};
use meshlet_proto::identity::v1::identity_client::IdentityClient;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, Route, RunArgs};

use crate::identity::{CertStatus, Creds, IdentityTask};
use crate::inbound::Inbound;
use crate::metrics::{Direction, Metrics, Refusal};
use crate::outbound::Outbound;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("--trust-bundle {0}: {1}")]
    TrustBundle(String, String),
    #[error("control plane TLS: {0}")]
    Tls(#[from] tls::TlsConfigError),
    #[error("--control-addr: {0}")]
    ControlAddr(#[from] tonic::transport::Error),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("tracing: {0}")]
    Tracing(String),
}

/// The sidecar's listeners, bound by the caller (port 0 in tests).
#[derive(Debug)]
pub struct Listeners {
    pub admin: TcpListener,
    pub inbound: TcpListener,
    pub outbound: TcpListener,
    /// Explicit-mode routes, each with its listener.
    pub routes: Vec<(TcpListener, Route)>,
}

impl Listeners {
    /// Binds every listener `config` names.
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let mut routes = Vec::new();
        for route in &config.routes {
            routes.push((TcpListener::bind(route.listen).await?, route.clone()));
        }
        Ok(Self {
            admin: TcpListener::bind(config.admin_addr).await?,
            inbound: TcpListener::bind(config.inbound_addr).await?,
            outbound: TcpListener::bind(config.outbound_addr).await?,
            routes,
        })
    }
}

/// A started sidecar.
#[derive(Debug)]
pub struct Running {
    pub admin_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub route_addrs: Vec<SocketAddr>,
    pub metrics: Arc<Metrics>,
    events: tokio::sync::broadcast::Sender<metrics::ConnEvent>,
    creds: watch::Receiver<Option<Arc<Creds>>>,
    policy: relay::PolicyRx,
    stopped: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Waits for the first certificate and the first policy (what `/ready` reports).
    pub async fn ready(&self) {
        let mut creds = self.creds.clone();
        let _ = creds.wait_for(Option::is_some).await;
        let mut policy = self.policy.clone();
        let _ = policy.wait_for(Option::is_some).await;
    }

    /// Every connection that ends from now on, with what was verified on its TLS hop.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<metrics::ConnEvent> {
        self.events.subscribe()
    }

    /// The sidecar's certificate and TLS configurations, once it has one.
    pub fn creds(&self) -> Option<Arc<Creds>> {
        self.creds.borrow().clone()
    }

    /// Waits until shutdown and draining are complete.
    pub async fn wait(self) {
        let _ = self.stopped.await;
    }
}

/// Starts the sidecar on `listeners`. When `shutdown` completes it stops accepting, lets
/// in-flight connections finish for up to `drain_timeout`, then stops.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, ProxyError> {
    let bundle_pem = std::fs::read(&config.trust_bundle).map_err(|e| {
        ProxyError::TrustBundle(config.trust_bundle.display().to_string(), e.to_string())
    })?;
    let bundle: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bundle_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            ProxyError::TrustBundle(config.trust_bundle.display().to_string(), e.to_string())
        })?;
    // The control plane is trusted by the roots of the moment: the file's at first, then the
    // bundle the control plane streams (so a root rotation never cuts the sidecar off).
    let control_roots: tls::LiveRoots = Arc::new(ArcSwap::new(tls::root_store(&bundle)?));
    let control_tls = tls::live_client_config(
        control_roots.clone(),
        Expected::Exact(config.control_identity.clone()),
        None,
        &[meshlet_proto::connect::GRPC_ALPN],
    )?;
    let channel = meshlet_proto::connect::tls_channel(&config.control_addr, Arc::new(control_tls))?;

    let addrs = Addresses {
        admin: listeners.admin.local_addr()?,
        inbound: listeners.inbound.local_addr()?,
        outbound: listeners.outbound.local_addr()?,
        routes: listeners
            .routes
            .iter()
            .map(|(l, _)| l.local_addr())
            .collect::<Result<_, _>>()?,
    };
    let own: Vec<SocketAddr> = [addrs.admin, addrs.inbound, addrs.outbound]
        .into_iter()
        .chain(addrs.routes.iter().copied())
        .collect();
    // Explicit mode registers the inbound listener's address and port; a pod its IP.
    let address = match (config.app_addr, config.pod_ip) {
        (Some(_), ip) => Some(
            SocketAddr::new(ip.unwrap_or(addrs.inbound.ip()), addrs.inbound.port()).to_string(),
        ),
        (None, ip) => ip.map(|ip| ip.to_string()),
    };

    let accepting = CancellationToken::new();
    let draining = CancellationToken::new();
    let background = CancellationToken::new();
    let metrics = Arc::new(Metrics::default());
    let limits = relay::Limits {
        sniff_timeout: config.sniff_timeout,
        idle_timeout: config.idle_timeout,
        max_header_bytes: config.max_header_bytes,
        http2_max_streams: config.http2_max_streams,
    };
    let provider = match &config.tracing {
        Some(tc) => Some(
            meshlet_telemetry::traces::start(
                tc,
                resource_defaults(&config.token_file),
                &metrics.traces,
            )
            .map_err(|e| ProxyError::Tracing(e.to_string()))?,
        ),
        None => None,
    };
    let tracer = provider
        .as_ref()
        .map(|p| opentelemetry::trace::TracerProvider::tracer(p, "meshlet-proxy"));
    let (events, _) = tokio::sync::broadcast::channel(256);
    let (creds_tx, creds) = watch::channel(None);
    let status = Arc::new(ArcSwap::from_pointee(CertStatus::default()));
    let (bundle_tx, bundle_rx) = watch::channel(bundle);
    let registration = address.clone();
    let identity = IdentityTask {
        client: IdentityClient::new(channel.clone()),
        token_file: config.token_file.clone(),
        address,
        creds: creds_tx,
        status: status.clone(),
        metrics: metrics.clone(),
        control_roots,
    };
    tokio::spawn(identity::maintain(identity, bundle_rx, background.clone()));
    let (policy_tx, policy) = watch::channel(None);
    tokio::spawn(discovery::watch_bundle(
        channel.clone(),
        config.token_file.clone(),
        registration,
        bundle_tx,
        policy_tx,
        background.clone(),
    ));
    let resolver = discovery::Resolver::new(
        channel,
        config.token_file.clone(),
        config.discovery_timeout,
        background.clone(),
    );

    let pool = pool::Pool::new(config.connect_timeout, config.handshake_timeout);
    tokio::spawn(pool.clone().sweep(draining.clone()));
    let outbound = Arc::new(Outbound {
        resolver,
        creds: creds.clone(),
        metrics: metrics.clone(),
        events: events.clone(),
        own: own.clone(),
        connect_timeout: config.connect_timeout,
        handshake_timeout: config.handshake_timeout,
        limits,
        drain: draining.clone(),
        tracer: tracer.clone(),
        picks: Default::default(),
        pool: pool.clone(),
    });
    let inbound = Arc::new(Inbound {
        creds: creds.clone(),
        metrics: metrics.clone(),
        events: events.clone(),
        mode: config.inbound_mode,
        app_addr: config.app_addr,
        own,
        connect_timeout: config.connect_timeout,
        handshake_timeout: config.handshake_timeout,
        limits,
        drain: draining.clone(),
        tracer,
        policy: policy.clone(),
        workload: token_workload(&config.token_file),
        app_clients: Arc::new(app_clients::AppClients::new(
            config.connect_timeout,
            config.app_idle_timeout,
        )),
    });
    let tracker = TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let accept = |direction| Acceptor {
        stop: accepting.clone(),
        tracker: tracker.clone(),
        slots: slots.clone(),
        metrics: metrics.clone(),
        direction,
    };
    let explicit = config.app_addr.is_some();
    {
        let (outbound, metrics) = (outbound.clone(), metrics.clone());
        tokio::spawn(accept_loop(
            listeners.outbound,
            accept(Direction::outbound),
            move |conn| {
                let (outbound, metrics) = (outbound.clone(), metrics.clone());
                async move {
                    match orig_dst::original_dst(&conn) {
                        Ok(dst) => outbound.handle(conn, dst, None).await,
                        Err(_) => {
                            metrics.refuse(Direction::outbound, Refusal::no_original_destination)
                        }
                    }
                }
            },
        ));
    }
    for (listener, route) in listeners.routes {
        let outbound = outbound.clone();
        tokio::spawn(accept_loop(
            listener,
            accept(Direction::outbound),
            move |conn| {
                outbound
                    .clone()
                    .handle(conn, route.upstream, route.identity.clone())
            },
        ));
    }
    {
        let (inbound, metrics) = (inbound.clone(), metrics.clone());
        let app_addr = config.app_addr;
        tokio::spawn(accept_loop(
            listeners.inbound,
            accept(Direction::inbound),
            move |conn| {
                let (inbound, metrics) = (inbound.clone(), metrics.clone());
                async move {
                    let dst = match (explicit, app_addr) {
                        (true, Some(app)) => Ok(app),
                        _ => orig_dst::original_dst(&conn),
                    };
                    match dst {
                        Ok(dst) => inbound.handle(conn, dst).await,
                        Err(_) => {
                            metrics.refuse(Direction::inbound, Refusal::no_original_destination)
                        }
                    }
                }
            },
        ));
    }
    let is_draining = Arc::new(AtomicBool::new(false));
    let running_policy = policy.clone();
    let admin_state = Arc::new(admin::AdminState {
        policy,
        creds: creds.clone(),
        status,
        metrics: metrics.registry(),
        draining: is_draining.clone(),
    });
    tokio::spawn(admin::serve(
        listeners.admin,
        admin_state,
        background.clone(),
    ));

    let drain_timeout = config.drain_timeout;
    let stopped = tokio::spawn(async move {
        shutdown.await;
        tracing::info!(in_flight = tracker.len(), ?drain_timeout, "draining");
        is_draining.store(true, Ordering::Relaxed);
        accepting.cancel();
        draining.cancel();
        tracker.close();
        if tokio::time::timeout(drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = tracker.len(),
                "drain deadline passed; closing the remaining connections"
            );
        }
        background.cancel();
        drop(provider);
    });
    tracing::info!(admin = %addrs.admin, inbound = %addrs.inbound, outbound = %addrs.outbound, routes = ?addrs.routes, "sidecar serving");
    Ok(Running {
        admin_addr: addrs.admin,
        inbound_addr: addrs.inbound,
        outbound_addr: addrs.outbound,
        route_addrs: addrs.routes,
        metrics,
        events,
        creds,
        policy: running_policy,
        stopped,
    })
}

struct Addresses {
    admin: SocketAddr,
    inbound: SocketAddr,
    outbound: SocketAddr,
    routes: Vec<SocketAddr>,
}

/// What every accept loop shares: when to stop, the tasks to drain, the connection slots.
struct Acceptor {
    stop: CancellationToken,
    tracker: TaskTracker,
    slots: Arc<tokio::sync::Semaphore>,
    metrics: Arc<Metrics>,
    direction: Direction,
}

/// Accepts until `stop`, handing each connection to `handle` as a tracked task that holds
/// one of `--max-connections` slots; without a free slot the connection is closed at once.
async fn accept_loop<F, Fut>(listener: TcpListener, a: Acceptor, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    while let Some((conn, _)) =
        meshlet_telemetry::process::accept(&listener, &a.stop, "proxy").await
    {
        let Ok(slot) = a.slots.clone().try_acquire_owned() else {
            a.metrics.refuse(a.direction, Refusal::connection_limit);
            continue;
        };
        let _ = conn.set_nodelay(true);
        let work = handle(conn);
        a.tracker.spawn(async move {
            work.await;
            drop(slot);
        });
    }
}

/// The `kubernetes.io` claim of the workload's own token (read, not verified: it only
/// names this workload to itself).
fn token_claims(token_file: &std::path::Path) -> Option<serde_json::Value> {
    use base64::Engine;
    let token = std::fs::read_to_string(token_file).ok()?;
    let payload = token
        .trim()
        .split('.')
        .nth(1)?
        .trim_end_matches('=')
        .to_owned();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    Some(claims["kubernetes.io"].clone())
}

/// This workload's namespace and service account, from its token.
fn token_workload(token_file: &std::path::Path) -> Option<(String, String)> {
    let k8s = token_claims(token_file)?;
    Some((
        k8s["namespace"].as_str()?.to_owned(),
        k8s["serviceaccount"]["name"].as_str()?.to_owned(),
    ))
}

/// Resource attributes that name the workload, from its token's `kubernetes.io` claim:
/// `service.name` = `<service-account>.<namespace>` (unless `OTEL_SERVICE_NAME` says
/// otherwise), `k8s.namespace.name`, `k8s.pod.name`.
fn resource_defaults(token_file: &std::path::Path) -> Vec<opentelemetry::KeyValue> {
    use opentelemetry::KeyValue;
    let claims = token_claims(token_file);
    let field = |path: &[&str]| {
        let mut v = claims.as_ref()?;
        for p in path {
            v = &v[*p];
        }
        v.as_str().map(str::to_owned)
    };
    let mut attributes = vec![];
    match (field(&["serviceaccount", "name"]), field(&["namespace"])) {
        (Some(sa), Some(ns)) => {
            attributes.push(KeyValue::new("service.name", format!("{sa}.{ns}")));
            attributes.push(KeyValue::new("k8s.namespace.name", ns));
        }
        _ => attributes.push(KeyValue::new("service.name", "meshlet-proxy")),
    }
    if let Some(pod) = field(&["pod", "name"]) {
        attributes.push(KeyValue::new("k8s.pod.name", pod));
    }
    attributes
}
