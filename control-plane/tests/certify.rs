//! The control plane from outside: real gRPC over real TLS on loopback, port 0, one process.
//! A CSR-to-SVID round trip, tables of bad tokens and bad CSRs (each a gRPC status, a clear
//! message without the token, a counted metric), reflection, the admin API, and a restart
//! that keeps the CA.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::Duration;

use common::{ControlPlane, http_get, metric, now, p256};
use meshlet_control::token::{Claims, KubernetesClaims, LocalSigner, NamedRef};
use meshlet_identity::csr::build_csr;
use meshlet_identity::{Expected, SpiffeId, tls};
use meshlet_proto::identity::v1::CertifyRequest;
use meshlet_proto::identity::v1::identity_client::IdentityClient;
use rustls::pki_types::CertificateDer;
use tonic::Code;
use x509_parser::prelude::{FromDer, X509Certificate};

fn claims(ns: &str, sa: &str) -> Claims {
    Claims {
        iss: "meshlet-local".into(),
        sub: format!("system:serviceaccount:{ns}:{sa}"),
        aud: vec!["meshlet".into()],
        exp: now() + 600,
        iat: now(),
        nbf: now(),
        kubernetes: Some(KubernetesClaims {
            namespace: Some(ns.into()),
            pod: Some(NamedRef {
                name: format!("{sa}-0"),
                uid: String::new(),
            }),
            serviceaccount: Some(NamedRef {
                name: sa.into(),
                uid: String::new(),
            }),
        }),
    }
}

#[tokio::test]
async fn csr_to_svid_round_trip() {
    let cp = ControlPlane::start().await;
    let key = p256();
    let token = cp
        .signer()
        .mint("prod", "api", Some("api-7d9"), Duration::from_secs(600))
        .unwrap();
    let resp = cp
        .client()
        .certify(CertifyRequest {
            csr: build_csr(&key, None).unwrap(),
            token,
            pod_ip: "10.1.2.3".into(),
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(resp.certificate_chain.len(), 2);
    assert_eq!(
        resp.trust_bundle,
        cp.bundle().iter().map(|c| c.to_vec()).collect::<Vec<_>>()
    );
    let (_, leaf) = X509Certificate::from_der(&resp.certificate_chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        "[URI(\"spiffe://cluster.local/ns/prod/sa/api\")]"
    );
    assert_eq!(
        leaf.public_key().raw,
        &rcgen::PublicKeyData::subject_public_key_info(&key)[..]
    );
    assert_eq!(leaf.validity().not_after.timestamp(), resp.expires_at_unix);
    let ttl = resp.expires_at_unix - leaf.validity().not_before.timestamp();
    assert_eq!(
        ttl,
        3600 + 60,
        "configured TTL plus the clock-skew backdate"
    );

    // The issued leaf verifies as that SPIFFE ID against the trust bundle.
    let id = SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/api").unwrap();
    let verifier = meshlet_identity::verify::SpiffeServerVerifier::new(
        tls::root_store(&cp.bundle()).unwrap(),
        Expected::Exact(id),
        &tls::provider(),
    );
    let chain: Vec<CertificateDer<'static>> = resp
        .certificate_chain
        .iter()
        .map(|c| c.clone().into())
        .collect();
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        &verifier,
        &chain[0],
        &chain[1..],
        &rustls::pki_types::ServerName::try_from("x.invalid").unwrap(),
        &[],
        rustls::pki_types::UnixTime::now(),
    )
    .unwrap();

    let (status, certs) = http_get(cp.running().admin_addr, "/v1/certs").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&certs).unwrap();
    let w = &json["workloads"][0];
    assert_eq!(w["spiffe_id"], "spiffe://cluster.local/ns/prod/sa/api");
    assert_eq!(w["pod"], "prod/api-7d9");
    assert_eq!(w["state"], "valid");
    assert_eq!(w["renewals"], 0);
    assert_eq!(json["ca"]["roots"].as_array().unwrap().len(), 1);
    cp.stop().await;
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated_and_counted() {
    let cp = ControlPlane::start().await;
    let (_other_dir, other_signer) = {
        let d = tempfile::tempdir().unwrap();
        let s = LocalSigner::load_or_create(d.path()).unwrap();
        (d, s)
    };
    let signer = cp.signer();
    let sign = |c: Claims| signer.sign_claims(&c).unwrap();

    let mut expired = claims("a", "b");
    expired.exp = now() - 120;
    let mut not_yet = claims("a", "b");
    not_yet.nbf = now() + 120;
    let mut wrong_aud = claims("a", "b");
    wrong_aud.aud = vec!["kubernetes".into()];
    let mut no_k8s = claims("a", "b");
    no_k8s.kubernetes = None;
    let mut wrong_sub = claims("a", "b");
    wrong_sub.sub = "system:serviceaccount:a:admin".into();
    let hmac = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims("a", "b"),
        &jsonwebtoken::EncodingKey::from_secret(b"guessable").unwrap(),
    )
    .unwrap();
    // alg none: a valid payload with an unsigned header.
    let good = sign(claims("a", "b"));
    let payload = good.split('.').nth(1).unwrap();
    let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
    // A signature made by a key the control plane does not trust.
    let wrong_key = other_signer.sign_claims(&claims("a", "b")).unwrap();
    // A good header and payload with another token's signature.
    let spliced = format!(
        "{}.{}",
        good.rsplit_once('.').unwrap().0,
        wrong_key.rsplit('.').next().unwrap()
    );

    let cases: Vec<(&str, String, &str)> = vec![
        ("expired", sign(expired), "token_expired"),
        ("not yet valid", sign(not_yet), "token_not_yet_valid"),
        ("wrong audience", sign(wrong_aud), "token_audience"),
        ("wrong key", wrong_key, "token_signature"),
        ("spliced signature", spliced, "token_signature"),
        ("alg none", none, "token_algorithm"),
        ("HMAC", hmac, "token_algorithm"),
        ("malformed", "not.a.jwt".into(), "token_malformed"),
        ("empty", String::new(), "token_malformed"),
        ("missing kubernetes.io claims", sign(no_k8s), "token_claims"),
        ("sub disagrees with claims", sign(wrong_sub), "token_claims"),
    ];
    let mut client = cp.client();
    let admin = cp.running().admin_addr;
    for (name, token, reason) in &cases {
        let label = format!("meshlet_csr_rejected_total{{reason=\"{reason}\"}}");
        let before = metric(&http_get(admin, "/metrics").await.1, &label);
        let csr = build_csr(&p256(), None).unwrap();
        let err = client
            .certify(CertifyRequest {
                csr,
                token: token.clone(),
                pod_ip: String::new(),
            })
            .await
            .expect_err(name);
        assert_eq!(err.code(), Code::Unauthenticated, "{name}: {err:?}");
        assert!(!err.message().is_empty(), "{name}");
        if token.len() > 8 {
            assert!(
                !err.message().contains(token.as_str()),
                "{name}: the token is echoed"
            );
        }
        let after = metric(&http_get(admin, "/metrics").await.1, &label);
        assert_eq!(
            after,
            before + 1.0,
            "{name}: counted as {reason}: {}",
            err.message()
        );
    }
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(metric(&metrics, "meshlet_certificates_issued_total"), 0.0);
    cp.stop().await;
}

#[tokio::test]
async fn bad_csrs_are_refused_with_the_right_status() {
    let cp = ControlPlane::start().await;
    let signer = cp.signer();
    let mut client = cp.client();
    let other = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/admin").unwrap();
    let mut tampered = build_csr(&p256(), None).unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let ed25519 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let cases: Vec<(&str, Vec<u8>, String, Code, &str)> = vec![
        (
            "garbage",
            b"\x30\x03junk".to_vec(),
            String::new(),
            Code::InvalidArgument,
            "not valid DER",
        ),
        (
            "wrong signature",
            tampered,
            String::new(),
            Code::InvalidArgument,
            "signature",
        ),
        (
            "another identity",
            build_csr(&p256(), Some(&other)).unwrap(),
            String::new(),
            Code::PermissionDenied,
            "token proves",
        ),
        (
            "unsupported key",
            build_csr(&ed25519, None).unwrap(),
            String::new(),
            Code::InvalidArgument,
            "P-256",
        ),
        (
            "oversized CSR",
            vec![0x30; 9000],
            String::new(),
            Code::InvalidArgument,
            "limit",
        ),
        (
            "bad pod_ip",
            build_csr(&p256(), None).unwrap(),
            "not-an-ip".into(),
            Code::InvalidArgument,
            "pod_ip",
        ),
    ];
    for (name, csr, pod_ip, code, words) in cases {
        let token = signer
            .mint("a", "b", None, Duration::from_secs(60))
            .unwrap();
        let err = client
            .certify(CertifyRequest { csr, token, pod_ip })
            .await
            .expect_err(name);
        assert_eq!(err.code(), code, "{name}: {err:?}");
        assert!(err.message().contains(words), "{name}: {}", err.message());
    }
    // A request over the size limit is refused by the transport, not parsed.
    let token = signer
        .mint("a", "b", None, Duration::from_secs(60))
        .unwrap();
    let err = client
        .certify(CertifyRequest {
            csr: vec![0; 100_000],
            token,
            pod_ip: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    let (_, metrics) = http_get(cp.running().admin_addr, "/metrics").await;
    for reason in [
        "csr_malformed",
        "csr_bad_signature",
        "csr_identity_mismatch",
        "csr_unsupported_key",
        "csr_too_large",
        "bad_pod_ip",
    ] {
        assert_eq!(
            metric(
                &metrics,
                &format!("meshlet_csr_rejected_total{{reason=\"{reason}\"}}")
            ),
            1.0,
            "{reason}"
        );
    }
    cp.stop().await;
}

#[tokio::test]
async fn control_plane_is_verified_by_its_spiffe_id() {
    let cp = ControlPlane::start().await;
    let wrong = SpiffeId::parse("spiffe://cluster.local/ns/meshlet-system/sa/impostor").unwrap();
    let mut client = IdentityClient::new(cp.channel_expecting(Expected::Exact(wrong)));
    let token = cp
        .signer()
        .mint("a", "b", None, Duration::from_secs(60))
        .unwrap();
    let err = client
        .certify(CertifyRequest {
            csr: build_csr(&p256(), None).unwrap(),
            token,
            pod_ip: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unavailable,
        "the TLS handshake fails: {err:?}"
    );
    cp.stop().await;
}

#[tokio::test]
async fn renewals_are_counted_and_certs_filtered() {
    let cp = ControlPlane::start().await;
    let signer = cp.signer();
    let mut client = cp.client();
    for (ns, sa, times) in [("a", "web", 3), ("b", "db", 1)] {
        for _ in 0..times {
            let token = signer
                .mint(ns, sa, Some("p"), Duration::from_secs(60))
                .unwrap();
            client
                .certify(CertifyRequest {
                    csr: build_csr(&p256(), None).unwrap(),
                    token,
                    pod_ip: String::new(),
                })
                .await
                .unwrap();
        }
    }
    let (_, body) = http_get(cp.running().admin_addr, "/v1/certs?namespace=a").await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let workloads = json["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 1, "{body}");
    assert_eq!(workloads[0]["renewals"], 2);
    let (status, _) = http_get(cp.running().admin_addr, "/v1/certs?state=bogus").await;
    assert_eq!(status, 400);
    let (_, body) = http_get(cp.running().admin_addr, "/v1/certs?state=expired").await;
    assert!(body.contains("\"workloads\":[]"), "{body}");
    let (_, metrics) = http_get(cp.running().admin_addr, "/metrics").await;
    assert_eq!(metric(&metrics, "meshlet_certificates_issued_total"), 4.0);
    cp.stop().await;
}

#[tokio::test]
async fn admin_api_serves_bundle_and_health() {
    let cp = ControlPlane::start().await;
    let admin = cp.running().admin_addr;
    assert_eq!(http_get(admin, "/ready").await.0, 200);
    let (status, pem) = http_get(admin, "/v1/trust-bundle").await;
    assert_eq!(status, 200);
    assert_eq!(pem, cp.running().trust_bundle_pem);
    assert_eq!(http_get(admin, "/nope").await.0, 404);
    cp.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_identity_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let cp = ControlPlane::start().await;
    let mut client = ServerReflectionClient::new(
        cp.channel_expecting(Expected::Exact(cp.running().identity.clone())),
    );
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply {reply:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"meshlet.identity.v1.Identity"), "{names:?}");
    cp.stop().await;
}

#[tokio::test]
async fn restart_keeps_the_ca() {
    let cp = ControlPlane::start().await;
    let before = cp.running().trust_bundle_pem.clone();
    let first = cp.certify_as("a", "b", None).await.unwrap();
    let dir = cp.stop().await;

    let cp = ControlPlane::start_in(dir).await;
    assert_eq!(cp.running().trust_bundle_pem, before);
    let second = cp.certify_as("a", "b", None).await.unwrap();
    assert_eq!(
        first.certificate_chain[1], second.certificate_chain[1],
        "same issuing CA"
    );
    cp.stop().await;
}

#[tokio::test]
async fn metrics_pass_promtool() {
    let cp = ControlPlane::start().await;
    let token = cp
        .signer()
        .mint("a", "b", None, Duration::from_secs(60))
        .unwrap();
    let mut client = cp.client();
    client
        .certify(CertifyRequest {
            csr: build_csr(&p256(), None).unwrap(),
            token: token.clone(),
            pod_ip: String::new(),
        })
        .await
        .unwrap();
    let _ = client
        .certify(CertifyRequest {
            csr: b"junk".to_vec(),
            token,
            pod_ip: String::new(),
        })
        .await;
    let (_, text) = http_get(cp.running().admin_addr, "/metrics").await;
    assert!(
        text.contains("# TYPE meshlet_certificates_issued_total counter"),
        "{text}"
    );
    assert!(
        text.contains("meshlet_csr_rejected_total{reason=\"csr_malformed\"} 1"),
        "{text}"
    );
    if let Some((clean, report)) = meshlet_telemetry::promtool::check(&text) {
        assert!(
            clean,
            "promtool check metrics reported:\n{report}\non:\n{text}"
        );
    }
    cp.stop().await;
}

#[tokio::test]
async fn the_control_planes_own_identity_is_never_issued() {
    let cp = ControlPlane::start().await;
    let err = cp
        .certify_as("meshlet-system", "meshlet-control", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("control plane's identity"),
        "{}",
        err.message()
    );
    let (_, m) = http_get(cp.running().admin_addr, "/metrics").await;
    assert_eq!(
        metric(
            &m,
            r#"meshlet_csr_rejected_total{reason="reserved_identity"}"#
        ),
        1.0
    );
    cp.stop().await;
}
