//! Kubernetes Services: which backends stand behind a ClusterIP:port.
//!
//! An app that connects to a Service's ClusterIP would be sent by kube-proxy to a backend
//! the sidecar cannot see, so the sidecar could not know which identity to expect. Discovery
//! therefore answers a ClusterIP:port with the Service's ready backends (pod IP:target port),
//! and the sidecar connects to one of them directly, as Linkerd and Istio do.
//!
//! [`index`] builds the map from Services and EndpointSlices (pure, tested as a table);
//! [`follow_cluster`] lists both every 2 s with `--kubernetes`. Without a cluster, an
//! embedder (the demo, tests) publishes its own map through `Running::services`.
//!
//! The map is `None` until it has been read once: discovery answers no address before that,
//! because "not a Service" could send plaintext through kube-proxy to a meshed backend.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointSlice};
use kube::api::{Api, ListParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;

/// ClusterIP:port to the ready backends behind it, sorted.
pub type ServiceMap = BTreeMap<SocketAddr, Vec<SocketAddr>>;

/// What discovery reads: `None` until the first map is known.
pub type Services = watch::Receiver<Option<Arc<ServiceMap>>>;

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Builds the map from the cluster's Services and EndpointSlices. Headless and
/// ExternalName Services have no ClusterIP (their names resolve to pod IPs, which discovery
/// knows already); UDP and SCTP ports are not proxied; endpoints marked not ready are left
/// out (a missing `ready` means ready, as the API says) unless none is ready, when those
/// terminating but still serving stand in, as kube-proxy does.
pub fn index(services: &[Service], slices: &[EndpointSlice]) -> ServiceMap {
    let mut map = ServiceMap::new();
    for service in services {
        let (Some(name), Some(namespace), Some(spec)) = (
            service.metadata.name.as_deref(),
            service.metadata.namespace.as_deref(),
            service.spec.as_ref(),
        ) else {
            continue;
        };
        let cluster_ips: BTreeSet<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let own_slices: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(namespace)
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL))
                        .map(String::as_str)
                        == Some(name)
            })
            .collect();
        for port in spec.ports.iter().flatten() {
            if !is_tcp(port.protocol.as_deref()) {
                continue;
            }
            let Ok(service_port) = u16::try_from(port.port) else {
                continue;
            };
            for cluster_ip in &cluster_ips {
                let backends = backends(&own_slices, port.name.as_deref(), cluster_ip);
                map.insert(SocketAddr::new(*cluster_ip, service_port), backends);
            }
        }
    }
    map
}

/// The ready addresses of `slices` (of the ClusterIP's family) on the port named `port_name`;
/// when none is ready, those terminating but still serving, as kube-proxy falls back to.
fn backends(
    slices: &[&EndpointSlice],
    port_name: Option<&str>,
    cluster_ip: &IpAddr,
) -> Vec<SocketAddr> {
    let ready = addresses(slices, port_name, cluster_ip, |c| c.ready != Some(false));
    if !ready.is_empty() {
        return ready;
    }
    addresses(slices, port_name, cluster_ip, |c| c.serving == Some(true))
}

/// The addresses of `slices` on the port named `port_name` whose conditions pass `keep`.
fn addresses(
    slices: &[&EndpointSlice],
    port_name: Option<&str>,
    cluster_ip: &IpAddr,
    keep: impl Fn(&EndpointConditions) -> bool,
) -> Vec<SocketAddr> {
    let family = if cluster_ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let mut out = BTreeSet::new();
    for slice in slices.iter().filter(|s| s.address_type == family) {
        let target = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name.unwrap_or("")
                && is_tcp(p.protocol.as_deref())
        });
        let Some(target) = target
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            if !keep(&endpoint.conditions.clone().unwrap_or_default()) {
                continue;
            }
            for ip in &endpoint.addresses {
                if let Ok(ip) = ip.parse::<IpAddr>() {
                    out.insert(SocketAddr::new(ip, target));
                }
            }
        }
    }
    out.into_iter().collect()
}

fn is_tcp(protocol: Option<&str>) -> bool {
    matches!(protocol, None | Some("TCP"))
}

/// Keeps `tx` equal to the cluster's Services until `stop`.
pub async fn follow_cluster(
    cluster: Cluster,
    tx: watch::Sender<Option<Arc<ServiceMap>>>,
    stop: CancellationToken,
) {
    let fetch = || list(&cluster);
    let publish = |map: ServiceMap| {
        tx.send_if_modified(|current| {
            let changed = current.as_deref() != Some(&map);
            if changed {
                tracing::debug!(addresses = map.len(), "services changed");
                *current = Some(Arc::new(map));
            }
            changed
        });
    };
    let what = "Services and EndpointSlices";
    crate::cluster::poll(what, Duration::from_secs(2), stop, fetch, publish).await;
}

async fn list(cluster: &Cluster) -> Result<ServiceMap, kube::Error> {
    let client = cluster.client();
    let services: Api<Service> = Api::all(client.clone());
    let slices: Api<EndpointSlice> = Api::all(client);
    let services = services.list(&ListParams::default()).await?.items;
    let slices = slices.list(&ListParams::default()).await?.items;
    Ok(index(&services, &slices))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("a valid Service")
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).expect("a valid EndpointSlice")
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().expect("valid")).collect()
    }

    #[test]
    fn cluster_ips_map_to_ready_backends_on_the_target_port() {
        let services = vec![
            service(json!({"metadata": {"name": "web", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                                   {"name": "dns", "port": 53, "protocol": "UDP"},
                                   {"name": "admin", "port": 9000, "targetPort": "admin"}]}})),
            service(json!({"metadata": {"name": "one", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 5432}]}})),
            service(
                json!({"metadata": {"name": "headless", "namespace": "shop"},
                "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
            ),
            service(json!({"metadata": {"name": "ext", "namespace": "shop"},
                "spec": {"type": "ExternalName", "externalName": "example.com"}})),
            service(json!({"metadata": {"name": "empty", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.12", "ports": [{"port": 80}]}})),
            service(json!({"metadata": {"name": "rollout", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.13", "ports": [{"port": 80}]}})),
        ];
        let slices = vec![
            slice(json!({"metadata": {"name": "web-abc", "namespace": "shop",
                                      "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                          {"name": "admin", "port": 9001, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": ["10.244.1.7"], "conditions": {"ready": true}},
                    {"addresses": ["10.244.2.9"]},
                    {"addresses": ["10.244.3.3"], "conditions": {"ready": false, "terminating": true}}]})),
            slice(json!({"metadata": {"name": "web-def", "namespace": "shop",
                                      "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.244.4.4"], "conditions": {"ready": true}}]})),
            slice(json!({"metadata": {"name": "web-v6", "namespace": "shop",
                                      "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv6",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["fd00:10:244::7"]}]})),
            // Same Service name in another namespace: not ours.
            slice(json!({"metadata": {"name": "web-xyz", "namespace": "other",
                                      "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["10.9.9.9"]}]})),
            slice(json!({"metadata": {"name": "one-1", "namespace": "shop",
                                      "labels": {"kubernetes.io/service-name": "one"}},
                "addressType": "IPv4",
                "ports": [{"port": 5432}],
                "endpoints": [{"addresses": ["10.244.5.5"]}]})),
            slice(
                json!({"metadata": {"name": "rollout-1", "namespace": "shop",
                                      "labels": {"kubernetes.io/service-name": "rollout"}},
                "addressType": "IPv4",
                "ports": [{"port": 80}],
                "endpoints": [
                    {"addresses": ["10.244.6.6"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                    {"addresses": ["10.244.6.7"], "conditions": {"ready": false, "serving": false}}]}),
            ),
        ];
        let map = index(&services, &slices);
        let cases: Vec<(&str, &str, Vec<SocketAddr>)> = vec![
            (
                "ready and unset-ready backends on the target port, terminating left out",
                "10.96.0.10:80",
                addrs(&["10.244.1.7:8080", "10.244.2.9:8080", "10.244.4.4:8080"]),
            ),
            (
                "a named target port resolves per slice",
                "10.96.0.10:9000",
                addrs(&["10.244.1.7:9001", "10.244.2.9:9001"]),
            ),
            (
                "the IPv6 ClusterIP gets the IPv6 backends",
                "[fd00::10]:80",
                addrs(&["[fd00:10:244::7]:8080"]),
            ),
            (
                "an unnamed port",
                "10.96.0.11:5432",
                addrs(&["10.244.5.5:5432"]),
            ),
            ("a Service with no backends", "10.96.0.12:80", vec![]),
            (
                "none ready: the terminating one still serving stands in",
                "10.96.0.13:80",
                addrs(&["10.244.6.6:80"]),
            ),
        ];
        for (what, key, want) in cases {
            let key: SocketAddr = key.parse().expect("valid");
            assert_eq!(map.get(&key), Some(&want), "{what}");
        }
        assert_eq!(
            map.len(),
            7,
            "UDP, headless and ExternalName are absent: {map:?}"
        );
    }
}
