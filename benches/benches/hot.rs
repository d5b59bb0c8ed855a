//! Micro-benchmarks of the hot pieces: a full mutual-TLS 1.3 handshake between two
//! sidecars (both sides, in memory, with the mesh's real configurations and SPIFFE
//! verifiers), the SPIFFE ID check of a peer certificate, and certificate issuance.
//!
//! `cargo bench -p meshlet-benches --bench hot`

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use meshlet_identity::ca::Ca;
use meshlet_identity::csr::{build_csr, check_csr};
use meshlet_identity::{Expected, MESH_ALPN, SpiffeId, TrustDomain, tls};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

struct Mesh {
    _dir: tempfile::TempDir,
    ca: Ca,
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    leaf: CertificateDer<'static>,
    td: TrustDomain,
}

fn material(ca: &Ca, id: &SpiffeId) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let checked = check_csr(&build_csr(&key, None).expect("csr"), id).expect("checked");
    let svid = ca
        .issue(
            id,
            &checked,
            Duration::from_secs(3600),
            time::OffsetDateTime::now_utc(),
        )
        .expect("issued");
    (
        svid.chain,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

fn mesh() -> Mesh {
    let dir = tempfile::tempdir().expect("temp dir");
    let td = TrustDomain::parse("cluster.local").expect("valid");
    let ca = Ca::load_or_create(dir.path(), &td).expect("CA");
    let roots = tls::root_store(ca.trust_bundle()).expect("roots");
    let client_id = SpiffeId::for_service_account(&td, "a", "client").expect("valid");
    let server_id = SpiffeId::for_service_account(&td, "b", "server").expect("valid");
    let (cc, ck) = material(&ca, &client_id);
    let (sc, sk) = material(&ca, &server_id);
    let leaf = sc[0].clone();
    let client = tls::client_config(
        roots.clone(),
        Expected::TrustDomain(td.clone()),
        Some((cc, ck)),
        &[MESH_ALPN],
    )
    .expect("client");
    let server = tls::server_config(
        sc,
        sk,
        Some((roots, Expected::TrustDomain(td.clone()))),
        &[MESH_ALPN],
    )
    .expect("server");
    Mesh {
        _dir: dir,
        ca,
        client: Arc::new(client),
        server: Arc::new(server),
        leaf,
        td,
    }
}

/// One full handshake, both sides, bytes moved in memory.
fn handshake(m: &Mesh) {
    let name = ServerName::try_from("mesh.invalid").expect("valid");
    let mut c = rustls::ClientConnection::new(m.client.clone(), name).expect("client");
    let mut s = rustls::ServerConnection::new(m.server.clone()).expect("server");
    let mut buf = Vec::with_capacity(8192);
    while c.is_handshaking() || s.is_handshaking() {
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("write");
        }
        s.read_tls(&mut &buf[..]).expect("read");
        s.process_new_packets().expect("server handshake");
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).expect("write");
        }
        c.read_tls(&mut &buf[..]).expect("read");
        c.process_new_packets().expect("client handshake");
    }
}

fn benches(c: &mut Criterion) {
    let m = mesh();
    c.bench_function(
        "mTLS 1.3 handshake, both sides (X25519MLKEM768, P-256)",
        |b| b.iter(|| handshake(&m)),
    );
    let expected =
        Expected::Exact(SpiffeId::for_service_account(&m.td, "b", "server").expect("valid"));
    c.bench_function(
        "SPIFFE ID check of a peer leaf (X509-SVID rules + exact match)",
        |b| {
            b.iter(|| {
                expected
                    .check(std::hint::black_box(&m.leaf))
                    .expect("valid")
            })
        },
    );
    c.bench_function("SpiffeId::parse", |b| {
        b.iter(|| {
            SpiffeId::parse(std::hint::black_box(
                "spiffe://cluster.local/ns/shop/sa/cart",
            ))
            .expect("valid")
        })
    });
    let id = SpiffeId::for_service_account(&m.td, "a", "b").expect("valid");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = build_csr(&key, None).expect("csr");
    c.bench_function("issuance: CSR check + sign an SVID", |b| {
        b.iter(|| {
            let checked = check_csr(&csr, &id).expect("checked");
            m.ca.issue(
                &id,
                &checked,
                Duration::from_secs(3600),
                time::OffsetDateTime::now_utc(),
            )
            .expect("issued")
        })
    });
}

criterion_group! {
    name = hot;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(hot);
