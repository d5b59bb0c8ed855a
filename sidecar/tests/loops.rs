//! Connections aimed at the sidecar's own listeners: outbound routes whose upstream is the
//! sidecar's inbound, admin or outbound port or the route itself, a connection to the
//! outbound capture port that was never redirected, and an inbound app address that is
//! the sidecar's admin port. Each is refused at once and counted (`loop_detected`, or
//! `no_original_destination` where there is no original destination to read), and the
//! sidecar goes on serving.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use meshlet_proxy::{Listeners, Route};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

fn route_at(listen: SocketAddr, upstream: SocketAddr) -> Route {
    Route {
        listen,
        upstream,
        identity: None,
    }
}

/// A route listener on a new port, forwarding to `upstream`.
async fn route_to(upstream: SocketAddr) -> (TcpListener, Route) {
    let (l, listen) = bind().await;
    (l, route_at(listen, upstream))
}

/// Sends a line and expects the connection to be closed at once with nothing sent back.
async fn refused_at_once(addr: SocketAddr, what: &str) {
    let started = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: me\r\n\r\n").await;
    let mut back = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut back)).await;
    assert!(read.is_ok(), "{what}: still open after 5 s");
    assert!(
        back.is_empty(),
        "{what}: answered {:?}",
        String::from_utf8_lossy(&back)
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{what}: closed only after {:?}",
        started.elapsed()
    );
}

fn refused(m: &str, direction: &str, reason: &str) -> f64 {
    metric(
        m,
        &format!(
            r#"meshlet_connections_refused_total{{direction="{direction}",reason="{reason}"}}"#
        ),
    )
}

#[tokio::test]
async fn connections_to_the_sidecars_own_listeners_are_refused_as_loops() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let ((admin, admin_addr), (inbound, inbound_addr)) = (bind().await, bind().await);
    let (outbound, outbound_addr) = bind().await;
    let (to_self, to_self_addr) = bind().await;
    let echo = echo_app().await;
    let mut routes = vec![
        route_to(inbound_addr).await,
        route_to(admin_addr).await,
        route_to(outbound_addr).await,
        (to_self, route_at(to_self_addr, to_self_addr)),
    ];
    let looping: Vec<SocketAddr> = routes.iter().map(|(_, r)| r.listen).collect();
    let to_echo = route_to(echo).await;
    let echo_listen = to_echo.1.listen;
    routes.push(to_echo);
    let mut config = sidecar_config(&cp, cp.token_file("demo", "looper"));
    config.app_addr = Some(admin_addr);
    let listeners = Listeners {
        admin,
        inbound,
        outbound,
        routes,
    };
    let mut s = Sidecar::start_on(config, listeners).await;
    tokio::time::timeout(Duration::from_secs(10), s.r().ready())
        .await
        .unwrap();

    for (i, listen) in looping.iter().enumerate() {
        refused_at_once(*listen, &format!("route {i} to an own listener")).await;
    }
    refused_at_once(inbound_addr, "inbound to the own admin port").await;
    let m = s.metrics().await;
    assert_eq!(refused(&m, "outbound", "loop_detected"), 4.0, "{m}");
    assert_eq!(refused(&m, "inbound", "loop_detected"), 1.0, "{m}");

    // Without NAT there is no original destination to read; where conntrack tracks the
    // connection anyway, the original destination is the capture port itself: a loop.
    refused_at_once(outbound_addr, "capture port, not redirected").await;
    let m = s.metrics().await;
    let capture = refused(&m, "outbound", "no_original_destination")
        + refused(&m, "outbound", "loop_detected");
    assert_eq!(capture, 5.0, "the capture port, counted once:\n{m}");
    // The sidecar goes on: its admin API and a route elsewhere.
    assert_eq!(http_get(admin_addr, "/ready").await.0, 200);
    assert_eq!(
        echo_round_trip(echo_listen, b"fine").await.unwrap(),
        b"fine"
    );
    s.stop().await;
    cp.stop().await;
}
