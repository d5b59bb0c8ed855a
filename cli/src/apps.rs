//! The small apps the demo puts behind sidecars, and the clients that call them. They know
//! nothing of the mesh: plain HTTP and plain TCP.

use std::net::SocketAddr;
use std::time::Duration;

use std::path::PathBuf;

use anyhow::{Context, ensure};
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

/// `meshletctl demo-app`: the apps and clients run inside the namespaces.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum DemoApp {
    /// Serve HTTP (`<name>: <method> <path>`) and a TCP echo.
    Serve {
        #[arg(long)]
        http: SocketAddr,
        #[arg(long)]
        echo: SocketAddr,
    },
    /// GET a path, `--count` times (or until `--until-secs`) on fresh connections; fails
    /// if any request fails.
    Get {
        addr: SocketAddr,
        path: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long)]
        until_secs: Option<u64>,
        /// Stop as soon as this file exists.
        #[arg(long)]
        stop_file: Option<PathBuf>,
    },
    /// Send `--bytes` bytes, half-close, and check they come back.
    Echo {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        bytes: usize,
    },
}

pub(crate) async fn demo_app(cmd: DemoApp) -> anyhow::Result<()> {
    match cmd {
        DemoApp::Serve { http, echo } => {
            let http = tokio::net::TcpListener::bind(http).await?;
            let echo = tokio::net::TcpListener::bind(echo).await?;
            tokio::join!(serve_http(http, "orders"), serve_echo(echo));
            Ok(())
        }
        DemoApp::Get {
            addr,
            path,
            count,
            until_secs,
            stop_file,
        } => {
            let until = until_secs.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
            let (mut ok, mut failed, mut last) = (0u32, 0u32, String::new());
            for _ in 0..count {
                if until.is_some_and(|u| tokio::time::Instant::now() >= u)
                    || stop_file.as_ref().is_some_and(|f| f.exists())
                {
                    break;
                }
                let result = async { HttpClient::connect(addr).await?.get(&path).await }.await;
                match result {
                    Ok((200, body)) => {
                        ok += 1;
                        last = body;
                    }
                    other => {
                        failed += 1;
                        last = format!("{other:?}");
                    }
                }
                if until.is_some() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            println!("{ok} ok, {failed} failed, last: {last}");
            ensure!(failed == 0 && ok > 0, "{failed} requests failed");
            Ok(())
        }
        DemoApp::Echo { addr, bytes } => {
            let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
            let back = echo(addr, &payload).await?;
            println!("{} bytes sent, {} echoed", payload.len(), back.len());
            ensure!(back == payload, "the echo differs");
            Ok(())
        }
    }
}
