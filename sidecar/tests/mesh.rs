//! The mesh end to end in one process (explicit mode, loopback, port 0): HTTP and TCP
//! through two sidecars over mutual TLS, passthrough, strict mode, identity checks, fail
//! closed without a certificate, server-first protocols, drain, a Service's address
//! balanced over its backends, and the activity count the memory release watches.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use meshlet_proxy::inbound::InboundMode;

#[tokio::test]
async fn http_crosses_the_mesh_with_mutual_tls_and_keep_alive() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let app = http_app("web").await;
    let (mut a, mut b) = pair(&cp, app, InboundMode::Strict, None).await;

    let mut client = HttpClient::connect(a.route(0)).await.unwrap();
    for i in 0..5 {
        let (status, body) = client.get(&format!("/hello/{i}")).await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (200, format!("web GET /hello/{i}").as_str())
        );
    }
    let (status, body) = client
        .request("POST", "/echo", Bytes::from_static(b"payload"))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "web POST /echo payload"));

    let a_metrics = a.metrics().await;
    let b_metrics = b.metrics().await;
    let out = r#"meshlet_requests_total{direction="outbound",status_code="200",tls="true"}"#;
    let inb = r#"meshlet_requests_total{direction="inbound",status_code="200",tls="true"}"#;
    assert_eq!(metric(&a_metrics, out), 6.0, "{a_metrics}");
    assert_eq!(metric(&b_metrics, inb), 6.0, "{b_metrics}");
    // Six requests, one connection each side: keep-alive held on both hops.
    assert_eq!(
        metric(
            &a_metrics,
            r#"meshlet_tcp_connections_total{direction="outbound",tls="true"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &b_metrics,
            r#"meshlet_tcp_connections_total{direction="inbound",tls="true"}"#
        ),
        1.0
    );
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn tcp_is_copied_byte_for_byte_with_half_close() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let app = echo_app().await;
    let (mut a, mut b) = pair(&cp, app, InboundMode::Strict, None).await;
    let payload: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let back = echo_round_trip(a.route(0), &payload).await.unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "the echoed bytes differ");
    let b_metrics = b.metrics().await;
    assert_eq!(
        metric(
            &b_metrics,
            r#"meshlet_tcp_connections_total{direction="inbound",tls="true"}"#
        ),
        1.0
    );
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn a_server_that_speaks_first_is_not_held_by_detection() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let app = greeting_app(b"220 smtp ready\r\n").await;
    let mut b = sidecar_config(&cp, cp.token_file("demo", "smtp"));
    b.app_addr = Some(app);
    // A detection time box far longer than the test waits: only the race can pass.
    b.sniff_timeout = Duration::from_secs(60);
    let mut b = Sidecar::start_ready(b).await;
    let mut a = sidecar_config(&cp, cp.token_file("demo", "client"));
    a.routes = vec![route(b.r().inbound_addr, None)];
    a.sniff_timeout = Duration::from_secs(60);
    let mut a = Sidecar::start_ready(a).await;

    let mut tcp = tokio::net::TcpStream::connect(a.route(0)).await.unwrap();
    let mut greeting = [0u8; 16];
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut greeting),
    )
    .await
    .expect("the greeting arrives without the client speaking")
    .unwrap();
    assert_eq!(&greeting, b"220 smtp ready\r\n");
    drop(tcp);
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn strict_mode_refuses_plaintext_and_permissive_passes_it() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let app = echo_app().await;
    let mut strict = sidecar_config(&cp, cp.token_file("demo", "strict"));
    strict.app_addr = Some(app);
    strict.inbound_mode = InboundMode::Strict;
    let mut strict = Sidecar::start_ready(strict).await;
    let mut permissive = sidecar_config(&cp, cp.token_file("demo", "permissive"));
    permissive.app_addr = Some(app);
    let mut permissive = Sidecar::start_ready(permissive).await;

    let refused = echo_round_trip(strict.r().inbound_addr, b"plain hello").await;
    assert!(
        refused.map(|b| b.is_empty()).unwrap_or(true),
        "strict mode let plaintext through"
    );
    let m = strict.metrics().await;
    assert_metric(
        &m,
        r#"meshlet_connections_refused_total{direction="inbound",reason="plaintext_in_strict_mode"}"#,
        1.0,
    );

    let back = echo_round_trip(permissive.r().inbound_addr, b"plain hello")
        .await
        .unwrap();
    assert_eq!(back, b"plain hello");
    let m = permissive.metrics().await;
    assert_metric(
        &m,
        r#"meshlet_tcp_connections_total{direction="inbound",tls="false"}"#,
        1.0,
    );
    strict.stop().await;
    permissive.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let app = echo_app().await;
    let (mut a, mut b) = pair(
        &cp,
        app,
        InboundMode::Strict,
        Some("spiffe://cluster.local/ns/demo/sa/not-the-server"),
    )
    .await;
    let result = echo_round_trip(a.route(0), b"secret").await;
    assert!(
        result.map(|b| b.is_empty()).unwrap_or(true),
        "data reached a server with the wrong identity"
    );
    let m = a.metrics().await;
    assert_metric(
        &m,
        r#"meshlet_tls_handshake_errors_total{direction="outbound",reason="wrong_identity"}"#,
        1.0,
    );
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn undiscovered_destinations_pass_through_and_meshed_ones_do_not() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let plain_app = echo_app().await;
    let app = echo_app().await;
    let mut b = sidecar_config(&cp, cp.token_file("demo", "server"));
    b.app_addr = Some(app);
    b.inbound_mode = InboundMode::Strict;
    let mut b = Sidecar::start_ready(b).await;
    let mut a = sidecar_config(&cp, cp.token_file("demo", "client"));
    // Neither route names an identity: discovery decides.
    a.routes = vec![route(plain_app, None), route(b.r().inbound_addr, None)];
    let mut a = Sidecar::start_ready(a).await;

    assert_eq!(
        echo_round_trip(a.route(0), b"to a plain app")
            .await
            .unwrap(),
        b"to a plain app"
    );
    // B is strict: this only works because discovery made A use mutual TLS.
    assert_eq!(
        echo_round_trip(a.route(1), b"to a meshed app")
            .await
            .unwrap(),
        b"to a meshed app"
    );
    let m = a.metrics().await;
    assert_metric(
        &m,
        r#"meshlet_tcp_connections_total{direction="outbound",tls="false"}"#,
        1.0,
    );
    assert_metric(
        &m,
        r#"meshlet_tcp_connections_total{direction="outbound",tls="true"}"#,
        1.0,
    );
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn without_a_certificate_nothing_is_meshed() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let app = echo_app().await;
    let mut b = sidecar_config(&cp, cp.token_file("demo", "server"));
    b.app_addr = Some(app);
    let mut b = Sidecar::start_ready(b).await;
    // A's token is junk: it never gets a certificate.
    let junk = cp.dir.path().join("junk.token");
    std::fs::write(&junk, "not-a-token").unwrap();
    let mut a = sidecar_config(&cp, junk);
    a.routes = vec![route(
        b.r().inbound_addr,
        Some("spiffe://cluster.local/ns/demo/sa/server"),
    )];
    // Permissive, in front of an app: without an identity it must not pass plaintext unchecked.
    a.app_addr = Some(app);
    let mut a = Sidecar::start(a).await;

    let (status, body) = http_get(a.r().admin_addr, "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert_refused_without_certificate(&a).await;
    let inbound = echo_round_trip(a.r().inbound_addr, b"plaintext").await;
    assert!(
        inbound.map(|b| b.is_empty()).unwrap_or(true),
        "plaintext passed a sidecar that knows no identity"
    );
    let m = a.metrics().await;
    assert_metric(
        &m,
        r#"meshlet_connections_refused_total{direction="inbound",reason="authz_denied"}"#,
        1.0,
    );
    // The refused Certify is reported once it has come back.
    let mut certs = serde_json::Value::Null;
    eventually(
        "the Certify error on /certs",
        Duration::from_secs(10),
        async || {
            let (_, body) = http_get(a.r().admin_addr, "/certs").await;
            certs = serde_json::from_str(&body).unwrap();
            !certs["last_error"].is_null()
        },
    )
    .await;
    assert!(certs["spiffe_id"].is_null());
    assert!(
        certs["state"].is_null(),
        "no certificate, no state: {certs}"
    );
    assert!(
        certs["last_error"]
            .as_str()
            .unwrap()
            .contains("calling the control plane"),
        "{certs}"
    );
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn drain_lets_an_in_flight_connection_finish() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let app = echo_app().await;
    let (mut a, mut b) = pair(&cp, app, InboundMode::Strict, None).await;
    let mut tcp = tokio::net::TcpStream::connect(a.route(0)).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"before ")
        .await
        .unwrap();
    // Let the first bytes cross, then start draining A while the connection is open.
    let mut first = [0u8; 7];
    tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut first)
        .await
        .unwrap();
    let stop_a = tokio::spawn(async move {
        a.stop().await;
    });
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"after")
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::shutdown(&mut tcp).await.unwrap();
    let mut rest = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest)
        .await
        .unwrap();
    assert_eq!(
        (&first[..], rest.as_slice()),
        (&b"before "[..], &b"after"[..])
    );
    stop_a.await.unwrap();
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn sidecar_metrics_pass_promtool_after_traffic() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let app = http_app("web").await;
    let (mut a, mut b) = pair(&cp, app, InboundMode::Strict, None).await;
    let mut client = HttpClient::connect(a.route(0)).await.unwrap();
    for _ in 0..3 {
        assert_eq!(client.get("/x").await.unwrap().0, 200);
    }
    drop(client);
    let _ = echo_round_trip(b.r().inbound_addr, b"plaintext to a strict sidecar").await;
    for s in [&a, &b] {
        let text = s.metrics().await;
        for family in [
            "meshlet_requests_total",
            "meshlet_request_duration_seconds_bucket",
            "meshlet_tcp_connections_total",
            "meshlet_identity_cert_expiry_timestamp_seconds",
        ] {
            assert!(text.contains(family), "{family} missing:\n{text}");
        }
        if let Some((clean, report)) = meshlet_telemetry::promtool::check(&text) {
            assert!(
                clean,
                "promtool check metrics reported:\n{report}\non:\n{text}"
            );
        }
    }
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

/// The count the memory release watches to notice that traffic stopped
/// (`meshlet_telemetry::memory::release_when_quiet`): connections and requests add to it,
/// on both sidecars, and nothing does at rest.
#[tokio::test]
async fn activity_grows_with_connections_and_requests_and_not_at_rest() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let app = http_app("web").await;
    let (mut a, mut b) = pair(&cp, app, InboundMode::Strict, None).await;
    let activity = |s: &Sidecar| s.r().metrics.activity.get();
    let (a0, b0) = (activity(&a), activity(&b));
    let mut client = HttpClient::connect(a.route(0)).await.unwrap();
    for _ in 0..3 {
        assert_eq!(client.get("/x").await.unwrap().0, 200);
    }
    // A: the app's connection and three requests; B: three requests (and the connection
    // between the sidecars, unless the pool already had it). Each sidecar counts a request
    // before it answers it.
    let (a1, b1) = (activity(&a), activity(&b));
    assert!(a1 >= a0 + 4, "client sidecar: {a0} -> {a1}");
    assert!(b1 >= b0 + 3, "server sidecar: {b0} -> {b1}");
    // At rest (the client's connection open and unused), the count stays where it is.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((activity(&a), activity(&b)), (a1, b1), "counted at rest");
    drop(client);
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn a_service_address_is_balanced_over_its_backends_each_with_its_own_identity() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    // Two meshed backends (strict: only mutual TLS gets in) with different identities, and
    // one backend without a sidecar.
    let mut backends = vec![];
    for (sa, name) in [("web-a", "one"), ("web-b", "two")] {
        let mut config = sidecar_config(&cp, cp.token_file("demo", sa));
        config.app_addr = Some(http_app(name).await);
        config.inbound_mode = InboundMode::Strict;
        backends.push(Sidecar::start_ready(config).await);
    }
    let plain = http_app("three").await;
    // The Service's address: an echo server stands in for kube-proxy, so a connection
    // passed through to it in plaintext would be answered, by the wrong party.
    let vip = echo_app_on("127.0.0.77").await;
    let services = cp.running.as_ref().unwrap().services.as_ref().unwrap();
    let publish = |list: Vec<std::net::SocketAddr>| {
        services.send_replace(Some(std::sync::Arc::new(
            [(vip, list)].into_iter().collect(),
        )));
    };
    publish(vec![
        backends[0].r().inbound_addr,
        backends[1].r().inbound_addr,
        plain,
    ]);
    let mut client = sidecar_config(&cp, cp.token_file("demo", "client"));
    client.routes = vec![route(vip, None)];
    let mut client = Sidecar::start_ready(client).await;

    let mut seen = vec![];
    for _ in 0..6 {
        let (status, body) = http_get(client.route(0), "/hello").await;
        assert_eq!(status, 200, "{body}");
        seen.push(body);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "one GET /hello",
            "one GET /hello",
            "three GET /hello",
            "three GET /hello",
            "two GET /hello",
            "two GET /hello"
        ],
        "round robin over the three backends"
    );
    let m = client.metrics().await;
    let count = |tls: &str| {
        metric(
            &m,
            &format!(r#"meshlet_tcp_connections_total{{direction="outbound",tls="{tls}"}}"#),
        )
    };
    assert_eq!((count("true"), count("false")), (4.0, 2.0), "{m}");

    // A backend leaves the Service: the next connections go to the others only.
    publish(vec![backends[0].r().inbound_addr]);
    eventually(
        "the Service to shrink to one backend",
        Duration::from_secs(5),
        async || http_get(client.route(0), "/hello").await.1 == "one GET /hello",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            http_get(client.route(0), "/hello").await.1,
            "one GET /hello"
        );
    }
    // No backend left: refused, never sent in plaintext to the Service's address.
    publish(vec![]);
    let unreachable =
        r#"meshlet_connections_refused_total{direction="outbound",reason="upstream_unreachable"}"#;
    eventually(
        "a Service without backends to be refused",
        Duration::from_secs(5),
        async || {
            let answer = echo_round_trip(client.route(0), b"GET / HTTP/1.0\r\n\r\n").await;
            answer.map(|b| b.is_empty()).unwrap_or(true)
                && metric(&client.metrics().await, unreachable) >= 1.0
        },
    )
    .await;
    client.stop().await;
    for mut b in backends {
        b.stop().await;
    }
    cp.stop().await;
}
