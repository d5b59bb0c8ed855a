//! Pooled connections between sidecars: HTTP requests from many app connections share one
//! mutual-TLS HTTP/2 connection, each reaching the app in the protocol it was sent in, with
//! its Host; a client cannot choose that protocol; upgrades get a connection of their own;
//! a renewed certificate gets a new pooled connection.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshlet_proxy::inbound::InboundMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An app that answers with what it received: version, Host, and any mesh header; and
/// that accepts an upgrade to an echo protocol.
async fn mirror_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |mut req: http::Request<hyper::body::Incoming>| async move {
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .map(|v| v.to_str().unwrap_or("?").to_owned())
                                .unwrap_or_else(|| "-".into())
                        };
                        let host = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .unwrap_or_else(|| header("host"));
                        let seen = format!(
                            "{:?} host={host} orig={}",
                            req.version(),
                            header("meshlet-orig-proto")
                        );
                        if req.headers().contains_key(http::header::UPGRADE) {
                            let upgrade = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(upgrade.await.unwrap());
                                let mut buf = [0u8; 64];
                                let n = io.read(&mut buf).await.unwrap();
                                io.write_all(&buf[..n]).await.unwrap();
                            });
                            let resp = http::Response::builder()
                                .status(101)
                                .header("connection", "upgrade")
                                .header("upgrade", "echo")
                                .body(Full::new(Bytes::new()))
                                .unwrap();
                            return Ok::<_, hyper::Error>(resp);
                        }
                        Ok(http::Response::new(Full::new(Bytes::from(seen))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

const INBOUND_TLS: &str = r#"meshlet_tcp_connections_total{direction="inbound",tls="true"}"#;
const OUTBOUND_TLS: &str = r#"meshlet_tcp_connections_total{direction="outbound",tls="true"}"#;

#[tokio::test]
async fn many_app_connections_share_one_connection_between_sidecars() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let (mut a, mut b) = pair(&cp, mirror_app().await, InboundMode::Strict, None).await;

    for _ in 0..20 {
        let (status, body) = http_get(a.route(0), "/orders").await;
        assert_eq!((status, body.as_str()), (200, "HTTP/1.1 host=app orig=-"));
    }
    // An HTTP/2 client rides the same connection, and reaches the app as HTTP/2.
    assert_eq!(
        h2_get(a.route(0), "http://orders.shop:8080/orders").await,
        (200, "HTTP/2.0 host=orders.shop:8080 orig=-".into())
    );
    // A client that names the pooled protocol itself is not believed.
    let raw = "GET /orders HTTP/1.1\r\nhost: app\r\nmeshlet-orig-proto: HTTP/2\r\nconnection: close\r\n\r\n";
    let mut tcp = tokio::net::TcpStream::connect(a.route(0)).await.unwrap();
    tcp.write_all(raw.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("HTTP/1.1 host=app orig=-"), "{answer}");

    let (am, bm) = (a.metrics().await, b.metrics().await);
    assert_eq!(metric(&am, OUTBOUND_TLS), 22.0, "{am}");
    assert_eq!(metric(&bm, INBOUND_TLS), 1.0, "one handshake for all: {bm}");
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn an_upgrade_gets_a_connection_of_its_own() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let (mut a, mut b) = pair(&cp, mirror_app().await, InboundMode::Strict, None).await;
    let mut tcp = tokio::net::TcpStream::connect(a.route(0)).await.unwrap();
    tcp.write_all(b"GET /ws HTTP/1.1\r\nhost: app\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp.write_all(b"ping over the tunnel").await.unwrap();
    let mut echoed = [0u8; 20];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"ping over the tunnel");
    drop(tcp);
    // The pooled connection (dialled when the app spoke HTTP) and the upgrade's own.
    assert_eq!(metric(&b.metrics().await, INBOUND_TLS), 2.0);
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn a_renewed_certificate_gets_a_new_pooled_connection() {
    // Certificates of 16 s are renewed after about 8 s: a second pooled connection before
    // 14 s comes from the renewal, not from an expiry.
    let mut cp = ControlPlane::start(Duration::from_secs(16)).await;
    let started = std::time::Instant::now();
    let (mut a, mut b) = pair(&cp, mirror_app().await, InboundMode::Strict, None).await;
    for _ in 0..3 {
        assert_eq!(http_get(a.route(0), "/").await.0, 200);
    }
    assert_eq!(metric(&b.metrics().await, INBOUND_TLS), 1.0);
    eventually(
        "a second pooled connection after a renewal",
        Duration::from_secs(14).saturating_sub(started.elapsed()),
        async || {
            assert_eq!(http_get(a.route(0), "/").await.0, 200);
            metric(&b.metrics().await, INBOUND_TLS) >= 2.0
        },
    )
    .await;
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn a_restarted_peer_is_dialled_again() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let app = mirror_app().await;
    let (mut a, mut b) = pair(&cp, app, InboundMode::Strict, None).await;
    assert_eq!(http_get(a.route(0), "/").await.0, 200);
    // B goes away and comes back on the same address: the pooled connection is dead.
    let inbound = b.r().inbound_addr;
    b.stop().await;
    let mut config = sidecar_config(&cp, cp.token_file("demo", "server"));
    config.app_addr = Some(app);
    config.inbound_mode = InboundMode::Strict;
    config.inbound_addr = inbound;
    let mut b = Sidecar::start_ready(config).await;
    for _ in 0..5 {
        let (status, body) = http_get(a.route(0), "/").await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(metric(&b.metrics().await, INBOUND_TLS), 1.0);
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn requests_waiting_for_a_failed_dial_fail_with_it() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    // A peer that accepts and never answers the handshake.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = hole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = vec![];
        while let Ok((tcp, _)) = hole.accept().await {
            held.push(tcp);
        }
    });
    let mut config = sidecar_config(&cp, cp.token_file("demo", "client"));
    config.routes = vec![route(
        peer,
        Some("spiffe://cluster.local/ns/demo/sa/server"),
    )];
    config.handshake_timeout = Duration::from_secs(1);
    let mut a = Sidecar::start_ready(config).await;
    let route = a.route(0);
    let waiting: Vec<_> = (0..10)
        .map(|_| {
            tokio::spawn(async move {
                let mut tcp = tokio::net::TcpStream::connect(route).await.unwrap();
                tcp.write_all(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
                    .await
                    .unwrap();
                let mut answer = Vec::new();
                tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
                    .await
                    .expect("closed, not left hanging")
                    .ok();
                answer
            })
        })
        .collect();
    for w in waiting {
        assert!(w.await.unwrap().is_empty(), "nothing answered");
    }
    let m = a.metrics().await;
    let timeouts = metric(
        &m,
        r#"meshlet_tls_handshake_errors_total{direction="outbound",reason="timeout"}"#,
    );
    assert_eq!(timeouts, 1.0, "one dial, shared by all ten: {m}");
    assert_metric(
        &m,
        r#"meshlet_connections_refused_total{direction="outbound",reason="upstream_unreachable"}"#,
        9.0,
    );
    a.stop().await;
    cp.stop().await;
}
