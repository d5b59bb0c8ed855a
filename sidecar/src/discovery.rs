//! Which destinations are meshed, learned from the control plane's `Discovery/Watch`.
//!
//! The sidecar watches only what it connects to: the first connection to a destination
//! starts a watch for it and waits for the first answer (at most the lookup timeout); later
//! connections read the cached answer at once. A watch nobody used for [`IDLE`] is dropped.
//! When the control plane is away, the last answer stays in force and the watch reconnects
//! with backoff; a destination never answered is `Unknown`, which the data path refuses
//! rather than risk plaintext to a meshed peer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use meshlet_identity::SpiffeId;
use meshlet_identity::authz::PolicySet;
use meshlet_proto::discovery::v1::discovery_client::DiscoveryClient;
use meshlet_proto::discovery::v1::{WatchRequest, WatchResponse};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::identity::backoff;

/// A watch unused this long is closed.
pub const IDLE: Duration = Duration::from_secs(300);

/// What discovery says about a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// A sidecar serves it, presenting this SPIFFE ID.
    Meshed(SpiffeId),
    /// No sidecar: pass the traffic through.
    NotMeshed,
    /// No answer (yet): the control plane is unreachable or slow.
    Unknown,
    /// A Kubernetes Service's ClusterIP:port: connect to one of these backends directly
    /// (empty: the Service has no backend to take the connection).
    Service(Arc<[Backend]>),
}

/// One backend of a Service, resolved like any destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub addr: SocketAddr,
    pub resolution: Resolution,
}

impl Resolution {
    /// Whether traffic here is (or was) mutual TLS: meshed, or a Service with a meshed backend.
    fn is_meshed(&self) -> bool {
        match self {
            Resolution::Meshed(_) => true,
            Resolution::Service(backends) => backends.iter().any(|b| b.resolution.is_meshed()),
            Resolution::NotMeshed | Resolution::Unknown => false,
        }
    }

    /// What one `Endpoint` of a Watch answer says.
    fn of_endpoint(e: &meshlet_proto::discovery::v1::Endpoint) -> Resolution {
        match e.meshed {
            true => match SpiffeId::parse(&e.identity) {
                Ok(id) => Resolution::Meshed(id),
                Err(_) => Resolution::Unknown,
            },
            false => Resolution::NotMeshed,
        }
    }
}

#[derive(Debug)]
struct Entry {
    rx: watch::Receiver<Resolution>,
    last_used: AtomicU64,
    /// When a meshed destination was first reported not meshed (ms since the resolver's
    /// epoch; 0: not leaving). Until [`LEAVE_GRACE`] has passed it resolves as unknown.
    left_at: Arc<AtomicU64>,
}

/// How long a destination that was meshed must be reported not meshed before traffic to
/// it is passed through in plaintext. Covers a control plane restart, whose registry fills
/// again as sidecars reconnect and announce themselves.
pub const LEAVE_GRACE: Duration = Duration::from_secs(60);

/// Never downgrade from meshed to plaintext at once: a "not meshed" answer for a
/// destination that was meshed is held as `Unknown` (refused) until it has stood for
/// [`LEAVE_GRACE`]. `now` and `left` are times since the resolver's epoch.
fn downgrade_guard(
    current: &Resolution,
    answer: Resolution,
    left: &AtomicU64,
    now: Duration,
) -> Resolution {
    let now_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX).max(1);
    match (current, answer) {
        (_, Resolution::Meshed(id)) => {
            left.store(0, Ordering::Relaxed);
            Resolution::Meshed(id)
        }
        (current, Resolution::NotMeshed) if current.is_meshed() => {
            left.store(now_ms, Ordering::Relaxed);
            Resolution::Unknown
        }
        (_, Resolution::NotMeshed) => {
            let since = left.load(Ordering::Relaxed);
            if since == 0 || now_ms.saturating_sub(since) >= LEAVE_GRACE.as_millis() as u64 {
                left.store(0, Ordering::Relaxed);
                Resolution::NotMeshed
            } else {
                Resolution::Unknown
            }
        }
        (_, other) => other,
    }
}

/// The downgrade guard of each backend of a Service, so a backend that was meshed is not
/// reached in plaintext at once either.
#[derive(Debug, Default)]
struct BackendGuards(std::collections::HashMap<SocketAddr, (Resolution, AtomicU64)>);

impl BackendGuards {
    /// The backends of a Watch answer, guarded; backends no longer listed are forgotten.
    fn guard(
        &mut self,
        endpoints: &[meshlet_proto::discovery::v1::Endpoint],
        now: Duration,
    ) -> Vec<Backend> {
        let mut out = Vec::with_capacity(endpoints.len());
        let mut next = std::collections::HashMap::with_capacity(endpoints.len());
        for e in endpoints {
            let Ok(addr) = e.address.parse::<SocketAddr>() else {
                tracing::warn!(address = %e.address, "discovery sent a backend that is not an address; skipped");
                continue;
            };
            let (previous, left) = self
                .0
                .remove(&addr)
                .unwrap_or((Resolution::Unknown, AtomicU64::new(0)));
            let resolution = downgrade_guard(&previous, Resolution::of_endpoint(e), &left, now);
            out.push(Backend {
                addr,
                resolution: resolution.clone(),
            });
            next.insert(addr, (resolution, left));
        }
        self.0 = next;
        out
    }
}

/// The cache of destination watches.
#[derive(Debug)]
pub struct Resolver {
    client: DiscoveryClient<Channel>,
    token_file: PathBuf,
    cache: DashMap<SocketAddr, Arc<Entry>>,
    lookup_timeout: Duration,
    epoch: Instant,
    stop: CancellationToken,
}

impl Resolver {
    pub fn new(
        channel: Channel,
        token_file: PathBuf,
        lookup_timeout: Duration,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            client: DiscoveryClient::new(channel),
            token_file,
            cache: DashMap::new(),
            lookup_timeout,
            epoch: Instant::now(),
            stop,
        })
    }

    /// What is known about `dst`, waiting up to the lookup timeout for a first answer.
    pub async fn resolve(self: &Arc<Self>, dst: SocketAddr) -> Resolution {
        let entry = self
            .cache
            .entry(dst)
            .or_insert_with(|| self.start(dst))
            .clone();
        entry
            .last_used
            .store(self.epoch.elapsed().as_secs(), Ordering::Relaxed);
        let mut rx = entry.rx.clone();
        let answer = tokio::time::timeout(
            self.lookup_timeout,
            rx.wait_for(|r| *r != Resolution::Unknown),
        )
        .await;
        match answer {
            Ok(Ok(r)) => r.clone(),
            _ => Resolution::Unknown,
        }
    }

    fn start(self: &Arc<Self>, dst: SocketAddr) -> Arc<Entry> {
        let (tx, rx) = watch::channel(Resolution::Unknown);
        let entry = Arc::new(Entry {
            rx,
            last_used: AtomicU64::new(self.epoch.elapsed().as_secs()),
            left_at: Arc::new(AtomicU64::new(0)),
        });
        let me = self.clone();
        let watched = entry.clone();
        let left = entry.left_at.clone();
        tokio::spawn(async move {
            let idle = {
                let me = me.clone();
                move || {
                    me.epoch
                        .elapsed()
                        .as_secs()
                        .saturating_sub(watched.last_used.load(Ordering::Relaxed))
                        > IDLE.as_secs()
                }
            };
            let epoch = me.epoch;
            let mut backends = BackendGuards::default();
            follow(
                me.client.clone(),
                &me.token_file,
                dst.to_string(),
                String::new(),
                &me.stop,
                idle,
                |msg| {
                    let service = msg.service || !msg.backends.is_empty();
                    let answer = match (&msg.endpoint, service) {
                        (Some(_), true) => Resolution::Service(
                            backends.guard(&msg.backends, epoch.elapsed()).into(),
                        ),
                        (Some(e), false) => Resolution::of_endpoint(e),
                        (None, _) => Resolution::Unknown,
                    };
                    tx.send_if_modified(|current| {
                        let next = downgrade_guard(current, answer, &left, epoch.elapsed());
                        let changed = *current != next;
                        *current = next;
                        changed
                    });
                },
            )
            .await;
            me.cache.remove(&dst);
        });
        entry
    }
}

/// Streams the trust bundle into `tx`, and this workload's authorization policy into
/// `policy`, until `stop`. A policy that does not parse leaves the previous one in force.
pub async fn watch_bundle(
    channel: Channel,
    token_file: PathBuf,
    announce: Option<String>,
    tx: watch::Sender<Vec<CertificateDer<'static>>>,
    policy: watch::Sender<Option<Arc<PolicySet>>>,
    stop: CancellationToken,
) {
    follow(
        DiscoveryClient::new(channel),
        &token_file,
        String::new(),
        announce.unwrap_or_default(),
        &stop,
        || false,
        |msg| {
            if !msg.policy.is_empty() {
            match serde_json::from_str::<PolicySet>(&msg.policy) {
                Ok(p) => {
                    policy.send_if_modified(|current| {
                        let changed = current.as_deref() != Some(&p);
                        *current = Some(Arc::new(p));
                        changed
                    });
                }
                Err(e) => tracing::error!(error = %e, "unreadable policy from the control plane; keeping the previous one"),
            }
        }
        if !msg.trust_bundle.is_empty() {
                let bundle: Vec<CertificateDer<'static>> = msg
                    .trust_bundle
                    .into_iter()
                    .map(CertificateDer::from)
                    .collect();
                tx.send_if_modified(|b| {
                    let changed = *b != bundle;
                    *b = bundle;
                    changed
                });
            }
        },
    )
    .await;
}

/// Keeps one Watch open for `address` (re-reading the token and reconnecting with backoff)
/// and hands every message to `on_message`, until `stop` or `idle()`.
async fn follow(
    mut client: DiscoveryClient<Channel>,
    token_file: &std::path::Path,
    address: String,
    announce: String,
    stop: &CancellationToken,
    idle: impl Fn() -> bool,
    mut on_message: impl FnMut(WatchResponse),
) {
    let mut failures = 0u32;
    let mut idle_check = tokio::time::interval(Duration::from_secs(30));
    while !stop.is_cancelled() && !idle() {
        let opened = async {
            let token = tokio::fs::read_to_string(token_file)
                .await
                .map_err(|e| e.to_string())?;
            let request = WatchRequest {
                token: token.trim().to_owned(),
                address: address.clone(),
                announce: announce.clone(),
            };
            client
                .watch(request)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.to_string())
        };
        let mut stream = match opened.await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(address, error = %e, "discovery watch failed");
                let wait = backoff(failures);
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = idle_check.tick() => if idle() { return },
                message = stream.message() => match message {
                    Ok(Some(m)) => {
                        failures = 0;
                        on_message(m);
                    }
                    Ok(None) | Err(_) => break,
                },
            }
        }
        let wait = backoff(failures);
        failures = failures.saturating_add(1);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meshed_destinations_are_not_downgraded_at_once() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").expect("valid");
        let left = AtomicU64::new(0);
        let s = Duration::from_secs;
        let meshed = Resolution::Meshed(id.clone());
        // Meshed, then "not meshed" (a restarted control plane): unknown, i.e. refused.
        assert_eq!(
            downgrade_guard(&meshed, Resolution::NotMeshed, &left, s(100)),
            Resolution::Unknown
        );
        // Still "not meshed" within the grace: unknown.
        assert_eq!(
            downgrade_guard(&Resolution::Unknown, Resolution::NotMeshed, &left, s(130)),
            Resolution::Unknown
        );
        // Meshed again (the sidecar re-announced): meshed, grace cleared.
        assert_eq!(
            downgrade_guard(&Resolution::Unknown, meshed.clone(), &left, s(131)),
            meshed
        );
        assert_eq!(left.load(Ordering::Relaxed), 0);
        // Left for good: plaintext only after the grace.
        assert_eq!(
            downgrade_guard(&meshed, Resolution::NotMeshed, &left, s(200)),
            Resolution::Unknown
        );
        assert_eq!(
            downgrade_guard(&Resolution::Unknown, Resolution::NotMeshed, &left, s(261)),
            Resolution::NotMeshed
        );
        // A destination never meshed passes through at once.
        let fresh = AtomicU64::new(0);
        assert_eq!(
            downgrade_guard(&Resolution::Unknown, Resolution::NotMeshed, &fresh, s(5)),
            Resolution::NotMeshed
        );
    }

    #[test]
    fn a_service_backend_that_was_meshed_is_not_downgraded_at_once() {
        let endpoint = |address: &str, identity: &str| meshlet_proto::discovery::v1::Endpoint {
            address: address.into(),
            meshed: !identity.is_empty(),
            identity: identity.into(),
        };
        let id = "spiffe://td/ns/a/sa/b";
        let meshed = Resolution::Meshed(SpiffeId::parse(id).expect("valid"));
        let s = Duration::from_secs;
        let mut guards = BackendGuards::default();
        let summary = |b: Vec<Backend>| -> Vec<(String, Resolution)> {
            b.into_iter()
                .map(|b| (b.addr.to_string(), b.resolution))
                .collect()
        };
        let first = guards.guard(
            &[
                endpoint("10.0.0.1:80", id),
                endpoint("10.0.0.2:80", ""),
                endpoint("bogus", id),
            ],
            s(10),
        );
        assert_eq!(
            summary(first),
            vec![
                ("10.0.0.1:80".into(), meshed.clone()),
                ("10.0.0.2:80".into(), Resolution::NotMeshed),
            ],
            "a backend that is not an address is skipped"
        );
        // The meshed backend is reported not meshed (a restarted control plane): held.
        let held = guards.guard(
            &[endpoint("10.0.0.1:80", ""), endpoint("10.0.0.2:80", "")],
            s(11),
        );
        assert_eq!(held[0].resolution, Resolution::Unknown);
        assert_eq!(held[1].resolution, Resolution::NotMeshed);
        let later = guards.guard(&[endpoint("10.0.0.1:80", "")], s(11) + LEAVE_GRACE);
        assert_eq!(
            later[0].resolution,
            Resolution::NotMeshed,
            "after the grace"
        );
        // A Service that had a meshed backend and is no longer a Service: held too.
        let service = Resolution::Service(
            vec![Backend {
                addr: "10.0.0.1:80".parse().expect("valid"),
                resolution: meshed,
            }]
            .into(),
        );
        let left = AtomicU64::new(0);
        assert_eq!(
            downgrade_guard(&service, Resolution::NotMeshed, &left, s(50)),
            Resolution::Unknown
        );
    }
}
