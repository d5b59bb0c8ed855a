//! The admission webhook over real HTTPS on loopback, fed AdmissionReview JSON as the API
//! server sends it: a plain pod, a pod with init containers, an opted-out pod, an
//! already-injected pod, a host-network pod, a non-pod object, and garbage. The patched pods
//! are written to `target/injected/` for `.ci/chart_check.py`, which validates them against
//! the Kubernetes schemas.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use meshlet_control::inject::{self, InjectMode, Op};
use meshlet_control::{Config, Listeners, Running};
use meshlet_identity::TrustDomain;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

struct Webhook {
    running: Running,
    stop: tokio::sync::oneshot::Sender<()>,
    roots: Arc<rustls::RootCertStore>,
    _dir: tempfile::TempDir,
}

async fn start(mode: InjectMode) -> Webhook {
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), cert.signing_key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert.cert.der().to_vec()))
        .unwrap();

    let mut config = Config::local(
        dir.path().join("data"),
        TrustDomain::parse("cluster.local").unwrap(),
        Duration::from_secs(600),
    )
    .unwrap();
    config.webhook_tls = Some((dir.path().join("tls.crt"), dir.path().join("tls.key")));
    config.inject.mode = mode;
    config.inject.image = "ghcr.io/meshlet/meshlet:test".into();
    let mut listeners = Listeners::bind(config.grpc_addr, config.admin_addr)
        .await
        .unwrap();
    listeners.webhook = Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = meshlet_control::run(config, listeners, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    Webhook {
        running,
        stop,
        roots: Arc::new(roots),
        _dir: dir,
    }
}

/// POSTs `body` to /inject over TLS: (status, body).
async fn post(w: &Webhook, body: Vec<u8>) -> (u16, Vec<u8>) {
    let addr = w.running.webhook_addr.unwrap();
    let config = rustls::ClientConfig::builder_with_provider(meshlet_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(w.roots.clone())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/inject")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    (
        status,
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
}

fn review(pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": false
        }
    }))
    .unwrap()
}

fn pod(name: &str, spec: Value, labels: Value, annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "shop", "labels": labels, "annotations": annotations},
           "spec": spec})
}

/// Sends `pod` for review; returns the patched pod, or None when allowed without a patch.
async fn admit(w: &Webhook, pod: &Value) -> Option<Value> {
    let (status, body) = post(w, review(pod)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(
        answer["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(answer["response"]["allowed"], true);
    let patch = answer["response"]["patch"].as_str()?;
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let ops: Vec<Value> = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap(),
    )
    .unwrap();
    let ops: Vec<Op> = ops
        .into_iter()
        .map(|o| {
            assert_eq!(o["op"], "add");
            Op {
                op: "add",
                path: o["path"].as_str().unwrap().to_owned(),
                value: o["value"].clone(),
            }
        })
        .collect();
    let mut patched = pod.clone();
    inject::apply(&mut patched, &ops).unwrap();
    Some(patched)
}

fn save(name: &str, pod: &Value) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/injected");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_vec_pretty(pod).unwrap(),
    )
    .unwrap();
}

fn names(p: &Value, list: &str) -> Vec<String> {
    p["spec"][list]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn the_webhook_injects_what_it_should_and_nothing_else() {
    let w = start(InjectMode::Native).await;
    let app = json!([{"name": "app", "image": "nginx:1.27", "ports": [{"containerPort": 8080}]}]);

    let plain = admit(
        &w,
        &pod(
            "plain",
            json!({"containers": app}),
            json!({"app": "web"}),
            json!({}),
        ),
    )
    .await
    .expect("patched");
    assert_eq!(
        names(&plain, "initContainers"),
        ["meshlet-init", "meshlet-proxy"]
    );
    assert_eq!(
        plain["spec"]["initContainers"][1]["restartPolicy"],
        "Always"
    );
    assert_eq!(
        plain["spec"]["initContainers"][1]["image"],
        "ghcr.io/meshlet/meshlet:test"
    );
    save("plain", &plain);

    let with_init = pod(
        "with-init",
        json!({"initContainers": [{"name": "migrate", "image": "busybox:1.36", "command": ["true"]}], "containers": app, "volumes": [{"name": "data", "emptyDir": {}}]}),
        json!({}),
        json!({"team": "shop"}),
    );
    let with_init = admit(&w, &with_init).await.expect("patched");
    assert_eq!(
        names(&with_init, "initContainers"),
        ["meshlet-init", "meshlet-proxy", "migrate"]
    );
    assert_eq!(with_init["metadata"]["annotations"]["team"], "shop");
    save("with-init", &with_init);

    // Left alone: opted out, host network, already injected.
    let opted_out = pod(
        "opted-out",
        json!({"containers": app}),
        json!({"meshlet.io/inject": "disabled"}),
        json!({}),
    );
    assert!(admit(&w, &opted_out).await.is_none());
    let host = pod(
        "host",
        json!({"hostNetwork": true, "containers": app}),
        json!({}),
        json!({}),
    );
    assert!(admit(&w, &host).await.is_none());
    assert!(admit(&w, &plain).await.is_none(), "injection is idempotent");

    // Not a pod: allowed untouched.
    let mut other: Value = serde_json::from_slice(&review(&json!({"kind": "ConfigMap"}))).unwrap();
    other["request"]["kind"]["kind"] = json!("ConfigMap");
    let (status, body) = post(&w, serde_json::to_vec(&other).unwrap()).await;
    assert_eq!(status, 200);
    assert!(
        serde_json::from_slice::<Value>(&body).unwrap()["response"]
            .get("patch")
            .is_none()
    );

    // Garbage gets a clear error, and the webhook keeps serving.
    for bad in [
        b"{not json".to_vec(),
        b"{}".to_vec(),
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
        review(&json!({"spec": {}})),
    ] {
        let (status, body) = post(&w, bad).await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
        assert!(!body.is_empty());
    }
    assert!(
        admit(
            &w,
            &pod(
                "after-garbage",
                json!({"containers": app}),
                json!({}),
                json!({})
            )
        )
        .await
        .is_some()
    );
    let _ = w.stop.send(());
    w.running.wait().await.unwrap();
}

#[tokio::test]
async fn container_mode_for_older_clusters() {
    let w = start(InjectMode::Container).await;
    let p = pod(
        "container-mode",
        json!({"containers": [{"name": "app", "image": "nginx:1.27"}]}),
        json!({}),
        json!({}),
    );
    let patched = admit(&w, &p).await.expect("patched");
    assert_eq!(names(&patched, "initContainers"), ["meshlet-init"]);
    assert_eq!(names(&patched, "containers"), ["meshlet-proxy", "app"]);
    save("container-mode", &patched);
    let _ = w.stop.send(());
    w.running.wait().await.unwrap();
}
