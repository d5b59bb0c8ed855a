//! Serving gRPC over TLS on an already-bound listener.
//!
//! The accept loop completes each TLS handshake in its own task (bounded by
//! [`HANDSHAKE_TIMEOUT`]) with the latest server configuration, so the serving certificate
//! rotates without a restart and a slow client delays nobody else.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `routes` on `listener` until `shutdown`; in-flight calls are finished first.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    routes: tonic::service::Routes,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (tx, rx) = mpsc::channel::<Result<TlsStream<TcpStream>, io::Error>>(64);
    tokio::spawn(accept_loop(listener, tls, tx, shutdown.clone()));
    tonic::transport::Server::builder()
        // Pings find sidecars that vanished, so their stream tasks end.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown.cancelled_owned())
        .await
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    tx: mpsc::Sender<Result<TlsStream<TcpStream>, io::Error>>,
    shutdown: CancellationToken,
) {
    loop {
        let Some((tcp, peer)) =
            meshlet_telemetry::process::accept(&listener, &shutdown, "gRPC").await
        else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send(Ok(stream)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}
