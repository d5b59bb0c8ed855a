//! What the control plane asks of Kubernetes (with `--kubernetes`):
//!
//! - [`Cluster::review_token`]: a TokenReview (audience `meshlet`) authenticates a workload
//!   token when `--token-review` is set, as an alternative to the cluster's JWKS.
//! - [`Cluster::pod_owns`]: a sidecar may register an address for discovery only if the pod
//!   its token names has that IP (a workload cannot claim another pod's address).
//! - [`Cluster::sync_trust_bundle`]: the `meshlet-trust-bundle` ConfigMap, which injected
//!   sidecars mount to trust the control plane at start, is kept current in every namespace
//!   labelled `meshlet.io/inject=enabled` (server-side apply; on start, every 30 s and
//!   whenever the bundle changes).
//! - [`poll`]: the loop that keeps a view of cluster resources (policies, Services) current.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

use crate::inject::{INJECT_LABEL, TRUST_BUNDLE_CONFIGMAP};
use crate::token::{AUDIENCE, TokenError, Workload};

/// The field manager of our server-side applies.
pub const FIELD_MANAGER: &str = "meshlet-control";

/// A Kubernetes API client, cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cluster { .. }")
    }
}

/// Why a Kubernetes call failed.
#[derive(Debug, thiserror::Error)]
#[error("Kubernetes API: {0}")]
pub struct ClusterError(#[from] kube::Error);

impl Cluster {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    /// The client, for other API calls.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The in-cluster client (service account token and CA of the pod).
    pub async fn in_cluster() -> Result<Self, ClusterError> {
        Ok(Self::new(kube::Client::try_default().await?))
    }

    /// Authenticates `token` with a TokenReview for the `meshlet` audience.
    pub async fn review_token(&self, token: &str) -> Result<Workload, TokenError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| TokenError::Unavailable(format!("the TokenReview failed: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(TokenError::Signature);
        }
        if !status
            .audiences
            .unwrap_or_default()
            .iter()
            .any(|a| a == AUDIENCE)
        {
            return Err(TokenError::Audience);
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (namespace, service_account) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(|| TokenError::Claims(format!("{username:?} is not a service account")))?;
        let pod = user
            .extra
            .unwrap_or_default()
            .get("authentication.kubernetes.io/pod-name")
            .and_then(|v| v.first().cloned());
        Ok(Workload {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod,
        })
    }

    /// Whether pod `namespace/pod` has `ip`.
    pub async fn pod_owns(
        &self,
        namespace: &str,
        pod: &str,
        ip: IpAddr,
    ) -> Result<bool, ClusterError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let Some(pod) = api.get_opt(pod).await? else {
            return Ok(false);
        };
        let status = pod.status.unwrap_or_default();
        let ips = status
            .pod_ips
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.ip)
            .chain(status.pod_ip);
        Ok(ips
            .filter_map(|s| s.parse::<IpAddr>().ok())
            .any(|p| p == ip))
    }

    /// Applies the trust bundle ConfigMap in every labelled namespace; returns how many.
    pub async fn sync_trust_bundle(&self, pem: &str) -> Result<usize, ClusterError> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let labelled = namespaces
            .list(&ListParams::default().labels(&format!("{INJECT_LABEL}=enabled")))
            .await?;
        let mut done = 0;
        for ns in labelled.items {
            let Some(name) = ns.metadata.name else {
                continue;
            };
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(TRUST_BUNDLE_CONFIGMAP.to_owned()),
                    namespace: Some(name.clone()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_owned(),
                        FIELD_MANAGER.to_owned(),
                    )])),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([("bundle.pem".to_owned(), pem.to_owned())])),
                ..Default::default()
            };
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &name);
            api.patch(
                TRUST_BUNDLE_CONFIGMAP,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&cm),
            )
            .await?;
            done += 1;
        }
        Ok(done)
    }
}

/// Every `period` until `stop`: `fetch` a view of the cluster and `publish` it. A failed
/// fetch keeps the previous view, and says so (naming `what`).
pub async fn poll<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    what: &str,
    period: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
    mut fetch: impl FnMut() -> F,
    mut publish: impl FnMut(T),
) {
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match fetch().await {
            Ok(view) => publish(view),
            Err(e) => tracing::warn!(error = %e, "listing {what} failed; the previous view stays"),
        }
    }
}
