//! Hostile input on the data path: HTTP/1 request-smuggling shapes (bare LF among them) sent by an app through its
//! sidecar never reach a peer's app as a request the policy did not allow, malformed framing
//! gets a 400, and TLS garbage, a ClientHello with another ALPN or none, or a stalled
//! handshake at the inbound port is closed without disturbing the connections that follow.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Anyone meshed may `GET /public...` on orders; nothing else.
const POLICY: &str = r#"
default: deny
policies:
  - name: orders
    namespace: demo
    serviceAccount: orders
    allow:
      - anyMeshed: true
        http: {methods: [GET], pathPrefixes: [/public]}
"#;

/// Writes `raw` on a fresh connection and returns everything read until the peer closes
/// or goes quiet for a second.
async fn send_raw(addr: SocketAddr, raw: &[u8]) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_lines(answer: &str) -> Vec<&str> {
    answer
        .lines()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .collect()
}

#[tokio::test]
async fn smuggling_shapes_never_reach_the_app_unchecked() {
    let mut cp = ControlPlane::start_with(Duration::from_secs(3600), Some(POLICY)).await;
    let mut orders = sidecar_config(&cp, cp.token_file("demo", "orders"));
    orders.app_addr = Some(http_app("orders").await);
    let mut orders = Sidecar::start_ready(orders).await;
    let mut client = sidecar_config(&cp, cp.token_file("demo", "client"));
    client.routes = vec![route(orders.r().inbound_addr, None)];
    let mut client = Sidecar::start_ready(client).await;
    orders.wait_for_policy("orders").await;
    let to = client.route(0);
    assert_eq!(http_get(to, "/public/menu").await.0, 200);

    // (name, raw bytes, what the first answer must be)
    let cases: [(&str, &[u8], &str); 7] = [
        (
            "bare LF line ends: parsed as two requests, the second checked",
            b"GET /public/a HTTP/1.1\nHost: a\n\nGET /admin HTTP/1.1\nHost: a\n\n",
            "HTTP/1.1 200",
        ),
        (
            "CL.TE: chunked wins, and the connection closes after the answer (RFC 9112 6.1)",
            b"GET /public/a HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
            "HTTP/1.1 200",
        ),
        (
            "two different Content-Lengths",
            b"GET /public/a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 30\r\n\r\nxGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "space before the colon",
            b"GET /public/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "obsolete line folding",
            b"GET /public/a HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "a chunk size that overflows: the head went upstream, the body failed",
            b"GET /public/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
            "HTTP/1.1 502",
        ),
        (
            "a request target with a NUL",
            b"GET /public/\0/../../admin HTTP/1.1\r\nHost: a\r\n\r\n",
            "HTTP/1.1 400",
        ),
    ];
    for (name, raw, first) in cases {
        let answer = send_raw(to, raw).await;
        assert!(
            !answer.contains("orders GET /admin"),
            "{name}: the app answered a request the policy denies:\n{answer}"
        );
        let statuses = status_lines(&answer);
        assert!(
            statuses.first().is_some_and(|s| s.starts_with(first)),
            "{name}: expected {first:?} first, got {statuses:?}"
        );
        // Whatever was parsed as a second request went through the policy.
        for extra in statuses.iter().skip(1) {
            assert!(
                extra.starts_with("HTTP/1.1 403") || extra.starts_with("HTTP/1.1 400"),
                "{name}: a smuggled request was not refused: {extra}\n{answer}"
            );
        }
    }
    // The sidecars still serve, and counted the requests they could not parse.
    assert_eq!(
        http_get(to, "/public/menu").await,
        (200, "orders GET /public/menu".into())
    );
    let malformed =
        r#"meshlet_http_connection_errors_total{direction="outbound",kind="malformed"}"#;
    assert!(
        metric(&client.metrics().await, malformed) >= 4.0,
        "the four 400s are counted"
    );
    client.stop().await;
    orders.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn tls_garbage_and_stalled_handshakes_are_closed() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let mut server = sidecar_config(&cp, cp.token_file("demo", "server"));
    server.app_addr = Some(echo_app().await);
    server.inbound_mode = meshlet_proxy::inbound::InboundMode::Strict;
    server.handshake_timeout = Duration::from_millis(500);
    let mut server = Sidecar::start_ready(server).await;
    let mut client = sidecar_config(&cp, cp.token_file("demo", "client"));
    client.routes = vec![route(server.r().inbound_addr, None)];
    let mut client = Sidecar::start_ready(client).await;
    let inbound = server.r().inbound_addr;

    let hello = mesh_client_hello();
    let with = |tail: &[u8]| [hello.as_slice(), tail].concat();
    let mut oversized = vec![0x17, 0x03, 0x03, 0xff, 0xff];
    oversized.extend(std::iter::repeat_n(0x41, 1024));
    let mut corrupt = hello.clone();
    for b in corrupt.iter_mut().skip(200).take(40) {
        *b ^= 0x5a;
    }
    let cases: [(&str, Vec<u8>); 7] = [
        ("a ClientHello, then silence", hello.clone()),
        ("a ClientHello offering only h2", client_hello(&[b"h2"])),
        ("a ClientHello offering no ALPN", client_hello(&[])),
        (
            "a ClientHello, then a record longer than TLS allows",
            with(&oversized),
        ),
        (
            "a ClientHello, then an alert of nonsense",
            with(&[0x15, 0x03, 0x03, 0x00, 0x02, 0xff, 0xff]),
        ),
        ("a ClientHello with corrupted extensions", corrupt),
        (
            "a record header and nothing after",
            vec![0x16, 0x03, 0x01, 0x02],
        ),
    ];
    for (name, raw) in cases {
        let started = Instant::now();
        let mut tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
        tcp.write_all(&raw).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "{name}: the connection stayed open 5 s");
        assert!(
            !String::from_utf8_lossy(&rest).contains("AAAA"),
            "{name}: garbage reached the app"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{name}: closed only after {:?}",
            started.elapsed()
        );
    }
    // Mesh traffic still flows, and the failures were counted, not crashed on.
    assert_eq!(
        echo_round_trip(client.route(0), b"still here")
            .await
            .unwrap(),
        b"still here"
    );
    let m = server.metrics().await;
    let failures: f64 = m
        .lines()
        .filter(|l| {
            (l.starts_with("meshlet_tls_handshake_errors_total{")
                || l.starts_with("meshlet_connections_refused_total{"))
                && l.contains(r#"direction="inbound""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(failures >= 7.0, "each bad connection is counted:\n{m}");
    // Other TLS (the two ALPN cases and the cut record) is not meshlet's; the corrupted
    // ClientHello is too when the flipped bytes land on its ALPN extension, and otherwise
    // fails in rustls (`tls_handshake`): the extensions' order varies from hello to hello.
    let not_meshlet = metric(
        &m,
        r#"meshlet_connections_refused_total{direction="inbound",reason="plaintext_in_strict_mode"}"#,
    );
    assert!(
        (3.0..=4.0).contains(&not_meshlet),
        "other TLS is not meshlet's:\n{m}"
    );
    client.stop().await;
    server.stop().await;
    cp.stop().await;
}
