//! Discovery/Watch from outside: an address becomes meshed when its workload certifies,
//! an "ip:port" watch falls back to the pod's IP, the trust bundle rides along, and a bad
//! token is refused.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::{Duration, Instant};

use common::{ControlPlane, p256};
use meshlet_identity::csr::build_csr;
use meshlet_proto::discovery::v1::discovery_client::DiscoveryClient;
use meshlet_proto::discovery::v1::{WatchRequest, WatchResponse};
use meshlet_proto::identity::v1::CertifyRequest;
use tonic::Streaming;

async fn next(stream: &mut Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an update within 5 s")
        .unwrap()
        .expect("the stream is open")
}

#[tokio::test]
async fn watch_reports_meshed_addresses_and_changes() {
    let cp = ControlPlane::start().await;
    let token = cp
        .signer()
        .mint("shop", "cart", Some("cart-1"), Duration::from_secs(600))
        .unwrap();
    let mut discovery = DiscoveryClient::new(cp.channel_expecting(
        meshlet_identity::Expected::Exact(cp.running().identity.clone()),
    ));
    let watch = |address: &str| WatchRequest {
        token: token.clone(),
        address: address.into(),
        announce: String::new(),
    };

    let mut pod = discovery
        .watch(watch("10.9.8.7:8080"))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut pod).await;
    let endpoint = first.endpoint.unwrap();
    assert_eq!(endpoint.address, "10.9.8.7:8080");
    assert!(!endpoint.meshed, "nothing registered yet");
    assert_eq!(
        first.trust_bundle.len(),
        1,
        "the bundle comes with every message"
    );

    // The workload certifies, registering its pod IP: the watch on ip:port sees it.
    cp.client()
        .certify(CertifyRequest {
            csr: build_csr(&p256(), None).unwrap(),
            token: token.clone(),
            pod_ip: "10.9.8.7".into(),
        })
        .await
        .unwrap();
    let update = next(&mut pod).await.endpoint.unwrap();
    assert!(update.meshed);
    assert_eq!(update.identity, "spiffe://cluster.local/ns/shop/sa/cart");

    // Explicit mode registers address and port: only that port is meshed.
    let port_token = cp
        .signer()
        .mint("shop", "db", Some("db-1"), Duration::from_secs(600))
        .unwrap();
    cp.client()
        .certify(CertifyRequest {
            csr: build_csr(&p256(), None).unwrap(),
            token: port_token,
            pod_ip: "127.0.0.1:16006".into(),
        })
        .await
        .unwrap();
    let mut exact = discovery
        .watch(watch("127.0.0.1:16006"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next(&mut exact).await.endpoint.unwrap().identity,
        "spiffe://cluster.local/ns/shop/sa/db"
    );
    let mut other_port = discovery
        .watch(watch("127.0.0.1:16007"))
        .await
        .unwrap()
        .into_inner();
    assert!(!next(&mut other_port).await.endpoint.unwrap().meshed);

    // Bundle only.
    let mut bundle = discovery.watch(watch("")).await.unwrap().into_inner();
    let msg = next(&mut bundle).await;
    assert!(msg.endpoint.is_none() && !msg.trust_bundle.is_empty());
    cp.stop().await;
}

#[tokio::test]
async fn watch_needs_a_valid_token_and_address() {
    let cp = ControlPlane::start().await;
    let mut discovery = DiscoveryClient::new(cp.channel_expecting(
        meshlet_identity::Expected::Exact(cp.running().identity.clone()),
    ));
    let err = discovery
        .watch(WatchRequest {
            token: "junk".into(),
            address: "1.2.3.4".into(),
            announce: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let token = cp
        .signer()
        .mint("a", "b", None, Duration::from_secs(60))
        .unwrap();
    let err = discovery
        .watch(WatchRequest {
            token,
            address: "not an address".into(),
            announce: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    cp.stop().await;
}

#[tokio::test]
async fn a_sidecar_announces_its_address_while_its_watch_is_open() {
    let cp = ControlPlane::start().await;
    let token = cp
        .signer()
        .mint("shop", "cart", Some("cart-1"), Duration::from_secs(600))
        .unwrap();
    let mut discovery = DiscoveryClient::new(cp.channel_expecting(
        meshlet_identity::Expected::Exact(cp.running().identity.clone()),
    ));
    let mut observer = discovery
        .watch(WatchRequest {
            token: token.clone(),
            address: "10.5.5.5:8080".into(),
            announce: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!next(&mut observer).await.endpoint.unwrap().meshed);

    // The bundle watch announces 10.5.5.5 (no Certify in this process ever saw it).
    let announce = || {
        let mut discovery = discovery.clone();
        let request = WatchRequest {
            token: token.clone(),
            address: String::new(),
            announce: "10.5.5.5".into(),
        };
        async move { discovery.watch(request).await.unwrap().into_inner() }
    };
    let mut announcer = announce().await;
    let _ = next(&mut announcer).await;
    let seen = next(&mut observer).await.endpoint.unwrap();
    assert!(seen.meshed);
    assert_eq!(seen.identity, "spiffe://cluster.local/ns/shop/sa/cart");

    // A blip: the announcer's watch closes and it announces again within the grace. The
    // observer hears nothing of it, even once the grace has passed.
    drop(announcer);
    let mut again = announce().await;
    let _ = next(&mut again).await;
    if let Ok(Ok(Some(m))) =
        tokio::time::timeout(Duration::from_millis(800), observer.message()).await
    {
        assert!(
            m.endpoint.unwrap().meshed,
            "withdrawn although it announced again within the grace"
        );
    }

    // Gone for good: withdrawn once the grace has passed.
    drop(again);
    let gone = Instant::now();
    assert!(!next(&mut observer).await.endpoint.unwrap().meshed);
    assert!(
        gone.elapsed() >= Duration::from_millis(250),
        "withdrawn before the grace"
    );
    cp.stop().await;
}
