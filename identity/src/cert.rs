//! Reading certificates: the X509-SVID rules a peer's leaf must meet, and the summary
//! (subject, serial, validity) that status APIs show.

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// Why a certificate is not a valid X509-SVID leaf.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("the certificate is not valid DER X.509")]
    Malformed,
    #[error("an SVID has exactly one URI SAN; this one has {0}")]
    UriSanCount(usize),
    #[error("the URI SAN is not a SPIFFE ID: {0}")]
    BadId(#[from] SpiffeIdError),
    #[error("an SVID leaf must not be a CA (basicConstraints cA is true)")]
    LeafIsCa,
    #[error("an SVID leaf must not have keyCertSign or cRLSign")]
    LeafCanSign,
    #[error("the SPIFFE ID {got} is not the expected {want}")]
    WrongId { got: SpiffeId, want: SpiffeId },
    #[error("the SPIFFE ID {got} is not in trust domain {want}")]
    WrongTrustDomain { got: SpiffeId, want: String },
}

/// What an operator wants to know about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    pub subject: String,
    /// Lowercase hex, no separators.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// The single URI SAN when it is a valid SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    match X509Certificate::from_der(der) {
        Ok((&[], cert)) => Ok(cert),
        _ => Err(SvidError::Malformed),
    }
}

fn uri_sans<'a>(cert: &'a X509Certificate<'a>) -> Vec<&'a str> {
    let mut uris = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push(*uri);
                }
            }
        }
    }
    uris
}

/// Reads the SPIFFE ID of an X509-SVID leaf, checking the leaf rules of the X509-SVID
/// specification that a chain validator does not: exactly one URI SAN, which is a SPIFFE ID;
/// not a CA; no keyCertSign or cRLSign. Chain, validity and EKU are webpki's job.
pub fn svid_id(der: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    let cert = parse(der)?;
    if cert.is_ca() {
        return Err(SvidError::LeafIsCa);
    }
    match cert.key_usage() {
        Err(_) => return Err(SvidError::Malformed),
        Ok(Some(ku)) if ku.value.key_cert_sign() || ku.value.crl_sign() => {
            return Err(SvidError::LeafCanSign);
        }
        Ok(_) => {}
    }
    match uri_sans(&cert).as_slice() {
        [uri] => Ok(SpiffeId::parse(uri)?),
        other => Err(SvidError::UriSanCount(other.len())),
    }
}

/// Summarises any certificate (leaf or CA) for status output.
pub fn summarize(der: &[u8]) -> Result<CertSummary, SvidError> {
    let cert = parse(der)?;
    let spiffe_id = match uri_sans(&cert).as_slice() {
        [uri] => SpiffeId::parse(uri).ok(),
        _ => None,
    };
    Ok(CertSummary {
        subject: cert.subject().to_string(),
        serial: hex(cert.raw_serial()),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        spiffe_id,
    })
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The health of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertState {
    Valid,
    /// Its renewal time has passed without a renewal.
    Overdue,
    /// Less than the configured share of its lifetime is left.
    Expiring,
    Expired,
}

/// Under this share of its lifetime left, a certificate is `expiring` (the control plane's
/// `--expiring-share` default, and what the sidecar's `/certs` uses).
pub const DEFAULT_EXPIRING_SHARE: f64 = 0.25;

/// A workload renews at about half of its certificate's life; past this share without a
/// renewal it is overdue (the window covers the renewal jitter and a few retries).
pub const OVERDUE_SHARE: f64 = 0.6;

/// Decides a certificate's state at `now`: `expired` from `not_after` on; `expiring` once
/// less than `expiring_share` of its lifetime is left; `overdue` (when `renews` is set, i.e.
/// for workloads) once [`OVERDUE_SHARE`] of its life has passed; else `valid`.
pub fn state(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
    expiring_share: f64,
    renews: bool,
) -> CertState {
    if now >= not_after {
        return CertState::Expired;
    }
    let life = (not_after - not_before).as_seconds_f64();
    let left = (not_after - now).as_seconds_f64();
    if left < life * expiring_share {
        CertState::Expiring
    } else if renews && life - left > life * OVERDUE_SHARE {
        CertState::Overdue
    } else {
        CertState::Valid
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn states_follow_the_lifetime() {
        let nb = datetime!(2026-01-01 00:00 UTC);
        let na = datetime!(2026-01-02 00:00 UTC); // 24 h
        let cases = [
            (datetime!(2026-01-01 00:00 UTC), true, CertState::Valid),
            (datetime!(2026-01-01 12:00 UTC), true, CertState::Valid),
            (datetime!(2026-01-01 14:24 UTC), true, CertState::Valid), // exactly 60%
            (datetime!(2026-01-01 14:25 UTC), true, CertState::Overdue),
            (datetime!(2026-01-01 14:25 UTC), false, CertState::Valid), // CA certs do not renew
            (datetime!(2026-01-01 18:00 UTC), true, CertState::Overdue), // exactly 25% left
            (datetime!(2026-01-01 18:01 UTC), true, CertState::Expiring),
            (datetime!(2026-01-01 18:01 UTC), false, CertState::Expiring),
            (datetime!(2026-01-02 00:00 UTC), true, CertState::Expired),
            (datetime!(2027-01-01 00:00 UTC), false, CertState::Expired),
        ];
        for (now, renews, want) in cases {
            assert_eq!(
                state(nb, na, now, 0.25, renews),
                want,
                "{now} renews={renews}"
            );
        }
    }
}
