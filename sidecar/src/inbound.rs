//! Inbound: a connection arrives for the local app; we look at its first bytes, decide
//! terminate, pass through or refuse, then act.
//!
//! A TLS ClientHello offering meshlet's ALPN is terminated with mutual TLS (the client
//! must present a valid SVID of our trust domain) and forwarded in plaintext to the app;
//! on a pooled connection (`meshlet/h2`), request by request.
//! Anything else is passed through untouched in permissive mode and refused in strict mode.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use meshlet_identity::cert::svid_id;
use meshlet_identity::{MESH_ALPN, POOLED_ALPN};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::app_clients::AppClients;
use crate::detect::Protocol;
use crate::detect::{self, Hello};
use crate::http::Upstream;
use crate::identity::Creds;
use crate::io::{Prefixed, sniff};
use crate::metrics::{ConnEvent, Direction, HandshakeError, Metrics, Refusal, TlsInfo};
use crate::pool::peer_not_after;
use crate::relay::{
    InboundAuthz, Limits, PolicyRx, RelayCtx, connect, no_policy_yet, relay, serve_http,
};
use meshlet_identity::SpiffeId;
use meshlet_identity::authz::{ConnectionVerdict, MtlsMode, Target};

/// What inbound accepts besides mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    /// Plaintext and other TLS are passed through to the app.
    Permissive,
    /// Only meshlet's mutual TLS is accepted.
    Strict,
}

/// What the first bytes of an inbound connection were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// A ClientHello offering meshlet's ALPN.
    MeshTls,
    /// Some other TLS (an app's own TLS, a client outside the mesh).
    OtherTls,
    /// Not TLS.
    Plaintext,
    /// Nothing within the time box (a client waiting for the server to speak).
    Silent,
}

/// Classifies the sniffed bytes.
pub fn classify(bytes: &[u8]) -> Sniffed {
    match detect::client_hello(bytes) {
        Hello::Tls { alpn } if alpn.iter().any(|p| p == MESH_ALPN || p == POOLED_ALPN) => {
            Sniffed::MeshTls
        }
        Hello::Tls { .. } => Sniffed::OtherTls,
        Hello::NotTls => Sniffed::Plaintext,
        Hello::NeedMore if bytes.is_empty() => Sniffed::Silent,
        // A partial record that never completed in time: not something we can terminate.
        Hello::NeedMore => Sniffed::OtherTls,
    }
}

/// What to do with one inbound connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Terminate mutual TLS, then forward plaintext to the app at this address.
    Terminate(SocketAddr),
    /// Forward the bytes untouched to the app at this address.
    Passthrough(SocketAddr),
    Refuse(Refusal),
}

/// Decides an inbound connection meant for `app`. `own` are the sidecar's listeners.
pub fn decide(
    sniffed: Sniffed,
    mode: InboundMode,
    have_creds: bool,
    app: SocketAddr,
    own: &[SocketAddr],
) -> Plan {
    if own
        .iter()
        .any(|o| o.port() == app.port() && (o.ip() == app.ip() || o.ip().is_unspecified()))
    {
        return Plan::Refuse(Refusal::loop_detected);
    }
    match (sniffed, mode) {
        (Sniffed::MeshTls, _) if have_creds => Plan::Terminate(app),
        (Sniffed::MeshTls, _) => Plan::Refuse(Refusal::no_certificate),
        (_, InboundMode::Permissive) => Plan::Passthrough(app),
        (_, InboundMode::Strict) => Plan::Refuse(Refusal::plaintext_in_strict_mode),
    }
}

/// Cancels `drain` at `until`, or when the credentials change (a renewal or a new trust
/// bundle), whichever comes first; returns early once `drain` is cancelled by others.
async fn close_pooled(
    drain: CancellationToken,
    until: SystemTime,
    mut creds: watch::Receiver<Option<Arc<Creds>>>,
) {
    creds.borrow_and_update();
    let left = until.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::select! {
        _ = drain.cancelled() => return,
        _ = tokio::time::sleep(left) => tracing::debug!("a certificate of a pooled connection expired"),
        _ = creds.changed() => tracing::debug!("new credentials: pooled connection wound down"),
    }
    drain.cancel();
}

/// The inbound side of the sidecar.
#[derive(Debug)]
pub struct Inbound {
    pub creds: watch::Receiver<Option<Arc<Creds>>>,
    pub metrics: Arc<Metrics>,
    pub events: tokio::sync::broadcast::Sender<ConnEvent>,
    pub mode: InboundMode,
    /// Explicit mode: where the app listens. Transparent mode: None (the original
    /// destination is the app).
    pub app_addr: Option<SocketAddr>,
    pub own: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub limits: Limits,
    pub drain: CancellationToken,
    pub tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
    /// The authorization policy this workload enforces (from the control plane).
    pub policy: PolicyRx,
    /// This workload's namespace and service account, from its token: known even before
    /// (or after) it holds a valid certificate.
    pub workload: Option<(String, String)>,
    /// Keep-alive connections to the app for requests that arrive on pooled connections.
    pub app_clients: Arc<AppClients>,
}

impl Inbound {
    /// Handles one connection whose original destination is `dst`.
    pub async fn handle(self: Arc<Self>, mut conn: TcpStream, dst: SocketAddr) {
        let app = self.app_addr.unwrap_or(dst);
        let mut first = BytesMut::new();
        let enough = |b: &[u8]| detect::client_hello(b) != Hello::NeedMore;
        if sniff(
            &mut conn,
            &mut first,
            self.limits.sniff_timeout,
            detect::MAX_SNIFF,
            enough,
        )
        .await
        .is_err()
        {
            return;
        }
        let creds = self
            .creds
            .borrow()
            .clone()
            .filter(|c| c.valid_at(SystemTime::now()));
        // The namespace's mTLS mode in the policy, if it sets one, overrides --inbound-mode.
        let namespace = self.workload.as_ref().map(|(ns, _)| ns.as_str());
        let mode = namespace
            .and_then(|ns| self.policy.borrow().as_deref().and_then(|p| p.mode(ns)))
            .map_or(self.mode, |m| match m {
                MtlsMode::Strict => InboundMode::Strict,
                MtlsMode::Permissive => InboundMode::Permissive,
            });
        let plan = decide(classify(&first), mode, creds.is_some(), app, &self.own);
        tracing::debug!(%dst, ?plan, "inbound");
        let conn = Prefixed::new(first, conn);
        match (plan, creds) {
            (Plan::Refuse(reason), _) => self.metrics.refuse(Direction::inbound, reason),
            (Plan::Passthrough(app), _) => {
                let Ok(authz) = self.authorize(app.port(), None) else {
                    return;
                };
                match connect(app, self.connect_timeout).await {
                    Ok(upstream) => Box::pin(relay(conn, upstream, self.ctx(None, authz))).await,
                    Err(_) => self
                        .metrics
                        .refuse(Direction::inbound, Refusal::upstream_unreachable),
                }
            }
            // Boxed: the TLS state is large, and a task's future is as large as its
            // largest state.
            (Plan::Terminate(app), Some(creds)) => {
                Box::pin(self.terminate(conn, app, &creds)).await
            }
            (Plan::Terminate(_), None) => self
                .metrics
                .refuse(Direction::inbound, Refusal::no_certificate),
        }
    }

    async fn terminate(&self, conn: Prefixed<TcpStream>, app: SocketAddr, creds: &Creds) {
        let acceptor = tokio_rustls::TlsAcceptor::from(creds.server.clone());
        let tls = match tokio::time::timeout(self.handshake_timeout, acceptor.accept(conn)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return self.handshake_failed(HandshakeError::of(&e), &e.to_string()),
            Err(_) => return self.handshake_failed(HandshakeError::timeout, "timed out"),
        };
        // The client verifier accepted a chain to our bundle and an ID of our trust domain.
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| svid_id(leaf).ok());
        let Some(peer) = peer else {
            return self.handshake_failed(HandshakeError::no_peer_certificate, "no client SVID");
        };
        let Ok(authz) = self.authorize(app.port(), Some(peer.clone())) else {
            return;
        };
        let info = TlsInfo::of(tls.get_ref().1, peer.to_string());
        if tls.get_ref().1.alpn_protocol() == Some(POOLED_ALPN) {
            // Many app connections' requests as HTTP/2 streams: each to the app in the
            // protocol it was sent in, each checked against the policy. A pooled connection
            // lives long: it is wound down (GOAWAY) when either certificate expires or our
            // credentials or trust bundle change, and the client dials again.
            let until = peer_not_after(tls.get_ref().1).min(creds.not_after);
            let drain = self.drain.child_token();
            tokio::spawn(close_pooled(drain.clone(), until, self.creds.clone()));
            let mut ctx = self.ctx(Some(info), authz);
            ctx.drain = drain.clone();
            let upstream = Upstream::App(self.app_clients.clone(), app);
            serve_http(tls, Protocol::Http2, upstream, ctx).await;
            drain.cancel();
            return;
        }
        let Ok(upstream) = connect(app, self.connect_timeout).await else {
            return self
                .metrics
                .refuse(Direction::inbound, Refusal::upstream_unreachable);
        };
        relay(tls, upstream, self.ctx(Some(info), authz)).await;
    }

    fn handshake_failed(&self, reason: HandshakeError, detail: &str) {
        tracing::warn!(
            ?reason,
            detail,
            "inbound mutual TLS failed; connection refused"
        );
        self.metrics.handshake_error(Direction::inbound, reason);
        self.metrics
            .refuse(Direction::inbound, Refusal::tls_handshake);
    }

    /// The connection-level authorization decision for `peer` (None: plaintext) calling
    /// this workload on `port`. `Err`: denied (counted and logged; close the connection).
    /// `Ok(Some)`: the policy to check each HTTP request against.
    fn authorize(
        &self,
        port: u16,
        peer: Option<SpiffeId>,
    ) -> Result<Option<Arc<InboundAuthz>>, ()> {
        let target = self
            .workload
            .as_ref()
            .map(|(namespace, service_account)| Target {
                namespace,
                service_account,
                port,
            });
        // Not knowing who we are, or having no policy yet: refuse (never fail open).
        let verdict = match (target.as_ref(), self.policy.borrow().as_deref()) {
            (Some(target), Some(policy)) => policy.connection(target, peer.as_ref()),
            (None, _) => ConnectionVerdict::Deny(meshlet_identity::authz::Decision {
                allowed: false,
                rule: "this workload's identity is unknown (no readable token)".into(),
            }),
            (_, None) => ConnectionVerdict::Deny(no_policy_yet()),
        };
        let Some(target) = target else {
            self.metrics.authz(Direction::inbound, false);
            self.metrics
                .refuse(Direction::inbound, Refusal::authz_denied);
            return Err(());
        };
        let http_only = match verdict {
            ConnectionVerdict::Allow(_) => {
                self.metrics.authz(Direction::inbound, true);
                false
            }
            ConnectionVerdict::PerRequest => true,
            ConnectionVerdict::Deny(d) => {
                self.metrics.authz(Direction::inbound, false);
                self.metrics
                    .refuse(Direction::inbound, Refusal::authz_denied);
                let peer = peer.as_ref().map_or("plaintext", |p| p.as_str());
                tracing::info!(peer, rule = %d.rule, "connection denied by policy");
                return Err(());
            }
        };
        Ok(Some(Arc::new(InboundAuthz {
            policy: self.policy.clone(),
            namespace: target.namespace.to_owned(),
            service_account: target.service_account.to_owned(),
            port,
            peer,
            http_only,
        })))
    }

    fn ctx(&self, tls: Option<TlsInfo>, authz: Option<Arc<InboundAuthz>>) -> RelayCtx {
        RelayCtx {
            metrics: self.metrics.clone(),
            events: self.events.clone(),
            direction: Direction::inbound,
            tls,
            limits: self.limits,
            drain: self.drain.clone(),
            tracer: self.tracer.clone(),
            authz,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_decisions() {
        use InboundMode::{Permissive, Strict};
        use Sniffed::*;
        let app: SocketAddr = "10.0.0.2:8080".parse().expect("valid");
        let own: Vec<SocketAddr> = vec![
            "0.0.0.0:15006".parse().expect("valid"),
            "0.0.0.0:15000".parse().expect("valid"),
        ];
        let cases = [
            (MeshTls, Permissive, true, app, Plan::Terminate(app)),
            (MeshTls, Strict, true, app, Plan::Terminate(app)),
            (
                MeshTls,
                Strict,
                false,
                app,
                Plan::Refuse(Refusal::no_certificate),
            ),
            (
                MeshTls,
                Permissive,
                false,
                app,
                Plan::Refuse(Refusal::no_certificate),
            ),
            (Plaintext, Permissive, true, app, Plan::Passthrough(app)),
            (Plaintext, Permissive, false, app, Plan::Passthrough(app)),
            (OtherTls, Permissive, true, app, Plan::Passthrough(app)),
            (Silent, Permissive, true, app, Plan::Passthrough(app)),
            (
                Plaintext,
                Strict,
                true,
                app,
                Plan::Refuse(Refusal::plaintext_in_strict_mode),
            ),
            (
                OtherTls,
                Strict,
                true,
                app,
                Plan::Refuse(Refusal::plaintext_in_strict_mode),
            ),
            (
                Silent,
                Strict,
                true,
                app,
                Plan::Refuse(Refusal::plaintext_in_strict_mode),
            ),
            (
                MeshTls,
                Permissive,
                true,
                "10.0.0.2:15006".parse().expect("valid"),
                Plan::Refuse(Refusal::loop_detected),
            ),
            (
                Plaintext,
                Permissive,
                true,
                "10.0.0.2:15000".parse().expect("valid"),
                Plan::Refuse(Refusal::loop_detected),
            ),
        ];
        for (sniffed, mode, have_creds, app, want) in cases {
            assert_eq!(
                decide(sniffed, mode, have_creds, app, &own),
                want,
                "{sniffed:?} {mode:?} creds={have_creds} {app}"
            );
        }
    }

    #[test]
    fn first_bytes_are_classified() {
        assert_eq!(classify(b""), Sniffed::Silent);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Sniffed::Plaintext);
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x00]), Sniffed::OtherTls);
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0, 2, 0x01, 0]),
            Sniffed::OtherTls
        );
    }
}
