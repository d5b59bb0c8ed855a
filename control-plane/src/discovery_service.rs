//! `meshlet.discovery.v1.Discovery/Watch`: one destination's state and the trust bundle.
//!
//! A watch for "ip:port" reports the identity registered for exactly that address, else the
//! one registered for the bare IP (a pod serves every port of its IP). When the address is a
//! Service's ClusterIP:port, the answer also lists its backends, each resolved the same way. The full state is sent
//! first and again on every change; a stream ends when the client leaves or the control plane
//! shuts down (the sidecar then watches again).

use std::net::SocketAddr;
use std::sync::Arc;

use meshlet_identity::SpiffeId;
use meshlet_proto::discovery::v1::discovery_server::Discovery;
use meshlet_proto::discovery::v1::{Endpoint, WatchRequest, WatchResponse};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::identity_service::parse_address;
use crate::registry::Registry;
use crate::services::Services;
use crate::token::{Authenticator, Workload};
use meshlet_identity::authz::PolicySet;

/// The trust bundle as streamed: DER roots. Replaced as a whole when roots rotate.
pub type Bundle = Arc<Vec<Vec<u8>>>;

/// The Discovery service and what it needs.
#[derive(Debug)]
pub struct DiscoveryService {
    pub trust_domain: meshlet_identity::TrustDomain,
    pub auth: Arc<Authenticator>,
    /// With `--token-review`, tokens are checked by the cluster, as for Certify.
    pub cluster: Option<crate::cluster::Cluster>,
    pub token_review: bool,
    pub registry: Arc<Registry>,
    pub bundle: watch::Receiver<Bundle>,
    pub policy: watch::Receiver<Arc<PolicySet>>,
    /// Services' ClusterIPs and their backends (see `services`).
    pub services: Services,
    /// How long an announced address outlives its watch (see `--withdraw-grace`).
    pub withdraw_grace: std::time::Duration,
    pub stop: CancellationToken,
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let authenticated = match (&self.cluster, self.token_review) {
            (Some(cluster), true) => cluster.review_token(&request.token).await,
            _ => self.auth.authenticate(&request.token),
        };
        let workload = authenticated.map_err(|e| Status::unauthenticated(e.to_string()))?;
        let address = parse_address(&request.address)?;
        let mut announced = None;
        if address.is_none()
            && let Some(own) = parse_address(&request.announce)?
        {
            let id = meshlet_identity::SpiffeId::for_service_account(
                &self.trust_domain,
                &workload.namespace,
                &workload.service_account,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
            if let Some(cluster) = &self.cluster {
                let ip = own
                    .parse::<std::net::IpAddr>()
                    .or_else(|_| own.parse::<std::net::SocketAddr>().map(|a| a.ip()))
                    .map_err(|_| Status::invalid_argument("announce is not an address"))?;
                let pod = workload
                    .pod
                    .as_deref()
                    .ok_or_else(|| Status::permission_denied("the token names no pod"))?;
                match cluster.pod_owns(&workload.namespace, pod, ip).await {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(Status::permission_denied(format!(
                            "pod {}/{pod} does not have IP {ip}",
                            workload.namespace
                        )));
                    }
                    Err(e) => return Err(Status::unavailable(e.to_string())),
                }
            }
            let generation = self.registry.announce(&own, id.clone());
            announced = Some((own, id, generation));
        }
        let (tx, rx) = mpsc::channel(4);
        // The bundle-only watch also carries the caller's authorization policy.
        let policy = address.is_none().then(|| (self.policy.clone(), workload));
        let registry = self.registry.clone();
        let services = self.services.clone();
        let stop = self.stop.clone();
        let bundle = self.bundle.clone();
        let grace = self.withdraw_grace;
        tokio::spawn(async move {
            let asked = address.map(|a| Watched::new(&registry, a));
            stream(asked, &registry, services, bundle, policy, tx, stop.clone()).await;
            // The sidecar is gone, or reconnecting: if it announces again within the grace,
            // the withdrawal below is void. A control plane that is shutting down withdraws
            // nothing: its other watchers would hear "unknown" in its last moments and
            // refuse traffic to peers that are still there.
            if let Some((own, id, generation)) = announced {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(grace) => registry.withdraw(&own, &id, generation),
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One address followed in the registry: its exact entry, and its IP's when it has a port
/// (a pod serves every port of its IP).
struct Watched {
    address: String,
    exact: watch::Receiver<Option<SpiffeId>>,
    by_ip: Option<watch::Receiver<Option<SpiffeId>>>,
}

impl Watched {
    fn new(registry: &Registry, address: String) -> Self {
        let by_ip = address
            .parse::<SocketAddr>()
            .ok()
            .map(|a| registry.watch_address(&a.ip().to_string()));
        Self {
            exact: registry.watch_address(&address),
            by_ip,
            address,
        }
    }

    fn endpoint(&mut self) -> Endpoint {
        let id = self.exact.borrow_and_update().clone().or_else(|| {
            self.by_ip
                .as_mut()
                .and_then(|rx| rx.borrow_and_update().clone())
        });
        Endpoint {
            address: self.address.clone(),
            meshed: id.is_some(),
            identity: id.map(|i| i.to_string()).unwrap_or_default(),
        }
    }

    async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        match &mut self.by_ip {
            Some(by_ip) => tokio::select! {
                r = self.exact.changed() => r,
                r = by_ip.changed() => r,
            },
            None => self.exact.changed().await,
        }
    }
}

/// Sends the state of `asked` (and, when it is a Service's address, of its backends), the
/// bundle and the policy, again on every change of any of them.
async fn stream(
    mut asked: Option<Watched>,
    registry: &Registry,
    mut services: Services,
    mut bundle: watch::Receiver<Bundle>,
    mut policy: Option<(watch::Receiver<Arc<PolicySet>>, Workload)>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    stop: CancellationToken,
) {
    // No answer about an address before the Services are known (see `services`).
    if asked.is_some() {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
            r = services.wait_for(|m| m.is_some()) => if r.is_err() { return },
        }
    }
    let service_key = asked
        .as_ref()
        .and_then(|a| a.address.parse::<SocketAddr>().ok());
    let mut backends: Vec<Watched> = vec![];
    let mut is_service = false;
    let mut services_open = true;
    loop {
        if let Some(key) = service_key {
            let listed: Option<Vec<SocketAddr>> = services
                .borrow_and_update()
                .as_ref()
                .and_then(|m| m.get(&key).cloned());
            is_service = listed.is_some();
            let now = listed.unwrap_or_default();
            let same = now.len() == backends.len()
                && now
                    .iter()
                    .zip(&backends)
                    .all(|(a, w)| a.to_string() == w.address);
            if !same {
                backends = now
                    .into_iter()
                    .map(|a| Watched::new(registry, a.to_string()))
                    .collect();
            }
        }
        let policy_json = match policy.as_mut() {
            Some((rx, w)) => {
                let mine = crate::policy::for_workload(
                    &rx.borrow_and_update(),
                    &w.namespace,
                    &w.service_account,
                );
                serde_json::to_string(&mine).unwrap_or_default()
            }
            None => String::new(),
        };
        let message = WatchResponse {
            trust_bundle: bundle.borrow_and_update().to_vec(),
            endpoint: asked.as_mut().map(Watched::endpoint),
            policy: policy_json,
            backends: backends.iter_mut().map(Watched::endpoint).collect(),
            service: is_service,
        };
        if tx.send(Ok(message)).await.is_err() {
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
            r = bundle.changed() => if r.is_err() { return },
            r = changed(asked.as_mut()) => if r.is_err() { return },
            r = any_changed(&mut backends) => if r.is_err() { return },
            r = services.changed(), if services_open && service_key.is_some() => {
                // An embedder that dropped its sender froze the map; it stays as it was.
                services_open = r.is_ok();
            }
            r = policy_changed(&mut policy) => if r.is_err() { return },
        }
    }
}

async fn changed(watched: Option<&mut Watched>) -> Result<(), watch::error::RecvError> {
    match watched {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

async fn any_changed(backends: &mut [Watched]) -> Result<(), watch::error::RecvError> {
    if backends.is_empty() {
        return std::future::pending().await;
    }
    let (first, _, _) =
        futures_util::future::select_all(backends.iter_mut().map(|w| Box::pin(w.changed()))).await;
    first
}

async fn policy_changed(
    p: &mut Option<(watch::Receiver<Arc<PolicySet>>, Workload)>,
) -> Result<(), watch::error::RecvError> {
    match p {
        Some((rx, _)) => rx.changed().await,
        None => std::future::pending().await,
    }
}
