//! Clients that send the headers the mesh itself writes or might be thought to vouch for.
//! With tracing on, the sidecars rewrite `traceparent` (the trace is continued, the parent
//! becomes the inbound sidecar's span) and B3 headers alike: a client's forged or
//! malformed value never reaches the app as the parent. The sidecars add no identity header, and an
//! identity claimed in a header never changes what the authorization policy allows.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use meshlet_telemetry::traces::{OtlpProtocol, SamplerConfig, TraceConfig};
use tokio::net::TcpListener;

/// `web` allows the admin identity everything, any meshed caller `/public`.
const POLICY: &str = r#"
default: deny
policies:
  - name: web
    namespace: demo
    serviceAccount: web
    allow:
      - identities: ["spiffe://cluster.local/ns/demo/sa/admin"]
      - anyMeshed: true
        http: {pathPrefixes: [/public]}
"#;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";

/// An HTTP app answering with the request's headers, one `name: value` a line.
async fn header_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    let lines: String = req
                        .headers()
                        .iter()
                        .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or("?")))
                        .collect();
                    Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from(lines))))
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service),
            );
        }
    });
    addr
}

/// Tracing to a collector that is not there: spans are made and dropped.
async fn tracing_nowhere() -> Option<TraceConfig> {
    let gone = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    Some(TraceConfig {
        endpoint: format!("http://{gone}"),
        protocol: OtlpProtocol::Grpc,
        service_name: None,
        resource_attributes: vec![],
        sampler: SamplerConfig::AlwaysOn,
        export_timeout: Duration::from_secs(1),
    })
}

/// GETs `path` with `headers` and returns (status, the headers the app saw).
async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder().uri(path).header("host", "web");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    answer(sender.send_request(req)).await
}

/// The values of header `name` among the app's lines.
fn values<'a>(seen: &'a str, name: &str) -> Vec<&'a str> {
    let prefix = format!("{name}: ");
    seen.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect()
}

/// The app saw exactly one well-formed, sampled `traceparent`: (trace id, parent id).
fn one_traceparent(seen: &str) -> (String, String) {
    let tp = values(seen, "traceparent");
    assert_eq!(tp.len(), 1, "one traceparent:\n{seen}");
    let parts: Vec<&str> = tp[0].split('-').collect();
    assert!(
        parts.len() == 4
            && parts[0] == "00"
            && parts[1].len() == 32
            && parts[2].len() == 16
            && parts
                .iter()
                .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit())),
        "a well-formed traceparent: {}",
        tp[0]
    );
    (parts[1].to_owned(), parts[2].to_owned())
}

#[tokio::test]
async fn trace_headers_from_a_client_are_rewritten_and_identity_headers_grant_nothing() {
    let mut cp = ControlPlane::start_with(Duration::from_secs(3600), Some(POLICY)).await;
    let mut web = sidecar_config(&cp, cp.token_file("demo", "web"));
    web.app_addr = Some(header_app().await);
    web.tracing = tracing_nowhere().await;
    let mut web = Sidecar::start_ready(web).await;
    let mut client = sidecar_config(&cp, cp.token_file("demo", "client"));
    client.routes = vec![route(web.r().inbound_addr, None)];
    client.tracing = tracing_nowhere().await;
    let mut client = Sidecar::start_ready(client).await;
    web.wait_for_policy("web").await;
    let to = client.route(0);

    // A forged traceparent: the trace goes on, the parent is the inbound sidecar's span.
    let forged = format!("00-{TRACE}-{SPAN}-01");
    let (status, seen) = get_with(to, "/public/a", &[("traceparent", &forged)]).await;
    assert_eq!(status, 200);
    let (trace, parent) = one_traceparent(&seen);
    assert_eq!(trace, TRACE, "the trace is continued");
    assert_ne!(
        parent, SPAN,
        "the client's span id reached the app as the parent"
    );

    // A malformed one is replaced by a new trace.
    let garbage = "00-zzzz-not-a-trace-01";
    let (_, seen) = get_with(to, "/public/b", &[("traceparent", garbage)]).await;
    let (trace, _) = one_traceparent(&seen);
    assert_ne!(trace, TRACE);
    assert!(
        !seen.contains("zzzz"),
        "the malformed value reached the app:\n{seen}"
    );

    // B3 is read, then the app gets a traceparent naming the inbound sidecar's span.
    let b3 = format!("{TRACE}-{SPAN}-1");
    let (_, seen) = get_with(to, "/public/c", &[("b3", &b3)]).await;
    let (trace, parent) = one_traceparent(&seen);
    assert_eq!(trace, TRACE, "the B3 trace is continued");
    assert_ne!(parent, SPAN);
    let b3 = values(&seen, "b3");
    assert_eq!(
        b3,
        [format!("{TRACE}-{parent}-1")],
        "B3 names the same parent:\n{seen}"
    );

    // An identity claimed in headers changes nothing: the policy reads the TLS peer.
    let claims = [
        (
            "x-forwarded-client-cert",
            "By=spiffe://cluster.local/ns/demo/sa/web;URI=spiffe://cluster.local/ns/demo/sa/admin",
        ),
        ("x-spiffe-id", "spiffe://cluster.local/ns/demo/sa/admin"),
    ];
    assert_eq!(get_with(to, "/admin", &claims).await.0, 403);
    let (status, seen) = get_with(to, "/public/d", &[]).await;
    assert_eq!(status, 200);
    for name in ["x-forwarded-client-cert", "x-spiffe-id", "x-forwarded-for"] {
        assert!(
            values(&seen, name).is_empty(),
            "the mesh added {name}:\n{seen}"
        );
    }
    // A forged client certificate header, the one Envoy-based meshes set, never reaches the
    // app: an app written for those meshes would believe it.
    let (status, seen) = get_with(to, "/public/e", &claims[..1]).await;
    assert_eq!(status, 200);
    assert!(
        values(&seen, "x-forwarded-client-cert").is_empty(),
        "a forged x-forwarded-client-cert reached the app:\n{seen}"
    );
    assert!(
        values(&seen, "tracestate").iter().all(|v| !v.is_empty()),
        "no empty tracestate:\n{seen}"
    );
    client.stop().await;
    web.stop().await;
    cp.stop().await;
}
