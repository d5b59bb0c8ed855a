//! Keep-alive connections from the inbound sidecar to the app: reused while requests keep
//! coming, never used again once unused for `--app-idle-timeout` (so that no request races
//! the close of an app with a short keep-alive timeout, such as Node.js's 5 s) and closed;
//! `0` keeps none.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use meshlet_proxy::inbound::InboundMode;

/// Connections an app accepted, and how many of them the other side has closed.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    closed: AtomicUsize,
}

/// An HTTP/1.1 app with keep-alive that counts its connections.
async fn counting_app() -> (SocketAddr, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counts.accepted.fetch_add(1, Ordering::SeqCst);
            let counts = counts.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from("ok"))))
                });
                // Returns once the sidecar closes the connection.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
                counts.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

/// A client sidecar routing to a server sidecar in front of a counting app, whose app
/// connections may stay unused for `app_idle`.
struct Mesh {
    _cp: ControlPlane,
    seen: Arc<Seen>,
    a: Sidecar,
    b: Sidecar,
}

impl Mesh {
    async fn start(app_idle: Duration) -> Self {
        let cp = ControlPlane::start(Duration::from_secs(3600)).await;
        let (app, seen) = counting_app().await;
        let mut b = sidecar_config(&cp, cp.token_file("demo", "server"));
        b.app_addr = Some(app);
        b.inbound_mode = InboundMode::Strict;
        b.app_idle_timeout = app_idle;
        let (a, b) = pair_with(&cp, b, None).await;
        Self {
            _cp: cp,
            seen,
            a,
            b,
        }
    }

    /// One GET from the client's app, over a connection to the client sidecar.
    async fn get(&self, client: &mut HttpClient) {
        assert_eq!(client.get("/").await.unwrap(), (200, "ok".to_owned()));
    }

    async fn client(&self) -> HttpClient {
        HttpClient::connect(self.a.route(0)).await.unwrap()
    }

    fn accepted(&self) -> usize {
        self.seen.accepted.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.seen.closed.load(Ordering::SeqCst)
    }

    async fn stop(mut self) {
        self.a.stop().await;
        self.b.stop().await;
    }
}

#[tokio::test]
async fn requests_in_a_row_reuse_one_app_connection() {
    let mesh = Mesh::start(Duration::from_secs(60)).await;
    for _ in 0..4 {
        // A new app connection each time on the client's side: the server sidecar still
        // reuses its connection to the app.
        mesh.get(&mut mesh.client().await).await;
    }
    // One connection, as a rule. hyper-util puts a connection back in its pool from a task
    // of its own, so on a busy machine a request may find none yet and dial a second one;
    // four requests on at most two connections still prove reuse.
    let accepted = mesh.accepted();
    assert!(
        accepted <= 2,
        "{accepted} app connections for 4 requests in a row"
    );
    assert_eq!(mesh.closed(), 0);
    mesh.stop().await;
}

#[tokio::test]
async fn an_app_connection_unused_for_the_idle_timeout_is_closed_by_the_sidecar() {
    let mesh = Mesh::start(Duration::from_millis(200)).await;
    let mut client = mesh.client().await;
    mesh.get(&mut client).await;
    assert_eq!(mesh.accepted(), 1);
    eventually(
        "the sidecar closes its idle app connection",
        Duration::from_secs(10),
        async || mesh.closed() == 1,
    )
    .await;
    // The next request gets a new connection to the app.
    mesh.get(&mut client).await;
    assert_eq!(mesh.accepted(), 2);
    mesh.stop().await;
}

#[tokio::test]
async fn an_app_idle_timeout_of_zero_keeps_no_app_connection() {
    let mesh = Mesh::start(Duration::ZERO).await;
    let mut client = mesh.client().await;
    mesh.get(&mut client).await;
    mesh.get(&mut client).await;
    assert_eq!(mesh.accepted(), 2, "a new connection per request");
    eventually(
        "the sidecar closes each app connection after its response",
        Duration::from_secs(10),
        async || mesh.closed() == 2,
    )
    .await;
    mesh.stop().await;
}
