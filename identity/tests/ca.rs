//! The CA end to end without the network: issuance follows the X509-SVID rules (read back
//! with x509-parser, a parser independent of rcgen), CSRs are checked, the CA survives a
//! restart, and the verifiers accept and refuse real TLS 1.3 handshakes.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use meshlet_identity::ca::{Ca, CaError};
use meshlet_identity::cert::SvidError;
use meshlet_identity::csr::{CsrError, MAX_CSR_LEN, build_csr, check_csr};
use meshlet_identity::{Expected, MESH_ALPN, SpiffeId, TrustDomain, tls};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn td() -> TrustDomain {
    TrustDomain::parse("cluster.local").unwrap()
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::for_service_account(&td(), ns, sa).unwrap()
}

fn new_ca() -> (tempfile::TempDir, Ca) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(dir.path(), &td()).unwrap();
    (dir, ca)
}

fn p256() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

#[test]
fn issued_svid_follows_the_x509_svid_rules() {
    let (_dir, ca) = new_ca();
    let key = p256();
    let who = id("prod", "api");
    let checked = check_csr(&build_csr(&key, None).unwrap(), &who).unwrap();
    let now = OffsetDateTime::now_utc();
    let svid = ca.issue(&who, &checked, DAY, now).unwrap();

    assert_eq!(svid.chain.len(), 2, "leaf and intermediate");
    let (rest, leaf) = X509Certificate::from_der(&svid.chain[0]).unwrap();
    assert!(rest.is_empty());
    assert!(
        leaf.subject().as_raw().len() <= 2,
        "empty subject: {}",
        leaf.subject()
    );

    let mut uris = vec![];
    let mut san_critical = None;
    for ext in leaf.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            san_critical = Some(ext.critical);
            for n in &san.general_names {
                match n {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    other => panic!("unexpected SAN {other:?}"),
                }
            }
        }
    }
    assert_eq!(
        uris,
        vec!["spiffe://cluster.local/ns/prod/sa/api".to_string()]
    );
    assert_eq!(
        san_critical,
        Some(true),
        "SAN is critical when the subject is empty"
    );

    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca, "leaf is CA:false");
    let ku = leaf.key_usage().unwrap().expect("key usage present");
    assert!(ku.critical, "key usage is critical");
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let eku = leaf.extended_key_usage().unwrap().expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);

    // The public key is the CSR's, and the lifetime is the TTL (plus the clock-skew backdate).
    assert_eq!(
        leaf.public_key().raw,
        &rcgen::PublicKeyData::subject_public_key_info(&key)[..]
    );
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(life, DAY.as_secs() as i64 + 60);
    assert_eq!(
        leaf.validity().not_after.timestamp(),
        svid.not_after.unix_timestamp()
    );
    assert_eq!(meshlet_identity::cert::hex(leaf.raw_serial()), svid.serial);

    // The chain validates against the bundle.
    let (_, issuer) = X509Certificate::from_der(&svid.chain[1]).unwrap();
    leaf.verify_signature(Some(issuer.public_key())).unwrap();
    let (_, root) = X509Certificate::from_der(&ca.trust_bundle()[0]).unwrap();
    issuer.verify_signature(Some(root.public_key())).unwrap();
    assert!(issuer.is_ca() && root.is_ca());
    for ca_cert in [&issuer, &root] {
        let has_name_constraints = ca_cert
            .extensions()
            .iter()
            .any(|e| matches!(e.parsed_extension(), ParsedExtension::NameConstraints(_)));
        assert!(
            !has_name_constraints,
            "no name constraints on signing certificates"
        );
    }
}

#[test]
fn lifetime_never_passes_the_issuer_expiry() {
    let (_dir, ca) = new_ca();
    let who = id("a", "b");
    let checked = check_csr(&build_csr(&p256(), None).unwrap(), &who).unwrap();
    let svid = ca
        .issue(&who, &checked, DAY * 5000, OffsetDateTime::now_utc())
        .unwrap();
    assert_eq!(svid.not_after, ca.issuer_not_after());

    let late = ca.issuer_not_after() + time::Duration::seconds(1);
    assert!(matches!(
        ca.issue(&who, &checked, DAY, late),
        Err(CaError::IssuerExpired(_))
    ));
}

#[test]
fn restart_keeps_the_ca_and_keys_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let first = Ca::load_or_create(dir.path(), &td()).unwrap();
    let second = Ca::load_or_create(dir.path(), &td()).unwrap();
    assert_eq!(first.trust_bundle(), second.trust_bundle());
    assert_eq!(first.issuer_not_after(), second.issuer_not_after());
    for key in ["root.key", "issuer.key"] {
        let mode = std::fs::metadata(dir.path().join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    // Loading the files alone (the Kubernetes Secret path) gives the same CA.
    let loaded = Ca::load(dir.path()).unwrap();
    assert_eq!(loaded.trust_bundle_pem(), first.trust_bundle_pem());
}

#[test]
fn broken_ca_folders_are_refused_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    Ca::load_or_create(dir.path(), &td()).unwrap();
    std::fs::remove_file(dir.path().join("issuer.key")).unwrap();
    let err = Ca::load_or_create(dir.path(), &td()).unwrap_err();
    assert!(matches!(err, CaError::Incomplete(_, "issuer.key")), "{err}");

    // A key that does not belong to the issuer certificate.
    std::fs::write(dir.path().join("issuer.key"), p256().serialize_pem()).unwrap();
    let err = Ca::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    // An issuer that does not chain to the bundle.
    let (other, _) = new_ca();
    for f in ["issuer.crt", "issuer.key"] {
        std::fs::copy(other.path().join(f), dir.path().join(f)).unwrap();
    }
    assert!(matches!(
        Ca::load(dir.path()),
        Err(CaError::IssuerNotInBundle)
    ));

    std::fs::write(dir.path().join("bundle.crt"), "not pem").unwrap();
    assert!(matches!(Ca::load(dir.path()), Err(CaError::BadFile { .. })));
}

#[test]
fn bad_csrs_are_refused_with_the_reason() {
    let who = id("prod", "api");
    let good = build_csr(&p256(), None).unwrap();
    let mut tampered = good.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let ed25519 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut trailing = good.clone();
    trailing.push(0);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"definitely not a CSR".to_vec(), "csr_malformed"),
        ("empty", vec![], "csr_malformed"),
        ("trailing bytes", trailing, "csr_malformed"),
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            "csr_malformed",
        ),
        ("wrong signature", tampered, "csr_bad_signature"),
        (
            "ed25519 key",
            build_csr(&ed25519, None).unwrap(),
            "csr_unsupported_key",
        ),
        (
            "p384 key",
            build_csr(&p384, None).unwrap(),
            "csr_unsupported_key",
        ),
        (
            "another identity",
            build_csr(&p256(), Some(&id("prod", "admin"))).unwrap(),
            "csr_identity_mismatch",
        ),
        ("oversized", vec![0x30; MAX_CSR_LEN + 1], "csr_too_large"),
    ];
    for (name, der, reason) in cases {
        let err = check_csr(&der, &who).expect_err(name);
        assert_eq!(err.reason(), reason, "{name}: {err}");
    }
    // Naming the right identity is fine.
    check_csr(&build_csr(&p256(), Some(&who)).unwrap(), &who).unwrap();
    assert!(matches!(
        check_csr(&build_csr(&p256(), Some(&id("x", "y"))).unwrap(), &who),
        Err(CsrError::IdentityMismatch { .. })
    ));
}

/// One workload's TLS material: chain and key.
fn material(
    ca: &Ca,
    who: &SpiffeId,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    PrivateKeyDer<'static>,
) {
    let key = p256();
    let checked = check_csr(&build_csr(&key, None).unwrap(), who).unwrap();
    let svid = ca
        .issue(who, &checked, DAY, OffsetDateTime::now_utc())
        .unwrap();
    (
        svid.chain,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// Runs a TLS handshake in memory; returns the first error either side raised.
fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> Result<(), rustls::Error> {
    let name = ServerName::try_from("mesh.invalid").unwrap();
    let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
    let mut s = rustls::ServerConnection::new(Arc::new(server))?;
    for _ in 0..20 {
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
            assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn mutual_tls_checks_both_identities() {
    let (_dir, ca) = new_ca();
    let (_other_dir, other_ca) = new_ca();
    let roots = tls::root_store(ca.trust_bundle()).unwrap();
    let (client_id, server_id) = (id("a", "client"), id("b", "server"));
    let client_mat = material(&ca, &client_id);
    let server_mat = material(&ca, &server_id);
    let foreign_mat = material(&other_ca, &server_id);
    let other_td = TrustDomain::parse("other.example").unwrap();

    let client = |expect: Expected, mat: &(Vec<_>, PrivateKeyDer<'static>)| {
        tls::client_config(
            roots.clone(),
            expect,
            Some((mat.0.clone(), mat.1.clone_key())),
            &[MESH_ALPN],
        )
        .unwrap()
    };
    let server = |expect: Expected, mat: &(Vec<_>, PrivateKeyDer<'static>)| {
        tls::server_config(
            mat.0.clone(),
            mat.1.clone_key(),
            Some((roots.clone(), expect)),
            &[MESH_ALPN],
        )
        .unwrap()
    };
    let ok = handshake(
        client(Expected::Exact(server_id.clone()), &client_mat),
        server(Expected::TrustDomain(td()), &server_mat),
    );
    assert!(ok.is_ok(), "{ok:?}");

    let cases = [
        (
            "server presents another ID",
            Expected::Exact(id("b", "other")),
            Expected::TrustDomain(td()),
            &server_mat,
            &client_mat,
            "WrongId",
        ),
        (
            "client from another trust domain",
            Expected::Exact(server_id.clone()),
            Expected::TrustDomain(other_td),
            &server_mat,
            &client_mat,
            "WrongTrustDomain",
        ),
        (
            "server cert from another CA",
            Expected::Exact(server_id.clone()),
            Expected::TrustDomain(td()),
            &foreign_mat,
            &client_mat,
            "UnknownIssuer",
        ),
        (
            "client cert from another CA",
            Expected::Exact(server_id.clone()),
            Expected::TrustDomain(td()),
            &server_mat,
            &foreign_mat,
            "UnknownIssuer",
        ),
    ];
    for (name, client_expects, server_expects, server_mat, client_mat, want) in cases {
        let err = handshake(
            client(client_expects, client_mat),
            server(server_expects, server_mat),
        )
        .expect_err(name);
        assert!(format!("{err:?} {err}").contains(want), "{name}: {err:?}");
    }
}

#[test]
fn svid_leaf_rules_refuse_ca_certificates() {
    let (dir, _ca) = new_ca();
    let issuer_pem = std::fs::read(dir.path().join("issuer.crt")).unwrap();
    let issuer = rustls::pki_types::CertificateDer::from_pem_slice(&issuer_pem).unwrap();
    let err = Expected::TrustDomain(td()).check(&issuer).unwrap_err();
    assert_eq!(err, SvidError::LeafIsCa);
    let err = Expected::TrustDomain(td())
        .check(&b"junk"[..].into())
        .unwrap_err();
    assert_eq!(err, SvidError::Malformed);
}

use rustls::pki_types::pem::PemObject;

#[test]
fn root_rotation_steps_on_disk() {
    use meshlet_identity::ca::{add_root, new_intermediate, retire_root};
    let dir = tempfile::tempdir().unwrap();
    let first = Ca::load_or_create(dir.path(), &td()).unwrap();
    let old_root = first.roots()[0].serial.clone();
    assert_eq!(first.issuer_root(), old_root);
    let now = OffsetDateTime::now_utc();

    // 1. a new root joins the bundle; issuing is unchanged.
    add_root(dir.path(), &td(), now).unwrap();
    let step1 = Ca::load(dir.path()).unwrap();
    assert_eq!(step1.roots().len(), 2);
    assert_eq!(step1.issuer_root(), old_root);
    let new_root = step1.roots()[1].serial.clone();
    assert_ne!(new_root, old_root);
    assert_ne!(
        step1.roots()[0].subject,
        step1.roots()[1].subject,
        "roots are told apart by name"
    );

    // Retiring the root that signs the intermediate is refused.
    assert!(matches!(
        retire_root(dir.path(), &old_root),
        Err(CaError::RootInUse(_))
    ));

    // 2. a new intermediate under the new root issues from now on.
    new_intermediate(dir.path(), &td(), now).unwrap();
    let step2 = Ca::load(dir.path()).unwrap();
    assert_eq!(step2.issuer_root(), new_root);
    let who = id("a", "b");
    let svid = step2
        .issue(
            &who,
            &check_csr(&build_csr(&p256(), None).unwrap(), &who).unwrap(),
            DAY,
            now,
        )
        .unwrap();
    let (_, issuer) = X509Certificate::from_der(&svid.chain[1]).unwrap();
    let (_, root) = X509Certificate::from_der(&step2.trust_bundle()[1]).unwrap();
    issuer.verify_signature(Some(root.public_key())).unwrap();

    // 3. the old root leaves the bundle.
    assert!(matches!(
        retire_root(dir.path(), "00ff"),
        Err(CaError::UnknownRoot(_))
    ));
    retire_root(dir.path(), &old_root).unwrap();
    let step3 = Ca::load(dir.path()).unwrap();
    assert_eq!(step3.roots().len(), 1);
    assert_eq!(step3.roots()[0].serial, new_root);
    assert!(matches!(
        retire_root(dir.path(), &new_root),
        Err(CaError::RootInUse(_))
    ));
    for key in ["root.key", "issuer.key"] {
        let mode = std::fs::metadata(dir.path().join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key} after rotation");
    }
}

#[test]
fn sessions_are_never_resumed() {
    // Every connection is validated against the bundle of the moment: no resumption.
    let (_dir, ca) = new_ca();
    let roots = tls::root_store(ca.trust_bundle()).unwrap();
    let (cm, sm) = (material(&ca, &id("a", "c")), material(&ca, &id("b", "s")));
    let client = Arc::new(
        tls::client_config(
            roots.clone(),
            Expected::TrustDomain(td()),
            Some((cm.0, cm.1)),
            &[MESH_ALPN],
        )
        .unwrap(),
    );
    let server = Arc::new(
        tls::server_config(
            sm.0,
            sm.1,
            Some((roots, Expected::TrustDomain(td()))),
            &[MESH_ALPN],
        )
        .unwrap(),
    );
    for round in 0..3 {
        let name = ServerName::try_from("mesh.invalid").unwrap();
        let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        for _ in 0..20 {
            let mut buf = vec![];
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            let mut buf = vec![];
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        assert_eq!(
            c.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "round {round}"
        );
        assert_eq!(
            s.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "round {round}"
        );
    }
}
