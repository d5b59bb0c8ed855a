//! Certificates that break the X509-SVID rules, end to end against real sidecars.
//!
//! Each bad leaf is signed by the control plane's real CA (read from its data dir) with
//! rcgen, from the same parameters the CA uses, so that only the broken rule differs. A
//! raw tokio-rustls client presents each one to a strict inbound sidecar; a raw
//! tokio-rustls server presents each one, standing in for the peer sidecar, to an outbound
//! sidecar whose route names the expected SPIFFE ID. Each must be refused and counted by
//! reason, while a correctly made leaf from the same forge is accepted, before and after.
//! The same forge makes peers that stand in for other sidecars' behaviour: an older version
//! (no pooled protocol) and one winding its pooled connection down as a request arrives.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use meshlet_identity::{Expected, MESH_ALPN, POOLED_ALPN, SpiffeId, TrustDomain, tls};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/orders";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";

/// The one thing a forged leaf gets wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    /// None: a correct SVID, which must be accepted.
    Nothing,
    TwoUriSans,
    NoUriSan,
    NotSpiffeScheme,
    CaTrue,
    KeyCertSign,
    CrlSign,
    OtherTrustDomain,
    Expired,
    NotYetValid,
    LookAlikeRoot,
}

/// Every flaw, each with the handshake-error reason the sidecar must count for it.
const FLAWS: [(Flaw, &str); 10] = [
    (Flaw::TwoUriSans, "wrong_identity"),
    (Flaw::NoUriSan, "wrong_identity"),
    (Flaw::NotSpiffeScheme, "wrong_identity"),
    (Flaw::CaTrue, "untrusted_certificate"),
    (Flaw::KeyCertSign, "wrong_identity"),
    (Flaw::CrlSign, "wrong_identity"),
    (Flaw::OtherTrustDomain, "wrong_identity"),
    (Flaw::Expired, "untrusted_certificate"),
    (Flaw::NotYetValid, "untrusted_certificate"),
    (Flaw::LookAlikeRoot, "untrusted_certificate"),
];

fn expected_reasons() -> Vec<(Flaw, String)> {
    FLAWS.iter().map(|(f, r)| (*f, (*r).to_owned())).collect()
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Signs leaves with the control plane's real intermediate, or with a look-alike root.
struct Forge {
    issuer: Issuer<'static, KeyPair>,
    issuer_der: CertificateDer<'static>,
    /// Same subject name and key identifier as the real root, another key.
    look_alike: Issuer<'static, KeyPair>,
    look_alike_der: CertificateDer<'static>,
}

impl Forge {
    fn load(cp: &ControlPlane) -> Self {
        let dir = cp.dir.path().join("ca");
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        let issuer_pem = read("issuer.crt");
        let issuer =
            Issuer::from_ca_cert_pem(&issuer_pem, KeyPair::from_pem(&read("issuer.key")).unwrap())
                .unwrap();
        let root = CertificateDer::from_pem_slice(read("root.crt").as_bytes()).unwrap();
        let (look_alike, look_alike_der) = look_alike_root(&root);
        Self {
            issuer,
            issuer_der: CertificateDer::from_pem_slice(issuer_pem.as_bytes()).unwrap(),
            look_alike,
            look_alike_der,
        }
    }

    /// A fresh key and a leaf for `id` with `flaw`, and the chain a sidecar would present.
    fn svid(&self, id: &str, flaw: Flaw) -> Identity {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = leaf_params(id, flaw);
        let chain = if flaw == Flaw::LookAlikeRoot {
            let leaf = params.signed_by(&key, &self.look_alike).unwrap();
            vec![leaf.der().clone(), self.look_alike_der.clone()]
        } else {
            let leaf = params.signed_by(&key, &self.issuer).unwrap();
            vec![leaf.der().clone(), self.issuer_der.clone()]
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (chain, key)
    }
}

/// A self-signed root with the real root's subject name, another key.
fn look_alike_root(
    real: &CertificateDer<'_>,
) -> (Issuer<'static, KeyPair>, CertificateDer<'static>) {
    let subject = meshlet_identity::cert::summarize(real).unwrap().subject;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    for part in subject.split(", ") {
        match part.split_once('=').unwrap() {
            ("O", v) => dn.push(DnType::OrganizationName, v),
            ("CN", v) => dn.push(DnType::CommonName, v),
            other => panic!("unexpected part of the root's subject: {other:?}"),
        }
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let der = params.self_signed(&key).unwrap().der().clone();
    // Signing through the real root's DER keeps its name and key identifier exactly.
    (Issuer::from_ca_cert_der(real, key).unwrap(), der)
}

/// The CA's own X509-SVID parameters (valid for an hour), then `flaw`.
fn leaf_params(id: &str, flaw: Flaw) -> CertificateParams {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let hour = Duration::from_secs(3600);
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());
    let spiffe_id = SpiffeId::parse(id).unwrap();
    let mut p = meshlet_identity::ca::svid_params(&spiffe_id, hour, now, now + 24 * hour).unwrap();
    match flaw {
        Flaw::Nothing | Flaw::LookAlikeRoot => {}
        Flaw::TwoUriSans => p
            .subject_alt_names
            .push(uri("spiffe://cluster.local/ns/demo/sa/other")),
        Flaw::NoUriSan => p.subject_alt_names.clear(),
        Flaw::NotSpiffeScheme => {
            p.subject_alt_names = vec![uri(&id.replacen("spiffe://", "https://", 1))]
        }
        Flaw::CaTrue => p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained),
        Flaw::KeyCertSign => p.key_usages.push(KeyUsagePurpose::KeyCertSign),
        Flaw::CrlSign => p.key_usages.push(KeyUsagePurpose::CrlSign),
        Flaw::OtherTrustDomain => {
            p.subject_alt_names = vec![uri(&id.replacen("cluster.local", "evil.example", 1))]
        }
        Flaw::Expired => (p.not_before, p.not_after) = (now - 2 * hour, now - hour),
        Flaw::NotYetValid => (p.not_before, p.not_after) = (now + hour, now + 2 * hour),
    }
    p
}

fn roots(cp: &ControlPlane) -> Arc<rustls::RootCertStore> {
    let pem = std::fs::read(&cp.bundle_file).unwrap();
    let bundle: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .unwrap();
    tls::root_store(&bundle).unwrap()
}

/// Connects to a sidecar's inbound port presenting `identity`, sends `ping` and returns
/// what came back (the echo app answers `ping` once the sidecar let the client in).
async fn present_as_client(
    inbound: SocketAddr,
    roots: Arc<rustls::RootCertStore>,
    identity: Identity,
) -> Result<Vec<u8>, String> {
    let expected = Expected::Exact(SpiffeId::parse(SERVER_ID).unwrap());
    let config = tls::client_config(roots, expected, Some(identity), &[MESH_ALPN]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(inbound).await.unwrap();
    let name = ServerName::IpAddress(inbound.ip().into());
    let exchange = async {
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(b"ping").await?;
        let mut back = vec![0u8; 4];
        tls.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => panic!("the inbound sidecar neither answered nor closed within 5 s"),
    }
}

/// A stand-in for a peer sidecar: mutual TLS with the mesh ALPN, presenting `identity`,
/// echoing what it is sent.
async fn fake_peer(roots: Arc<rustls::RootCertStore>, identity: Identity) -> SocketAddr {
    let td = TrustDomain::parse("cluster.local").unwrap();
    let clients = Some((roots, Expected::TrustDomain(td)));
    let config = tls::server_config(identity.0, identity.1, clients, &[MESH_ALPN]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let (mut r, mut w) = tokio::io::split(tls);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// The failure counters of `s` for `direction`: handshake errors by reason, and the
/// connections refused as `tls_handshake` (under the key "refused").
async fn failures(s: &Sidecar, direction: &str) -> BTreeMap<String, f64> {
    let m = s.metrics().await;
    let dir = format!(r#"{{direction="{direction}",reason=""#);
    let mut out = BTreeMap::new();
    for line in m.lines() {
        let Some((name, rest)) = line.split_once(&dir) else {
            continue;
        };
        let Some((reason, value)) = rest.split_once("\"} ") else {
            continue;
        };
        let value: f64 = value.parse().unwrap();
        match name {
            "meshlet_tls_handshake_errors_total" => out.insert(reason.to_owned(), value),
            "meshlet_connections_refused_total" if reason == "tls_handshake" => {
                out.insert("refused".to_owned(), value)
            }
            _ => None,
        };
    }
    out
}

/// Waits until one more connection was refused for its handshake, and returns the one
/// handshake-error reason that moved with it.
async fn counted_reason(s: &Sidecar, direction: &str, before: &BTreeMap<String, f64>) -> String {
    let refused = before.get("refused").copied().unwrap_or(0.0) + 1.0;
    eventually(
        "the refusal is counted",
        Duration::from_secs(5),
        async || failures(s, direction).await.get("refused") == Some(&refused),
    )
    .await;
    let after = failures(s, direction).await;
    let moved: Vec<String> = after
        .iter()
        .filter(|(k, v)| *k != "refused" && before.get(*k).copied().unwrap_or(0.0) + 1.0 == **v)
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(moved.len(), 1, "one reason moved: {before:?} -> {after:?}");
    moved[0].clone()
}

#[tokio::test]
async fn a_strict_inbound_refuses_client_certificates_that_break_the_svid_rules() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let forge = Forge::load(&cp);
    let mut server = sidecar_config(&cp, cp.token_file("demo", "orders"));
    server.app_addr = Some(echo_app().await);
    server.inbound_mode = meshlet_proxy::inbound::InboundMode::Strict;
    let mut server = Sidecar::start_ready(server).await;
    let inbound = server.r().inbound_addr;
    let good = || forge.svid(CLIENT_ID, Flaw::Nothing);

    assert_eq!(
        present_as_client(inbound, roots(&cp), good()).await,
        Ok(b"ping".to_vec()),
        "a correct SVID from the forge is accepted"
    );
    let mut observed = vec![];
    for (flaw, _) in FLAWS {
        let before = failures(&server, "inbound").await;
        let got = present_as_client(inbound, roots(&cp), forge.svid(CLIENT_ID, flaw)).await;
        assert!(got.is_err(), "{flaw:?}: the client was let in: {got:?}");
        let counted = counted_reason(&server, "inbound", &before).await;
        observed.push((flaw, counted));
    }
    assert_eq!(
        observed,
        expected_reasons(),
        "(flaw, handshake error counted)"
    );
    assert_eq!(
        present_as_client(inbound, roots(&cp), good()).await,
        Ok(b"ping".to_vec()),
        "a good client is still served"
    );
    server.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn an_outbound_sidecar_refuses_server_certificates_that_break_the_svid_rules() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let forge = Forge::load(&cp);
    let cases: Vec<(Flaw, &str)> = [(Flaw::Nothing, "")].into_iter().chain(FLAWS).collect();
    let mut client = sidecar_config(&cp, cp.token_file("demo", "client"));
    for (flaw, _) in &cases {
        let peer = fake_peer(roots(&cp), forge.svid(SERVER_ID, *flaw)).await;
        client.routes.push(route(peer, Some(SERVER_ID)));
    }
    let mut client = Sidecar::start_ready(client).await;

    let mut observed = vec![];
    for (i, (flaw, _)) in cases.iter().enumerate() {
        let before = failures(&client, "outbound").await;
        let back = echo_round_trip(client.route(i), b"ping").await;
        if *flaw == Flaw::Nothing {
            assert_eq!(back.unwrap(), b"ping", "a correct SVID from the forge");
            continue;
        }
        assert!(
            back.as_ref().is_ok_and(|b| b.is_empty()) || back.is_err(),
            "{flaw:?}: bytes went through: {back:?}"
        );
        let counted = counted_reason(&client, "outbound", &before).await;
        observed.push((*flaw, counted));
    }
    assert_eq!(
        observed,
        expected_reasons(),
        "(flaw, handshake error counted)"
    );
    assert_eq!(
        echo_round_trip(client.route(0), b"again").await.unwrap(),
        b"again",
        "the good peer is still reached"
    );
    client.stop().await;
    cp.stop().await;
}

type PeerTls = tokio_rustls::server::TlsStream<TcpStream>;

/// A stand-in peer sidecar: a correct SVID for `SERVER_ID`, client certificates of the trust
/// domain required, ALPN `alpn` only; each connection it accepts goes to `handle` with its
/// number (0, 1, ...). Returns its address and the count of connections it took.
async fn stand_in_peer<F, Fut>(
    cp: &ControlPlane,
    alpn: &[u8],
    handle: F,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>)
where
    F: Fn(PeerTls, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (chain, key) = Forge::load(cp).svid(SERVER_ID, Flaw::Nothing);
    let td = TrustDomain::parse("cluster.local").unwrap();
    let clients = Some((roots(cp), Expected::TrustDomain(td)));
    let config = tls::server_config(chain, key, clients, &[alpn]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = listener.local_addr().unwrap();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (counted, handle) = (connections.clone(), Arc::new(handle));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counted, handle) = (acceptor.clone(), counted.clone(), handle.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let n = counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    handle(tls, n).await;
                }
            });
        }
    });
    (peer, connections)
}

/// Serves HTTP/1.1 (`h2`: HTTP/2) on `tls`, answering each request `<text> <method>`.
async fn serve_text(tls: PeerTls, h2: bool, text: &'static str) {
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let body = format!("{text} {}", req.method());
        async move {
            Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(
                bytes::Bytes::from(body),
            )))
        }
    });
    let io = hyper_util::rt::TokioIo::new(tls);
    let _ = if h2 {
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(io, service)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await
    };
}

/// A peer sidecar of an earlier version (it offers only `meshlet/1`): HTTP still reaches it,
/// over a connection per app connection instead of a pooled one.
#[tokio::test]
async fn an_older_peer_without_the_pooled_protocol_still_gets_http() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let (peer, handshakes) =
        stand_in_peer(&cp, MESH_ALPN, |tls, _| serve_text(tls, false, "old peer")).await;
    let mut client = sidecar_config(&cp, cp.token_file("demo", "client"));
    client.routes = vec![route(peer, Some(SERVER_ID))];
    let mut client = Sidecar::start_ready(client).await;
    for _ in 0..3 {
        assert_eq!(
            http_get(client.route(0), "/").await,
            (200, "old peer GET".into())
        );
    }
    assert_eq!(
        handshakes.load(std::sync::atomic::Ordering::Relaxed),
        3,
        "one connection per app connection"
    );
    client.stop().await;
    cp.stop().await;
}

/// A stand-in for a peer sidecar winding its pooled connections down: every other connection
/// answers the first request's HEADERS with GOAWAY (last stream 0, `NO_ERROR`: the request
/// was not processed) and closes; the others serve `served <method>`. Returns its address and
/// the count of connections it took.
async fn going_away_peer(cp: &ControlPlane) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    stand_in_peer(cp, POOLED_ALPN, |mut tls, n| async move {
        if n % 2 == 0 {
            refuse_first_request(&mut tls).await;
        } else {
            serve_text(tls, true, "served").await;
        }
    })
    .await
}

/// Raw HTTP/2: reads the client's preface and frames up to its first HEADERS, then sends
/// SETTINGS and GOAWAY (last stream 0, `NO_ERROR`) and waits (at most 5 s) for the close.
async fn refuse_first_request<S>(io: &mut S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    if io.read_exact(&mut preface).await.is_err() {
        return;
    }
    loop {
        let mut head = [0u8; 9];
        if io.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        if io.read_exact(&mut payload).await.is_err() {
            return;
        }
        if head[3] == 0x1 {
            break;
        }
    }
    let settings = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    let goaway = [0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let _ = io.write_all(&[&settings[..], &goaway[..]].concat()).await;
    let _ = io.flush().await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut rest)).await;
}

/// A request that meets a peer winding its pooled connection down (GOAWAY below its stream)
/// was not processed: without a body it is sent again on a new connection and answered;
/// with a body (gone by then) it gets a 502, and is not sent twice.
#[tokio::test]
async fn a_request_a_going_away_peer_did_not_process_is_sent_again() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let (peer, connections) = going_away_peer(&cp).await;
    let (peer2, connections2) = going_away_peer(&cp).await;
    let mut client = sidecar_config(&cp, cp.token_file("demo", "client"));
    client.routes = vec![route(peer, Some(SERVER_ID)), route(peer2, Some(SERVER_ID))];
    let mut client = Sidecar::start_ready(client).await;

    assert_eq!(
        http_get(client.route(0), "/").await,
        (200, "served GET".into())
    );
    assert_eq!(
        connections.load(Relaxed),
        2,
        "refused on one, sent again on another"
    );

    let mut app = HttpClient::connect(client.route(1)).await.unwrap();
    let (status, _) = app
        .request("POST", "/", bytes::Bytes::from_static(b"order"))
        .await
        .unwrap();
    assert_eq!(status, 502, "a request with a body is not built again");
    assert_eq!(connections2.load(Relaxed), 1);
    client.stop().await;
    cp.stop().await;
}
