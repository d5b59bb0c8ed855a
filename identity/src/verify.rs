//! rustls verifiers that check the peer's SPIFFE ID.
//!
//! Chain validation (signatures, validity, EKU, path length) stays in rustls-webpki; the only
//! thing added here is the identity check on the validated leaf: the X509-SVID leaf rules,
//! then either an exact SPIFFE ID or membership of a trust domain. Host names are never
//! checked: peers are reached by IP and named by SPIFFE ID.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

use crate::cert::{SvidError, svid_id};
use crate::spiffe::{SpiffeId, TrustDomain};

/// Which peer identities a verifier accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// Exactly this SPIFFE ID, byte for byte.
    Exact(SpiffeId),
    /// Any SPIFFE ID of this trust domain.
    TrustDomain(TrustDomain),
}

impl Expected {
    /// Checks a chain-validated leaf against this expectation.
    pub fn check(&self, leaf: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
        let got = svid_id(leaf)?;
        match self {
            Self::Exact(want) if &got == want => Ok(got),
            Self::Exact(want) => Err(SvidError::WrongId {
                got,
                want: want.clone(),
            }),
            Self::TrustDomain(td) if got.is_member_of(td) => Ok(got),
            Self::TrustDomain(td) => Err(SvidError::WrongTrustDomain {
                got,
                want: td.to_string(),
            }),
        }
    }
}

fn to_rustls(e: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Trust anchors that can be replaced while connections are being made: each
/// verification reads the latest set.
pub type LiveRoots = Arc<arc_swap::ArcSwap<RootCertStore>>;

/// Verifies a server's SVID: webpki chain to the roots of the moment, then [`Expected`].
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: LiveRoots,
    expected: Expected,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, expected: Expected, provider: &CryptoProvider) -> Self {
        Self::live(Arc::new(arc_swap::ArcSwap::new(roots)), expected, provider)
    }

    /// A verifier that follows `roots` as they change.
    pub fn live(roots: LiveRoots, expected: Expected, provider: &CryptoProvider) -> Self {
        Self {
            roots,
            expected,
            algs: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots.load(),
            intermediates,
            now,
            self.algs.all,
        )?;
        self.expected.check(end_entity).map_err(to_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies a client's SVID: webpki's client verifier (chain, clientAuth EKU), then
/// [`Expected`]. Client certificates are mandatory.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    expected: Expected,
}

impl SpiffeClientVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        expected: Expected,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider).build()?;
        Ok(Self { inner, expected })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.expected.check(end_entity).map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
