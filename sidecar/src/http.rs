//! HTTP/1.1 and HTTP/2 proxying per request, with hyper. The upstream is one connection per
//! downstream connection (keep-alive on both sides), or, between sidecars, a pooled HTTP/2
//! connection shared by many (see [`crate::pool`]). Each request is counted and timed; an
//! upstream that fails gets the client a 502. HTTP/1.1 upgrades (WebSocket) are relayed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::server::conn::{http1 as server1, http2 as server2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;

use crate::detect::Protocol;
use crate::metrics::{Direction, DirectionLabels, HttpError, HttpErrorLabels, RequestLabels};
use crate::pool;
use crate::relay::RelayCtx;
use crate::trace;

/// The header Envoy-based meshes use to name the caller: removed inbound, never passed on.
const FORWARDED_CLIENT_CERT: &str = "x-forwarded-client-cert";

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

type Body = BoxBody<Bytes, hyper::Error>;

/// The HPACK table every HTTP/2 connection of ours asks its peer to keep for it: none.
///
/// hyper and h2 parse a header value as a slice of the connection's read buffer, and an
/// HPACK table keeps the values it indexes until newer ones push them out (4 KB of headers
/// by default). So each new value, such as one `date` a second, kept a whole read buffer
/// (8 KB or more) alive: measured, 35 KB more heap after each 3 s burst, up to about half a
/// MiB per table. With no table, neither end keeps anything and headers travel literally
/// (Huffman-coded): a few hundred bytes more per request between sidecars.
pub const HEADER_TABLE_SIZE: u32 = 0;

/// Copies each header value into an allocation of its own, before it goes to an HTTP/2
/// peer that is not a sidecar: such a peer sizes our encoder's table, which then keeps
/// these small copies instead of the read buffers they were parsed from.
pub fn own_values(headers: &mut HeaderMap) {
    for value in headers.values_mut() {
        if let Ok(mut owned) = HeaderValue::from_bytes(value.as_bytes()) {
            owned.set_sensitive(value.is_sensitive());
            *value = owned;
        }
    }
}

/// Where a connection's requests go.
#[derive(Clone, Debug)]
pub enum Upstream {
    /// A connection of its own: HTTP/1 sends one request at a time.
    H1(Arc<Mutex<client1::SendRequest<Incoming>>>),
    /// A connection of its own: HTTP/2 multiplexes.
    H2(client2::SendRequest<Incoming>),
    /// Outbound to a meshed destination: streams of a pooled connection.
    Pooled(Arc<pool::Route>),
    /// Inbound on a pooled connection: the app at this address, in each request's protocol.
    App(Arc<crate::app_clients::AppClients>, std::net::SocketAddr),
}

impl Upstream {
    async fn send(
        &self,
        mut req: Request<Incoming>,
    ) -> Result<Response<Incoming>, pool::SendError> {
        if matches!(self, Self::H1(_) | Self::H2(_)) {
            // Meaningful only on a pooled connection; never passed on from a client.
            req.headers_mut().remove(pool::ORIG_PROTO);
        }
        // The connection-per-client branches are boxed: each request's future is as large
        // as its largest branch, and hyper moves it into a task of its own per HTTP/2 stream.
        match self {
            Self::H1(sender) => {
                Box::pin(async move {
                    let mut sender = sender.lock().await;
                    sender.ready().await?;
                    Ok(sender.send_request(req).await?)
                })
                .await
            }
            Self::H2(sender) => {
                own_values(req.headers_mut());
                Box::pin(async move {
                    let mut sender = sender.clone();
                    sender.ready().await?;
                    Ok(sender.send_request(req).await?)
                })
                .await
            }
            Self::Pooled(route) => route.send(req).await,
            Self::App(clients, app) => clients.send(*app, req).await,
        }
    }
}

/// Proxies HTTP between `down` and `up` until the client is done.
pub async fn proxy<D, U>(down: D, up: U, protocol: Protocol, ctx: &RelayCtx)
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match handshake(up, protocol).await {
        Ok(upstream) => serve(down, protocol, upstream, ctx).await,
        Err(e) => tracing::debug!(error = %e, "upstream HTTP handshake failed"),
    }
}

/// Serves the HTTP client on `down`, sending each request to `upstream`, until it is done.
pub async fn serve<D>(down: D, protocol: Protocol, upstream: Upstream, ctx: &RelayCtx)
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(ctx.clone());
    let service_ctx = ctx.clone();
    // An app speaking HTTP/2 sizes our encoder's table (a pooled connection's peer, the
    // other sidecar, asks for none).
    let own = protocol == Protocol::Http2 && !matches!(upstream, Upstream::App(..));
    let service = hyper::service::service_fn(move |req| {
        let upstream = upstream.clone();
        let ctx = service_ctx.clone();
        async move {
            let mut response = forward(req, &upstream, &ctx).await;
            if own {
                own_values(response.headers_mut());
            }
            Ok::<_, Infallible>(response)
        }
    });
    let io = TokioIo::new(down);
    let served = match protocol {
        Protocol::Http2 => {
            let conn = server2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(ctx.limits.http2_max_streams)
                .max_header_list_size(
                    u32::try_from(ctx.limits.max_header_bytes).unwrap_or(u32::MAX),
                )
                .initial_stream_window_size(pool::STREAM_WINDOW)
                .initial_connection_window_size(pool::CONNECTION_WINDOW)
                .header_table_size(HEADER_TABLE_SIZE)
                .serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = ctx.drain.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        _ => {
            let conn = server1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT.min(ctx.limits.idle_timeout))
                .max_buf_size(ctx.limits.max_header_bytes.max(8192))
                .serve_connection(io, service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = ctx.drain.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
        if let Some(kind) = client_error(&e) {
            let direction = ctx.direction;
            ctx.metrics
                .http_errors
                .get_or_create(&HttpErrorLabels { direction, kind })
                .inc();
        }
    }
}

/// What a served connection's error says about its client, if it is the client's doing
/// (a client that merely went away is not counted).
fn client_error(e: &hyper::Error) -> Option<HttpError> {
    if e.is_parse() {
        return Some(HttpError::malformed);
    }
    if e.is_timeout() {
        return Some(HttpError::header_timeout);
    }
    let h2 = std::error::Error::source(e)?.downcast_ref::<h2::Error>()?;
    match h2.reason()? {
        _ if !h2.is_go_away() || h2.is_remote() => None,
        h2::Reason::ENHANCE_YOUR_CALM => Some(HttpError::flood),
        h2::Reason::NO_ERROR => None,
        _ => Some(HttpError::protocol),
    }
}

async fn handshake<U>(up: U, protocol: Protocol) -> Result<Upstream, hyper::Error>
where
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(up);
    if protocol == Protocol::Http2 {
        let (sender, conn) = client2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .header_table_size(HEADER_TABLE_SIZE)
            .handshake(io)
            .await?;
        tokio::spawn(conn);
        Ok(Upstream::H2(sender))
    } else {
        let (sender, conn) = client1::handshake(io).await?;
        tokio::spawn(conn.with_upgrades());
        Ok(Upstream::H1(Arc::new(Mutex::new(sender))))
    }
}

/// Forwards one request and returns the response (or a 502), counting and timing it.
async fn forward(
    mut req: Request<Incoming>,
    upstream: &Upstream,
    ctx: &RelayCtx,
) -> Response<Body> {
    let started = Instant::now();
    if ctx.direction == Direction::inbound {
        // Envoy-based meshes tell the app its caller in this header; here the app must not
        // believe one a client wrote.
        req.headers_mut().remove(FORWARDED_CLIENT_CERT);
    }
    let peer = ctx.tls.as_ref().map(|t| t.peer.as_str());
    let span = ctx
        .tracer
        .as_ref()
        .map(|t| trace::start_request(t, ctx.direction, &mut req, peer));
    if let Some(authz) = &ctx.authz {
        // An upgrade to h2c would turn the connection into a tunnel of requests nobody
        // checks: the request goes on without it (WebSocket and others stay allowed).
        let h2c = req
            .headers()
            .get(http::header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("h2c"));
        if h2c {
            req.headers_mut().remove(http::header::UPGRADE);
            req.headers_mut().remove("http2-settings");
            req.headers_mut().remove(http::header::CONNECTION);
        }
        let decision = authz.request(req.method().as_str(), req.uri().path());
        ctx.metrics.authz(ctx.direction, decision.allowed);
        if !decision.allowed {
            tracing::info!(method = %req.method(), path = req.uri().path(), peer, rule = %decision.rule, "request denied");
            let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
            *resp.status_mut() = StatusCode::FORBIDDEN;
            if let Some(span) = span {
                span.deny(&decision.rule);
                span.finish(403);
            }
            return resp;
        }
    }
    let wants_upgrade = req.headers().contains_key(http::header::UPGRADE);
    let downstream_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
    let response = match upstream.send(req).await {
        Ok(mut resp) => {
            if let (Some(down), StatusCode::SWITCHING_PROTOCOLS) =
                (downstream_upgrade, resp.status())
            {
                let up = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    if let (Ok(down), Ok(up)) = (down.await, up.await) {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(down),
                            &mut TokioIo::new(up),
                        )
                        .await;
                    }
                });
            }
            resp.map(BodyExt::boxed)
        }
        Err(e) => {
            tracing::debug!(error = %e, "upstream request failed");
            let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            resp
        }
    };
    if let Some(span) = span {
        span.finish(response.status().as_u16());
    }
    let direction = ctx.direction;
    ctx.metrics
        .requests
        .get_or_create(&RequestLabels {
            direction,
            status_code: response.status().as_u16(),
            tls: ctx.tls.is_some(),
        })
        .inc();
    ctx.metrics
        .request_duration
        .get_or_create(&DirectionLabels { direction })
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics.activity.inc();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_values_keep_no_part_of_the_buffer_they_were_parsed_from() {
        let buffer = Bytes::from_static(b"x-request-id: 7f3a\r\nauthorization: Bearer t0k3n\r\n");
        let inside = |v: &HeaderValue| buffer.as_ptr_range().contains(&v.as_bytes().as_ptr());
        let mut headers = HeaderMap::new();
        let id = HeaderValue::from_maybe_shared(buffer.slice(14..18)).expect("valid");
        let mut secret = HeaderValue::from_maybe_shared(buffer.slice(35..47)).expect("valid");
        secret.set_sensitive(true);
        headers.insert("x-request-id", id);
        headers.insert("authorization", secret);
        assert!(headers.values().all(inside), "the test's values are slices");

        own_values(&mut headers);

        assert!(!headers.values().any(inside));
        assert_eq!(headers["x-request-id"], "7f3a");
        assert_eq!(headers["authorization"], "Bearer t0k3n");
        assert!(headers["authorization"].is_sensitive());
        assert!(!headers["x-request-id"].is_sensitive());
    }
}
