//! SPIFFE IDs and trust domains, parsed once by the SPIFFE-ID specification.
//!
//! `spiffe://<trust-domain>/<path>`: the scheme is exactly `spiffe`; the trust domain is
//! lowercase letters, digits, `.`, `-` and `_`, at most 255 bytes; the path is one or more
//! non-empty segments of letters, digits, `.`, `-` and `_`, none of them `.` or `..`, with no
//! trailing slash. There is no room for userinfo, a port, a query, a fragment or
//! percent-encoding: the characters that would introduce them are refused.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The longest SPIFFE ID we accept or issue (the spec's SHOULD NOT exceed).
pub const MAX_ID_LEN: usize = 2048;
/// The longest trust domain name.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("a SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("the trust domain has {0:?}: only a-z, 0-9, '.', '-' and '_' are allowed")]
    TrustDomainChar(char),
    #[error("a workload SPIFFE ID needs a path after the trust domain")]
    MissingPath,
    #[error("the path has an empty segment or a trailing slash")]
    EmptySegment,
    #[error("the path has a '.' or '..' segment")]
    DotSegment,
    #[error("the path has {0:?}: only letters, digits, '.', '-' and '_' are allowed")]
    PathChar(char),
    #[error("the SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
}

/// A trust domain name, such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    /// Parses a bare trust domain name (no scheme).
    pub fn parse(name: &str) -> Result<Self, SpiffeIdError> {
        check_trust_domain(name)?;
        Ok(Self(name.into()))
    }

    /// The name, such as `cluster.local`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`, as a string.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A workload's SPIFFE ID: `spiffe://<trust-domain>/<path>` with a non-empty path.
///
/// Compared byte for byte; cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: Arc<str>,
    /// Byte offset of the path's leading '/'.
    path_start: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID. The path must be present: workloads never carry a bare
    /// trust domain ID.
    pub fn parse(id: &str) -> Result<Self, SpiffeIdError> {
        if id.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = id.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(domain)?;
        check_path(path)?;
        Ok(Self {
            id: id.into(),
            path_start: SCHEME.len() + domain.len(),
        })
    }

    /// The Kubernetes form: `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn for_service_account(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!(
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The trust domain name, such as `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    /// Whether this ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain() == td.as_str()
    }

    /// The path, with its leading '/'.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

fn check_trust_domain(domain: &str) -> Result<(), SpiffeIdError> {
    if domain.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    match domain
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(SpiffeIdError::TrustDomainChar(c)),
        None => Ok(()),
    }
}

fn check_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Err(SpiffeIdError::MissingPath);
    }
    // `path` starts with '/', so the first split item is always the empty string before it.
    for segment in path.split('/').skip(1) {
        match segment {
            "" => return Err(SpiffeIdError::EmptySegment),
            "." | ".." => return Err(SpiffeIdError::DotSegment),
            _ => {}
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(SpiffeIdError::PathChar(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use SpiffeIdError as E;

    #[test]
    fn good_ids_parse_into_their_parts() {
        let cases = [
            (
                "spiffe://cluster.local/ns/default/sa/web",
                "cluster.local",
                "/ns/default/sa/web",
            ),
            ("spiffe://example.org/a", "example.org", "/a"),
            ("spiffe://a-b_c.9/A.b-c_D/x", "a-b_c.9", "/A.b-c_D/x"),
            ("spiffe://td/...", "td", "/..."),
        ];
        for (input, td, path) in cases {
            let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(id.trust_domain(), td, "{input}");
            assert_eq!(id.path(), path, "{input}");
            assert_eq!(id.as_str(), input);
        }
    }

    #[test]
    fn bad_ids_are_refused_with_the_reason() {
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        let long_id = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        let cases: &[(&str, E)] = &[
            ("", E::WrongScheme),
            ("http://td/a", E::WrongScheme),
            ("SPIFFE://td/a", E::WrongScheme),
            ("spiffe:/td/a", E::WrongScheme),
            ("spiffe://", E::EmptyTrustDomain),
            ("spiffe:///a", E::EmptyTrustDomain),
            ("spiffe://Cluster.local/a", E::TrustDomainChar('C')),
            ("spiffe://user@td/a", E::TrustDomainChar('@')),
            ("spiffe://td:8080/a", E::TrustDomainChar(':')),
            ("spiffe://td%41/a", E::TrustDomainChar('%')),
            ("spiffe://td?x=1", E::TrustDomainChar('?')),
            ("spiffe://td#frag", E::TrustDomainChar('#')),
            ("spiffe://td", E::MissingPath),
            ("spiffe://td/", E::EmptySegment),
            ("spiffe://td/a/", E::EmptySegment),
            ("spiffe://td//a", E::EmptySegment),
            ("spiffe://td/a/./b", E::DotSegment),
            ("spiffe://td/a/..", E::DotSegment),
            ("spiffe://td/.", E::DotSegment),
            ("spiffe://td/a%2Fb", E::PathChar('%')),
            ("spiffe://td/a?x=1", E::PathChar('?')),
            ("spiffe://td/a#f", E::PathChar('#')),
            ("spiffe://td/a b", E::PathChar(' ')),
            ("spiffe://td/caf\u{e9}", E::PathChar('\u{e9}')),
            (&long_td, E::TrustDomainTooLong),
            (&long_id, E::TooLong),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "{input:?}");
        }
    }

    #[test]
    fn trust_domain_of_255_bytes_is_the_limit() {
        let td = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        assert!(TrustDomain::parse(&td).is_ok());
        assert!(SpiffeId::parse(&format!("spiffe://{td}/x")).is_ok());
    }

    #[test]
    fn service_account_ids_are_built_and_checked() {
        let td = TrustDomain::parse("cluster.local").expect("valid trust domain");
        let id = SpiffeId::for_service_account(&td, "prod", "api").expect("valid names");
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/prod/sa/api");
        assert!(id.is_member_of(&td));
        assert!(!id.is_member_of(&TrustDomain::parse("other").expect("valid")));
        assert_eq!(
            SpiffeId::for_service_account(&td, "", "api"),
            Err(E::EmptySegment)
        );
        assert_eq!(
            SpiffeId::for_service_account(&td, "a/../b", "api"),
            Err(E::DotSegment)
        );
    }
}
