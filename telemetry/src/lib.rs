//! What operators see, shared by the control plane and the sidecar.
//!
//! # Layout
//! - [`prometheus_text`]: a prometheus-client registry in the Prometheus text format
//!   (`text/plain; version=0.0.4`), the format `promtool check metrics` reads.
//! - [`admin`]: the small HTTP/1.1 server behind both admin APIs, and response helpers.
//! - [`process`]: logging setup, the shutdown signal, accepting connections.
//! - [`memory`]: handing memory the allocator keeps after a burst back to the system; `pow`,
//!   so that glibc's libm is never loaded.
//! - [`promtool`]: `promtool check metrics`, as the tests run it.
//! - [`traces`]: OpenTelemetry traces over OTLP (gRPC or HTTP/protobuf) from `OTEL_*`
//!   variables, exported off the data path.

pub mod admin;
pub mod memory;
pub mod process;
pub mod promtool;
pub mod traces;

use prometheus_client::registry::Registry;

/// The content type of [`prometheus_text`].
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encodes `registry` in the Prometheus text format.
///
/// prometheus-client writes OpenMetrics, whose counter families are named without the
/// `_total` suffix that their samples carry, and which ends with `# EOF`. In the Prometheus
/// text format a family's HELP and TYPE name its samples, so counters are renamed to
/// `<name>_total`, and the OpenMetrics-only `# UNIT` and `# EOF` lines are dropped.
pub fn prometheus_text(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut open_metrics = String::new();
    prometheus_client::encoding::text::encode(&mut open_metrics, registry)?;
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 16 * counters.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;

    use super::*;

    #[test]
    fn counters_are_named_by_their_samples() {
        let mut r = Registry::default();
        let c = Counter::<u64>::default();
        c.inc();
        r.register("meshlet_things", "Things seen", c);
        r.register("meshlet_level", "A level", Gauge::<i64>::default());
        r.register_with_unit(
            "meshlet_wait",
            "Waiting",
            prometheus_client::registry::Unit::Seconds,
            Histogram::new([0.1, 1.0]),
        );
        let text = prometheus_text(&r).expect("encoding to a String cannot fail");
        assert!(text.contains("# HELP meshlet_things_total Things seen.\n# TYPE meshlet_things_total counter\nmeshlet_things_total 1\n"), "{text}");
        assert!(text.contains("# TYPE meshlet_level gauge\n"), "{text}");
        assert!(
            text.contains("# TYPE meshlet_wait_seconds histogram\n"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }
}
