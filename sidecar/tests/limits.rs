//! Limits a user can set: a connection limit that closes the excess at once (and counts
//! it), a request-head size limit (431), and an idle timeout for opaque TCP.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn excess_connections_are_closed_and_counted() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let app = echo_app().await;
    let mut b = sidecar_config(&cp, cp.token_file("demo", "server"));
    b.app_addr = Some(app);
    b.max_connections = 2;
    let mut b = Sidecar::start_ready(b).await;

    // Two plaintext (permissive) connections hold both slots.
    let mut held = vec![];
    for i in 0..2u8 {
        let mut c = tokio::net::TcpStream::connect(b.r().inbound_addr)
            .await
            .unwrap();
        c.write_all(&[b'a' + i]).await.unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await.unwrap();
        held.push(c);
    }
    // A third is closed at once, without reaching the app.
    let mut third = tokio::net::TcpStream::connect(b.r().inbound_addr)
        .await
        .unwrap();
    let _ = third.write_all(b"x").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf))
        .await
        .expect("closed, not hanging");
    assert!(
        read.is_err() || buf.is_empty(),
        "the excess connection was served: {buf:?}"
    );
    let m = b.metrics().await;
    assert_metric(
        &m,
        r#"meshlet_connections_refused_total{direction="inbound",reason="connection_limit"}"#,
        1.0,
    );
    // A slot frees when a connection ends.
    drop(held.pop());
    let inbound = b.r().inbound_addr;
    eventually(
        "the freed slot is reused",
        Duration::from_secs(5),
        async || {
            echo_round_trip(inbound, b"again")
                .await
                .is_ok_and(|v| v == b"again")
        },
    )
    .await;
    drop(held);
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn oversized_request_heads_get_431_and_idle_tcp_is_closed() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let http = http_app("web").await;
    let echo = echo_app().await;
    let mut web = sidecar_config(&cp, cp.token_file("demo", "web"));
    web.app_addr = Some(http);
    let mut web = Sidecar::start_ready(web).await;
    let mut ledger = sidecar_config(&cp, cp.token_file("demo", "ledger"));
    ledger.app_addr = Some(echo);
    ledger.idle_timeout = Duration::from_millis(300);
    let mut ledger = Sidecar::start_ready(ledger).await;
    let mut a = sidecar_config(&cp, cp.token_file("demo", "client"));
    a.routes = vec![
        route(web.r().inbound_addr, None),
        route(ledger.r().inbound_addr, None),
    ];
    a.max_header_bytes = 8 * 1024;
    a.idle_timeout = Duration::from_millis(300);
    let mut a = Sidecar::start_ready(a).await;

    let mut client = HttpClient::connect(a.route(0)).await.unwrap();
    assert_eq!(client.get("/small").await.unwrap().0, 200);
    let mut raw = tokio::net::TcpStream::connect(a.route(0)).await.unwrap();
    let big = "x".repeat(20 * 1024);
    raw.write_all(format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(80)])
    );

    // Opaque TCP with no bytes either way for 300 ms is closed.
    let mut tcp = tokio::net::TcpStream::connect(a.route(1)).await.unwrap();
    tcp.write_all(b"hello").await.unwrap();
    let mut five = [0u8; 5];
    tcp.read_exact(&mut five).await.unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an idle connection stayed open for 10 s");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed before it was idle"
    );
    drop(client);
    a.stop().await;
    web.stop().await;
    ledger.stop().await;
    cp.stop().await;
}
