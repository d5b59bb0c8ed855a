//! Tokens verified against a JWKS: from a file, and from a URL served on loopback (as a
//! cluster serves `/openid/v1/jwks`), with the configured issuer enforced.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use meshlet_control::token::LocalSigner;
use meshlet_control::{Config, Listeners};
use meshlet_identity::csr::build_csr;
use meshlet_identity::{Expected, TrustDomain, tls};
use meshlet_proto::identity::v1::CertifyRequest;
use meshlet_proto::identity::v1::identity_client::IdentityClient;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A key pair standing in for the cluster's service-account issuer, and its JWKS.
fn cluster_issuer(dir: &std::path::Path) -> (LocalSigner, String) {
    let signer = LocalSigner::load_or_create(dir).unwrap();
    let pem = std::fs::read_to_string(dir.join("token-signing.key")).unwrap();
    let key = rcgen::KeyPair::from_pem(&pem).unwrap();
    let raw = key.public_key_raw(); // 0x04 || x || y
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {"kty": "EC", "crv": "P-256", "kid": "meshlet-local", "alg": "ES256", "use": "sig",
         "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}
    ]});
    (signer, jwks.to_string())
}

async fn certify(running: &meshlet_control::Running, token: String) -> Result<(), tonic::Status> {
    let bundle: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(running.trust_bundle_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let config = tls::client_config(
        tls::root_store(&bundle).unwrap(),
        Expected::Exact(running.identity.clone()),
        None,
        &[meshlet_proto::connect::GRPC_ALPN],
    )
    .unwrap();
    let mut client = IdentityClient::new(
        meshlet_proto::connect::tls_channel(&running.grpc_addr.to_string(), Arc::new(config))
            .unwrap(),
    );
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    client
        .certify(CertifyRequest {
            csr: build_csr(&key, None).unwrap(),
            token,
            pod_ip: String::new(),
        })
        .await
        .map(|_| ())
}

/// Starts a control plane; sending on the returned channel stops it.
async fn start(config: Config) -> (meshlet_control::Running, tokio::sync::oneshot::Sender<()>) {
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

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::local(
        dir.to_owned(),
        TrustDomain::parse("cluster.local").unwrap(),
        Duration::from_secs(600),
    )
    .unwrap();
    c.local_tokens = false;
    c
}

#[tokio::test]
async fn jwks_file_keys_verify_tokens_and_local_key_is_off() {
    let cp_dir = tempfile::tempdir().unwrap();
    let issuer_dir = tempfile::tempdir().unwrap();
    let (cluster, jwks) = cluster_issuer(issuer_dir.path());
    let jwks_path = cp_dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks).unwrap();
    let mut config = config(cp_dir.path());
    config.jwks_file = Some(jwks_path);

    let (running, stop) = start(config).await;

    certify(
        &running,
        cluster
            .mint("a", "b", None, Duration::from_secs(60))
            .unwrap(),
    )
    .await
    .unwrap();
    // With local tokens off, the control plane's own data-dir key is not trusted.
    let local = LocalSigner::load_or_create(cp_dir.path()).unwrap();
    let err = certify(
        &running,
        local.mint("a", "b", None, Duration::from_secs(60)).unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("signature"), "{}", err.message());
    let _ = stop.send(());
    running.wait().await.unwrap();
}

#[tokio::test]
async fn jwks_url_is_fetched_with_the_bearer_token_and_issuer_is_enforced() {
    let cp_dir = tempfile::tempdir().unwrap();
    let issuer_dir = tempfile::tempdir().unwrap();
    let (cluster, jwks) = cluster_issuer(issuer_dir.path());

    // A one-request-at-a-time JWKS server that insists on the bearer token.
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = server.accept().await {
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            let authorized = request.contains("authorization: Bearer sa-token-123\r\n");
            let _ = seen_tx.send(request.lines().next().unwrap_or_default().to_owned());
            let (status, body) = if authorized {
                ("200 OK", jwks.clone())
            } else {
                ("401 Unauthorized", String::new())
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });
    let token_file = cp_dir.path().join("token");
    std::fs::write(&token_file, "sa-token-123\n").unwrap();
    let mut config = config(cp_dir.path());
    config.jwks = Some(meshlet_control::jwks::JwksSource {
        url: format!("http://{addr}/openid/v1/jwks").parse().unwrap(),
        ca_file: None,
        bearer_token_file: Some(token_file.clone()),
    });
    config.token_issuer = Some("meshlet-local".into());

    let (running, stop) = start(config.clone()).await;
    assert_eq!(
        seen_rx.recv().await.unwrap(),
        "GET /openid/v1/jwks HTTP/1.1"
    );
    certify(
        &running,
        cluster
            .mint("a", "b", None, Duration::from_secs(60))
            .unwrap(),
    )
    .await
    .unwrap();

    // A token from the right key but another issuer is refused.
    let mut claims: meshlet_control::token::Claims = serde_json::from_value(serde_json::json!({
        "iss": "https://elsewhere", "sub": "system:serviceaccount:a:b", "exp": u64::MAX / 2,
        "kubernetes.io": {"namespace": "a", "serviceaccount": {"name": "b"}}
    }))
    .unwrap();
    claims.aud = vec!["meshlet".into()];
    let err = certify(&running, cluster.sign_claims(&claims).unwrap())
        .await
        .unwrap_err();
    assert!(err.message().contains("issuer"), "{}", err.message());
    let _ = stop.send(());
    running.wait().await.unwrap();

    // A wrong bearer token makes start-up fail with the server's answer.
    std::fs::write(&token_file, "wrong").unwrap();
    let listeners = Listeners::bind(config.grpc_addr, config.admin_addr)
        .await
        .unwrap();
    let err = meshlet_control::run(config, listeners, async {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}
