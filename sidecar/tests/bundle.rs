//! A new trust bundle reaches the sidecar's TLS configurations without a restart: after a
//! bundle update that adds a second root, a client certified by that root is accepted.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use common::ControlPlane;
use meshlet_identity::ca::Ca;
use meshlet_identity::csr::{build_csr, check_csr};
use meshlet_identity::{Expected, MESH_ALPN, SpiffeId, TrustDomain, tls};
use meshlet_proto::identity::v1::identity_client::IdentityClient;
use meshlet_proxy::identity::{CertStatus, IdentityTask, maintain};
use meshlet_proxy::metrics::Metrics;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Does a client with `chain`/`key` get through a handshake with `server`?
fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: rustls::ClientConfig,
) -> Result<(), rustls::Error> {
    let mut c = rustls::ClientConnection::new(
        Arc::new(client),
        ServerName::try_from("x.invalid").unwrap(),
    )?;
    let mut s = rustls::ServerConnection::new(server)?;
    for _ in 0..10 {
        let mut buf = vec![];
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        s.read_tls(&mut &buf[..]).unwrap();
        s.process_new_packets()?;
        let mut buf = vec![];
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        c.read_tls(&mut &buf[..]).unwrap();
        c.process_new_packets()?;
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

#[tokio::test]
async fn a_bundle_update_is_used_by_the_next_handshake() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let cp_bundle: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cp.running.as_ref().unwrap().trust_bundle_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let control_tls = tls::client_config(
        tls::root_store(&cp_bundle).unwrap(),
        Expected::Exact(cp.running.as_ref().unwrap().identity.clone()),
        None,
        &[meshlet_proto::connect::GRPC_ALPN],
    )
    .unwrap();
    let channel =
        meshlet_proto::connect::tls_channel(&cp.addr().to_string(), Arc::new(control_tls)).unwrap();
    let (creds_tx, mut creds) = watch::channel(None);
    let (bundle_tx, bundle_rx) = watch::channel(cp_bundle.clone());
    let status = Arc::new(ArcSwap::from_pointee(CertStatus::default()));
    let task = IdentityTask {
        client: IdentityClient::new(channel),
        token_file: cp.token_file("demo", "server"),
        address: None,
        creds: creds_tx,
        status: status.clone(),
        metrics: Arc::new(Metrics::default()),
        control_roots: Arc::new(ArcSwap::new(tls::root_store(&cp_bundle).unwrap())),
    };
    let stop = CancellationToken::new();
    tokio::spawn(maintain(task, bundle_rx, stop.clone()));
    creds.wait_for(Option::is_some).await.unwrap();

    // A client certified by a second CA of the same trust domain.
    let td = TrustDomain::parse("cluster.local").unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other = Ca::load_or_create(other_dir.path(), &td).unwrap();
    let who = SpiffeId::for_service_account(&td, "demo", "client").unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let svid = other
        .issue(
            &who,
            &check_csr(&build_csr(&key, None).unwrap(), &who).unwrap(),
            Duration::from_secs(600),
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let server_id = SpiffeId::for_service_account(&td, "demo", "server").unwrap();
    let both: Vec<CertificateDer<'static>> = cp_bundle
        .iter()
        .cloned()
        .chain(other.trust_bundle().iter().cloned())
        .collect();
    let client = || {
        tls::client_config(
            tls::root_store(&both).unwrap(),
            Expected::Exact(server_id.clone()),
            Some((svid.chain.clone(), key.clone_key())),
            &[MESH_ALPN],
        )
        .unwrap()
    };

    let before = creds.borrow().clone().unwrap();
    assert!(
        handshake(before.server.clone(), client()).is_err(),
        "the second CA is not trusted yet"
    );

    bundle_tx.send_replace(both.clone());
    creds.changed().await.unwrap();
    let after = creds.borrow().clone().unwrap();
    handshake(after.server.clone(), client()).expect("trusted after the bundle update");
    assert_eq!(
        status.load().trust_bundle.len(),
        2,
        "/certs lists both roots"
    );
    assert_eq!(after.id, before.id, "same certificate, new bundle");
    stop.cancel();
    cp.stop().await;
}
