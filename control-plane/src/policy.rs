//! Where authorization policy comes from, and what each sidecar is sent.
//!
//! Locally, `--policy-file` (YAML or JSON of a `PolicySet`) is read at start and re-read
//! when it changes (checked every 200 ms). In a cluster, the `MeshPolicy` (cluster-scoped,
//! mesh default and namespace modes) and `AccessPolicy` (namespaced) custom resources of
//! group `meshlet.io` are listed every 2 s. Either way the set is published on a watch
//! channel; each sidecar receives only what its own workload enforces.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use meshlet_identity::authz::{AccessPolicy, PolicySet};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;

/// Why a policy could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("--policy-file {0}: {1}")]
    File(PathBuf, String),
    #[error("custom resource {0}: {1}")]
    Resource(String, String),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

/// Reads a policy file.
pub fn read_file(path: &Path) -> Result<PolicySet, PolicyError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| PolicyError::File(path.to_owned(), e.to_string()))?;
    serde_yaml_ng::from_str(&text).map_err(|e| PolicyError::File(path.to_owned(), e.to_string()))
}

/// What the workload `namespace/service_account` enforces: the defaults, its namespace's
/// mode, and the policies that select it.
pub fn for_workload(set: &PolicySet, namespace: &str, service_account: &str) -> PolicySet {
    PolicySet {
        default: set.default,
        namespaces: set
            .namespaces
            .iter()
            .filter(|(ns, _)| *ns == namespace)
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        policies: set
            .policies
            .iter()
            .filter(|p| p.namespace == namespace && p.service_account == service_account)
            .cloned()
            .collect(),
    }
}

/// Keeps `tx` equal to the policy file until `stop`; a file that stops parsing keeps the
/// last good policy (and says so in the log).
pub async fn follow_file(
    path: PathBuf,
    tx: watch::Sender<Arc<PolicySet>>,
    stop: CancellationToken,
) {
    let mut seen: Option<SystemTime> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if modified == seen {
            continue;
        }
        seen = modified;
        match read_file(&path) {
            Ok(set) => {
                tracing::info!(policies = set.policies.len(), "policy file loaded");
                tx.send_replace(Arc::new(set));
            }
            Err(e) => {
                tracing::error!(error = %e, "policy file rejected; the previous policy stays")
            }
        }
    }
}

/// Keeps `tx` equal to the cluster's policy resources until `stop`.
pub async fn follow_cluster(
    cluster: Cluster,
    tx: watch::Sender<Arc<PolicySet>>,
    stop: CancellationToken,
) {
    let fetch = || list_cluster(&cluster);
    let publish = |set: PolicySet| {
        tx.send_if_modified(|current| {
            let changed = **current != set;
            *current = Arc::new(set);
            changed
        });
    };
    crate::cluster::poll("policy resources", POLL, stop, fetch, publish).await;
}

/// How often the cluster's policy resources are listed.
const POLL: Duration = Duration::from_secs(2);

async fn list_cluster(cluster: &Cluster) -> Result<PolicySet, PolicyError> {
    let resource = |kind: &str, plural: &str| {
        ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("meshlet.io", "v1alpha1", kind),
            plural,
        )
    };
    let client = cluster.client();
    let mesh: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("MeshPolicy", "meshpolicies"));
    let access: Api<DynamicObject> =
        Api::all_with(client, &resource("AccessPolicy", "accesspolicies"));
    let mut set = PolicySet::default();
    for mp in mesh.list(&ListParams::default()).await?.items {
        let name = mp.metadata.name.clone().unwrap_or_default();
        let spec = mp.data.get("spec").cloned().unwrap_or_default();
        let parsed: PolicySet = serde_json::from_value(serde_json::json!({
            "default": spec.get("default").cloned().unwrap_or(serde_json::json!("allow-meshed")),
            "namespaces": spec.get("namespaces").cloned().unwrap_or(serde_json::json!({})),
        }))
        .map_err(|e| PolicyError::Resource(format!("MeshPolicy {name}"), e.to_string()))?;
        set.default = parsed.default;
        set.namespaces.extend(parsed.namespaces);
    }
    for ap in access.list(&ListParams::default()).await?.items {
        let (name, namespace) = (
            ap.metadata.name.clone().unwrap_or_default(),
            ap.metadata.namespace.clone().unwrap_or_default(),
        );
        let mut spec = ap.data.get("spec").cloned().unwrap_or_default();
        spec["name"] = serde_json::json!(name);
        spec["namespace"] = serde_json::json!(namespace);
        let service_account = spec["serviceAccount"].as_str().map(str::to_owned);
        match serde_json::from_value::<AccessPolicy>(spec) {
            Ok(p) => set.policies.push(p),
            // A policy that does not parse must not open its workload: it closes it (no
            // caller allowed) until fixed, and says so. Without a service account it
            // selects nothing.
            Err(e) => {
                tracing::error!(policy = %format!("{namespace}/{name}"), error = %e, "AccessPolicy rejected: its workload is closed until it is fixed");
                if let Some(service_account) = service_account {
                    set.policies.push(AccessPolicy {
                        name,
                        namespace,
                        service_account,
                        ports: vec![],
                        allow: vec![],
                    });
                }
            }
        }
    }
    Ok(set)
}
