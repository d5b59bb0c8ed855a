//! rustls configurations for the mesh: TLS 1.3 only, aws-lc-rs (post-quantum hybrid key
//! exchange preferred), SPIFFE verifiers, and no session resumption, so every connection
//! is validated against the current trust bundle.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub use crate::verify::LiveRoots;
use crate::verify::{Expected, SpiffeClientVerifier, SpiffeServerVerifier};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the trust bundle holds no usable root certificate")]
    EmptyBundle,
}

/// The one crypto provider the mesh uses. Library code passes it explicitly; it never
/// relies on the process-wide default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A root store holding every certificate of `bundle`.
pub fn root_store(bundle: &[CertificateDer<'_>]) -> Result<Arc<RootCertStore>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) =
        roots.add_parsable_certificates(bundle.iter().cloned().map(|c| c.into_owned()));
    if added == 0 {
        return Err(TlsConfigError::EmptyBundle);
    }
    Ok(Arc::new(roots))
}

/// A server configuration presenting `chain`; with `clients` set, a client SVID matching it
/// is required (mutual TLS).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    clients: Option<(Arc<RootCertStore>, Expected)>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsConfigError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut config = match clients {
        Some((roots, expected)) => builder
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
                roots, expected, provider,
            )?))
            .with_single_cert(chain, key)?,
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client configuration that requires the server to present `expected`; with `identity`
/// set, it presents that chain as its client certificate.
pub fn client_config(
    roots: Arc<RootCertStore>,
    expected: Expected,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsConfigError> {
    live_client_config(
        Arc::new(arc_swap::ArcSwap::new(roots)),
        expected,
        identity,
        alpn,
    )
}

/// As [`client_config`], trusting whatever `roots` holds at each handshake.
pub fn live_client_config(
    roots: LiveRoots,
    expected: Expected,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsConfigError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier::live(roots, expected, &provider));
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}
