//! Root rotation end to end, under continuous traffic between two sidecars: add a root,
//! issue from a new intermediate under it, let workloads renew, retire the old root. No
//! request is lost and nothing restarts; afterwards a peer that still holds a certificate
//! under the old root is refused. The admin API refuses callers without an admin token.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use meshlet_control::token::LocalSigner;
use meshlet_identity::ca::Ca;
use meshlet_identity::csr::{build_csr, check_csr};
use meshlet_identity::{Expected, MESH_ALPN, SpiffeId, TrustDomain, tls};
use meshlet_proxy::inbound::InboundMode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn post(admin: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    tcp.write_all(
        format!("POST {path} HTTP/1.0\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head[9..12].parse().unwrap(), body.to_owned())
}

async fn bundle_len(s: &Sidecar) -> usize {
    let v: serde_json::Value =
        serde_json::from_str(&http_get(s.r().admin_addr, "/certs").await.1).unwrap();
    v["trust_bundle"].as_array().unwrap().len()
}

async fn rotations(s: &Sidecar) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&http_get(s.r().admin_addr, "/certs").await.1).unwrap();
    v["rotations"].as_u64().unwrap()
}

/// A mesh client holding `chain`/`key` asks B's inbound for "/" over mutual TLS.
async fn old_peer_gets_through(
    b_inbound: std::net::SocketAddr,
    roots: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> bool {
    let td = TrustDomain::parse("cluster.local").unwrap();
    let config = tls::client_config(
        tls::root_store(roots).unwrap(),
        Expected::TrustDomain(td),
        Some((chain, key)),
        &[MESH_ALPN],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(b_inbound).await.unwrap();
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(b_inbound.ip().into()), tcp)
        .await
    else {
        return false;
    };
    if tls
        .write_all(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    buf.starts_with(b"HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_under_traffic_loses_nothing_and_retires_the_old_root() {
    let mut cp = ControlPlane::start(Duration::from_secs(3)).await;
    let admin = cp.running.as_ref().unwrap().admin_addr;
    let app = http_app("web").await;
    let mut b = sidecar_config(&cp, cp.token_file("demo", "server"));
    b.app_addr = Some(app);
    b.inbound_mode = InboundMode::Strict;
    let mut b = Sidecar::start_ready(b).await;
    let mut a = sidecar_config(&cp, cp.token_file("demo", "client"));
    a.routes = vec![route(b.r().inbound_addr, None)];
    let mut a = Sidecar::start_ready(a).await;

    // Only an admin identity may rotate.
    let signer = LocalSigner::load_or_create(cp.dir.path()).unwrap();
    let admin_token = signer
        .mint(
            "meshlet-system",
            "meshlet-admin",
            None,
            Duration::from_secs(600),
        )
        .unwrap();
    let other_token = signer
        .mint("demo", "client", None, Duration::from_secs(600))
        .unwrap();
    assert_eq!(post(admin, "/v1/ca/roots", None).await.0, 401);
    assert_eq!(post(admin, "/v1/ca/roots", Some("garbage")).await.0, 401);
    let (status, body) = post(admin, "/v1/ca/roots", Some(&other_token)).await;
    assert_eq!(status, 403, "{body}");

    // Material under the old root, kept aside as a peer that never renews would hold it.
    let td = TrustDomain::parse("cluster.local").unwrap();
    let old_ca = Ca::load(&cp.dir.path().join("ca")).unwrap();
    let old_root = old_ca.roots()[0].serial.clone();
    let who = SpiffeId::for_service_account(&td, "demo", "stale").unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let stale = old_ca
        .issue(
            &who,
            &check_csr(&build_csr(&key, None).unwrap(), &who).unwrap(),
            Duration::from_secs(600),
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    let stale_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

    // Continuous traffic on fresh connections (each a new handshake) until told to stop.
    let (ok, failed, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let traffic = {
        let (ok, failed, stop, route) = (ok.clone(), failed.clone(), stop.clone(), a.route(0));
        let failures = failures.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let result = async { HttpClient::connect(route).await?.get("/").await }.await;
                match result {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        let at = format!("{:?}", Instant::now());
                        failures.lock().unwrap().push(format!("{at}: {other:?}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // 1. A new root reaches both sidecars.
    let (status, body) = post(admin, "/v1/ca/roots", Some(&admin_token)).await;
    assert_eq!(status, 200, "{body}");
    eventually(
        "both sidecars trust two roots",
        Duration::from_secs(20),
        || async { bundle_len(&a).await == 2 && bundle_len(&b).await == 2 },
    )
    .await;
    let both: Vec<CertificateDer<'static>> = {
        let bundle = std::fs::read(cp.dir.path().join("ca/bundle.crt")).unwrap();
        CertificateDer::pem_slice_iter(&bundle)
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert!(
        old_peer_gets_through(
            b.r().inbound_addr,
            &both,
            stale.chain.clone(),
            stale_key.clone_key()
        )
        .await,
        "before retirement the old root is trusted"
    );

    // 2. Issue from a new intermediate under the new root; wait until both renewed twice.
    let (status, body) = post(admin, "/v1/ca/intermediate", Some(&admin_token)).await;
    assert_eq!(status, 200, "{body}");
    let (ra, rb) = (rotations(&a).await, rotations(&b).await);
    eventually(
        "both sidecars renewed under the new intermediate",
        Duration::from_secs(20),
        || async { rotations(&a).await >= ra + 2 && rotations(&b).await >= rb + 2 },
    )
    .await;

    // 3. Retire the old root.
    let (status, body) = post(
        admin,
        &format!("/v1/ca/retire-root?serial={old_root}"),
        Some(&admin_token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    eventually(
        "both sidecars trust one root",
        Duration::from_secs(20),
        || async { bundle_len(&a).await == 1 && bundle_len(&b).await == 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // more traffic on the final state
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during the rotation: {:?}",
        ok + failed,
        failures.lock().unwrap()
    );
    assert!(ok > 50, "only {ok} requests");

    assert!(
        !old_peer_gets_through(b.r().inbound_addr, &both, stale.chain, stale_key).await,
        "a certificate under the retired root was accepted"
    );
    let m = b.metrics().await;
    assert!(
        metric(
            &m,
            r#"meshlet_tls_handshake_errors_total{direction="inbound",reason="untrusted_certificate"}"#
        ) >= 1.0,
        "{m}"
    );
    let cm = http_get(admin, "/metrics").await.1;
    assert_eq!(
        cm.matches("meshlet_ca_cert_expiry_timestamp_seconds{role=\"root\"")
            .count(),
        1,
        "{cm}"
    );
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}
