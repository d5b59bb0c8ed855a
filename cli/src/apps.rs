//! The small apps the demo puts behind sidecars, and the clients that call them. They know
//! nothing of the mesh: plain HTTP and plain TCP.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves HTTP on `listener`: every request gets `200 <name>: <method> <path>`.
pub(crate) async fn serve_http(listener: TcpListener, name: &'static str) {
    while let Ok((tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |req: http::Request<hyper::body::Incoming>| async move {
                    let body = format!("{name}: {} {}", req.method(), req.uri().path());
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        body,
                    ))))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// Echoes every TCP connection on `listener` until the client half-closes.
pub(crate) async fn serve_echo(listener: TcpListener) {
    while let Ok((mut tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = tcp.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

/// An HTTP/1.1 client on one kept-alive connection.
pub(crate) struct HttpClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl HttpClient {
    /// Connects to `addr` (a socket address or "host:port"), within 5 s.
    pub(crate) async fn connect<A>(addr: A) -> anyhow::Result<Self>
    where
        A: tokio::net::ToSocketAddrs + std::fmt::Display,
    {
        let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr))
            .await
            .with_context(|| format!("connecting to {addr}: timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(Self { sender })
    }

    /// GETs `path`: (status, body).
    pub(crate) async fn get(&mut self, path: &str) -> anyhow::Result<(u16, String)> {
        self.send(http::Method::GET, path, None).await
    }

    /// GETs `path` as part of the trace `traceparent` names: (status, body).
    pub(crate) async fn get_traced(
        &mut self,
        path: &str,
        traceparent: &str,
    ) -> anyhow::Result<(u16, String)> {
        let req = http::Request::get(path)
            .header(http::header::HOST, "orders.demo:8080")
            .header("traceparent", traceparent)
            .body(Full::new(Bytes::new()))?;
        self.sender.ready().await?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(req))
            .await
            .context("no answer within 10 s")??;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Sends a bodiless request, with a bearer token when given: (status, body).
    pub(crate) async fn send(
        &mut self,
        method: http::Method,
        path: &str,
        bearer: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "meshlet");
        if let Some(token) = bearer {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(Full::new(Bytes::new()))?;
        self.sender.ready().await?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(req))
            .await
            .context("no answer within 10 s")??;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Sends `payload` to `addr`, half-closes, and returns everything read back.
pub(crate) async fn echo(addr: SocketAddr, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut r, mut w) = tcp.split();
    let write = async {
        w.write_all(payload).await?;
        w.shutdown().await
    };
    let mut back = Vec::new();
    let (wrote, read) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(write, r.read_to_end(&mut back))
    })
    .await
    .context("no echo within 10 s")?;
    wrote?;
    read?;
    Ok(back)
}
