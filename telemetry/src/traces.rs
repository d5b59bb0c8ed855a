//! OpenTelemetry traces exported with OTLP, configured by the standard `OTEL_*` variables.
//!
//! [`TraceConfig::from_env`] reads the variables through an injected lookup (tests pass
//! their own). [`start`] builds a tracer provider whose spans go into a bounded queue and
//! are exported in batches by a background task: a slow or absent collector fills the
//! queue, further spans are dropped and counted, and traffic never waits.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

/// Spans waiting for export at most; past this they are dropped and counted.
pub const QUEUE: usize = 4096;
/// Spans per export call at most.
pub const BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
pub const BATCH_DELAY: Duration = Duration::from_millis(200);

/// Which OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// Tracing configuration from the standard OpenTelemetry variables.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    /// Collector base address, e.g. `http://localhost:4317`.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub service_name: Option<String>,
    pub resource_attributes: Vec<(String, String)>,
    pub sampler: SamplerConfig,
    pub export_timeout: Duration,
}

/// The sampler, as `OTEL_TRACES_SAMPLER`/`_ARG` name it.
#[derive(Debug, Clone, PartialEq)]
pub enum SamplerConfig {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
    ParentBased(Box<SamplerConfig>),
}

impl SamplerConfig {
    fn build(&self) -> Sampler {
        match self {
            Self::AlwaysOn => Sampler::AlwaysOn,
            Self::AlwaysOff => Sampler::AlwaysOff,
            Self::Ratio(r) => Sampler::TraceIdRatioBased(*r),
            Self::ParentBased(root) => Sampler::ParentBased(Box::new(root.build())),
        }
    }
}

/// A variable that is set but unusable; names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct TraceConfigError {
    pub var: &'static str,
    pub reason: String,
}

impl TraceConfig {
    /// Reads `OTEL_SDK_DISABLED`, `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`,
    /// `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and
    /// `OTEL_TRACES_SAMPLER_ARG` through `get`. `Ok(None)`: tracing is disabled.
    pub fn from_env(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, TraceConfigError> {
        let err = |var, reason: String| TraceConfigError { var, reason };
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let protocol = match get("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
            None | Some("grpc") => OtlpProtocol::Grpc,
            Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some(other) => {
                return Err(err(
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                    format!("{other:?} is not grpc or http/protobuf"),
                ));
            }
        };
        let default_endpoint = match protocol {
            OtlpProtocol::Grpc => "http://localhost:4317",
            OtlpProtocol::HttpProtobuf => "http://localhost:4318",
        };
        let endpoint =
            get("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_else(|| default_endpoint.into());
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(err(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("{endpoint:?} is not an http:// or https:// URL"),
            ));
        }
        let mut resource_attributes = Vec::new();
        for pair in get("OTEL_RESOURCE_ATTRIBUTES")
            .unwrap_or_default()
            .split(',')
            .filter(|p| !p.trim().is_empty())
        {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                err(
                    "OTEL_RESOURCE_ATTRIBUTES",
                    format!("{pair:?} is not key=value"),
                )
            })?;
            resource_attributes.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let ratio = || -> Result<f64, TraceConfigError> {
            match get("OTEL_TRACES_SAMPLER_ARG") {
                None => Ok(1.0),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        err(
                            "OTEL_TRACES_SAMPLER_ARG",
                            format!("{a:?} is not a ratio from 0 to 1"),
                        )
                    }),
            }
        };
        let parent = |s| SamplerConfig::ParentBased(Box::new(s));
        let sampler = match get("OTEL_TRACES_SAMPLER").as_deref() {
            None | Some("parentbased_always_on") => parent(SamplerConfig::AlwaysOn),
            Some("always_on") => SamplerConfig::AlwaysOn,
            Some("always_off") => SamplerConfig::AlwaysOff,
            Some("parentbased_always_off") => parent(SamplerConfig::AlwaysOff),
            Some("traceidratio") => SamplerConfig::Ratio(ratio()?),
            Some("parentbased_traceidratio") => parent(SamplerConfig::Ratio(ratio()?)),
            Some(other) => {
                return Err(err(
                    "OTEL_TRACES_SAMPLER",
                    format!("{other:?} is not a supported sampler"),
                ));
            }
        };
        Ok(Some(Self {
            endpoint,
            protocol,
            service_name: get("OTEL_SERVICE_NAME"),
            resource_attributes,
            sampler,
            export_timeout: Duration::from_secs(10),
        }))
    }
}

/// The counters a trace pipeline keeps.
#[derive(Debug, Clone, Default)]
pub struct TraceCounters {
    /// Spans dropped because the export queue was full.
    pub dropped: Counter,
    /// Spans a collector refused or never received (failed export calls).
    pub export_failures: Counter,
    /// Spans a collector accepted.
    pub exported: Counter,
}

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct StartError(String);

/// Starts the pipeline; `defaults` are resource attributes the variables may override
/// (such as `service.name`). Must run inside a Tokio runtime.
pub fn start(
    config: &TraceConfig,
    defaults: Vec<KeyValue>,
    counters: &TraceCounters,
) -> Result<SdkTracerProvider, StartError> {
    let mut attributes = defaults;
    for (k, v) in &config.resource_attributes {
        attributes.retain(|kv| kv.key.as_str() != k);
        attributes.push(KeyValue::new(k.clone(), v.clone()));
    }
    if let Some(name) = &config.service_name {
        attributes.retain(|kv| kv.key.as_str() != "service.name");
        attributes.push(KeyValue::new("service.name", name.clone()));
    }
    let resource = Resource::builder_empty()
        .with_attributes(attributes)
        .build();
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let mut exporter = match config.protocol {
        OtlpProtocol::Grpc => builder
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(config.export_timeout)
            .build(),
        OtlpProtocol::HttpProtobuf => builder
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(format!(
                "{}/v1/traces",
                config.endpoint.trim_end_matches('/')
            ))
            .with_timeout(config.export_timeout)
            .build(),
    }
    .map_err(|e| StartError(e.to_string()))?;
    exporter.set_resource(&resource);
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(export_loop(
        exporter,
        rx,
        config.export_timeout,
        counters.clone(),
    ));
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(config.sampler.build())
        .with_span_processor(QueueProcessor {
            tx,
            dropped: counters.dropped.clone(),
        })
        .build())
}

/// Hands finished spans to the export task without ever waiting.
#[derive(Debug)]
struct QueueProcessor {
    tx: mpsc::Sender<SpanData>,
    dropped: Counter,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Exports batches until every sender is gone.
async fn export_loop(
    exporter: impl SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    timeout: Duration,
    counters: TraceCounters,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        match tokio::time::timeout(timeout, exporter.export(std::mem::take(&mut batch))).await {
            Ok(Ok(())) => {
                counters.exported.inc_by(n);
            }
            Ok(Err(e)) => {
                counters.export_failures.inc_by(n);
                tracing::debug!(error = %e, spans = n, "span export failed");
            }
            Err(_) => {
                counters.export_failures.inc_by(n);
                tracing::debug!(spans = n, "span export timed out");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn variables_are_read_with_the_spec_defaults() {
        let c = TraceConfig::from_env(env(&[]))
            .ok()
            .flatten()
            .expect("enabled by default");
        assert_eq!(
            (c.endpoint.as_str(), c.protocol),
            ("http://localhost:4317", OtlpProtocol::Grpc)
        );
        assert_eq!(
            c.sampler,
            SamplerConfig::ParentBased(Box::new(SamplerConfig::AlwaysOn))
        );

        let c = TraceConfig::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_SERVICE_NAME", "cart"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "k8s.pod.name=cart-0, deployment.environment=prod",
            ),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ]))
        .ok()
        .flatten()
        .expect("enabled");
        assert_eq!(
            (c.endpoint.as_str(), c.protocol),
            ("http://localhost:4318", OtlpProtocol::HttpProtobuf)
        );
        assert_eq!(c.service_name.as_deref(), Some("cart"));
        assert_eq!(
            c.resource_attributes[1],
            ("deployment.environment".into(), "prod".into())
        );
        assert_eq!(
            c.sampler,
            SamplerConfig::ParentBased(Box::new(SamplerConfig::Ratio(0.25)))
        );

        assert_eq!(
            TraceConfig::from_env(env(&[("OTEL_SDK_DISABLED", "true")])),
            Ok(None)
        );
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases = [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4317"),
            ("OTEL_RESOURCE_ATTRIBUTES", "novalue"),
            ("OTEL_TRACES_SAMPLER", "sometimes"),
        ];
        for (var, value) in cases {
            let e = TraceConfig::from_env(env(&[(var, value)])).expect_err(var);
            assert_eq!(e.var, var);
        }
        let e = TraceConfig::from_env(env(&[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ]))
        .expect_err("ratio above 1");
        assert_eq!(e.var, "OTEL_TRACES_SAMPLER_ARG");
    }
}
