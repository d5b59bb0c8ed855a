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
}

#[derive(Debug)]
struct Entry {
    rx: watch::Receiver<Resolution>,
    last_used: AtomicU64,
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

    /// How many destinations are watched now.
    pub fn watched(&self) -> usize {
        self.cache.len()
    }

    fn start(self: &Arc<Self>, dst: SocketAddr) -> Arc<Entry> {
        let (tx, rx) = watch::channel(Resolution::Unknown);
        let entry = Arc::new(Entry {
            rx,
            last_used: AtomicU64::new(self.epoch.elapsed().as_secs()),
        });
        let me = self.clone();
        let watched = entry.clone();
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
            follow(
                me.client.clone(),
                &me.token_file,
                dst.to_string(),
                &me.stop,
                idle,
                |msg| {
                    let resolution = match msg.endpoint {
                        Some(e) if e.meshed => match SpiffeId::parse(&e.identity) {
                            Ok(id) => Resolution::Meshed(id),
                            Err(_) => Resolution::Unknown,
                        },
                        Some(_) => Resolution::NotMeshed,
                        None => Resolution::Unknown,
                    };
                    tx.send_if_modified(|r| {
                        let changed = *r != resolution;
                        *r = resolution;
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
    tx: watch::Sender<Vec<CertificateDer<'static>>>,
    policy: watch::Sender<Option<Arc<PolicySet>>>,
    stop: CancellationToken,
) {
    follow(
        DiscoveryClient::new(channel),
        &token_file,
        String::new(),
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
