//! `meshlet-control serve` configuration: flags, each also settable as `MESHLET_<FLAG>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meshlet_identity::{SpiffeId, TrustDomain};

/// The namespace and service account the control plane's own SPIFFE ID names by default.
pub const CONTROL_NAMESPACE: &str = "meshlet-system";
pub const CONTROL_SERVICE_ACCOUNT: &str = "meshlet-control";

/// Flags of `meshlet-control serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Folder for the CA (`<data-dir>/ca`, created on first start and reused) and the local
    /// token signing key.
    #[arg(long, env = "MESHLET_DATA_DIR", default_value = "/var/lib/meshlet")]
    pub data_dir: PathBuf,
    /// Load the CA from this folder instead (bundle.crt, issuer.crt, issuer.key; as mounted
    /// from a Kubernetes Secret). Nothing is created there.
    #[arg(long, env = "MESHLET_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// The SPIFFE trust domain.
    #[arg(long, env = "MESHLET_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,
    /// gRPC over TLS (Identity service).
    #[arg(long, env = "MESHLET_GRPC_ADDR", default_value = "0.0.0.0:15012")]
    pub grpc_addr: SocketAddr,
    /// Admin HTTP: /ready, /live, /metrics, /v1/certs, /v1/trust-bundle.
    #[arg(long, env = "MESHLET_ADMIN_ADDR", default_value = "0.0.0.0:15014")]
    pub admin_addr: SocketAddr,
    /// Lifetime of workload certificates, e.g. 24h, 90s.
    #[arg(long, env = "MESHLET_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
    /// The control plane's own SPIFFE ID [default: spiffe://<trust-domain>/ns/meshlet-system/sa/meshlet-control]
    #[arg(long, env = "MESHLET_IDENTITY")]
    pub identity: Option<SpiffeId>,
    /// Trust workload tokens signed by the keys of this JWKS file.
    #[arg(long, env = "MESHLET_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// Trust workload tokens signed by the keys at this URL, e.g.
    /// https://kubernetes.default.svc/openid/v1/jwks (refreshed every 10 minutes).
    #[arg(long, env = "MESHLET_JWKS_URL")]
    pub jwks_url: Option<http::Uri>,
    /// CA certificates (PEM) that verify an https --jwks-url.
    #[arg(long, env = "MESHLET_JWKS_CA_FILE")]
    pub jwks_ca_file: Option<PathBuf>,
    /// A file holding a bearer token sent to --jwks-url.
    #[arg(long, env = "MESHLET_JWKS_TOKEN_FILE")]
    pub jwks_token_file: Option<PathBuf>,
    /// Require this `iss` in workload tokens.
    #[arg(long, env = "MESHLET_TOKEN_ISSUER")]
    pub token_issuer: Option<String>,
    /// Trust tokens minted with the local signing key (`meshletctl token`). Turn off in a
    /// cluster.
    #[arg(long, env = "MESHLET_LOCAL_TOKENS", default_value_t = true, action = clap::ArgAction::Set)]
    pub local_tokens: bool,
    /// A certificate is reported `expiring` when less than this share of its life is left.
    #[arg(long, env = "MESHLET_EXPIRING_SHARE", default_value_t = meshlet_identity::cert::DEFAULT_EXPIRING_SHARE)]
    pub expiring_share: f64,
    /// How long an address a sidecar announced stays meshed after its watch closes; a
    /// sidecar that reconnects within it (a network blip) is never seen as gone.
    #[arg(long, env = "MESHLET_WITHDRAW_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub withdraw_grace: Duration,
    /// A root or intermediate is reported `expiring` when it expires within this time.
    #[arg(long, env = "MESHLET_CA_EXPIRING_WITHIN", default_value = "30d", value_parser = humantime::parse_duration)]
    pub ca_expiring_within: Duration,
    /// Admission webhook (HTTPS, `/inject`); served when its certificate and key are given.
    #[arg(long, env = "MESHLET_WEBHOOK_ADDR", default_value = "0.0.0.0:15017")]
    pub webhook_addr: SocketAddr,
    /// The webhook's serving certificate (PEM); its CA is the webhook configuration's caBundle.
    #[arg(long, env = "MESHLET_WEBHOOK_TLS_CERT", requires = "webhook_tls_key")]
    pub webhook_tls_cert: Option<PathBuf>,
    /// The webhook's private key (PEM).
    #[arg(long, env = "MESHLET_WEBHOOK_TLS_KEY", requires = "webhook_tls_cert")]
    pub webhook_tls_key: Option<PathBuf>,
    /// The sidecar image injected into pods.
    #[arg(
        long,
        env = "MESHLET_PROXY_IMAGE",
        default_value = "ghcr.io/meshlet/meshlet:0.1.0"
    )]
    pub proxy_image: String,
    /// `native`: the sidecar is an init container with restartPolicy Always (Kubernetes
    /// 1.29+); `container`: a regular first container (older clusters).
    #[arg(
        long,
        env = "MESHLET_INJECT_MODE",
        value_enum,
        default_value = "native"
    )]
    pub inject_mode: crate::inject::InjectMode,
    /// The control plane's address as injected sidecars reach it.
    #[arg(
        long,
        env = "MESHLET_POD_CONTROL_ADDR",
        default_value = "meshlet-control.meshlet-system.svc:15012"
    )]
    pub pod_control_addr: String,
    /// Where injected sidecars export traces (OTLP gRPC); unset: tracing off in injected pods.
    #[arg(long, env = "MESHLET_POD_OTLP_ENDPOINT")]
    pub pod_otlp_endpoint: Option<String>,
    /// Authorization policy (YAML or JSON); re-read when it changes. Without it, in a
    /// cluster, the MeshPolicy and AccessPolicy resources are used.
    #[arg(long, env = "MESHLET_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,
    /// Running in Kubernetes: check that a registering pod owns its IP, and keep the
    /// meshlet-trust-bundle ConfigMap current in every namespace labelled for injection.
    #[arg(long, env = "MESHLET_KUBERNETES")]
    pub kubernetes: bool,
    /// Authenticate workload tokens with a TokenReview (needs --kubernetes) instead of keys.
    #[arg(long, env = "MESHLET_TOKEN_REVIEW", requires = "kubernetes")]
    pub token_review: bool,
    /// Identities allowed to rotate the CA through the admin API (bearer token), repeatable
    /// [default: spiffe://<trust-domain>/ns/meshlet-system/sa/meshlet-admin]
    #[arg(
        long = "admin-identity",
        env = "MESHLET_ADMIN_IDENTITY",
        value_delimiter = ','
    )]
    pub admin_identities: Vec<SpiffeId>,
}

/// The control plane's validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Kubernetes API (set in `main` with `--kubernetes`; tests inject a fake one).
    pub cluster: Option<crate::cluster::Cluster>,
    pub token_review: bool,
    pub policy_file: Option<PathBuf>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub webhook_addr: SocketAddr,
    /// The webhook's certificate and key files; None: no webhook.
    pub webhook_tls: Option<(PathBuf, PathBuf)>,
    pub inject: crate::inject::InjectConfig,
    pub data_dir: PathBuf,
    pub ca_dir: Option<PathBuf>,
    pub trust_domain: TrustDomain,
    pub identity: SpiffeId,
    pub cert_ttl: Duration,
    pub jwks_file: Option<PathBuf>,
    pub jwks: Option<crate::jwks::JwksSource>,
    pub token_issuer: Option<String>,
    pub local_tokens: bool,
    pub expiring_share: f64,
    pub ca_expiring_within: Duration,
    pub withdraw_grace: Duration,
    pub admin_identities: Vec<SpiffeId>,
}

/// A configuration value that parsed but cannot be used; names its flag and variable.
#[derive(Debug, thiserror::Error)]
#[error("--{flag} (MESHLET_{env}): {reason}")]
pub struct ConfigError {
    flag: &'static str,
    env: &'static str,
    reason: String,
}

fn config_error(flag: &'static str, env: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        env,
        reason: reason.into(),
    }
}

impl Config {
    /// A local configuration: CA and keys in `data_dir`, local tokens trusted.
    pub fn local(
        data_dir: PathBuf,
        trust_domain: TrustDomain,
        cert_ttl: Duration,
    ) -> Result<Self, ConfigError> {
        let identity = default_identity(&trust_domain)?;
        let admin = default_admin(&trust_domain)?;
        let inject = crate::inject::InjectConfig {
            image: "ghcr.io/meshlet/meshlet:0.1.0".into(),
            mode: crate::inject::InjectMode::Native,
            control_addr: "meshlet-control.meshlet-system.svc:15012".into(),
            control_identity: identity.to_string(),
            otlp_endpoint: None,
        };
        Ok(Self {
            cluster: None,
            token_review: false,
            policy_file: None,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            webhook_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            webhook_tls: None,
            inject,
            data_dir,
            ca_dir: None,
            trust_domain,
            identity,
            cert_ttl,
            jwks_file: None,
            jwks: None,
            token_issuer: None,
            local_tokens: true,
            expiring_share: meshlet_identity::cert::DEFAULT_EXPIRING_SHARE,
            ca_expiring_within: Duration::from_secs(30 * 86_400),
            withdraw_grace: Duration::from_secs(10),
            admin_identities: vec![admin],
        })
    }
}

fn default_admin(td: &TrustDomain) -> Result<SpiffeId, ConfigError> {
    SpiffeId::for_service_account(td, CONTROL_NAMESPACE, "meshlet-admin")
        .map_err(|e| config_error("trust-domain", "TRUST_DOMAIN", e.to_string()))
}

fn default_identity(td: &TrustDomain) -> Result<SpiffeId, ConfigError> {
    SpiffeId::for_service_account(td, CONTROL_NAMESPACE, CONTROL_SERVICE_ACCOUNT)
        .map_err(|e| config_error("trust-domain", "TRUST_DOMAIN", e.to_string()))
}

impl TryFrom<ServeArgs> for Config {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Self, ConfigError> {
        if a.cert_ttl < Duration::from_secs(10) {
            return Err(config_error("cert-ttl", "CERT_TTL", "must be at least 10s"));
        }
        if !(0.0..1.0).contains(&a.expiring_share) {
            return Err(config_error(
                "expiring-share",
                "EXPIRING_SHARE",
                "must be at least 0 and below 1",
            ));
        }
        let identity = match a.identity {
            Some(id) if !id.is_member_of(&a.trust_domain) => {
                return Err(config_error(
                    "identity",
                    "IDENTITY",
                    format!("{id} is not in trust domain {}", a.trust_domain),
                ));
            }
            Some(id) => id,
            None => default_identity(&a.trust_domain)?,
        };
        if a.jwks_file.is_none() && a.jwks_url.is_none() && !a.local_tokens && !a.token_review {
            return Err(config_error(
                "local-tokens",
                "LOCAL_TOKENS",
                "false leaves no way to verify tokens: set --jwks-file, --jwks-url or --token-review",
            ));
        }
        let jwks = a.jwks_url.map(|url| crate::jwks::JwksSource {
            url,
            ca_file: a.jwks_ca_file,
            bearer_token_file: a.jwks_token_file,
        });
        let admin_identities = match a.admin_identities.is_empty() {
            true => vec![default_admin(&a.trust_domain)?],
            false => a.admin_identities,
        };
        let inject = crate::inject::InjectConfig {
            image: a.proxy_image,
            mode: a.inject_mode,
            control_addr: a.pod_control_addr,
            control_identity: identity.to_string(),
            otlp_endpoint: a.pod_otlp_endpoint,
        };
        Ok(Self {
            cluster: None,
            token_review: a.token_review,
            policy_file: a.policy_file,
            webhook_addr: a.webhook_addr,
            webhook_tls: a.webhook_tls_cert.zip(a.webhook_tls_key),
            inject,
            admin_identities,
            ca_expiring_within: a.ca_expiring_within,
            withdraw_grace: a.withdraw_grace,
            grpc_addr: a.grpc_addr,
            admin_addr: a.admin_addr,
            data_dir: a.data_dir,
            ca_dir: a.ca_dir,
            trust_domain: a.trust_domain,
            identity,
            cert_ttl: a.cert_ttl,
            jwks_file: a.jwks_file,
            jwks,
            token_issuer: a.token_issuer,
            local_tokens: a.local_tokens,
            expiring_share: a.expiring_share,
        })
    }
}
