//! Workload authentication: JWTs with the claims of a Kubernetes projected service-account
//! token, verified against a JWKS (the cluster's) or the control plane's local signing key.
//!
//! Rules: asymmetric algorithms only (`none` and HMAC are refused before any key is tried),
//! `aud` contains `meshlet`, `exp` and `nbf` checked with [`CLOCK_SKEW`], `iss` checked when
//! configured, and the namespace and service account come from the `kubernetes.io` claim,
//! which must agree with `sub`. Error messages never contain the token.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

/// The audience every workload token must carry.
pub const AUDIENCE: &str = "meshlet";
/// The issuer of tokens minted with the local key.
pub const LOCAL_ISSUER: &str = "meshlet-local";
/// Tolerated clock difference for `exp` and `nbf`.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Tokens longer than this are refused unread.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
const LOCAL_KID: &str = "meshlet-local";
const SIGNING_KEY_FILE: &str = "token-signing.key";

/// Why a token was refused. [`TokenError::reason`] is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("the token's algorithm {0:?} is not accepted (asymmetric signatures only)")]
    Algorithm(String),
    #[error("the token's signature does not verify with any trusted key")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's audience does not include {AUDIENCE:?}")]
    Audience,
    #[error("the token's issuer is not the configured one")]
    Issuer,
    #[error("the token's claims are incomplete or inconsistent: {0}")]
    Claims(String),
    #[error("the token could not be checked: {0}")]
    Unavailable(String),
}

impl TokenError {
    /// A short, closed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge | Self::Malformed(_) => "token_malformed",
            Self::Algorithm(_) => "token_algorithm",
            Self::Signature => "token_signature",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::Audience => "token_audience",
            Self::Issuer => "token_issuer",
            Self::Claims(_) => "token_claims",
            Self::Unavailable(_) => "cluster_unavailable",
        }
    }
}

/// Who a valid token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub service_account: String,
    pub pod: Option<String>,
}

/// The claims of a Kubernetes projected service-account token that we use.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub iss: String,
    pub sub: String,
    /// Checked by jsonwebtoken from the raw claims (string or array); only written here.
    #[serde(default, skip_deserializing)]
    pub aud: Vec<String>,
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default)]
    pub nbf: u64,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: Option<KubernetesClaims>,
}

/// The `kubernetes.io` claim.
#[derive(Debug, Serialize, Deserialize)]
pub struct KubernetesClaims {
    pub namespace: Option<String>,
    pub pod: Option<NamedRef>,
    pub serviceaccount: Option<NamedRef>,
}

/// A named object reference in the `kubernetes.io` claim.
#[derive(Debug, Serialize, Deserialize)]
pub struct NamedRef {
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

/// A key that may sign workload tokens.
#[derive(Clone)]
pub struct TrustedKey {
    kid: Option<String>,
    key: DecodingKey,
}

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// Reads the asymmetric keys of a JWKS document; symmetric (`oct`) keys are skipped.
pub fn keys_from_jwks(json: &[u8]) -> Result<Vec<TrustedKey>, String> {
    let set: JwkSet =
        serde_json::from_slice(json).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            continue;
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key: {e}"))?;
        keys.push(TrustedKey {
            kid: jwk.common.key_id.clone(),
            key,
        });
    }
    if keys.is_empty() {
        return Err("the JWKS holds no asymmetric key".into());
    }
    Ok(keys)
}

/// Verifies workload tokens. The key set can be replaced while serving (JWKS refresh).
#[derive(Debug)]
pub struct Authenticator {
    keys: ArcSwap<Vec<TrustedKey>>,
    issuer: Option<String>,
}

impl Authenticator {
    pub fn new(keys: Vec<TrustedKey>, issuer: Option<String>) -> Self {
        Self {
            keys: ArcSwap::from_pointee(keys),
            issuer,
        }
    }

    /// Replaces the trusted keys (keeps `extra`, such as the local key, in front).
    pub fn set_keys(&self, keys: Vec<TrustedKey>) {
        self.keys.store(Arc::new(keys));
    }

    /// Authenticates `token`, returning who it names.
    pub fn authenticate(&self, token: &str) -> Result<Workload, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge);
        }
        let alg = header_alg(token)?;
        let keys = self.keys.load();
        let by_kid: Vec<&TrustedKey> = match jsonwebtoken::decode_header(token) {
            Ok(Header { kid: Some(kid), .. })
                if keys.iter().any(|k| k.kid.as_ref() == Some(&kid)) =>
            {
                keys.iter()
                    .filter(|k| k.kid.as_ref() == Some(&kid))
                    .collect()
            }
            Ok(_) => keys.iter().collect(),
            Err(e) => return Err(TokenError::Malformed(e.to_string())),
        };
        let mut validation = Validation::new(alg);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = CLOCK_SKEW.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        for candidate in by_kid {
            match jsonwebtoken::decode::<Claims>(token, &candidate.key, &validation) {
                Ok(data) => return workload_of(data.claims),
                Err(e) => match e.kind() {
                    ErrorKind::InvalidSignature
                    | ErrorKind::InvalidAlgorithm
                    | ErrorKind::InvalidKeyFormat
                    | ErrorKind::InvalidEcdsaKey
                    | ErrorKind::InvalidRsaKey(_)
                    | ErrorKind::InvalidEddsaKey => {
                        continue;
                    }
                    _ => return Err(claim_error(e.kind())),
                },
            }
        }
        Err(TokenError::Signature)
    }
}

/// Reads `alg` from the JOSE header ourselves, so `none` and HMAC get a clear refusal.
fn header_alg(token: &str) -> Result<Algorithm, TokenError> {
    #[derive(Deserialize)]
    struct Alg {
        alg: String,
    }
    let header = token.split('.').next().unwrap_or_default();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed("the header is not base64url".into()))?;
    let Alg { alg } = serde_json::from_slice(&json)
        .map_err(|_| TokenError::Malformed("the header has no alg".into()))?;
    match alg.parse::<Algorithm>() {
        Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) | Err(_) => {
            Err(TokenError::Algorithm(alg))
        }
        Ok(alg) => Ok(alg),
    }
}

fn claim_error(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidAudience => TokenError::Audience,
        ErrorKind::InvalidIssuer => TokenError::Issuer,
        ErrorKind::MissingRequiredClaim(c) => TokenError::Claims(format!("missing {c}")),
        ErrorKind::InvalidClaimFormat(c) => TokenError::Claims(format!("bad {c}")),
        ErrorKind::Json(e) => TokenError::Claims(e.to_string()),
        other => TokenError::Malformed(format!("{other:?}")),
    }
}

fn workload_of(claims: Claims) -> Result<Workload, TokenError> {
    let missing = |what: &str| TokenError::Claims(format!("missing kubernetes.io {what}"));
    let k8s = claims.kubernetes.ok_or_else(|| missing("claim"))?;
    let namespace = k8s.namespace.ok_or_else(|| missing("namespace"))?;
    let service_account = k8s
        .serviceaccount
        .ok_or_else(|| missing("serviceaccount"))?
        .name;
    let expected_sub = format!("system:serviceaccount:{namespace}:{service_account}");
    if claims.sub != expected_sub {
        return Err(TokenError::Claims(
            "sub does not match the kubernetes.io claim".into(),
        ));
    }
    Ok(Workload {
        namespace,
        service_account,
        pod: k8s.pod.map(|p| p.name),
    })
}

/// The control plane's own token signing key (ES256), for local development and the demo.
/// Stored PKCS#8 in `<data-dir>/token-signing.key`, mode 0600.
pub struct LocalSigner {
    encoding: EncodingKey,
    public: TrustedKey,
}

impl std::fmt::Debug for LocalSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalSigner { .. }")
    }
}

/// Why the local signing key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("{0}")]
    File(#[from] meshlet_identity::ca::CaError),
    #[error("{path}: {reason}")]
    BadKey { path: String, reason: String },
    #[error("generating the key: {0}")]
    Generate(#[from] rcgen::Error),
}

impl LocalSigner {
    /// Loads the key in `data_dir`, creating it when absent.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, SignerError> {
        let path = data_dir.join(SIGNING_KEY_FILE);
        if !path.exists() {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            std::fs::create_dir_all(data_dir).map_err(|source| {
                meshlet_identity::ca::CaError::Io {
                    path: data_dir.to_owned(),
                    source,
                }
            })?;
            meshlet_identity::ca::write_new(&path, key.serialize_pem().as_bytes(), 0o600)?;
        }
        let bad = |reason: String| SignerError::BadKey {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| bad(e.to_string()))?;
        let encoding = EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let decoding = DecodingKey::from_ec_pem(key.public_key_pem().as_bytes())
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            encoding,
            public: TrustedKey {
                kid: Some(LOCAL_KID.into()),
                key: decoding,
            },
        })
    }

    /// The key that verifies what this signer mints.
    pub fn trusted_key(&self) -> TrustedKey {
        self.public.clone()
    }

    /// Mints a token with the claims of a projected service-account token.
    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        pod: Option<&str>,
        ttl: Duration,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let claims = Claims {
            iss: LOCAL_ISSUER.into(),
            sub: format!("system:serviceaccount:{namespace}:{service_account}"),
            aud: vec![AUDIENCE.into()],
            exp: now + ttl.as_secs(),
            iat: now,
            nbf: now,
            kubernetes: Some(KubernetesClaims {
                namespace: Some(namespace.into()),
                pod: pod.map(|name| NamedRef {
                    name: name.into(),
                    uid: String::new(),
                }),
                serviceaccount: Some(NamedRef {
                    name: service_account.into(),
                    uid: String::new(),
                }),
            }),
        };
        self.sign_claims(&claims)
    }

    /// Signs arbitrary claims with the local key (ES256).
    pub fn sign_claims(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(LOCAL_KID.into());
        jsonwebtoken::encode(&header, claims, &self.encoding)
    }
}
