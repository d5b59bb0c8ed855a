//! Authorization end to end between sidecars: an allowed identity gets through, a denied
//! one gets 403 (HTTP) or a closed connection (TCP), path tricks do not pass, the policy's
//! namespace mode refuses plaintext, and a policy change takes effect within a second
//! without a restart and without dropping an allowed connection.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use meshlet_proxy::inbound::InboundMode;

const POLICY: &str = r#"
default: allow-meshed
namespaces:
  demo: strict
policies:
  - name: orders
    namespace: demo
    serviceAccount: orders
    allow:
      - identities: ["spiffe://cluster.local/ns/demo/sa/frontend"]
      - anyMeshed: true
        http: {methods: [GET], pathPrefixes: [/public]}
  - name: ledger
    namespace: demo
    serviceAccount: ledger
    allow:
      - identities: ["spiffe://cluster.local/ns/demo/sa/frontend"]
"#;

#[tokio::test]
async fn policy_is_enforced_and_changes_apply_within_a_second() {
    let mut cp = ControlPlane::start_with(Duration::from_secs(3600), Some(POLICY)).await;
    let (orders_app, ledger_app) = (http_app("orders").await, echo_app().await);
    let mut orders = sidecar_config(&cp, cp.token_file("demo", "orders"));
    orders.app_addr = Some(orders_app);
    let mut orders = Sidecar::start_ready(orders).await;
    // Started permissive: the policy's "demo: strict" must win.
    let mut ledger = sidecar_config(&cp, cp.token_file("demo", "ledger"));
    ledger.app_addr = Some(ledger_app);
    ledger.inbound_mode = InboundMode::Permissive;
    let mut ledger = Sidecar::start_ready(ledger).await;
    let mut clients = vec![];
    for sa in ["frontend", "intruder"] {
        let mut c = sidecar_config(&cp, cp.token_file("demo", sa));
        c.routes = vec![
            route(orders.r().inbound_addr, None),
            route(ledger.r().inbound_addr, None),
        ];
        clients.push(Sidecar::start_ready(c).await);
    }
    let (frontend, intruder) = (&clients[0], &clients[1]);
    // The policy reaches the sidecars over discovery.
    orders.wait_for_policy("orders").await;
    let (_, enforced) = http_get(orders.r().admin_addr, "/policy").await;
    assert!(
        !enforced.contains("\"ledger\""),
        "each sidecar gets only its own policies: {enforced}"
    );

    let mut allowed = HttpClient::connect(frontend.route(0)).await.unwrap();
    assert_eq!(
        allowed.get("/orders/1").await.unwrap(),
        (200, "orders GET /orders/1".into())
    );
    let mut denied = HttpClient::connect(intruder.route(0)).await.unwrap();
    for (method, path, want) in [
        ("GET", "/orders/1", 403),
        ("GET", "/public/menu", 200),
        ("GET", "/public/../orders/1", 403),
        ("GET", "/public%2F..%2Forders", 403),
        ("GET", "/PUBLIC/menu", 200),
        ("POST", "/public/menu", 403),
    ] {
        let (status, body) = denied.request(method, path, Bytes::new()).await.unwrap();
        assert_eq!(status, want, "intruder {method} {path}");
        if status == 403 {
            assert!(
                body.is_empty(),
                "a 403 says nothing of the policy: {body:?}"
            );
        }
    }
    // TCP: the intruder's connection to the ledger is closed; the frontend's works.
    assert!(
        echo_round_trip(intruder.route(1), b"steal")
            .await
            .map(|b| b.is_empty())
            .unwrap_or(true)
    );
    assert_eq!(
        echo_round_trip(frontend.route(1), b"pay").await.unwrap(),
        b"pay"
    );
    // The policy's strict mode for namespace demo: plaintext to the (permissive) ledger fails.
    assert!(
        echo_round_trip(ledger.r().inbound_addr, b"plain")
            .await
            .map(|b| b.is_empty())
            .unwrap_or(true)
    );
    let m = orders.metrics().await;
    assert!(
        metric(
            &m,
            r#"meshlet_authz_decisions_total{result="deny",direction="inbound"}"#
        ) >= 4.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            r#"meshlet_authz_decisions_total{result="allow",direction="inbound"}"#
        ) >= 3.0,
        "{m}"
    );

    // Allow the intruder: within a second, on the same kept-alive connection, no restart.
    let widened = POLICY.replace(
        r#"- identities: ["spiffe://cluster.local/ns/demo/sa/frontend"]
      - anyMeshed"#,
        r#"- identities: ["spiffe://cluster.local/ns/demo/sa/frontend", "spiffe://cluster.local/ns/demo/sa/intruder"]
      - anyMeshed"#,
    );
    assert_ne!(widened, POLICY);
    std::fs::write(cp.dir.path().join("policy.yaml"), widened).unwrap();
    eventually(
        "the policy change applies on the kept-alive connection",
        Duration::from_secs(1),
        async || denied.get("/orders/1").await.unwrap().0 == 200,
    )
    .await;
    assert_eq!(
        allowed.get("/orders/2").await.unwrap().0,
        200,
        "the allowed connection was kept"
    );
    drop((allowed, denied));
    for mut c in clients {
        c.stop().await;
    }
    orders.stop().await;
    ledger.stop().await;
    cp.stop().await;
}
