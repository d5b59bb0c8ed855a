//! Moving bytes once both ends are connected: detect the application protocol, then proxy
//! HTTP per request (hyper) or copy opaque TCP both ways with half-close.
//!
//! Detection races the two ends: whichever speaks first decides. A client that sends an
//! HTTP request line gets HTTP proxying; a server that speaks first (SMTP, MySQL, ...) makes
//! the connection opaque at once; if neither speaks within the time box, it is opaque.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::detect::{self, Protocol};
use crate::http;
use crate::io::{Counted, Prefixed, sniff};
use crate::metrics::{ConnEvent, ConnRecord, Direction, Metrics, TlsInfo};
use crate::trace::TcpSpan;

/// What a relay needs besides the two streams.
#[derive(Debug, Clone)]
pub struct RelayCtx {
    pub metrics: Arc<Metrics>,
    pub events: tokio::sync::broadcast::Sender<ConnEvent>,
    pub direction: Direction,
    /// Set when the hop between sidecars is mutual TLS: what was verified.
    pub tls: Option<TlsInfo>,
    pub limits: Limits,
    /// Cancelled when the sidecar drains: HTTP connections finish their requests and close.
    pub drain: CancellationToken,
    /// Spans for requests and connections, when tracing is on.
    pub tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
    /// Inbound: the policy each HTTP request is checked against.
    pub authz: Option<Arc<InboundAuthz>>,
}

/// The limits every proxied connection keeps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long to wait for a connection's first bytes before treating it as opaque.
    pub sniff_timeout: Duration,
    /// Opaque TCP: closed after this long without a byte either way. HTTP: the longest wait
    /// for a request's headers (at most [`crate::http::HEADER_READ_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// The largest HTTP request head.
    pub max_header_bytes: usize,
    /// HTTP/2 streams open at once per connection.
    pub http2_max_streams: u32,
}

/// The policy a sidecar enforces: None until the control plane has sent one (everything
/// inbound is refused until then).
pub type PolicyRx = tokio::sync::watch::Receiver<Option<Arc<meshlet_identity::authz::PolicySet>>>;

/// The decision while no policy has arrived.
pub fn no_policy_yet() -> meshlet_identity::authz::Decision {
    meshlet_identity::authz::Decision {
        allowed: false,
        rule: "no policy received from the control plane yet".into(),
    }
}

/// What an inbound connection's requests are checked against.
#[derive(Debug)]
pub struct InboundAuthz {
    pub policy: PolicyRx,
    pub namespace: String,
    pub service_account: String,
    pub port: u16,
    pub peer: Option<meshlet_identity::SpiffeId>,
    /// Only HTTP rules allow this caller: anything but HTTP is refused.
    pub http_only: bool,
}

impl InboundAuthz {
    /// Decides one request with the policy of the moment.
    pub fn request(&self, method: &str, path: &str) -> meshlet_identity::authz::Decision {
        let target = meshlet_identity::authz::Target {
            namespace: &self.namespace,
            service_account: &self.service_account,
            port: self.port,
        };
        let req = meshlet_identity::authz::Request { method, path };
        match self.policy.borrow().as_deref() {
            Some(policy) => policy.request(&target, self.peer.as_ref(), req),
            None => no_policy_yet(),
        }
    }
}

/// Relays `down` (the side that connected to us) and `up` (the side we connected to) until
/// both are done. Only mutual-TLS connections are inspected for HTTP; everything else is
/// passed through untouched, byte for byte.
pub async fn relay<D, U>(mut down: D, mut up: U, ctx: RelayCtx)
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut record = ConnRecord::new(
        ctx.metrics.clone(),
        ctx.events.clone(),
        ctx.direction,
        ctx.tls.clone(),
    );
    let mut down_buf = BytesMut::new();
    let mut up_buf = BytesMut::new();
    let protocol = if ctx.tls.is_some() {
        tokio::select! {
            sniffed = sniff(&mut down, &mut down_buf, ctx.limits.sniff_timeout, detect::MAX_SNIFF, |b| detect::protocol(b).is_some()) => {
                match sniffed {
                    Ok(_) => detect::protocol(&down_buf).unwrap_or(Protocol::Opaque),
                    Err(_) => return,
                }
            }
            // The server spoke first (or closed): not HTTP.
            _ = up.read_buf(&mut up_buf) => Protocol::Opaque,
        }
    } else {
        Protocol::Opaque
    };
    record.protocol = label(protocol);
    let mut down = Counted::new(Prefixed::new(down_buf, down), record.bytes.clone());
    let mut up = Prefixed::new(up_buf, up);
    if protocol == Protocol::Opaque && ctx.authz.as_ref().is_some_and(|a| a.http_only) {
        ctx.metrics.authz(ctx.direction, false);
        ctx.metrics
            .refuse(ctx.direction, crate::metrics::Refusal::authz_denied);
        tracing::info!("denied: only HTTP requests are allowed for this caller");
        return;
    }
    match protocol {
        Protocol::Opaque => {
            let peer = ctx.tls.as_ref().map(|t| t.peer.as_str());
            let span = ctx
                .tracer
                .as_ref()
                .map(|t| TcpSpan::start(t, ctx.direction, peer));
            copy_until_idle(&mut down, &mut up, &record.bytes, ctx.limits.idle_timeout).await;
            if let Some(span) = span {
                span.finish(record.bytes.load(std::sync::atomic::Ordering::Relaxed));
            }
        }
        Protocol::Http1 | Protocol::Http2 => Box::pin(http::proxy(down, up, protocol, &ctx)).await,
    }
    drop(record);
}

fn label(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Http1 => "http1",
        Protocol::Http2 => "http2",
        Protocol::Opaque => "opaque",
    }
}

/// Serves an HTTP client whose protocol is already known, sending its requests to
/// `upstream` (a pooled connection between sidecars, or the app behind one).
pub async fn serve_http<D>(down: D, protocol: Protocol, upstream: http::Upstream, ctx: RelayCtx)
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut record = ConnRecord::new(
        ctx.metrics.clone(),
        ctx.events.clone(),
        ctx.direction,
        ctx.tls.clone(),
    );
    record.protocol = label(protocol);
    let down = Counted::new(down, record.bytes.clone());
    http::serve(down, protocol, upstream, &ctx).await;
    drop(record);
}

/// Copies both ways with half-close until both sides are done, or until no byte moved
/// for `idle`.
async fn copy_until_idle<A, B>(
    a: &mut A,
    b: &mut B,
    bytes: &std::sync::atomic::AtomicU64,
    idle: Duration,
) where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use std::sync::atomic::Ordering;
    let copy = tokio::io::copy_bidirectional(a, b);
    tokio::pin!(copy);
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(10)));
    let (mut seen, mut since) = (bytes.load(Ordering::Relaxed), tokio::time::Instant::now());
    loop {
        tokio::select! {
            done = &mut copy => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "TCP relay ended with an error");
                }
                return;
            }
            _ = tick.tick() => {
                let now = bytes.load(Ordering::Relaxed);
                if now != seen {
                    (seen, since) = (now, tokio::time::Instant::now());
                } else if since.elapsed() >= idle {
                    tracing::debug!(?idle, "idle TCP connection closed");
                    return;
                }
            }
        }
    }
}

/// Connects to `dst` within `timeout`, with Nagle off.
pub async fn connect(dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
