//! Outbound: the local app connects somewhere; we decide mutual TLS or passthrough, then act.
//!
//! [`decide`] is the security decision, pure and tested as a table: a meshed destination
//! gets mutual TLS and must present the SPIFFE ID discovery (or the route) names; a
//! destination known not to be meshed is passed through; an unknown one is refused (never
//! plaintext to what may be a meshed peer); without a valid certificate, mesh traffic is
//! refused (never fail open). A Kubernetes Service's ClusterIP is replaced by one of its
//! backends (round robin over those discovery has answered for), each decided alike.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use meshlet_identity::SpiffeId;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::detect::{self, Protocol};
use crate::discovery::{Resolution, Resolver};
use crate::http::Upstream;
use crate::identity::Creds;
use crate::io::{Prefixed, sniff};
use crate::metrics::{ConnEvent, Direction, HandshakeError, Metrics, Refusal, TlsInfo};
use crate::pool::{DialError, Got, Pool, Route, dial};
use crate::relay::{Limits, RelayCtx, connect, relay, serve_http};

/// How long a meshed connection waits for the app to speak before it gets a connection of
/// its own: HTTP clients send their request at once; a client that waits for the server
/// (SMTP, MySQL) is delayed by this much, once per connection.
pub const POOL_SNIFF: Duration = Duration::from_millis(50);

/// What to do with one outbound connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Connect to `dst` and pass the bytes through untouched.
    Passthrough(SocketAddr),
    /// Connect to `dst` with mutual TLS; the server must present `identity`.
    Mesh {
        dst: SocketAddr,
        identity: SpiffeId,
    },
    Refuse(Refusal),
}

/// Decides an outbound connection to `dst`. `own` are the sidecar's listeners (a
/// connection to one of them would loop). `pick` chooses among a Service's backends.
pub fn decide(
    dst: SocketAddr,
    own: &[SocketAddr],
    resolution: &Resolution,
    have_creds: bool,
    pick: usize,
) -> Plan {
    let loops = own.iter().any(|o| {
        o.port() == dst.port()
            && (o.ip() == dst.ip() || (o.ip().is_unspecified() && dst.ip().is_loopback()))
    });
    if loops {
        return Plan::Refuse(Refusal::loop_detected);
    }
    match resolution {
        Resolution::Meshed(_) if !have_creds => Plan::Refuse(Refusal::no_certificate),
        Resolution::Meshed(identity) => Plan::Mesh {
            dst,
            identity: identity.clone(),
        },
        Resolution::NotMeshed => Plan::Passthrough(dst),
        Resolution::Unknown => Plan::Refuse(Refusal::discovery_unavailable),
        // No backend: kube-proxy would refuse it too, and plaintext to the ClusterIP could
        // reach a meshed pod that discovery has not listed yet.
        Resolution::Service(backends) if backends.is_empty() => {
            Plan::Refuse(Refusal::upstream_unreachable)
        }
        Resolution::Service(backends) => {
            let known: Vec<_> = backends
                .iter()
                .filter(|b| b.resolution != Resolution::Unknown)
                .collect();
            match known.get(pick % known.len().max(1)) {
                Some(b) => decide(b.addr, own, &b.resolution, have_creds, 0),
                None => Plan::Refuse(Refusal::discovery_unavailable),
            }
        }
    }
}

/// The outbound side of the sidecar.
#[derive(Debug)]
pub struct Outbound {
    pub resolver: Arc<Resolver>,
    pub creds: watch::Receiver<Option<Arc<Creds>>>,
    pub metrics: Arc<Metrics>,
    pub events: tokio::sync::broadcast::Sender<ConnEvent>,
    pub own: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub limits: Limits,
    pub drain: CancellationToken,
    pub tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
    /// Counts connections, to take a Service's backends in turn.
    pub picks: std::sync::atomic::AtomicUsize,
    /// Connections to peer sidecars, shared by HTTP requests.
    pub pool: Arc<Pool>,
}

impl Outbound {
    /// Handles one connection from the app to `dst`. `route_identity` is the SPIFFE ID an
    /// explicit route names (no discovery lookup then).
    pub async fn handle(
        self: Arc<Self>,
        app: TcpStream,
        dst: SocketAddr,
        route_identity: Option<SpiffeId>,
    ) {
        let resolution = match route_identity {
            Some(id) => Resolution::Meshed(id),
            None => self.resolver.resolve(dst).await,
        };
        let creds = self
            .creds
            .borrow()
            .clone()
            .filter(|c| c.valid_at(SystemTime::now()));
        let pick = self
            .picks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let plan = decide(dst, &self.own, &resolution, creds.is_some(), pick);
        tracing::debug!(%dst, ?plan, "outbound");
        match (plan, creds) {
            (Plan::Refuse(reason), _) => self.metrics.refuse(Direction::outbound, reason),
            // Boxed here and below: a task's future is as large as its largest state, and
            // these paths are rare next to pooled HTTP (measured: 24 KB per app connection
            // unboxed, in the dev profile).
            (Plan::Passthrough(dst), _) => match connect(dst, self.connect_timeout).await {
                Ok(upstream) => Box::pin(relay(app, upstream, self.ctx(None))).await,
                Err(_) => self
                    .metrics
                    .refuse(Direction::outbound, Refusal::upstream_unreachable),
            },
            (Plan::Mesh { dst, identity }, Some(creds)) => {
                self.mesh(app, dst, &identity, &creds).await
            }
            (Plan::Mesh { .. }, None) => self
                .metrics
                .refuse(Direction::outbound, Refusal::no_certificate),
        }
    }

    async fn mesh(
        &self,
        mut app: TcpStream,
        dst: SocketAddr,
        identity: &SpiffeId,
        creds: &Arc<Creds>,
    ) {
        // An app that speaks HTTP at once gets streams of a pooled connection; anything
        // else (or a client that waits for the server) gets a connection of its own.
        let mut first = BytesMut::new();
        let head_start = POOL_SNIFF.min(self.limits.sniff_timeout);
        let decided = |b: &[u8]| detect::protocol(b).is_some();
        match sniff(&mut app, &mut first, head_start, detect::MAX_SNIFF, decided).await {
            // The app left without a word: no connection to make.
            Ok(true) if first.is_empty() => return,
            Ok(_) => {}
            Err(_) => return,
        }
        let protocol = detect::protocol(&first);
        let app = Prefixed::new(first, app);
        if let Some(protocol @ (Protocol::Http1 | Protocol::Http2)) = protocol {
            // The credentials of now, as every later request on this connection will use.
            let creds = self.creds.borrow().clone().unwrap_or_else(|| creds.clone());
            return match self.pool.get(dst, identity, &creds).await {
                Ok(Got::Pooled(pooled)) => {
                    let ctx = self.ctx(Some(pooled.info.clone()));
                    let route = Arc::new(Route::new(
                        self.pool.clone(),
                        dst,
                        identity.clone(),
                        self.creds.clone(),
                        pooled,
                    ));
                    serve_http(app, protocol, Upstream::Pooled(route), ctx).await
                }
                Ok(Got::Dedicated(tls, info)) => {
                    Box::pin(relay(app, tls, self.ctx(Some(info)))).await
                }
                Err(e) => self.dial_failed(dst, e),
            };
        }
        Box::pin(self.dedicated(app, dst, identity, creds)).await
    }

    /// A mutual-TLS connection of its own for `app`, relayed byte for byte.
    async fn dedicated(
        &self,
        app: Prefixed<TcpStream>,
        dst: SocketAddr,
        identity: &SpiffeId,
        creds: &Arc<Creds>,
    ) {
        let config = creds.client.clone();
        match dial(
            dst,
            identity,
            config,
            self.connect_timeout,
            self.handshake_timeout,
        )
        .await
        {
            Ok((tls, info)) => relay(app, tls, self.ctx(Some(info))).await,
            Err(e) => self.dial_failed(dst, e),
        }
    }

    fn dial_failed(&self, dst: SocketAddr, e: DialError) {
        match e {
            DialError::Connect(_) | DialError::Http2(_) | DialError::Shared => self
                .metrics
                .refuse(Direction::outbound, Refusal::upstream_unreachable),
            DialError::Handshake(reason, detail) => self.handshake_failed(reason, dst, &detail),
        }
    }

    fn handshake_failed(&self, reason: HandshakeError, dst: SocketAddr, detail: &str) {
        tracing::warn!(%dst, ?reason, detail, "mutual TLS to a meshed destination failed; connection refused");
        self.metrics.handshake_error(Direction::outbound, reason);
        self.metrics
            .refuse(Direction::outbound, Refusal::tls_handshake);
    }

    fn ctx(&self, tls: Option<TlsInfo>) -> RelayCtx {
        RelayCtx {
            metrics: self.metrics.clone(),
            events: self.events.clone(),
            direction: Direction::outbound,
            tls,
            limits: self.limits,
            drain: self.drain.clone(),
            tracer: self.tracer.clone(),
            authz: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_decisions() {
        let id = SpiffeId::parse("spiffe://td/ns/b/sa/web").expect("valid");
        let dst: SocketAddr = "10.0.0.2:8080".parse().expect("valid");
        let own: Vec<SocketAddr> = vec![
            "0.0.0.0:15001".parse().expect("valid"),
            "127.0.0.1:7000".parse().expect("valid"),
        ];
        let meshed = Resolution::Meshed(id.clone());
        let mesh = Plan::Mesh {
            dst,
            identity: id.clone(),
        };
        let (b1, b2, b3): (SocketAddr, SocketAddr, SocketAddr) = (
            "10.244.1.7:8080".parse().expect("valid"),
            "10.244.2.9:8080".parse().expect("valid"),
            "10.244.3.3:8080".parse().expect("valid"),
        );
        let backend = |addr, resolution| crate::discovery::Backend { addr, resolution };
        let service = Resolution::Service(
            vec![
                backend(b1, meshed.clone()),
                backend(b2, Resolution::Unknown),
                backend(b3, Resolution::NotMeshed),
            ]
            .into(),
        );
        let vip: SocketAddr = "10.96.0.10:80".parse().expect("valid");
        let cases: Vec<(&str, SocketAddr, Resolution, bool, usize, Plan)> = vec![
            (
                "a Service: the first known backend, with its identity",
                vip,
                service.clone(),
                true,
                0,
                Plan::Mesh {
                    dst: b1,
                    identity: id.clone(),
                },
            ),
            (
                "a Service: the next pick skips the unknown backend",
                vip,
                service.clone(),
                true,
                1,
                Plan::Passthrough(b3),
            ),
            (
                "a Service: picks wrap around",
                vip,
                service.clone(),
                true,
                2,
                Plan::Mesh {
                    dst: b1,
                    identity: id.clone(),
                },
            ),
            (
                "a Service's meshed backend without a certificate: refused",
                vip,
                service.clone(),
                false,
                0,
                Plan::Refuse(Refusal::no_certificate),
            ),
            (
                "a Service whose backends are all unknown: refused",
                vip,
                Resolution::Service(vec![backend(b2, Resolution::Unknown)].into()),
                true,
                7,
                Plan::Refuse(Refusal::discovery_unavailable),
            ),
            (
                "a Service with no backend: refused, never plaintext to the ClusterIP",
                vip,
                Resolution::Service(vec![].into()),
                true,
                0,
                Plan::Refuse(Refusal::upstream_unreachable),
            ),
            (
                "meshed, have a certificate",
                dst,
                meshed.clone(),
                true,
                0,
                mesh,
            ),
            (
                "meshed, no certificate: never fail open",
                dst,
                meshed.clone(),
                false,
                0,
                Plan::Refuse(Refusal::no_certificate),
            ),
            (
                "not meshed: pass through",
                dst,
                Resolution::NotMeshed,
                true,
                0,
                Plan::Passthrough(dst),
            ),
            (
                "not meshed, no certificate: still pass through",
                dst,
                Resolution::NotMeshed,
                false,
                0,
                Plan::Passthrough(dst),
            ),
            (
                "unknown: refuse rather than risk plaintext",
                dst,
                Resolution::Unknown,
                true,
                0,
                Plan::Refuse(Refusal::discovery_unavailable),
            ),
            (
                "to our own capture port on loopback",
                "127.0.0.1:15001".parse().expect("valid"),
                Resolution::NotMeshed,
                true,
                0,
                Plan::Refuse(Refusal::loop_detected),
            ),
            (
                "to our own route listener",
                "127.0.0.1:7000".parse().expect("valid"),
                meshed.clone(),
                true,
                0,
                Plan::Refuse(Refusal::loop_detected),
            ),
            (
                "same port elsewhere is fine",
                "10.0.0.9:15001".parse().expect("valid"),
                Resolution::NotMeshed,
                true,
                0,
                Plan::Passthrough("10.0.0.9:15001".parse().expect("valid")),
            ),
        ];
        for (name, dst, resolution, have_creds, pick, want) in cases {
            assert_eq!(
                decide(dst, &own, &resolution, have_creds, pick),
                want,
                "{name}"
            );
        }
    }
}
