//! `meshletctl check` and `certs` against a real control plane: exit 0 only when all is
//! well; non-zero with what to do when the control plane is unreachable, or a workload's
//! certificate is overdue, expiring or expired (20 s certificates make each happen), or a
//! root or the intermediate is expiring.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;
use std::time::Duration;

use meshlet_control::token::LocalSigner;
use meshlet_control::{Config, Listeners, Running};
use meshlet_identity::csr::build_csr;
use meshlet_identity::{Expected, TrustDomain, tls};
use meshlet_proto::identity::v1::CertifyRequest;
use meshlet_proto::identity::v1::identity_client::IdentityClient;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

fn meshletctl(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshletctl"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn start(
    dir: &std::path::Path,
    ttl: Duration,
    ca_expiring_within: Duration,
) -> (Running, tokio::sync::oneshot::Sender<()>) {
    let mut config = Config::local(
        dir.to_owned(),
        TrustDomain::parse("cluster.local").unwrap(),
        ttl,
    )
    .unwrap();
    config.ca_expiring_within = ca_expiring_within;
    let listeners = Listeners::bind(config.grpc_addr, config.admin_addr)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = meshlet_control::run(config, listeners, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    (running, stop)
}

async fn certify(running: &Running, dir: &std::path::Path, sa: &str) {
    let bundle: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(running.trust_bundle_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let config = tls::client_config(
        tls::root_store(&bundle).unwrap(),
        Expected::Exact(running.identity.clone()),
        None,
        &[b"h2"],
    )
    .unwrap();
    let channel = meshlet_proto::connect::tls_channel(
        &running.grpc_addr.to_string(),
        std::sync::Arc::new(config),
    )
    .unwrap();
    let token = LocalSigner::load_or_create(dir)
        .unwrap()
        .mint(
            "shop",
            sa,
            Some(&format!("{sa}-0")),
            Duration::from_secs(600),
        )
        .unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    IdentityClient::new(channel)
        .certify(CertifyRequest {
            csr: build_csr(&key, None).unwrap(),
            token,
            pod_ip: String::new(),
        })
        .await
        .unwrap();
}

// The subprocess blocks its thread while the control plane (in this runtime) answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_loudly_for_each_unhealthy_case() {
    // Unreachable: a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    drop(std::net::TcpListener::bind(closed));
    let (code, out) = meshletctl(&["check", "--control-admin", &closed.to_string()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("unreachable") && out.contains("→"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let (running, stop) = start(
        dir.path(),
        Duration::from_secs(20),
        Duration::from_secs(86_400),
    )
    .await;
    let admin = running.admin_addr.to_string();
    let check = || meshletctl(&["check", "--control-admin", &admin]);

    let (code, out) = check();
    assert_eq!(code, 0, "no workloads yet, a fresh CA: {out}");
    let issued = tokio::time::Instant::now();
    certify(&running, dir.path(), "cart").await;
    let (code, out) = check();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("✓") && out.contains("1 workload"), "{out}");

    // 20 s certificates that nobody renews: overdue after 60% (12 s), expiring with 25% left
    // (15 s), expired (20 s); each check sits well inside its window, even on a busy machine.
    for (at, want) in [
        (13.5, "renewal is overdue"),
        (17.5, "was not renewed"),
        (20.8, "certificate expired"),
    ] {
        tokio::time::sleep_until(issued + Duration::from_secs_f64(at)).await;
        let (code, out) = check();
        assert_eq!(code, 1, "at {at} s: {out}");
        assert!(
            out.contains(want)
                && out.contains("spiffe://cluster.local/ns/shop/sa/cart (pod shop/cart-0)"),
            "at {at} s: {out}"
        );
        assert!(out.contains("→ check that its sidecar is running"), "{out}");
    }
    let (code, out) = meshletctl(&["certs", "--control-admin", &admin]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("spiffe://cluster.local/ns/shop/sa/cart")
            && out.contains("expired")
            && out.contains("root "),
        "{out}"
    );
    let (code, out) = meshletctl(&[
        "certs",
        "--control-admin",
        &admin,
        "-o",
        "json",
        "--state",
        "expired",
    ]);
    assert_eq!(code, 0, "{out}");
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(json["workloads"].as_array().unwrap().len(), 1);
    let _ = stop.send(());
    running.wait().await.unwrap();

    // A CA that expires within the warning window: roots and intermediate are flagged.
    let dir = tempfile::tempdir().unwrap();
    let (running, stop) = start(
        dir.path(),
        Duration::from_secs(600),
        Duration::from_secs(20 * 365 * 86_400),
    )
    .await;
    let (code, out) = meshletctl(&["check", "--control-admin", &running.admin_addr.to_string()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("root O=meshlet") && out.contains("rotate the roots now"),
        "{out}"
    );
    assert!(
        out.contains("the issuing intermediate")
            && out.contains("meshletctl ca rotate-intermediate"),
        "{out}"
    );
    let _ = stop.send(());
    running.wait().await.unwrap();
}
