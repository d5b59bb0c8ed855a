//! The sidecar's Prometheus metrics, with label sets from closed enums, and the
//! per-connection record that is written once, when the connection ends (even when its task
//! is cancelled during drain).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use meshlet_identity::cert::SvidError;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue, serde::Serialize)]
#[allow(non_camel_case_types)]
pub enum Direction {
    inbound,
    outbound,
}

/// Why a connection was refused or failed before any byte reached its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue, serde::Serialize)]
#[allow(non_camel_case_types)]
pub enum Refusal {
    /// Strict inbound mode and the client did not speak meshlet's TLS.
    plaintext_in_strict_mode,
    /// Mesh traffic, but this sidecar has no valid certificate (it never fails open).
    no_certificate,
    /// Whether the destination is meshed could not be learned in time.
    discovery_unavailable,
    /// A connection aimed at the sidecar's own listeners.
    loop_detected,
    /// The original destination could not be read.
    no_original_destination,
    /// The destination did not accept the connection.
    upstream_unreachable,
    /// The TLS handshake between sidecars failed (see the handshake errors metric).
    tls_handshake,
    /// The authorization policy does not allow this caller.
    authz_denied,
    /// `--max-connections` were already open.
    connection_limit,
}

/// Why a TLS handshake between sidecars failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum HandshakeError {
    /// The peer's certificate did not chain to the trust bundle, had expired or was not
    /// yet valid, or broke a rule of chain validation (such as a CA certificate as leaf).
    untrusted_certificate,
    /// The peer's leaf chained, but is not an X509-SVID carrying the expected SPIFFE ID
    /// (wrong ID or trust domain, not exactly one SPIFFE URI SAN, allowed to sign).
    wrong_identity,
    /// The peer presented no certificate.
    no_peer_certificate,
    /// Timed out.
    timeout,
    /// Anything else at the TLS layer (bad records, protocol errors, I/O).
    protocol,
}

impl HandshakeError {
    /// Classifies a handshake error for the metric.
    pub fn of(e: &std::io::Error) -> Self {
        let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return Self::protocol;
        };
        match tls {
            // Only our SPIFFE check reports an SvidError; rustls wraps other webpki errors
            // (a CA as end entity, a path length violated) as `Other` too.
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))
                if other.0.downcast_ref::<SvidError>().is_some() =>
            {
                Self::wrong_identity
            }
            rustls::Error::InvalidCertificate(_) => Self::untrusted_certificate,
            rustls::Error::NoCertificatesPresented => Self::no_peer_certificate,
            _ => Self::protocol,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    pub status_code: u16,
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: Direction,
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: Direction,
    pub reason: HandshakeError,
}

/// Why the sidecar ended an HTTP connection because of what its client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum HttpError {
    /// An HTTP/1 request that does not parse, or whose head is too large (400, 431).
    malformed,
    /// HTTP/2 abuse: floods of resets, CONTINUATION or empty frames, header bombs
    /// (GOAWAY ENHANCE_YOUR_CALM).
    flood,
    /// Another HTTP/2 protocol error (GOAWAY).
    protocol,
    /// The request headers did not arrive in time.
    header_timeout,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HttpErrorLabels {
    pub direction: Direction,
    pub kind: HttpError,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabels {
    pub direction: Direction,
    pub reason: Refusal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AuthzResult {
    allow,
    deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AuthzLabels {
    pub result: AuthzResult,
    pub direction: Direction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RotationResult {
    success,
    failure,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RotationLabels {
    pub result: RotationResult,
}

/// Latency buckets from 100 µs to 10 s.
const LATENCY_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// Every metric the sidecar exports.
#[derive(Debug)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<DirectionLabels, Histogram>,
    pub connections: Family<ConnLabels, Counter>,
    pub bytes: Family<DirectionLabels, Counter>,
    pub handshake_errors: Family<HandshakeLabels, Counter>,
    pub refused: Family<RefusalLabels, Counter>,
    pub http_errors: Family<HttpErrorLabels, Counter>,
    pub cert_expiry: Gauge,
    pub rotations: Family<RotationLabels, Counter>,
    pub traces: meshlet_telemetry::traces::TraceCounters,
    pub authz: Family<AuthzLabels, Counter>,
    /// Connections and requests so far, not exported: the memory release looks at it to
    /// notice when traffic stops (`meshlet_telemetry::memory::release_when_quiet`).
    pub activity: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
            connections: Family::default(),
            bytes: Family::default(),
            handshake_errors: Family::default(),
            refused: Family::default(),
            http_errors: Family::default(),
            cert_expiry: Gauge::default(),
            rotations: Family::default(),
            traces: Default::default(),
            authz: Family::default(),
            activity: Counter::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric under the `meshlet_` prefix.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::default();
        let r = registry.sub_registry_with_prefix("meshlet");
        r.register("requests", "HTTP requests proxied", self.requests.clone());
        r.register_with_unit(
            "request_duration",
            "Time from request to response headers",
            Unit::Seconds,
            self.request_duration.clone(),
        );
        r.register(
            "tcp_connections",
            "TCP connections proxied",
            self.connections.clone(),
        );
        r.register("tcp_bytes", "Bytes proxied, both ways", self.bytes.clone());
        r.register(
            "tls_handshake_errors",
            "Failed TLS handshakes between sidecars",
            self.handshake_errors.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused before reaching their destination",
            self.refused.clone(),
        );
        r.register(
            "http_connection_errors",
            "HTTP connections ended because of what the client sent",
            self.http_errors.clone(),
        );
        r.register(
            "identity_cert_expiry_timestamp_seconds",
            "When this sidecar's certificate expires (Unix time)",
            self.cert_expiry.clone(),
        );
        r.register(
            "identity_cert_rotations",
            "Certificate renewals, by result",
            self.rotations.clone(),
        );
        r.register(
            "authz_decisions",
            "Authorization decisions, by result",
            self.authz.clone(),
        );
        r.register(
            "spans_dropped",
            "Spans dropped because the export queue was full",
            self.traces.dropped.clone(),
        );
        r.register(
            "spans_exported",
            "Spans a collector accepted",
            self.traces.exported.clone(),
        );
        r.register(
            "spans_export_failed",
            "Spans whose export to the collector failed",
            self.traces.export_failures.clone(),
        );
        registry
    }

    pub fn refuse(&self, direction: Direction, reason: Refusal) {
        self.refused
            .get_or_create(&RefusalLabels { direction, reason })
            .inc();
    }

    pub fn authz(&self, direction: Direction, allowed: bool) {
        let result = if allowed {
            AuthzResult::allow
        } else {
            AuthzResult::deny
        };
        self.authz
            .get_or_create(&AuthzLabels { result, direction })
            .inc();
    }

    pub fn handshake_error(&self, direction: Direction, reason: HandshakeError) {
        self.handshake_errors
            .get_or_create(&HandshakeLabels { direction, reason })
            .inc();
    }
}

/// What was verified on a mutual-TLS hop.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TlsInfo {
    /// The other sidecar's verified SPIFFE ID.
    pub peer: String,
    /// Such as `TLSv1_3`.
    pub version: String,
    /// Such as `X25519MLKEM768`.
    pub key_exchange: String,
}

impl TlsInfo {
    /// Reads what a finished handshake negotiated.
    pub fn of(conn: &rustls::CommonState, peer: String) -> Self {
        Self {
            peer,
            version: conn
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
            key_exchange: conn
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()))
                .unwrap_or_default(),
        }
    }
}

/// One finished connection, as published to [`crate::Running::events`] subscribers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnEvent {
    pub direction: Direction,
    /// Set when the hop between sidecars was mutual TLS.
    pub tls: Option<TlsInfo>,
    /// `http1`, `http2` or `opaque`.
    pub protocol: &'static str,
    pub bytes: u64,
    pub duration_ms: u64,
}

/// One proxied connection's result, recorded once when dropped: metrics, a log line, and
/// an event.
#[derive(Debug)]
pub struct ConnRecord {
    metrics: Arc<Metrics>,
    events: tokio::sync::broadcast::Sender<ConnEvent>,
    pub direction: Direction,
    pub tls: Option<TlsInfo>,
    pub protocol: &'static str,
    pub bytes: Arc<AtomicU64>,
    started: Instant,
}

impl ConnRecord {
    pub fn new(
        metrics: Arc<Metrics>,
        events: tokio::sync::broadcast::Sender<ConnEvent>,
        direction: Direction,
        tls: Option<TlsInfo>,
    ) -> Self {
        metrics
            .connections
            .get_or_create(&ConnLabels {
                direction,
                tls: tls.is_some(),
            })
            .inc();
        metrics.activity.inc();
        Self {
            metrics,
            events,
            direction,
            tls,
            protocol: "opaque",
            bytes: Arc::default(),
            started: Instant::now(),
        }
    }
}

impl Drop for ConnRecord {
    fn drop(&mut self) {
        let bytes = self.bytes.load(Ordering::Relaxed);
        self.metrics
            .bytes
            .get_or_create(&DirectionLabels {
                direction: self.direction,
            })
            .inc_by(bytes);
        let event = ConnEvent {
            direction: self.direction,
            tls: self.tls.take(),
            protocol: self.protocol,
            bytes,
            duration_ms: self.started.elapsed().as_millis() as u64,
        };
        tracing::debug!(?event, "connection closed");
        // Nobody listening is the normal case.
        let _ = self.events.send(event);
    }
}
