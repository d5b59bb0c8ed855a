//! Inbound, behind a pooled connection: each request goes to the app in the protocol the
//! app's caller spoke ([`ORIG_PROTO`]), over keep-alive connections kept per app address.
//!
//! Connections are shared by every caller, so they are keyed by the app's address alone,
//! never by anything a request says: HTTP/1.1 requests use a small keep-alive pool (the
//! request keeps its `Host`), HTTP/2 requests share one connection (and keep `:authority`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::DashMap;
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http2 as client2;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::http::{HEADER_TABLE_SIZE, own_values};
use crate::pool::{ORIG_PROTO, SendError};
use crate::relay::connect;

/// Idle HTTP/1.1 connections kept per app address.
const MAX_IDLE_PER_APP: usize = 64;

/// Keep-alive clients to the app.
#[derive(Debug, Default)]
pub struct AppClients {
    h1: DashMap<SocketAddr, Client<AppConnector, Incoming>>,
    h2: DashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<client2::SendRequest<Incoming>>>>>,
    connect_timeout: Duration,
    /// How long an HTTP/1.1 connection may wait unused in the pool and still be used:
    /// less than the app's own keep-alive timeout, so that no request races the app's close.
    idle: Duration,
}

impl AppClients {
    pub fn new(connect_timeout: Duration, idle: Duration) -> Self {
        Self {
            connect_timeout,
            idle,
            ..Self::default()
        }
    }

    /// Sends a request that arrived on a pooled connection to the app at `app`, in the
    /// protocol [`ORIG_PROTO`] names (HTTP/1.1 when absent).
    pub async fn send(
        &self,
        app: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Result<Response<Incoming>, SendError> {
        let h2 = req
            .headers_mut()
            .remove(ORIG_PROTO)
            .is_some_and(|v| v.as_bytes() == b"HTTP/2");
        if h2 {
            *req.version_mut() = Version::HTTP_2;
            // Boxed: its connect-and-handshake state would make every request's future larger.
            return Box::pin(self.send_h2(app, req)).await;
        }
        // HTTP/1.1: the request keeps its Host; the URI names the app, which keys the pool.
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(http::header::HOST)
            && let Some(authority) = req.uri().authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(http::header::HOST, host);
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(crate::pool::authority_of(app));
        parts.path_and_query = req
            .uri()
            .path_and_query()
            .cloned()
            .or(Some(http::uri::PathAndQuery::from_static("/")));
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        let client = self
            .h1
            .entry(app)
            .or_insert_with(|| {
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(self.idle)
                    .pool_max_idle_per_host(if self.idle.is_zero() {
                        0
                    } else {
                        MAX_IDLE_PER_APP
                    })
                    .build(AppConnector {
                        app,
                        timeout: self.connect_timeout,
                    })
            })
            .clone();
        Ok(client.request(req).await?)
    }

    /// HTTP/2 to the app: one shared connection per app address, made again when it closes.
    async fn send_h2(
        &self,
        app: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Result<Response<Incoming>, SendError> {
        own_values(req.headers_mut());
        let slot = self.h2.entry(app).or_default().clone();
        let mut sender = {
            let mut conn = slot.lock().await;
            match conn.as_ref().filter(|s| !s.is_closed()) {
                Some(sender) => sender.clone(),
                None => {
                    let tcp = connect(app, self.connect_timeout)
                        .await
                        .map_err(SendError::AppConnect)?;
                    let (sender, driver) = client2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .header_table_size(HEADER_TABLE_SIZE)
                        .handshake(TokioIo::new(tcp))
                        .await?;
                    tokio::spawn(driver);
                    *conn = Some(sender.clone());
                    sender
                }
            }
        };
        sender.ready().await?;
        Ok(sender.send_request(req).await?)
    }
}

/// Connects to the app's address: the pool is the app's, whatever the request says.
#[derive(Debug, Clone)]
pub struct AppConnector {
    app: SocketAddr,
    timeout: Duration,
}

impl tower::Service<Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (app, timeout) = (self.app, self.timeout);
        Box::pin(async move { Ok(TokioIo::new(connect(app, timeout).await?)) })
    }
}
