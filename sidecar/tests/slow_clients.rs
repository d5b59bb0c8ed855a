//! Slow clients that send one byte a second: at a strict inbound port (a ClientHello
//! dribbled in is refused when the sniff time box ends; a complete ClientHello followed
//! by a dribble is closed at --handshake-timeout), and at the HTTP header read (closed
//! when the header read timeout, min(30 s, --idle-timeout), ends). Each is closed on time
//! however steadily the bytes come, is counted, and good clients are served after.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use meshlet_proxy::inbound::InboundMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long any slow connection may stay open before the test fails.
const LIMIT: Duration = Duration::from_secs(10);

/// What a dribbling client saw.
#[derive(Debug)]
struct Dribbled {
    /// From connecting until the sidecar closed the connection.
    open_for: Duration,
    /// Bytes written one at a time before it closed.
    dribbled: usize,
    /// Everything the sidecar sent.
    answer: Vec<u8>,
}

/// Writes `first` at once, then `then` one byte a second, until the sidecar closes the
/// connection (at most [`LIMIT`]).
async fn dribble(addr: SocketAddr, first: &[u8], then: &[u8]) -> Dribbled {
    let started = Instant::now();
    let (mut r, mut w) = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap()
        .into_split();
    w.write_all(first).await.unwrap();
    let mut dribbled = 0;
    let writer = async {
        for b in then {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if w.write_all(&[*b]).await.is_err() {
                break;
            }
            dribbled += 1;
        }
        std::future::pending::<()>().await
    };
    let mut answer = Vec::new();
    let closed = tokio::select! {
        read = tokio::time::timeout(LIMIT, r.read_to_end(&mut answer)) => read.is_ok(),
        _ = writer => unreachable!("the writer never ends"),
    };
    assert!(closed, "a slow client was kept for {LIMIT:?}");
    Dribbled {
        open_for: started.elapsed(),
        dribbled,
        answer,
    }
}

/// A strict server sidecar in front of an echo app (handshake timeout 2 s), and a client
/// sidecar whose route 0 leads to it.
async fn strict_pair(cp: &ControlPlane) -> (Sidecar, Sidecar) {
    let mut server = sidecar_config(cp, cp.token_file("demo", "server"));
    server.app_addr = Some(echo_app().await);
    server.inbound_mode = InboundMode::Strict;
    server.handshake_timeout = Duration::from_secs(2);
    let server = Sidecar::start_ready(server).await;
    let mut client = sidecar_config(cp, cp.token_file("demo", "client"));
    client.routes = vec![route(server.r().inbound_addr, None)];
    (server, Sidecar::start_ready(client).await)
}

fn inbound_count(m: &str, name: &str, reason: &str) -> f64 {
    metric(
        m,
        &format!(r#"meshlet_{name}_total{{direction="inbound",reason="{reason}"}}"#),
    )
}

#[tokio::test]
async fn a_dribbled_client_hello_is_refused_when_the_sniff_time_box_ends() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let (mut server, mut client) = strict_pair(&cp).await;
    let hello = mesh_client_hello();
    let got = dribble(server.r().inbound_addr, &hello[..1], &hello[1..]).await;
    assert!(
        got.open_for < Duration::from_millis(1_500) && got.answer.is_empty(),
        "{got:?}"
    );
    let m = server.metrics().await;
    let refused = inbound_count(&m, "connections_refused", "plaintext_in_strict_mode");
    assert_eq!(refused, 1.0, "{m}");
    assert_eq!(
        echo_round_trip(client.route(0), b"fast").await.unwrap(),
        b"fast"
    );
    client.stop().await;
    server.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn a_dribbled_handshake_is_closed_at_the_handshake_timeout() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let (mut server, mut client) = strict_pair(&cp).await;
    // A whole ClientHello, then ChangeCipherSpec records one byte a second.
    let ccs = [0x14, 0x03, 0x03, 0x00, 0x01, 0x01].repeat(3);
    let got = dribble(server.r().inbound_addr, &mesh_client_hello(), &ccs).await;
    assert!(
        got.open_for >= Duration::from_millis(1_900) && got.open_for < Duration::from_secs(4),
        "closed after {:?}, not at the 2 s handshake timeout",
        got.open_for
    );
    assert!(got.dribbled >= 1, "{got:?}");
    let inbound = server.r().inbound_addr;
    let admin = server.r().admin_addr;
    eventually(
        "the timeout is counted",
        Duration::from_secs(2),
        async || {
            let m = http_get(admin, "/metrics").await.1;
            inbound_count(&m, "tls_handshake_errors", "timeout") == 1.0
                && inbound_count(&m, "connections_refused", "tls_handshake") == 1.0
        },
    )
    .await;
    assert_eq!(
        echo_round_trip(client.route(0), b"fast").await.unwrap(),
        b"fast",
        "{inbound} still serves mesh clients"
    );
    client.stop().await;
    server.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn dribbled_request_headers_are_closed_at_the_header_read_timeout() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let mut web = sidecar_config(&cp, cp.token_file("demo", "web"));
    web.app_addr = Some(http_app("web").await);
    let mut web = Sidecar::start_ready(web).await;
    let mut client = sidecar_config(&cp, cp.token_file("demo", "client"));
    client.routes = vec![route(web.r().inbound_addr, None)];
    // The header read timeout follows the idle timeout below 30 s.
    client.idle_timeout = Duration::from_secs(2);
    let mut client = Sidecar::start_ready(client).await;
    let to = client.route(0);

    let got = dribble(
        to,
        b"GET /slow HTTP/1.1\r\nHost: app\r\n",
        b"X-Slow: 0123456789\r\n\r\n",
    )
    .await;
    let answer = String::from_utf8_lossy(&got.answer).into_owned();
    assert!(
        got.open_for >= Duration::from_millis(1_900) && got.open_for < Duration::from_secs(4),
        "closed after {:?}, not at the 2 s header read timeout",
        got.open_for
    );
    assert!(got.dribbled >= 1, "{got:?}");
    assert!(
        !answer.contains("web GET /slow"),
        "the app answered: {answer}"
    );
    assert_eq!(http_get(to, "/fast").await, (200, "web GET /fast".into()));
    let timeouts =
        r#"meshlet_http_connection_errors_total{direction="outbound",kind="header_timeout"}"#;
    assert_eq!(metric(&client.metrics().await, timeouts), 1.0);
    client.stop().await;
    web.stop().await;
    cp.stop().await;
}
