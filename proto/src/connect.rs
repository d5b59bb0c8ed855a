//! Reaching the control plane: a tonic channel over TLS whose verification is the caller's
//! rustls configuration (the SPIFFE ID check), not a host name.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// The ALPN protocol gRPC speaks.
pub const GRPC_ALPN: &[u8] = b"h2";

/// Opens a lazily connecting channel to `target` ("host:port", resolved at each connect)
/// over TLS with `tls`. The configuration's verifier decides whom to trust; the TLS server
/// name sent is a fixed placeholder. `tls` must offer the `h2` ALPN.
pub fn tls_channel(
    target: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let connector = TlsConnector::from(tls);
    let endpoint = Endpoint::from_shared(format!("http://{target}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        // Watch streams are mostly idle: pings find a control plane that vanished.
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let target = target.to_owned();
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            let target = target.clone();
            async move {
                let tcp = TcpStream::connect(target.as_str()).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from("meshlet-control.invalid")
                    .expect("a static DNS name is valid");
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        })),
    )
}
