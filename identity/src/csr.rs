//! Checking a workload's certificate signing request before the CA signs its key.
//!
//! The CA takes only the public key from a CSR: the identity comes from the authenticated
//! token. A CSR is accepted when it is well-formed DER no larger than [`MAX_CSR_LEN`], its
//! key is ECDSA P-256 (the one accepted key type), its own signature verifies with that key
//! (proof of possession), and any URI SAN it requests is exactly the identity being issued.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use crate::spiffe::SpiffeId;

/// The largest CSR we parse. A P-256 CSR is about 300 bytes.
pub const MAX_CSR_LEN: usize = 8 * 1024;

/// Why a CSR was refused. The variant names are metric label values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is {0} bytes; the limit is {MAX_CSR_LEN}")]
    TooLarge(usize),
    #[error("the CSR is not valid DER PKCS#10")]
    Malformed,
    #[error("the CSR's key is not ECDSA P-256, the only accepted key type")]
    UnsupportedKey,
    #[error("the CSR's signature does not verify with its own key")]
    BadSignature,
    #[error("the CSR asks for {requested} but the token proves {expected}")]
    IdentityMismatch { requested: String, expected: String },
}

impl CsrError {
    /// A short, closed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "csr_too_large",
            Self::Malformed => "csr_malformed",
            Self::UnsupportedKey => "csr_unsupported_key",
            Self::BadSignature => "csr_bad_signature",
            Self::IdentityMismatch { .. } => "csr_identity_mismatch",
        }
    }
}

/// The public key of a CSR that passed every check, ready to be signed.
#[derive(Debug, Clone)]
pub struct CheckedKey(pub(crate) rcgen::SubjectPublicKeyInfo);

/// Checks `der` as a CSR for `expected`; see the module docs for the rules.
pub fn check_csr(der: &[u8], expected: &SpiffeId) -> Result<CheckedKey, CsrError> {
    if der.len() > MAX_CSR_LEN {
        return Err(CsrError::TooLarge(der.len()));
    }
    let csr = match X509CertificationRequest::from_der(der) {
        Ok((&[], csr)) => csr,
        _ => return Err(CsrError::Malformed),
    };
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(CsrError::UnsupportedKey);
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name
                    && *uri != expected.as_str()
                {
                    return Err(CsrError::IdentityMismatch {
                        requested: (*uri).to_owned(),
                        expected: expected.to_string(),
                    });
                }
            }
        }
    }
    let key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw).map_err(|_| CsrError::Malformed)?;
    Ok(CheckedKey(key))
}

/// Builds a DER CSR for `key`, optionally naming `id` as its URI SAN; what a workload sends.
pub fn build_csr(key: &rcgen::KeyPair, id: Option<&SpiffeId>) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(id) = id {
        params.subject_alt_names = vec![rcgen::SanType::URI(id.as_str().try_into()?)];
    }
    Ok(params.serialize_request(key)?.der().to_vec())
}
