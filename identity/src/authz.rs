//! Authorization: which identities may call which workloads. The model and the decision,
//! pure; the sidecar enforces it, the control plane distributes it, `meshletctl policy
//! check` explains it.
//!
//! A [`PolicySet`] holds a mesh-wide default (`allow-meshed` or `deny`), per-namespace
//! mTLS modes (`strict` refuses plaintext, `permissive` accepts it), and access policies.
//! An access policy selects a workload (namespace, service account, optionally ports) and
//! lists who may call it: exact SPIFFE IDs (compared byte for byte), whole namespaces, or
//! any meshed identity, optionally narrowed for HTTP by methods and path prefixes. A
//! workload that some policy selects is closed to everyone the policies do not allow;
//! one that none selects follows the mesh-wide default.
//!
//! Paths are compared after [`normalize_path`], the normalisation the app will apply, so
//! `/admin/../admin`, `//admin`, `/%61dmin` or `/ADMIN` cannot slip past a rule.

use serde::{Deserialize, Serialize};

use crate::spiffe::SpiffeId;

/// The mesh-wide default for workloads no policy selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultAction {
    /// Any meshed identity may call (plaintext follows the namespace's mode).
    #[default]
    AllowMeshed,
    /// Nobody may call.
    Deny,
}

/// A namespace's mTLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    Strict,
    Permissive,
}

/// Everything a sidecar enforces.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySet {
    #[serde(default)]
    pub default: DefaultAction,
    /// Namespace name → mode; unlisted namespaces use the sidecar's own setting.
    #[serde(default)]
    pub namespaces: std::collections::BTreeMap<String, MtlsMode>,
    #[serde(default)]
    pub policies: Vec<AccessPolicy>,
}

/// Who may call one workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessPolicy {
    pub name: String,
    pub namespace: String,
    #[serde(rename = "serviceAccount")]
    pub service_account: String,
    /// Empty: every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    pub allow: Vec<Rule>,
}

/// One allow rule: a source, optionally narrowed for HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(
        default,
        rename = "anyMeshed",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub any_meshed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpMatch>,
}

/// HTTP narrowing: the method is one of `methods` (empty: any) and the normalised path
/// starts with one of `paths` at a segment boundary (empty: any).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(
        default,
        rename = "pathPrefixes",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub path_prefixes: Vec<String>,
}

/// The workload being called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub port: u16,
}

impl<'a> Target<'a> {
    /// The workload a `/ns/<ns>/sa/<sa>` SPIFFE ID names.
    pub fn of(id: &'a SpiffeId, port: u16) -> Option<Self> {
        let mut parts = id.path().split('/').skip(1);
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some(Self {
                namespace: ns,
                service_account: sa,
                port,
            }),
            _ => None,
        }
    }
}

/// An HTTP request, as seen by the inbound sidecar.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
}

/// A decision and the rule that made it, for metrics, logs and `policy check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub rule: String,
}

/// The answer for a connection, before any request is seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionVerdict {
    Allow(Decision),
    Deny(Decision),
    /// Only HTTP rules could allow it: decide each request.
    PerRequest,
}

fn decision(allowed: bool, rule: impl Into<String>) -> Decision {
    Decision {
        allowed,
        rule: rule.into(),
    }
}

impl PolicySet {
    /// The mTLS mode of `namespace`, if the policy sets one.
    pub fn mode(&self, namespace: &str) -> Option<MtlsMode> {
        self.namespaces.get(namespace).copied()
    }

    fn selecting<'p>(&'p self, t: &Target<'_>) -> Vec<&'p AccessPolicy> {
        self.policies
            .iter()
            .filter(|p| p.namespace == t.namespace && p.service_account == t.service_account)
            .filter(|p| p.ports.is_empty() || p.ports.contains(&t.port))
            .collect()
    }

    /// Decides a connection from `peer` (None: plaintext) to `target`.
    pub fn connection(&self, target: &Target<'_>, peer: Option<&SpiffeId>) -> ConnectionVerdict {
        let policies = self.selecting(target);
        if policies.is_empty() {
            return ConnectionVerdict::from(self.default_decision(target, peer));
        }
        let mut http_only = false;
        for p in &policies {
            for (i, rule) in p.allow.iter().enumerate() {
                if rule.source_matches(peer) {
                    match rule.http {
                        None => {
                            return ConnectionVerdict::Allow(decision(
                                true,
                                format!("{}/{} allow[{i}]", p.namespace, p.name),
                            ));
                        }
                        Some(_) => http_only = true,
                    }
                }
            }
        }
        if http_only {
            return ConnectionVerdict::PerRequest;
        }
        let names: Vec<String> = policies
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        ConnectionVerdict::Deny(decision(
            false,
            format!("{}: no rule allows this caller", names.join(", ")),
        ))
    }

    /// Decides one HTTP request from `peer` to `target`.
    pub fn request(
        &self,
        target: &Target<'_>,
        peer: Option<&SpiffeId>,
        req: Request<'_>,
    ) -> Decision {
        let policies = self.selecting(target);
        if policies.is_empty() {
            return self.default_decision(target, peer);
        }
        let path = normalize_path(req.path);
        for p in &policies {
            for (i, rule) in p.allow.iter().enumerate() {
                if !rule.source_matches(peer) {
                    continue;
                }
                let ok = match (&rule.http, &path) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(h), Some(path)) => h.matches(req.method, path),
                };
                if ok {
                    return decision(true, format!("{}/{} allow[{i}]", p.namespace, p.name));
                }
            }
        }
        let why = if path.is_none() {
            "the path does not normalise"
        } else {
            "no rule allows this request"
        };
        let names: Vec<String> = policies
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        decision(false, format!("{}: {why}", names.join(", ")))
    }

    fn default_decision(&self, target: &Target<'_>, peer: Option<&SpiffeId>) -> Decision {
        match (self.default, peer, self.mode(target.namespace)) {
            (DefaultAction::Deny, _, _) => decision(false, "mesh default: deny"),
            (DefaultAction::AllowMeshed, Some(_), _) => {
                decision(true, "mesh default: allow meshed")
            }
            (DefaultAction::AllowMeshed, None, Some(MtlsMode::Strict)) => decision(
                false,
                format!("namespace {}: strict mTLS", target.namespace),
            ),
            (DefaultAction::AllowMeshed, None, _) => {
                decision(true, "mesh default: plaintext allowed (permissive)")
            }
        }
    }
}

impl From<Decision> for ConnectionVerdict {
    fn from(d: Decision) -> Self {
        if d.allowed {
            Self::Allow(d)
        } else {
            Self::Deny(d)
        }
    }
}

impl Rule {
    fn source_matches(&self, peer: Option<&SpiffeId>) -> bool {
        let Some(peer) = peer else { return false };
        if self.any_meshed
            || self
                .identities
                .iter()
                .any(|i| i.as_bytes() == peer.as_str().as_bytes())
        {
            return true;
        }
        let peer_ns = Target::of(peer, 0).map(|t| t.namespace);
        peer_ns.is_some_and(|ns| self.namespaces.iter().any(|n| n == ns))
    }
}

impl HttpMatch {
    fn matches(&self, method: &str, path: &str) -> bool {
        let method_ok =
            self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method));
        let path_ok = self.path_prefixes.is_empty()
            || self
                .path_prefixes
                .iter()
                .filter_map(|p| normalize_path(p))
                .any(|prefix| {
                    prefix == "/"
                        || path == prefix
                        || path
                            .strip_prefix(&prefix)
                            .is_some_and(|rest| rest.starts_with('/'))
                });
        method_ok && path_ok
    }
}

/// Normalises a request path as servers do before routing: the query is dropped,
/// percent-encoding decoded (once; an encoded `/`, `\`, `%` or NUL, a `;` path parameter,
/// or anything that is not valid UTF-8 makes the path unusable), `\` read as `/`, repeated
/// slashes merged, `.` and `..` resolved (never above the root), and the result
/// lower-cased. `None`: refuse.
pub fn normalize_path(raw: &str) -> Option<String> {
    let raw = raw.split(['?', '#']).next().unwrap_or("");
    if !raw.starts_with('/') && !raw.starts_with('\\') {
        return None;
    }
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            let b = u8::from_str_radix(hex, 16).ok()?;
            // Encoded separators, NUL, and `%` itself (double encoding: an app that decodes
            // twice would see another path) are refused.
            if matches!(b, b'/' | b'\\' | 0 | b'%') {
                return None;
            }
            decoded.push(b);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let text = String::from_utf8(decoded).ok()?;
    // `;` starts path parameters that Java servers strip per segment (`/public/..;/admin`
    // routes to `/admin` there): refused rather than guessed.
    if text.contains('\0') || text.contains(';') {
        return None;
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in text.split(['/', '\\']) {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop()?;
            }
            s => segments.push(s),
        }
    }
    Some(format!("/{}", segments.join("/")).to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise_as_the_app_sees_them() {
        let cases = [
            ("/admin", Some("/admin")),
            ("/admin/", Some("/admin")),
            ("//admin", Some("/admin")),
            ("/a/../admin", Some("/admin")),
            ("/admin/../admin", Some("/admin")),
            ("/./admin/.", Some("/admin")),
            ("/%61dmin", Some("/admin")),
            ("/ADMIN", Some("/admin")),
            ("/Admin?x=1", Some("/admin")),
            ("\\admin", Some("/admin")),
            ("/public\\..\\admin", Some("/admin")),
            ("/%2e%2e/admin", None), // ".." above the root
            ("/../admin", None),
            ("/a%2fb", None),
            ("/a%5cb", None),
            ("/a%00b", None),
            ("/%zz", None),
            ("/%e", None),
            ("/%ff", None),
            ("/public/..;/admin", None),
            ("/public;jsessionid=1", None),
            ("/public/%3b/admin", None),
            ("/%252e%252e/admin", None),
            ("admin", None),
            ("", None),
            ("/", Some("/")),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw).as_deref(), want, "{raw:?}");
        }
    }

    fn set() -> PolicySet {
        serde_json::from_value(serde_json::json!({
            "default": "allow-meshed",
            "namespaces": {"secure": "strict"},
            "policies": [
                {"name": "orders", "namespace": "shop", "serviceAccount": "orders", "allow": [
                    {"identities": ["spiffe://cluster.local/ns/shop/sa/frontend"]},
                    {"namespaces": ["ops"], "http": {"methods": ["GET"], "pathPrefixes": ["/status"]}}
                ]},
                {"name": "admin-api", "namespace": "shop", "serviceAccount": "admin", "ports": [9000], "allow": [
                    {"anyMeshed": true, "http": {"pathPrefixes": ["/public"]}}
                ]}
            ]
        }))
        .expect("a valid policy")
    }

    #[test]
    fn requests_are_decided_by_the_rules() {
        let s = set();
        let id = |x: &str| SpiffeId::parse(x).expect("valid");
        let frontend = id("spiffe://cluster.local/ns/shop/sa/frontend");
        let ops = id("spiffe://cluster.local/ns/ops/sa/monitor");
        let other = id("spiffe://cluster.local/ns/web/sa/blog");
        let look_alike = id("spiffe://cluster.local/ns/shop/sa/frontendx");
        let orders = Target {
            namespace: "shop",
            service_account: "orders",
            port: 8080,
        };
        let admin = Target {
            namespace: "shop",
            service_account: "admin",
            port: 9000,
        };
        let admin_other_port = Target {
            namespace: "shop",
            service_account: "admin",
            port: 9001,
        };
        let free = Target {
            namespace: "web",
            service_account: "blog",
            port: 80,
        };
        let secure = Target {
            namespace: "secure",
            service_account: "vault",
            port: 80,
        };
        let req = |method, path| Request { method, path };
        let cases: Vec<(&str, &Target, Option<&SpiffeId>, Request, bool)> = vec![
            (
                "exact identity, any request",
                &orders,
                Some(&frontend),
                req("POST", "/orders"),
                true,
            ),
            (
                "identities compare byte for byte",
                &orders,
                Some(&look_alike),
                req("GET", "/status"),
                false,
            ),
            (
                "namespace + GET /status",
                &orders,
                Some(&ops),
                req("GET", "/status/health"),
                true,
            ),
            (
                "namespace, wrong method",
                &orders,
                Some(&ops),
                req("DELETE", "/status"),
                false,
            ),
            (
                "namespace, other path",
                &orders,
                Some(&ops),
                req("GET", "/orders"),
                false,
            ),
            (
                "prefix at a segment boundary only",
                &orders,
                Some(&ops),
                req("GET", "/statusx"),
                false,
            ),
            (
                "dot-dot out of the prefix",
                &orders,
                Some(&ops),
                req("GET", "/status/../orders"),
                false,
            ),
            (
                "other namespace",
                &orders,
                Some(&other),
                req("GET", "/status"),
                false,
            ),
            (
                "plaintext never matches a rule",
                &orders,
                None,
                req("GET", "/status"),
                false,
            ),
            (
                "any meshed, public path",
                &admin,
                Some(&other),
                req("GET", "/public/x"),
                true,
            ),
            (
                "any meshed, encoded escape",
                &admin,
                Some(&other),
                req("GET", "/public/%2e%2e/admin"),
                false,
            ),
            (
                "any meshed, double slash is still public",
                &admin,
                Some(&other),
                req("GET", "//public"),
                true,
            ),
            (
                "any meshed, case variant of public",
                &admin,
                Some(&other),
                req("GET", "/PUBLIC"),
                true,
            ),
            (
                "not public",
                &admin,
                Some(&other),
                req("GET", "/admin"),
                false,
            ),
            (
                "unselected port: mesh default",
                &admin_other_port,
                Some(&other),
                req("GET", "/admin"),
                true,
            ),
            (
                "no policy: meshed allowed",
                &free,
                Some(&other),
                req("GET", "/"),
                true,
            ),
            (
                "no policy: plaintext in a permissive namespace",
                &free,
                None,
                req("GET", "/"),
                true,
            ),
            (
                "no policy: plaintext in a strict namespace",
                &secure,
                None,
                req("GET", "/"),
                false,
            ),
        ];
        for (name, target, peer, r, want) in cases {
            let d = s.request(target, peer, r);
            assert_eq!(d.allowed, want, "{name}: {}", d.rule);
        }
        let mut deny = set();
        deny.default = DefaultAction::Deny;
        assert!(!deny.request(&free, Some(&other), req("GET", "/")).allowed);
    }

    #[test]
    fn connections_are_decided_before_requests() {
        let s = set();
        let id = |x: &str| SpiffeId::parse(x).expect("valid");
        let orders = Target {
            namespace: "shop",
            service_account: "orders",
            port: 8080,
        };
        assert!(matches!(
            s.connection(
                &orders,
                Some(&id("spiffe://cluster.local/ns/shop/sa/frontend"))
            ),
            ConnectionVerdict::Allow(_)
        ));
        assert_eq!(
            s.connection(&orders, Some(&id("spiffe://cluster.local/ns/ops/sa/m"))),
            ConnectionVerdict::PerRequest
        );
        assert!(matches!(
            s.connection(&orders, Some(&id("spiffe://cluster.local/ns/web/sa/b"))),
            ConnectionVerdict::Deny(_)
        ));
        assert!(matches!(
            s.connection(&orders, None),
            ConnectionVerdict::Deny(_)
        ));
    }

    #[test]
    fn workloads_are_read_from_spiffe_ids() {
        let id = SpiffeId::parse("spiffe://td/ns/shop/sa/cart").expect("valid");
        assert_eq!(
            Target::of(&id, 80),
            Some(Target {
                namespace: "shop",
                service_account: "cart",
                port: 80
            })
        );
        let other = SpiffeId::parse("spiffe://td/workload/x").expect("valid");
        assert_eq!(Target::of(&other, 80), None);
        let bad: Result<PolicySet, _> = serde_json::from_str(r#"{"policies": [], "surprise": 1}"#);
        assert!(bad.is_err(), "unknown fields are refused");
    }
}
