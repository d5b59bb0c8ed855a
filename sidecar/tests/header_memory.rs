//! Header compression between the sidecars keeps no read buffer alive. hyper and h2 parse
//! a header value as a slice of its connection's whole read buffer, and an HPACK table
//! keeps the values it indexes: with tables, each request or response carrying a new value
//! (a request ID, a `date`) kept a read buffer of 8 KB or more alive, up to about half a MiB
//! per table. Measured with a counting allocator around this whole process: the two
//! sidecars, the control plane, the app and the client.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::alloc::System;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use meshlet_proxy::inbound::InboundMode;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use tokio::net::TcpListener;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated and not yet freed, by anything in the process.
fn live_bytes() -> i64 {
    let s = GLOBAL.stats();
    s.bytes_allocated as i64 - s.bytes_deallocated as i64 + s.bytes_reallocated as i64
}

/// An HTTP/1.1 app answering each request with a header value of its own.
async fn numbering_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let n = count.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let mut resp = http::Response::new(Full::new(Bytes::from_static(b"ok")));
                        resp.headers_mut().insert("x-response-n", n.into());
                        Ok::<_, hyper::Error>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// The requests numbered `ids`, each with its number in `x-request-id`, on one connection
/// through the mesh; then the connection closed, and the app's pooled connections too
/// (closed after 200 ms unused).
async fn traffic(route: SocketAddr, ids: std::ops::Range<u64>) {
    let mut client = HttpClient::connect(route).await.unwrap();
    for id in ids {
        let req = http::Request::get("/")
            .header(http::header::HOST, "app")
            .header("x-request-id", id)
            .body(Full::default())
            .unwrap();
        assert_eq!(client.send(req).await.unwrap(), (200, "ok".to_owned()));
    }
    drop(client);
    tokio::time::sleep(Duration::from_millis(600)).await;
}

#[tokio::test]
async fn new_header_values_through_the_mesh_keep_no_read_buffer() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let app = numbering_app().await;
    let mut server = server_config(&cp, app, InboundMode::Strict);
    server.app_idle_timeout = Duration::from_millis(200);
    let (mut a, mut b) = pair_with(&cp, server, None).await;

    // The pooled connection, the app's connections and everything made once.
    traffic(a.route(0), 0..20).await;
    let before = live_bytes();
    // Each request and each response with a header value not seen before.
    traffic(a.route(0), 20..420).await;
    let grown = live_bytes() - before;

    // With HPACK tables each side kept about 80 read buffers of 8 KB: 1.3 MB in all.
    assert!(grown < 128 * 1024, "{grown} bytes more after the requests");
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}
