//! Certificates rotate under continuous traffic without losing a request, `/certs` shows
//! it, traffic goes on with the current certificates when the control plane stops, and
//! stops (fail closed) when they expire before it returns.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::{Duration, Instant};

use common::*;
use meshlet_proxy::inbound::InboundMode;

async fn rotations(s: &Sidecar) -> u64 {
    let (_, certs) = http_get(s.r().admin_addr, "/certs").await;
    let v: serde_json::Value = serde_json::from_str(&certs).unwrap();
    v["rotations"].as_u64().unwrap()
}

#[tokio::test]
async fn three_rotations_under_load_lose_no_request() {
    // 3 s certificates: each sidecar renews about every 1.5 s.
    let mut cp = ControlPlane::start(Duration::from_secs(3)).await;
    let (mut a, mut b) = pair(&cp, http_app("web").await, InboundMode::Strict, None).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut ok, mut failed, mut n) = (0u32, Vec::new(), 0u32);
    let mut kept = HttpClient::connect(a.route(0)).await.unwrap();
    while Instant::now() < deadline && n < 100_000 {
        n += 1;
        // Alternate a kept-alive connection and fresh connections (new handshakes).
        let result = if n % 2 == 0 {
            kept.get("/kept").await
        } else {
            HttpClient::connect(a.route(0))
                .await
                .unwrap()
                .get("/fresh")
                .await
        };
        match result {
            Ok((200, _)) => ok += 1,
            other => failed.push(format!("{other:?}")),
        }
        if n % 50 == 0 && rotations(&a).await >= 3 && rotations(&b).await >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (ra, rb) = (rotations(&a).await, rotations(&b).await);
    assert!(
        ra >= 3 && rb >= 3,
        "rotations: client {ra}, server {rb} after {n} requests"
    );
    assert!(
        failed.is_empty(),
        "{} of {n} requests failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests");

    let (_, certs) = http_get(a.r().admin_addr, "/certs").await;
    let v: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(v["spiffe_id"], "spiffe://cluster.local/ns/demo/sa/client");
    for field in [
        "serial",
        "not_before",
        "not_after",
        "renew_at",
        "last_rotation",
    ] {
        assert!(v[field].is_string(), "{field} in {certs}");
    }
    assert!(v["last_error"].is_null());
    assert_eq!(v["trust_bundle"].as_array().unwrap().len(), 1);
    let m = a.metrics().await;
    assert!(
        metric(
            &m,
            r#"meshlet_identity_cert_rotations_total{result="success"}"#
        ) >= 4.0,
        "{m}"
    );
    assert!(
        metric(&m, "meshlet_identity_cert_expiry_timestamp_seconds") > 1.7e9,
        "{m}"
    );
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn traffic_goes_on_when_the_control_plane_stops() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let (mut a, mut b) = pair(&cp, echo_app().await, InboundMode::Strict, None).await;
    assert_eq!(
        echo_round_trip(a.route(0), b"before").await.unwrap(),
        b"before"
    );

    cp.stop().await;
    for i in 0..20 {
        let msg = format!("after {i}");
        assert_eq!(
            echo_round_trip(a.route(0), msg.as_bytes()).await.unwrap(),
            msg.as_bytes()
        );
    }
    assert_eq!(
        http_get(a.r().admin_addr, "/ready").await.0,
        200,
        "still ready on its current certificate"
    );
    a.stop().await;
    b.stop().await;
}

/// The control plane stays away past the certificates' expiry: the sidecars fail closed
/// (no plaintext fallback into a permissive peer, not ready), count why, and recover on
/// their own once it returns.
#[tokio::test]
async fn expired_certificates_fail_closed_until_the_control_plane_returns() {
    let mut cp = ControlPlane::start(Duration::from_secs(3)).await;
    // Permissive: a client falling back to plaintext would get through, so it must not.
    let (mut a, mut b) = pair(&cp, echo_app().await, InboundMode::Permissive, None).await;
    assert_eq!(
        echo_round_trip(a.route(0), b"fresh").await.unwrap(),
        b"fresh"
    );

    cp.stop().await;
    let admin = a.r().admin_addr;
    eventually(
        "not ready once the 3 s certificate has expired",
        Duration::from_secs(10),
        async || http_get(admin, "/ready").await.0 != 200,
    )
    .await;
    for i in 0..5 {
        let sent = format!("expired {i}");
        let got = echo_round_trip(a.route(0), sent.as_bytes()).await;
        assert!(
            got.map(|b| b.is_empty()).unwrap_or(true),
            "mesh traffic flowed without a valid certificate"
        );
    }
    let m = a.metrics().await;
    assert!(
        metric(
            &m,
            r#"meshlet_connections_refused_total{direction="outbound",reason="no_certificate"}"#
        ) >= 5.0,
        "{m}"
    );
    let (_, certs) = http_get(a.r().admin_addr, "/certs").await;
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(certs["state"], "expired", "/certs says so: {certs}");

    cp.restart().await;
    let route = a.route(0);
    eventually(
        "traffic resumes once the control plane is back",
        Duration::from_secs(5),
        async || {
            echo_round_trip(route, b"back")
                .await
                .is_ok_and(|v| v == b"back")
        },
    )
    .await;
    assert_eq!(http_get(a.r().admin_addr, "/ready").await.0, 200);
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn a_sidecar_started_before_the_control_plane_is_ready_soon_after_it() {
    // Reserve the control plane's address, start the sidecar against it while nothing
    // listens there, let it fail a few times, then start the control plane on that address.
    let dir = tempfile::tempdir().unwrap();
    let td = meshlet_identity::TrustDomain::parse("cluster.local").unwrap();
    let first = ControlPlane::start(Duration::from_secs(3600)).await;
    let bundle = first.bundle_file.clone();
    let token = first.token_file("demo", "late");
    let (ca_dir, data) = (first.dir.path().to_owned(), dir.path().to_owned());
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = sidecar_config(&first, token);
    config.control_addr = grpc.to_string();
    config.trust_bundle = bundle;
    let mut sidecar = Sidecar::start(config).await;
    // A few failed attempts, the backoff growing.
    let admin = sidecar.r().admin_addr;
    eventually(
        "three failed certificate requests",
        Duration::from_secs(10),
        async || {
            let m = http_get(admin, "/metrics").await.1;
            metric(
                &m,
                r#"meshlet_identity_cert_rotations_total{result="failure"}"#,
            ) >= 3.0
        },
    )
    .await;
    assert_eq!(http_get(sidecar.r().admin_addr, "/ready").await.0, 503);

    let mut cp_config =
        meshlet_control::Config::local(data, td, Duration::from_secs(3600)).unwrap();
    cp_config.ca_dir = Some(ca_dir.join("ca"));
    cp_config.local_tokens = true;
    std::fs::copy(
        ca_dir.join("token-signing.key"),
        cp_config.data_dir.join("token-signing.key"),
    )
    .unwrap();
    let listeners = meshlet_control::Listeners {
        grpc: tokio::net::TcpListener::bind(grpc).await.unwrap(),
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        webhook: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let second = meshlet_control::run(cp_config, listeners, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    let back = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), sidecar.r().ready())
        .await
        .expect("ready soon after the control plane returned");
    // Retries are at most 1 s apart without a certificate (after three failures the usual
    // backoff would already wait 4 s); the rest is a Certify round trip, which a loaded CI
    // machine with every test running at once can stretch to a second.
    assert!(
        back.elapsed() < Duration::from_secs(3),
        "ready only after {:?}",
        back.elapsed()
    );
    sidecar.stop().await;
    let _ = stop.send(());
    second.wait().await.unwrap();
    drop(first);
}

#[tokio::test]
async fn a_restarted_control_plane_never_turns_mesh_traffic_into_plaintext() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let (mut a, mut b) = pair(&cp, echo_app().await, InboundMode::Strict, None).await;
    assert_eq!(
        echo_round_trip(a.route(0), b"before").await.unwrap(),
        b"before"
    );

    // The new process has never seen B certify: B's re-announcement must tell it.
    cp.restart().await;
    // B's watch reconnects to the new process and announces B again.
    let b_inbound = b.r().inbound_addr;
    eventually(
        "the restarted control plane hears B announce itself",
        Duration::from_secs(10),
        async || {
            cp.discovered(b_inbound).await.as_deref()
                == Some("spiffe://cluster.local/ns/demo/sa/server")
        },
    )
    .await;
    // A client that starts now learns about B only from the new process: B is strict, so
    // only a "meshed" answer (mutual TLS) gets its bytes echoed.
    let mut c = sidecar_config(&cp, cp.token_file("demo", "late-client"));
    c.routes = vec![route(b.r().inbound_addr, None)];
    let mut c = Sidecar::start_ready(c).await;
    for client in [&a, &c] {
        eventually(
            "traffic to resume after the restart",
            Duration::from_secs(20),
            async || {
                echo_round_trip(client.route(0), b"after")
                    .await
                    .is_ok_and(|v| v == b"after")
            },
        )
        .await;
        let m = client.metrics().await;
        assert_eq!(
            metric(
                &m,
                r#"meshlet_tcp_connections_total{direction="outbound",tls="false"}"#
            ),
            0.0,
            "plaintext after the restart:\n{m}"
        );
    }
    c.stop().await;
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

/// A control plane that accepts connections and never answers (overloaded, or a network
/// that black-holes replies): the sidecar starts, stays alive and not ready, refuses mesh
/// traffic, and once a real control plane answers it gets its certificate by itself; its
/// stuck calls time out rather than hang.
#[tokio::test]
async fn a_control_plane_that_never_answers_is_waited_out() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let grpc = cp.addr();
    let mut config = sidecar_config(&cp, cp.token_file("demo", "client"));
    config.routes = vec![route(
        echo_app().await,
        Some("spiffe://cluster.local/ns/demo/sa/server"),
    )];
    cp.stop().await;
    // The black hole: accepts, holds every connection, never writes a byte.
    let hole = tokio::net::TcpListener::bind(grpc).await.unwrap();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let accepting = {
        let held = held.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = hole.accept().await {
                held.lock().unwrap().push(tcp);
            }
        })
    };
    let mut a = Sidecar::start(config).await;
    eventually(
        "the sidecar to call the black hole",
        Duration::from_secs(10),
        async || !held.lock().unwrap().is_empty(),
    )
    .await;
    assert_eq!(http_get(a.r().admin_addr, "/live").await.0, 200);
    assert_eq!(http_get(a.r().admin_addr, "/ready").await.0, 503);
    assert_refused_without_certificate(&a).await;

    // A real control plane takes the address; the black hole's connections stay open.
    accepting.abort();
    let _ = accepting.await;
    cp.restart().await;
    let started = std::time::Instant::now();
    eventually(
        "ready once a control plane answers",
        Duration::from_secs(25),
        async || http_get(a.r().admin_addr, "/ready").await.0 == 200,
    )
    .await;
    eprintln!(
        "ready {:?} after the control plane came back",
        started.elapsed()
    );
    drop(held);
    a.stop().await;
    cp.stop().await;
}
