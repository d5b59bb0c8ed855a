//! `--kubernetes` against a fake API server that answers with recorded Kubernetes responses
//! (the shapes a 1.33 API server returns): TokenReview authentication, the pod-IP ownership
//! check at Certify, and the trust bundle ConfigMap applied in every labelled namespace.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::p256;
use http_body_util::{BodyExt, Full};
use meshlet_control::cluster::Cluster;
use meshlet_control::{Config, Listeners};
use meshlet_identity::csr::build_csr;
use meshlet_identity::{Expected, TrustDomain, tls};
use meshlet_proto::discovery::v1::WatchRequest;
use meshlet_proto::discovery::v1::discovery_client::DiscoveryClient;
use meshlet_proto::identity::v1::CertifyRequest;
use meshlet_proto::identity::v1::identity_client::IdentityClient;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};

type Applied = Arc<Mutex<Vec<(String, Value)>>>;

fn token_review(token: &str) -> Value {
    let user = |sa: &str, pod: &str| {
        json!({
            "username": format!("system:serviceaccount:shop:{sa}"),
            "uid": "8c4b1f34-2b44-4d7f-9a2c-1f0c5f9d8e11",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:shop", "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/credential-id": ["JTI=5b3e0c7e-2d7b-4b5e-a0f2-6c9d2e1f0a3b"],
                "authentication.kubernetes.io/node-name": ["node-1"],
                "authentication.kubernetes.io/pod-name": [pod],
                "authentication.kubernetes.io/pod-uid": ["0f4d9b6e-9a57-4a43-8f7a-3f1f7a2b9c10"]
            }
        })
    };
    let status = match token {
        "cart-token" => {
            json!({"authenticated": true, "user": user("cart", "cart-0"), "audiences": ["meshlet"]})
        }
        "ghost-token" => {
            json!({"authenticated": true, "user": user("ghost", "ghost-0"), "audiences": ["meshlet"]})
        }
        _ => {
            json!({"authenticated": false, "user": {}, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
        }
    };
    json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {"creationTimestamp": null},
           "spec": {"token": token, "audiences": ["meshlet"]}, "status": status})
}

fn pod_cart() -> Value {
    json!({"kind": "Pod", "apiVersion": "v1",
           "metadata": {"name": "cart-0", "namespace": "shop", "uid": "0f4d9b6e-9a57-4a43-8f7a-3f1f7a2b9c10", "resourceVersion": "4711"},
           "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}], "serviceAccountName": "cart", "nodeName": "node-1"},
           "status": {"phase": "Running", "podIP": "10.244.1.7", "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00:10:244:1::7"}], "hostIP": "172.18.0.2"}})
}

fn not_found(name: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("pods \"{name}\" not found"), "reason": "NotFound", "details": {"name": name, "kind": "pods"}, "code": 404})
}

fn mesh_policies() -> Value {
    json!({"apiVersion": "meshlet.io/v1alpha1", "kind": "MeshPolicyList", "metadata": {"resourceVersion": "501"},
           "items": [{"apiVersion": "meshlet.io/v1alpha1", "kind": "MeshPolicy",
                      "metadata": {"name": "default", "uid": "1b0e5c3a-0d43-4b8e-9a53-33f1d8ab61c2", "resourceVersion": "500", "generation": 1},
                      "spec": {"default": "deny", "namespaces": {"shop": "strict"}}}]})
}

fn access_policies() -> Value {
    json!({"apiVersion": "meshlet.io/v1alpha1", "kind": "AccessPolicyList", "metadata": {"resourceVersion": "502"},
    "items": [
      {"apiVersion": "meshlet.io/v1alpha1", "kind": "AccessPolicy",
       "metadata": {"name": "orders", "namespace": "shop", "uid": "7c2f8a91-3e55-4a8e-b1d4-1d0f5e6a7b89", "resourceVersion": "499", "generation": 2},
       "spec": {"serviceAccount": "orders", "allow": [{"identities": ["spiffe://cluster.local/ns/shop/sa/cart"]}, {"namespaces": ["ops"], "http": {"methods": ["GET"], "pathPrefixes": ["/status"]}}]}},
      {"apiVersion": "meshlet.io/v1alpha1", "kind": "AccessPolicy",
       "metadata": {"name": "broken", "namespace": "shop", "uid": "aa2f8a91-3e55-4a8e-b1d4-1d0f5e6a7b00", "resourceVersion": "498", "generation": 1},
       "spec": {"serviceAccount": "x", "allow": [{"surprise": true}]}}
    ]})
}

fn namespaces() -> Value {
    let ns = |name: &str| json!({"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, "meshlet.io/inject": "enabled"}}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
    json!({"kind": "NamespaceList", "apiVersion": "v1", "metadata": {"resourceVersion": "98765"}, "items": [ns("shop"), ns("prod")]})
}

fn services() -> Value {
    json!({"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "777"},
    "items": [{"metadata": {"name": "web", "namespace": "shop", "uid": "5d1c8e2a-7b3f-4f0e-9c61-2a8b7d9e0f11", "resourceVersion": "700"},
               "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ipFamilies": ["IPv4"],
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                        "selector": {"app": "web"}, "sessionAffinity": "None"},
               "status": {"loadBalancer": {}}}]})
}

fn endpoint_slices() -> Value {
    json!({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1", "metadata": {"resourceVersion": "778"},
    "items": [{"metadata": {"name": "web-7xk2p", "namespace": "shop", "generateName": "web-", "resourceVersion": "701",
                            "labels": {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io", "kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [
                 {"addresses": ["10.244.1.7"], "conditions": {"ready": true, "serving": true, "terminating": false},
                  "targetRef": {"kind": "Pod", "name": "cart-0", "namespace": "shop"}, "nodeName": "node-1"},
                 {"addresses": ["10.244.2.9"], "conditions": {"ready": true, "serving": true, "terminating": false},
                  "targetRef": {"kind": "Pod", "name": "legacy-0", "namespace": "shop"}, "nodeName": "node-2"},
                 {"addresses": ["10.244.3.3"], "conditions": {"ready": false, "serving": false, "terminating": true},
                  "targetRef": {"kind": "Pod", "name": "old-0", "namespace": "shop"}, "nodeName": "node-2"}]}]})
}

/// A fake API server on loopback: answers the recorded responses, records applies.
async fn fake_api(applied: Applied) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let applied = applied.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let applied = applied.clone();
                        async move {
                            let (method, path, query) = (
                                req.method().clone(),
                                req.uri().path().to_owned(),
                                req.uri().query().unwrap_or("").to_owned(),
                            );
                            let body: Value = serde_json::from_slice(
                                &req.into_body().collect().await?.to_bytes(),
                            )
                            .unwrap_or(Value::Null);
                            let (code, answer) = match (method.as_str(), path.as_str()) {
                                ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => (
                                    201,
                                    token_review(body["spec"]["token"].as_str().unwrap_or("")),
                                ),
                                ("GET", "/api/v1/namespaces/shop/pods/cart-0") => (200, pod_cart()),
                                ("GET", p) if p.starts_with("/api/v1/namespaces/shop/pods/") => {
                                    (404, not_found(p.rsplit('/').next().unwrap()))
                                }
                                ("GET", "/api/v1/namespaces")
                                    if query.contains(
                                        "labelSelector=meshlet.io%2Finject%3Denabled",
                                    ) =>
                                {
                                    (200, namespaces())
                                }
                                ("GET", "/api/v1/services") => (200, services()),
                                ("GET", "/apis/discovery.k8s.io/v1/endpointslices") => {
                                    (200, endpoint_slices())
                                }
                                ("GET", "/apis/meshlet.io/v1alpha1/meshpolicies") => {
                                    (200, mesh_policies())
                                }
                                ("GET", "/apis/meshlet.io/v1alpha1/accesspolicies") => {
                                    (200, access_policies())
                                }
                                ("PATCH", p) if p.ends_with("/configmaps/meshlet-trust-bundle") => {
                                    applied
                                        .lock()
                                        .unwrap()
                                        .push((format!("{p}?{query}"), body.clone()));
                                    (200, body)
                                }
                                _ => (404, not_found(&path)),
                            };
                            let mut resp = http::Response::new(Full::new(Bytes::from(
                                serde_json::to_vec(&answer).unwrap(),
                            )));
                            *resp.status_mut() = http::StatusCode::from_u16(code).unwrap();
                            resp.headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, hyper::Error>(resp)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn token_review_pod_ownership_and_bundle_configmaps() {
    let applied: Applied = Arc::default();
    let url = fake_api(applied.clone()).await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::local(
        dir.path().to_owned(),
        TrustDomain::parse("cluster.local").unwrap(),
        Duration::from_secs(600),
    )
    .unwrap();
    config.cluster = Some(Cluster::new(client));
    config.token_review = true;
    let listeners = Listeners::bind(config.grpc_addr, config.admin_addr)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = meshlet_control::run(config, listeners, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();

    let bundle: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(running.trust_bundle_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let tls = Arc::new(
        tls::client_config(
            tls::root_store(&bundle).unwrap(),
            Expected::Exact(running.identity.clone()),
            None,
            &[b"h2"],
        )
        .unwrap(),
    );
    let channel = meshlet_proto::connect::tls_channel(&running.grpc_addr.to_string(), tls).unwrap();
    let mut client = IdentityClient::new(channel.clone());
    let certify = |token: &str, pod_ip: &str| CertifyRequest {
        csr: build_csr(&p256(), None).unwrap(),
        token: token.into(),
        pod_ip: pod_ip.into(),
    };

    // TokenReview authenticates; the pod owns the IP it registers (IPv4 or IPv6).
    let ok = client
        .certify(certify("cart-token", "10.244.1.7"))
        .await
        .unwrap()
        .into_inner();
    let leaf = meshlet_identity::cert::summarize(&ok.certificate_chain[0]).unwrap();
    assert_eq!(
        leaf.spiffe_id.unwrap().as_str(),
        "spiffe://cluster.local/ns/shop/sa/cart"
    );
    client
        .certify(certify("cart-token", "fd00:10:244:1::7"))
        .await
        .unwrap();

    let cases = [
        (
            "cart-token",
            "10.244.9.9",
            tonic::Code::PermissionDenied,
            "does not have IP",
        ),
        (
            "ghost-token",
            "10.244.1.7",
            tonic::Code::PermissionDenied,
            "does not have IP",
        ),
        ("not-a-token", "", tonic::Code::Unauthenticated, "signature"),
    ];
    for (token, ip, code, words) in cases {
        let err = client.certify(certify(token, ip)).await.unwrap_err();
        assert_eq!(err.code(), code, "{token} {ip}: {err:?}");
        assert!(
            err.message().contains(words),
            "{token} {ip}: {}",
            err.message()
        );
    }

    // A Service's ClusterIP is answered with its ready backends, each resolved: the pod that
    // registered its IP above is meshed, the other is not, the terminating one is absent.
    let mut discovery = DiscoveryClient::new(channel);
    let mut watch = discovery
        .watch(WatchRequest {
            token: "cart-token".into(),
            address: "10.96.0.10:80".into(),
            announce: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("discovery answers once the Services are read")
        .unwrap()
        .unwrap();
    let backends: Vec<(String, bool, String)> = first
        .backends
        .iter()
        .map(|e| (e.address.clone(), e.meshed, e.identity.clone()))
        .collect();
    assert_eq!(
        backends,
        vec![
            (
                "10.244.1.7:8080".into(),
                true,
                "spiffe://cluster.local/ns/shop/sa/cart".into()
            ),
            ("10.244.2.9:8080".into(), false, String::new()),
        ]
    );
    assert!(
        !first.endpoint.unwrap().meshed,
        "the ClusterIP itself is no pod"
    );
    drop(watch);

    // The trust bundle ConfigMap reaches both labelled namespaces.
    common::eventually(
        "a ConfigMap in both namespaces",
        Duration::from_secs(10),
        async || applied.lock().unwrap().len() >= 2,
    )
    .await;
    let applied = applied.lock().unwrap().clone();
    for (ns, (path, body)) in ["shop", "prod"].iter().zip(&applied) {
        assert!(
            path.starts_with(&format!(
                "/api/v1/namespaces/{ns}/configmaps/meshlet-trust-bundle?"
            )),
            "{path}"
        );
        assert!(
            path.contains("fieldManager=meshlet-control") && path.contains("force=true"),
            "{path}"
        );
        assert_eq!(body["kind"], "ConfigMap");
        assert_eq!(
            body["data"]["bundle.pem"],
            running.trust_bundle_pem.as_str()
        );
    }

    // The policy resources become the policy in force; a malformed one closes its workload.
    let mut policy = Value::Null;
    common::eventually(
        "the policy resources to be read",
        Duration::from_secs(10),
        async || {
            let (_, body) = common::http_get(running.admin_addr, "/v1/policy").await;
            policy = serde_json::from_str(&body).unwrap();
            policy["default"] == "deny"
        },
    )
    .await;
    assert_eq!(policy["namespaces"]["shop"], "strict");
    // The malformed policy closes its workload (no rule) instead of being dropped.
    assert_eq!(policy["policies"].as_array().unwrap().len(), 2, "{policy}");
    assert_eq!(policy["policies"][1]["serviceAccount"], "x");
    assert_eq!(policy["policies"][1]["allow"], serde_json::json!([]));
    assert_eq!(policy["policies"][0]["name"], "orders");
    assert_eq!(
        policy["policies"][0]["allow"][1]["http"]["pathPrefixes"][0],
        "/status"
    );
    let _ = stop.send(());
    running.wait().await.unwrap();
}
