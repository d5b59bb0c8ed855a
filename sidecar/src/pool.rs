//! Connections between sidecars, reused.
//!
//! Outbound HTTP to a meshed destination travels as HTTP/2 streams over one mutual-TLS
//! connection per destination and identity (ALPN `meshlet/h2`), shared by every app
//! connection: a new app connection costs no handshake. [`Pool::get`] dials at most one
//! connection per destination at a time, and replaces it when it has closed or when this
//! sidecar's certificate or trust bundle changed (a pooled connection never outlives the
//! credentials it was made with). A peer that does not offer the pooled protocol (an older
//! sidecar) negotiates `meshlet/1`, and its connection serves that one app connection alone.
//!
//! A pooled connection is also left when the peer's certificate expires; a dial that fails
//! fails every request that waited for it (one timeout, not one each); a peer found not to
//! speak the pooled protocol is remembered for [`OLD_PEER`], and dialled without waiting.
//! A request the peer did not process (its connection closed or was going away) is sent once
//! more on another connection ([`crate::replay`]), and that connection is not used again.
//!
//! Each pooled request carries its original protocol in [`ORIG_PROTO`]; inbound,
//! [`crate::app_clients`] sends it to the app in that protocol.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshlet_identity::{Expected, POOLED_ALPN, SpiffeId};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::identity::Creds;
use crate::metrics::{HandshakeError, TlsInfo};
use crate::relay::connect;
use crate::replay::{Replay, ReqBody, not_processed};

/// The header that tells the inbound sidecar how the app spoke a pooled request:
/// `HTTP/1.1` or `HTTP/2`. Set by the outbound sidecar (a client's own value is replaced)
/// and removed before the request reaches the app.
pub const ORIG_PROTO: &str = "meshlet-orig-proto";

/// A pooled connection unused this long is closed.
pub const IDLE: Duration = Duration::from_secs(90);

/// How long a peer that negotiated `meshlet/1` is dialled without trying the pool.
pub const OLD_PEER: Duration = Duration::from_secs(60);

/// HTTP/2 flow control on pooled connections: one slow stream can hold at most its own
/// window, a sixteenth of the connection's, so it never stalls the others.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * STREAM_WINDOW;

/// A mutual-TLS connection to a peer sidecar.
pub type MeshTls = tokio_rustls::client::TlsStream<TcpStream>;

/// Why a connection to a peer sidecar could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("mutual TLS: {1}")]
    Handshake(HandshakeError, String),
    #[error("HTTP/2 over mutual TLS: {0}")]
    Http2(hyper::Error),
    #[error("the connection this request waited for could not be made")]
    Shared,
}

/// Connects to `dst` with mutual TLS (`config`), and checks that the peer presents
/// `identity`: the chain is validated in the handshake, the exact ID here.
pub async fn dial(
    dst: SocketAddr,
    identity: &SpiffeId,
    config: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
) -> Result<(MeshTls, TlsInfo), DialError> {
    let tcp = connect(dst, connect_timeout)
        .await
        .map_err(DialError::Connect)?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let handshake = connector.connect(ServerName::IpAddress(dst.ip().into()), tcp);
    let tls = match tokio::time::timeout(handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(DialError::Handshake(HandshakeError::of(&e), e.to_string())),
        Err(_) => {
            return Err(DialError::Handshake(
                HandshakeError::timeout,
                "timed out".into(),
            ));
        }
    };
    let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        return Err(DialError::Handshake(
            HandshakeError::no_peer_certificate,
            "no certificate".into(),
        ));
    };
    if let Err(e) = Expected::Exact(identity.clone()).check(leaf) {
        return Err(DialError::Handshake(
            HandshakeError::wrong_identity,
            e.to_string(),
        ));
    }
    let info = TlsInfo::of(tls.get_ref().1, identity.to_string());
    Ok((tls, info))
}

/// A pooled connection: send requests on clones of `sender`.
#[derive(Debug, Clone)]
pub struct Pooled {
    pub sender: client2::SendRequest<ReqBody>,
    pub info: TlsInfo,
    /// Set when a request found the connection going away: no request is sent on it again.
    closing: Arc<AtomicBool>,
    creds: Arc<Creds>,
    /// When the peer's certificate expires: the connection is not used after.
    peer_not_after: SystemTime,
    /// Its slot's last use, for [`Pool::sweep`].
    last_used: Arc<AtomicU64>,
}

impl Pooled {
    /// Whether a request made with `creds` may ride this connection now.
    fn usable(&self, creds: &Arc<Creds>) -> bool {
        Arc::ptr_eq(&self.creds, creds)
            && !self.sender.is_closed()
            && !self.closing.load(Ordering::Relaxed)
            && SystemTime::now() < self.peer_not_after
    }
}

/// When the peer certificate of `conn` expires (the epoch, i.e. already, when unknown).
pub fn peer_not_after(conn: &rustls::CommonState) -> SystemTime {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| meshlet_identity::cert::summarize(leaf).ok())
        .map_or(SystemTime::UNIX_EPOCH, |s| s.not_after.into())
}

/// What [`Pool::get`] found.
#[derive(Debug)]
pub enum Got {
    Pooled(Pooled),
    /// The peer does not speak the pooled protocol: a connection for one app connection.
    Dedicated(Box<MeshTls>, TlsInfo),
}

#[derive(Debug, Default)]
struct Slot {
    state: tokio::sync::Mutex<SlotState>,
    /// Milliseconds since the pool's epoch; the connection's routes keep it current.
    last_used: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct SlotState {
    pooled: Option<Pooled>,
    /// When the last dial failed: requests that waited for that dial fail with it.
    failed_at: Option<Instant>,
    /// Until when the peer is known not to speak the pooled protocol.
    old_peer_until: Option<Instant>,
}

/// The outbound sidecar's pooled connections.
#[derive(Debug)]
pub struct Pool {
    slots: DashMap<(SocketAddr, SpiffeId), Arc<Slot>>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    epoch: Instant,
}

impl Pool {
    pub fn new(connect_timeout: Duration, handshake_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            slots: DashMap::new(),
            connect_timeout,
            handshake_timeout,
            epoch: Instant::now(),
        })
    }

    /// The connection to `dst` (which must present `identity`) made with `creds`: the
    /// pooled one while it is open, else a new one.
    pub async fn get(
        &self,
        dst: SocketAddr,
        identity: &SpiffeId,
        creds: &Arc<Creds>,
    ) -> Result<Got, DialError> {
        let slot = self
            .slots
            .entry((dst, identity.clone()))
            .or_default()
            .clone();
        slot.last_used.store(self.now_ms(), Ordering::Relaxed);
        let arrived = Instant::now();
        // One dial per destination at a time; the others wait for it and share its outcome.
        let mut state = slot.state.lock().await;
        if let Some(pooled) = state.pooled.as_ref().filter(|p| p.usable(creds)) {
            return Ok(Got::Pooled(pooled.clone()));
        }
        if state.failed_at.is_some_and(|t| t >= arrived) {
            return Err(DialError::Shared);
        }
        if state.old_peer_until.is_some_and(|t| t > Instant::now()) {
            drop(state);
            let config = creds.client.clone();
            let (tls, info) = Box::pin(dial(
                dst,
                identity,
                config,
                self.connect_timeout,
                self.handshake_timeout,
            ))
            .await?;
            return Ok(Got::Dedicated(Box::new(tls), info));
        }
        state.pooled = None;
        let connected = Box::pin(self.connect(dst, identity, creds, &slot.last_used)).await;
        state.failed_at = connected.is_err().then(Instant::now);
        match connected? {
            Got::Pooled(pooled) => {
                state.pooled = Some(pooled.clone());
                Ok(Got::Pooled(pooled))
            }
            dedicated => {
                state.old_peer_until = Some(Instant::now() + OLD_PEER);
                Ok(dedicated)
            }
        }
    }

    /// Dials `dst` offering the pooled protocol; HTTP/2 on top when the peer takes it.
    async fn connect(
        &self,
        dst: SocketAddr,
        identity: &SpiffeId,
        creds: &Arc<Creds>,
        last_used: &Arc<AtomicU64>,
    ) -> Result<Got, DialError> {
        let (tls, info) = dial(
            dst,
            identity,
            creds.pooled_client.clone(),
            self.connect_timeout,
            self.handshake_timeout,
        )
        .await?;
        if tls.get_ref().1.alpn_protocol() != Some(POOLED_ALPN) {
            return Ok(Got::Dedicated(Box::new(tls), info));
        }
        let peer_not_after = peer_not_after(tls.get_ref().1);
        let (sender, driver) = client2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .header_table_size(crate::http::HEADER_TABLE_SIZE)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(DialError::Http2)?;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(%dst, error = %e, "pooled connection ended");
            }
        });
        Ok(Got::Pooled(Pooled {
            sender,
            info,
            closing: Arc::default(),
            creds: creds.clone(),
            peer_not_after,
            last_used: last_used.clone(),
        }))
    }

    /// Closes connections unused for [`IDLE`], every few seconds until `stop`.
    pub async fn sweep(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(IDLE / 6);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let idle_since = self.now_ms().saturating_sub(IDLE.as_millis() as u64);
            self.slots
                .retain(|_, slot| slot.last_used.load(Ordering::Relaxed) >= idle_since);
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Why a request could not be sent to the peer or the app.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("no valid certificate: mesh traffic refused")]
    NoCertificate,
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("the peer sidecar does not speak the pooled protocol")]
    NotPooled,
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    App(#[from] hyper_util::client::legacy::Error),
    #[error("connecting to the app: {0}")]
    AppConnect(std::io::Error),
}

/// Where one app connection's requests go: a meshed destination, through the pool. The
/// connection in use is kept here, so a request goes to the pool only when it is no longer
/// usable.
#[derive(Debug)]
pub struct Route {
    pool: Arc<Pool>,
    dst: SocketAddr,
    identity: SpiffeId,
    creds: watch::Receiver<Option<Arc<Creds>>>,
    current: std::sync::Mutex<Option<Pooled>>,
}

impl Route {
    pub fn new(
        pool: Arc<Pool>,
        dst: SocketAddr,
        identity: SpiffeId,
        creds: watch::Receiver<Option<Arc<Creds>>>,
        current: Pooled,
    ) -> Self {
        Self {
            pool,
            dst,
            identity,
            creds,
            current: std::sync::Mutex::new(Some(current)),
        }
    }

    /// A sender on the connection in use, else on the pool's (dialled if need be), and that
    /// connection's `closing` flag.
    async fn sender(
        &self,
        creds: &Arc<Creds>,
    ) -> Result<(client2::SendRequest<ReqBody>, Arc<AtomicBool>), SendError> {
        let now = self.pool.now_ms();
        let cached = self.current.lock().ok().and_then(|current| {
            let pooled = current.as_ref().filter(|p| p.usable(creds))?;
            pooled.last_used.store(now, Ordering::Relaxed);
            Some((pooled.sender.clone(), pooled.closing.clone()))
        });
        if let Some(cached) = cached {
            return Ok(cached);
        }
        let Got::Pooled(pooled) = self.pool.get(self.dst, &self.identity, creds).await? else {
            return Err(SendError::NotPooled);
        };
        let got = (pooled.sender.clone(), pooled.closing.clone());
        if let Ok(mut current) = self.current.lock() {
            *current = Some(pooled);
        }
        Ok(got)
    }

    /// An upgrade (WebSocket) gets a connection of its own, made for it.
    async fn send_upgrade(
        &self,
        creds: &Creds,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, SendError> {
        let (tls, _) = dial(
            self.dst,
            &self.identity,
            creds.client.clone(),
            self.pool.connect_timeout,
            self.pool.handshake_timeout,
        )
        .await?;
        let (mut sender, conn) = client1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn.with_upgrades());
        Ok(sender.send_request(req).await?)
    }

    /// Sends one request from the app. Upgrades (WebSocket) cannot ride an HTTP/2 stream:
    /// they get a connection of their own.
    pub async fn send(&self, mut req: Request<Incoming>) -> Result<Response<Incoming>, SendError> {
        let creds = self
            .creds
            .borrow()
            .clone()
            .filter(|c| c.valid_at(SystemTime::now()))
            .ok_or(SendError::NoCertificate)?;
        if req.headers().contains_key(http::header::UPGRADE) {
            // Boxed: the dial and HTTP/1.1 handshake would otherwise make every request's
            // future (which hyper keeps per connection and per stream) 2 KB larger.
            return Box::pin(self.send_upgrade(&creds, req)).await;
        }
        to_pooled(&mut req, self.dst);
        // A request the peer did not process (the connection closed or was going away under
        // it) goes once more, on another connection: hyper hands back one it never sent, and
        // one without a body is built again from its head.
        let mut replay = Replay::of(&req);
        let mut req = req.map(ReqBody::App);
        let mut retried = false;
        loop {
            let (mut sender, closing) = self.sender(&creds).await?;
            let failed = match sender.ready().await {
                Err(e) => e,
                Ok(()) => match sender.try_send_request(req).await {
                    Ok(resp) => return Ok(resp),
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => {
                            req = unsent;
                            e.into_error()
                        }
                        None => {
                            let e = e.into_error();
                            match replay.take().filter(|_| not_processed(&e)) {
                                Some(head) => req = head.request(),
                                None => return Err(e.into()),
                            }
                            e
                        }
                    },
                },
            };
            closing.store(true, Ordering::Relaxed);
            if retried {
                return Err(failed.into());
            }
            retried = true;
        }
    }
}

/// Rewrites an app's request for a pooled HTTP/2 stream: its protocol in [`ORIG_PROTO`]
/// (replacing any value the client sent), and an absolute URI (from `Host`, else the
/// destination), which HTTP/2 needs.
pub fn to_pooled(req: &mut Request<Incoming>, dst: SocketAddr) {
    let orig = match req.version() {
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    };
    req.headers_mut()
        .insert(ORIG_PROTO, HeaderValue::from_static(orig));
    if req.uri().authority().is_none() {
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .unwrap_or_else(|| authority_of(dst));
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        if let Ok(uri) = Uri::builder()
            .scheme("http")
            .authority(host)
            .path_and_query(path)
            .build()
        {
            *req.uri_mut() = uri;
        }
    }
    *req.version_mut() = Version::HTTP_2;
}

pub(crate) fn authority_of(addr: SocketAddr) -> http::uri::Authority {
    addr.to_string()
        .parse()
        .expect("a socket address is a valid URI authority")
}
