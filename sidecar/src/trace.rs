//! Spans for proxied traffic, with the OpenTelemetry HTTP semantic conventions.
//!
//! Outbound, each HTTP request gets a CLIENT span; inbound, a SERVER span. A request that
//! arrives with W3C `traceparent` (or B3 headers) continues that trace; the span's own
//! context is then written as `traceparent` into the request sent on, so the inbound
//! sidecar's SERVER span is the child of the outbound sidecar's CLIENT span, and the app
//! can continue the trace too. Opaque TCP connections get one span each with byte counts.

use std::time::SystemTime;

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracer;

use crate::metrics::Direction;

/// The attribute naming the other sidecar's verified SPIFFE ID.
pub const PEER_IDENTITY: &str = "meshlet.peer.spiffe_id";

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::try_from(key),
            http::HeaderValue::try_from(value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The trace a request belongs to: W3C `traceparent` first, then B3.
pub fn extract(headers: &HeaderMap) -> Context {
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    if cx.span().span_context().is_valid() {
        return cx;
    }
    match b3(headers) {
        Some(sc) => Context::new().with_remote_span_context(sc),
        None => Context::new(),
    }
}

/// Writes `cx`'s span as `traceparent` (and `tracestate`) into `headers`. B3 headers the
/// request came with are rewritten to name the same span, so that an app reading B3 never
/// takes the client's span (or a forged one) as its parent.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeadersMut(headers));
    if headers.get("tracestate").is_some_and(|v| v.is_empty()) {
        headers.remove("tracestate");
    }
    rewrite_b3(cx, headers);
}

/// The multi-header B3 names, all rewritten or removed together.
const B3_MULTI: [&str; 5] = [
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

fn rewrite_b3(cx: &Context, headers: &mut HeaderMap) {
    let span = cx.span();
    let sc = span.span_context();
    let (trace, id) = (sc.trace_id().to_string(), sc.span_id().to_string());
    let sampled = if sc.is_sampled() { "1" } else { "0" };
    let mut out = HeadersMut(headers);
    if out.0.contains_key("b3") {
        out.set("b3", format!("{trace}-{id}-{sampled}"));
    }
    if B3_MULTI.iter().any(|k| out.0.contains_key(*k)) {
        for k in B3_MULTI {
            out.0.remove(k);
        }
        out.set("x-b3-traceid", trace);
        out.set("x-b3-spanid", id);
        out.set("x-b3-sampled", sampled.to_owned());
    }
}

/// Reads B3: the single `b3` header (`trace-span[-sampled[-parent]]`) or the
/// `x-b3-traceid`/`x-b3-spanid`/`x-b3-sampled` headers.
pub fn b3(headers: &HeaderMap) -> Option<SpanContext> {
    let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    let (trace, span, sampled) = match get("b3") {
        Some(single) => {
            let mut parts = single.split('-');
            (parts.next()?, parts.next()?, parts.next())
        }
        None => (
            get("x-b3-traceid")?,
            get("x-b3-spanid")?,
            get("x-b3-sampled"),
        ),
    };
    // 64-bit trace IDs are widened to 128 bits, as the B3 spec allows.
    let trace = if trace.len() == 16 {
        format!("{trace:0>32}")
    } else {
        trace.to_owned()
    };
    let trace_id = TraceId::from_hex(&trace)
        .ok()
        .filter(|t| *t != TraceId::INVALID)?;
    let span_id = SpanId::from_hex(span)
        .ok()
        .filter(|s| *s != SpanId::INVALID)?;
    let flags = match sampled {
        Some("1") | Some("d") | Some("true") | None => TraceFlags::SAMPLED,
        _ => TraceFlags::default(),
    };
    Some(SpanContext::new(
        trace_id,
        span_id,
        flags,
        true,
        TraceState::default(),
    ))
}

/// Span status by the HTTP semantic conventions: 5xx is an error on both sides; 4xx only
/// on the client side.
pub fn status(direction: Direction, code: u16) -> Status {
    match (direction, code) {
        (_, 500..=599) => Status::error(format!("HTTP {code}")),
        (Direction::outbound, 400..=499) => Status::error(format!("HTTP {code}")),
        _ => Status::Unset,
    }
}

/// An HTTP request in flight: its span and the context to propagate.
#[derive(Debug)]
pub struct RequestSpan {
    cx: Context,
    direction: Direction,
}

/// Starts the span for a request (child of the incoming trace, if any) and rewrites the
/// request's `traceparent` to point at it.
pub fn start_request(
    tracer: &SdkTracer,
    direction: Direction,
    req: &mut http::Request<hyper::body::Incoming>,
    peer: Option<&str>,
) -> RequestSpan {
    let parent = extract(req.headers());
    let method = req.method().as_str().to_owned();
    let mut attributes = vec![
        KeyValue::new("http.request.method", method.clone()),
        KeyValue::new("url.path", req.uri().path().to_owned()),
        KeyValue::new("network.protocol.version", version(req.version())),
    ];
    // url.query is left out: query strings carry secrets often enough.
    let authority = req.uri().authority().map(|a| a.to_string()).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    });
    if let Some(authority) = authority {
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_owned(), p.parse::<i64>().ok()),
            _ => (authority, None),
        };
        attributes.push(KeyValue::new("server.address", host));
        if let Some(port) = port {
            attributes.push(KeyValue::new("server.port", port));
        }
    }
    if direction == Direction::inbound {
        attributes.push(KeyValue::new("url.scheme", "http"));
    }
    if let Some(peer) = peer {
        attributes.push(KeyValue::new(PEER_IDENTITY, peer.to_owned()));
    }
    let kind = match direction {
        Direction::outbound => SpanKind::Client,
        Direction::inbound => SpanKind::Server,
    };
    let span = tracer
        .span_builder(method)
        .with_kind(kind)
        .with_start_time(SystemTime::now())
        .with_attributes(attributes)
        .start_with_context(tracer, &parent);
    let cx = parent.with_span(span);
    inject(&cx, req.headers_mut());
    RequestSpan { cx, direction }
}

impl RequestSpan {
    /// Marks the request as denied by the authorization policy.
    pub fn deny(&self, rule: &str) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("meshlet.authz.result", "deny"));
        span.set_attribute(KeyValue::new("meshlet.authz.rule", rule.to_owned()));
    }

    /// Ends the span with the response status.
    pub fn finish(self, code: u16) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(code)));
        span.set_status(status(self.direction, code));
        span.end();
    }

    /// The trace this request belongs to.
    pub fn trace_id(&self) -> TraceId {
        self.cx.span().span_context().trace_id()
    }
}

/// One span for an opaque TCP connection; ended when dropped, with its byte count.
#[derive(Debug)]
pub struct TcpSpan {
    span: opentelemetry_sdk::trace::Span,
}

impl TcpSpan {
    pub fn start(tracer: &SdkTracer, direction: Direction, peer: Option<&str>) -> Self {
        let kind = match direction {
            Direction::outbound => SpanKind::Client,
            Direction::inbound => SpanKind::Server,
        };
        let mut attributes = vec![KeyValue::new("network.transport", "tcp")];
        if let Some(peer) = peer {
            attributes.push(KeyValue::new(PEER_IDENTITY, peer.to_owned()));
        }
        let span = tracer
            .span_builder("tcp")
            .with_kind(kind)
            .with_attributes(attributes)
            .start(tracer);
        Self { span }
    }

    pub fn finish(mut self, bytes: u64) {
        self.span
            .set_attribute(KeyValue::new("meshlet.tcp.bytes", bytes as i64));
        self.span.end();
    }
}

fn version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        _ => "1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("valid name"),
                v.parse().expect("valid value"),
            );
        }
        h
    }

    #[test]
    fn traces_are_continued_from_w3c_then_b3() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        /// (trace id, span id, sampled) the headers should yield.
        type Want<'a> = Option<(&'a str, &'a str, bool)>;
        let cases: Vec<(&str, HeaderMap, Want)> = vec![
            (
                "w3c",
                headers(&[("traceparent", tp)]),
                Some(("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", true)),
            ),
            (
                "w3c wins over b3",
                headers(&[
                    ("traceparent", tp),
                    ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
                ]),
                Some(("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", true)),
            ),
            (
                "b3 single",
                headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]),
                Some(("80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1", true)),
            ),
            (
                "b3 single, not sampled",
                headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0")]),
                Some((
                    "80f198ee56343ba864fe8b2a57d3eff7",
                    "e457b5a2e4d86bd1",
                    false,
                )),
            ),
            (
                "b3 multi, 64-bit trace id",
                headers(&[
                    ("x-b3-traceid", "a3ce929d0e0e4736"),
                    ("x-b3-spanid", "00f067aa0ba902b7"),
                    ("x-b3-sampled", "1"),
                ]),
                Some(("0000000000000000a3ce929d0e0e4736", "00f067aa0ba902b7", true)),
            ),
            (
                "bad traceparent, no b3",
                headers(&[("traceparent", "00-zz-00f067aa0ba902b7-01")]),
                None,
            ),
            (
                "all-zero b3",
                headers(&[("b3", "00000000000000000000000000000000-e457b5a2e4d86bd1")]),
                None,
            ),
            ("none", headers(&[]), None),
        ];
        for (name, h, want) in cases {
            let cx = extract(&h);
            let sc = cx.span().span_context().clone();
            match want {
                Some((trace, span, sampled)) => {
                    assert_eq!(sc.trace_id().to_string(), trace, "{name}");
                    assert_eq!(sc.span_id().to_string(), span, "{name}");
                    assert_eq!(sc.is_sampled(), sampled, "{name}");
                    assert!(sc.is_remote(), "{name}");
                }
                None => assert!(!sc.is_valid(), "{name}"),
            }
        }
    }

    #[test]
    fn b3_headers_are_rewritten_to_the_injected_span() {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("valid"),
            SpanId::from_hex("47effca911f1512d").expect("valid"),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(sc);
        let forged = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1";
        let cases = [
            ("b3 single", headers(&[("b3", forged)])),
            (
                "b3 multi",
                headers(&[
                    ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
                    ("x-b3-spanid", "e457b5a2e4d86bd1"),
                    ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
                    ("x-b3-flags", "1"),
                ]),
            ),
            ("none", headers(&[])),
        ];
        for (name, mut h) in cases {
            let had_single = h.contains_key("b3");
            let had_multi = h.contains_key("x-b3-traceid");
            inject(&cx, &mut h);
            let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok());
            assert_eq!(
                get("traceparent"),
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-47effca911f1512d-01"),
                "{name}"
            );
            let single =
                had_single.then_some("4bf92f3577b34da6a3ce929d0e0e4736-47effca911f1512d-1");
            assert_eq!(get("b3"), single, "{name}");
            let multi = |v| had_multi.then_some(v);
            assert_eq!(
                get("x-b3-traceid"),
                multi("4bf92f3577b34da6a3ce929d0e0e4736"),
                "{name}"
            );
            assert_eq!(get("x-b3-spanid"), multi("47effca911f1512d"), "{name}");
            assert_eq!(get("x-b3-sampled"), multi("1"), "{name}");
            assert_eq!(get("x-b3-parentspanid"), None, "{name}");
            assert_eq!(get("x-b3-flags"), None, "{name}");
        }
    }

    #[test]
    fn status_follows_the_semantic_conventions() {
        use Direction::{inbound, outbound};
        let cases = [
            (outbound, 200, false),
            (outbound, 404, true),
            (inbound, 404, false),
            (inbound, 500, true),
            (outbound, 503, true),
            (inbound, 302, false),
        ];
        for (direction, code, error) in cases {
            assert_eq!(
                matches!(status(direction, code), Status::Error { .. }),
                error,
                "{direction:?} {code}"
            );
        }
    }
}
