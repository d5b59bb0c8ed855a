//! `meshlet-proxy run` configuration: flags, each also settable as `MESHLET_<FLAG>`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use meshlet_identity::SpiffeId;

use crate::inbound::InboundMode;

/// Flags of `meshlet-proxy run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The control plane's gRPC address, host:port.
    #[arg(
        long,
        env = "MESHLET_CONTROL_ADDR",
        default_value = "meshlet-control.meshlet-system.svc:15012"
    )]
    pub control_addr: String,
    /// The SPIFFE ID the control plane must present.
    #[arg(
        long,
        env = "MESHLET_CONTROL_IDENTITY",
        default_value = "spiffe://cluster.local/ns/meshlet-system/sa/meshlet-control"
    )]
    pub control_identity: SpiffeId,
    /// The workload token (a projected service-account token, audience "meshlet"); re-read
    /// at every renewal.
    #[arg(
        long,
        env = "MESHLET_TOKEN_FILE",
        default_value = "/var/run/secrets/meshlet/token"
    )]
    pub token_file: PathBuf,
    /// PEM roots that verify the control plane (later bundles arrive over discovery).
    #[arg(
        long,
        env = "MESHLET_TRUST_BUNDLE",
        default_value = "/etc/meshlet/trust-bundle.pem"
    )]
    pub trust_bundle: PathBuf,
    /// This pod's IP, registered for discovery.
    #[arg(long, env = "MESHLET_POD_IP")]
    pub pod_ip: Option<IpAddr>,
    /// Admin HTTP: /ready, /live, /certs, /metrics.
    #[arg(long, env = "MESHLET_ADMIN_ADDR", default_value = "0.0.0.0:15000")]
    pub admin_addr: SocketAddr,
    /// Inbound listener (capture target, or the mesh port in explicit mode).
    #[arg(long, env = "MESHLET_INBOUND_ADDR", default_value = "0.0.0.0:15006")]
    pub inbound_addr: SocketAddr,
    /// Outbound capture listener (iptables redirects the app's connections here).
    #[arg(long, env = "MESHLET_OUTBOUND_ADDR", default_value = "127.0.0.1:15001")]
    pub outbound_addr: SocketAddr,
    /// Whether inbound accepts plaintext (permissive) or only meshlet's mutual TLS (strict).
    #[arg(
        long,
        env = "MESHLET_INBOUND_MODE",
        value_enum,
        default_value = "permissive"
    )]
    pub inbound_mode: InboundMode,
    /// Explicit mode: LISTEN=UPSTREAM[@SPIFFE_ID], an outbound listener that forwards to
    /// UPSTREAM, with mutual TLS when discovery or the given SPIFFE ID says it is meshed.
    /// Repeatable; in the environment, separate routes with commas.
    #[arg(long = "route", env = "MESHLET_ROUTE", value_delimiter = ',')]
    pub routes: Vec<Route>,
    /// Explicit mode: where inbound traffic goes (instead of its original destination).
    #[arg(long, env = "MESHLET_APP_ADDR")]
    pub app_addr: Option<SocketAddr>,
    /// How long in-flight connections may finish after SIGTERM.
    #[arg(long, env = "MESHLET_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// How long to wait for a connection's first bytes before treating it as opaque TCP.
    #[arg(long, env = "MESHLET_SNIFF_TIMEOUT", default_value = "300ms", value_parser = humantime::parse_duration)]
    pub sniff_timeout: Duration,
    /// How long a first connection waits for discovery to say whether its destination is
    /// meshed (then it is refused).
    #[arg(long, env = "MESHLET_DISCOVERY_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub discovery_timeout: Duration,
    /// Limit for connecting to a destination and for a TLS handshake.
    #[arg(long, env = "MESHLET_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Connections handled at once (all listeners together); more are closed at once and
    /// counted (`reason="connection_limit"`).
    #[arg(long, env = "MESHLET_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// The largest HTTP request head accepted (HTTP/1 header buffer, HTTP/2 header list).
    #[arg(long, env = "MESHLET_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Limit for a TLS handshake between sidecars.
    #[arg(long, env = "MESHLET_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// An opaque TCP connection with no bytes either way for this long is closed; HTTP
    /// connections wait this long for a request's headers.
    #[arg(long, env = "MESHLET_IDLE_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// A keep-alive HTTP/1.1 connection to the app unused this long is not used again (and
    /// is closed within twice this). Keep it below the app's own keep-alive timeout (Node.js:
    /// 5 s), or a request may go out on a connection the app is closing and fail; `0`: a new
    /// connection per request.
    #[arg(long, env = "MESHLET_APP_IDLE_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub app_idle_timeout: Duration,
    /// HTTP/2 streams a client may have open on one connection.
    #[arg(long, env = "MESHLET_HTTP2_MAX_STREAMS", default_value_t = 256)]
    pub http2_max_streams: u32,
    /// Tracing, from the standard `OTEL_*` variables (read in `main`; None: off).
    #[arg(skip)]
    pub tracing: Option<meshlet_telemetry::traces::TraceConfig>,
}

/// An explicit-mode outbound route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    /// The identity the upstream must present; None: ask discovery.
    pub identity: Option<SpiffeId>,
}

impl FromStr for Route {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (listen, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected LISTEN=UPSTREAM[@SPIFFE_ID]"))?;
        let (upstream, identity) = match rest.split_once('@') {
            Some((u, id)) => (
                u,
                Some(SpiffeId::parse(id).map_err(|e| format!("{id:?}: {e}"))?),
            ),
            None => (rest, None),
        };
        Ok(Self {
            listen: listen
                .parse()
                .map_err(|e| format!("LISTEN {listen:?}: {e}"))?,
            upstream: upstream
                .parse()
                .map_err(|e| format!("UPSTREAM {upstream:?}: {e}"))?,
            identity,
        })
    }
}

/// The sidecar's configuration. Built from [`RunArgs`]; tests build it directly.
pub type Config = RunArgs;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse() {
        let r: Route = "127.0.0.1:7000=127.0.0.1:16006@spiffe://td/ns/a/sa/b"
            .parse()
            .expect("valid");
        assert_eq!(r.listen.port(), 7000);
        assert_eq!(r.upstream.port(), 16006);
        assert_eq!(
            r.identity.map(|i| i.to_string()).as_deref(),
            Some("spiffe://td/ns/a/sa/b")
        );
        let r: Route = "[::1]:7000=10.0.0.1:80".parse().expect("valid");
        assert_eq!(r.identity, None);
        for bad in [
            "7000",
            "x=127.0.0.1:1",
            "127.0.0.1:1=y",
            "127.0.0.1:1=127.0.0.1:2@spiffe://td/",
        ] {
            assert!(bad.parse::<Route>().is_err(), "{bad}");
        }
    }
}
