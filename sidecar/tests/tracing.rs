//! Traces of requests that cross two sidecars, received by OTLP receivers inside the test
//! (gRPC: the tonic server opentelemetry-proto generates; HTTP/protobuf: a hyper server):
//! one trace, the SERVER span a child of the CLIENT span, HTTP attributes and the resource
//! right, an incoming `traceparent` continued; with the collector down, traffic is unharmed.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use meshlet_proxy::inbound::InboundMode;
use meshlet_telemetry::traces::{OtlpProtocol, SamplerConfig, TraceConfig};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use tokio::sync::mpsc;

/// A span as received, with its resource's attributes.
#[derive(Debug, Clone)]
struct Got {
    trace_id: String,
    span_id: String,
    parent: String,
    kind: i32,
    name: String,
    attributes: Vec<KeyValue>,
    resource: Vec<KeyValue>,
    status: i32,
}

fn attr(kvs: &[KeyValue], key: &str) -> Option<String> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            other => Some(format!("{other:?}")),
        })
}

fn flatten(req: ExportTraceServiceRequest) -> Vec<Got> {
    let mut out = vec![];
    for rs in req.resource_spans {
        let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Got {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    kind: s.kind,
                    name: s.name,
                    attributes: s.attributes,
                    resource: resource.clone(),
                    status: s.status.map(|st| st.code).unwrap_or(0),
                });
            }
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct GrpcReceiver(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn grpc_receiver() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(GrpcReceiver(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, rx)
}

async fn http_receiver() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            let body = req.into_body().collect().await?.to_bytes();
                            if let Ok(decoded) = ExportTraceServiceRequest::decode(body) {
                                let _ = tx.send(decoded);
                            }
                            let reply = ExportTraceServiceResponse::default().encode_to_vec();
                            let mut resp = http::Response::new(Full::new(Bytes::from(reply)));
                            resp.headers_mut()
                                .insert("content-type", "application/x-protobuf".parse().unwrap());
                            Ok::<_, hyper::Error>(resp)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// Receives until `enough` holds for the spans so far (at most 10 s).
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
    enough: impl Fn(&[Got]) -> bool,
) -> Vec<Got> {
    let mut spans = vec![];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !enough(&spans) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(req)) => spans.extend(flatten(req)),
            _ => panic!("spans did not arrive within 10 s; got {spans:#?}"),
        }
    }
    spans
}

fn tracing_to(addr: SocketAddr, protocol: OtlpProtocol) -> Option<TraceConfig> {
    Some(TraceConfig {
        endpoint: format!("http://{addr}"),
        protocol,
        service_name: None,
        resource_attributes: vec![("deployment.environment".into(), "test".into())],
        sampler: SamplerConfig::ParentBased(Box::new(SamplerConfig::AlwaysOn)),
        export_timeout: Duration::from_secs(10),
    })
}

async fn traced_pair(cp: &ControlPlane, collector: Option<TraceConfig>) -> (Sidecar, Sidecar) {
    let app = http_app("web").await;
    let mut b = sidecar_config(cp, cp.token_file("demo", "server"));
    b.app_addr = Some(app);
    b.inbound_mode = InboundMode::Strict;
    b.tracing = collector.clone();
    let b = Sidecar::start_ready(b).await;
    let mut a = sidecar_config(cp, cp.token_file("demo", "client"));
    a.routes = vec![route(b.r().inbound_addr, None)];
    a.tracing = collector;
    let a = Sidecar::start_ready(a).await;
    (a, b)
}

async fn get(addr: SocketAddr, path: &str, traceparent: Option<&str>) -> u16 {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header("host", "orders.shop:8080");
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    resp.status().as_u16()
}

fn check_pair(spans: &[Got], trace_id: &str) -> (Got, Got) {
    let client = spans
        .iter()
        .find(|s| s.trace_id == trace_id && s.kind == SpanKind::Client as i32)
        .cloned()
        .expect("a CLIENT span");
    let server = spans
        .iter()
        .find(|s| s.trace_id == trace_id && s.kind == SpanKind::Server as i32)
        .cloned()
        .expect("a SERVER span");
    assert_eq!(
        server.parent, client.span_id,
        "the SERVER span is the CLIENT span's child"
    );
    for s in [&client, &server] {
        assert_eq!(s.name, "GET");
        assert_eq!(
            attr(&s.attributes, "http.request.method").as_deref(),
            Some("GET")
        );
        assert_eq!(
            attr(&s.attributes, "url.path").as_deref(),
            Some("/orders/42")
        );
        assert_eq!(
            attr(&s.attributes, "http.response.status_code").as_deref(),
            Some("200")
        );
        assert_eq!(
            attr(&s.attributes, "server.address").as_deref(),
            Some("orders.shop")
        );
        assert_eq!(attr(&s.attributes, "server.port").as_deref(), Some("8080"));
        assert_eq!(
            attr(&s.resource, "deployment.environment").as_deref(),
            Some("test")
        );
        assert_eq!(
            attr(&s.resource, "k8s.namespace.name").as_deref(),
            Some("demo")
        );
    }
    assert_eq!(
        attr(&client.attributes, "meshlet.peer.spiffe_id").as_deref(),
        Some("spiffe://cluster.local/ns/demo/sa/server")
    );
    assert_eq!(
        attr(&server.attributes, "meshlet.peer.spiffe_id").as_deref(),
        Some("spiffe://cluster.local/ns/demo/sa/client")
    );
    assert_eq!(
        attr(&client.resource, "service.name").as_deref(),
        Some("client.demo")
    );
    assert_eq!(
        attr(&server.resource, "service.name").as_deref(),
        Some("server.demo")
    );
    assert_eq!(
        attr(&client.resource, "k8s.pod.name").as_deref(),
        Some("client-0")
    );
    (client, server)
}

#[tokio::test]
async fn a_request_is_one_trace_across_two_sidecars_over_grpc() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let (addr, mut rx) = grpc_receiver().await;
    let (mut a, mut b) = traced_pair(&cp, tracing_to(addr, OtlpProtocol::Grpc)).await;

    // No traceparent: a new trace starts at the client sidecar.
    assert_eq!(get(a.route(0), "/orders/42", None).await, 200);
    let spans = collect(&mut rx, |s| {
        s.iter().filter(|g| g.name == "GET").count() >= 2
    })
    .await;
    let trace_id = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .unwrap()
        .trace_id
        .clone();
    let (client, _) = check_pair(&spans, &trace_id);
    assert_eq!(
        client.parent, "",
        "a new trace: the CLIENT span is the root"
    );

    // An incoming traceparent is continued.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    assert_eq!(get(a.route(0), "/orders/42", Some(tp)).await, 200);
    let spans = collect(&mut rx, |s| {
        s.iter()
            .filter(|g| g.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736")
            .count()
            >= 2
    })
    .await;
    let (client, server) = check_pair(&spans, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        client.parent, "00f067aa0ba902b7",
        "the CLIENT span continues the caller's span"
    );
    assert_eq!(server.status, 0, "200 is not an error");
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn http_protobuf_export_works_and_tcp_gets_a_span() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let (addr, mut rx) = http_receiver().await;
    let app = echo_app().await;
    let mut b = sidecar_config(&cp, cp.token_file("demo", "server"));
    b.app_addr = Some(app);
    b.tracing = tracing_to(addr, OtlpProtocol::HttpProtobuf);
    let mut b = Sidecar::start_ready(b).await;
    let mut a = sidecar_config(&cp, cp.token_file("demo", "client"));
    a.routes = vec![route(b.r().inbound_addr, None)];
    a.tracing = tracing_to(addr, OtlpProtocol::HttpProtobuf);
    let mut a = Sidecar::start_ready(a).await;
    assert_eq!(
        echo_round_trip(a.route(0), b"opaque bytes").await.unwrap(),
        b"opaque bytes"
    );
    let spans = collect(&mut rx, |s| {
        s.iter().filter(|g| g.name == "tcp").count() >= 2
    })
    .await;
    let tcp: Vec<_> = spans.iter().filter(|g| g.name == "tcp").collect();
    assert!(
        tcp.iter()
            .all(|s| attr(&s.attributes, "meshlet.tcp.bytes").as_deref() == Some("24")),
        "{tcp:#?}"
    );
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn a_collector_that_is_down_harms_no_request() {
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (mut a, mut b) = traced_pair(&cp, tracing_to(closed, OtlpProtocol::Grpc)).await;
    for i in 0..30 {
        let started = Instant::now();
        assert_eq!(
            get(a.route(0), "/orders/42", None).await,
            200,
            "request {i}"
        );
        // The export timeout is 10 s: a request that waited for the collector would show it.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "request {i} took {:?}",
            started.elapsed()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = a.metrics().await;
        if metric(&m, "meshlet_spans_export_failed_total") > 0.0 {
            assert_eq!(
                metric(&m, "meshlet_spans_dropped_total"),
                0.0,
                "the queue never filled"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "failed exports were not counted:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.stop().await;
    b.stop().await;
    cp.stop().await;
}
