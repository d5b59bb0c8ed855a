//! Sidecar injection: what a pod gets, as a JSON Patch (RFC 6902), decided by a pure
//! function. The admission webhook sends the patch; `meshletctl inject` applies it to YAML.
//!
//! A pod gets: the `meshlet-init` init container (`meshlet-proxy init`, NET_ADMIN and NET_RAW
//! only), the `meshlet-proxy` sidecar (a native sidecar, i.e. an init container with
//! `restartPolicy: Always`, or a regular first container with a postStart wait in
//! `container` mode) with a startup probe on `/ready` so the app starts only once the proxy
//! has its certificate, the projected token volume (audience `meshlet`), the trust bundle
//! volume, the downward-API environment, the control plane's address, OTLP settings,
//! resources, a restrictive security context, and the `meshlet.io/injected` annotation.
//!
//! Pods labelled `meshlet.io/inject=disabled`, host-network pods and pods that already have
//! the sidecar are left alone.

use serde_json::{Value, json};

/// The annotation recording an injection.
pub const INJECTED: &str = "meshlet.io/injected";
/// The opt-out label (and its value).
pub const INJECT_LABEL: &str = "meshlet.io/inject";
pub const PROXY_NAME: &str = "meshlet-proxy";
pub const INIT_NAME: &str = "meshlet-init";
/// The ConfigMap (in the pod's namespace) holding the trust bundle under `bundle.pem`.
pub const TRUST_BUNDLE_CONFIGMAP: &str = "meshlet-trust-bundle";
pub const PROXY_UID: i64 = 1337;

/// How the sidecar is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InjectMode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29 and later).
    Native,
    /// A regular container, first in the pod (older clusters).
    Container,
}

/// What injection needs to know.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    pub image: String,
    pub mode: InjectMode,
    /// The control plane as pods reach it, host:port.
    pub control_addr: String,
    pub control_identity: String,
    /// Where the sidecars export traces (OTLP gRPC), if anywhere.
    pub otlp_endpoint: Option<String>,
}

/// Why a pod was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    OptedOut,
    HostNetwork,
    AlreadyInjected,
}

/// Why a pod could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("the object is not a pod: {0}")]
    NotAPod(String),
}

/// One JSON Patch operation (only `add` is needed).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Op {
    pub op: &'static str,
    pub path: String,
    pub value: Value,
}

fn add(path: impl Into<String>, value: Value) -> Op {
    Op {
        op: "add",
        path: path.into(),
        value,
    }
}

/// The patch for `pod`, or why it is left alone.
pub fn patch(pod: &Value, cfg: &InjectConfig) -> Result<Result<Vec<Op>, Skip>, InjectError> {
    let spec = pod
        .get("spec")
        .filter(|s| s.is_object())
        .ok_or_else(|| InjectError::NotAPod("no spec".into()))?;
    if !spec.get("containers").is_some_and(Value::is_array) {
        return Err(InjectError::NotAPod("no containers".into()));
    }
    let meta = pod.get("metadata");
    if meta
        .and_then(|m| m.get("labels"))
        .and_then(|l| l.get(INJECT_LABEL))
        .and_then(Value::as_str)
        == Some("disabled")
    {
        return Ok(Err(Skip::OptedOut));
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Err(Skip::HostNetwork));
    }
    let has = |list: &str| {
        spec.get(list).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_NAME))
        })
    };
    let annotated = meta
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(INJECTED))
        .is_some();
    if annotated || has("containers") || has("initContainers") {
        return Ok(Err(Skip::AlreadyInjected));
    }

    let mut ops = Vec::new();
    // Init containers: meshlet-init first, then (native mode) the sidecar, then the pod's own.
    let mut first = vec![init_container(cfg)];
    if cfg.mode == InjectMode::Native {
        first.push(sidecar(cfg));
    }
    match spec.get("initContainers").and_then(Value::as_array) {
        Some(_) => {
            for (i, c) in first.into_iter().enumerate() {
                ops.push(add(format!("/spec/initContainers/{i}"), c));
            }
        }
        None => ops.push(add("/spec/initContainers", Value::Array(first))),
    }
    if cfg.mode == InjectMode::Container {
        ops.push(add("/spec/containers/0", sidecar(cfg)));
    }
    let volumes = [
        json!({"name": "meshlet-token", "projected": {"sources": [{"serviceAccountToken": {"audience": "meshlet", "expirationSeconds": 3600, "path": "token"}}]}}),
        json!({"name": "meshlet-trust-bundle", "configMap": {"name": TRUST_BUNDLE_CONFIGMAP}}),
        json!({"name": "meshlet-xtables", "emptyDir": {"medium": "Memory"}}),
    ];
    match spec.get("volumes").and_then(Value::as_array) {
        Some(_) => ops.extend(volumes.into_iter().map(|v| add("/spec/volumes/-", v))),
        None => ops.push(add("/spec/volumes", Value::Array(volumes.to_vec()))),
    }
    match meta.and_then(|m| m.get("annotations")) {
        Some(a) if a.is_object() => ops.push(add(
            format!(
                "/metadata/annotations/{}",
                INJECTED.replace('~', "~0").replace('/', "~1")
            ),
            json!("true"),
        )),
        _ if meta.is_some() => ops.push(add("/metadata/annotations", json!({INJECTED: "true"}))),
        _ => ops.push(add("/metadata", json!({"annotations": {INJECTED: "true"}}))),
    }
    Ok(Ok(ops))
}

fn init_container(cfg: &InjectConfig) -> Value {
    json!({
        "name": INIT_NAME,
        "image": cfg.image,
        "command": ["meshlet-proxy", "init"],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
        },
        "volumeMounts": [{"name": "meshlet-xtables", "mountPath": "/run"}],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}}
    })
}

fn sidecar(cfg: &InjectConfig) -> Value {
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": field("metadata.name")}),
        json!({"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")}),
        json!({"name": "MESHLET_POD_IP", "valueFrom": field("status.podIP")}),
        json!({"name": "MESHLET_CONTROL_ADDR", "value": cfg.control_addr}),
        json!({"name": "MESHLET_CONTROL_IDENTITY", "value": cfg.control_identity}),
        json!({"name": "MESHLET_TOKEN_FILE", "value": "/var/run/secrets/meshlet/token"}),
        json!({"name": "MESHLET_TRUST_BUNDLE", "value": "/etc/meshlet/trust-bundle/bundle.pem"}),
        json!({"name": "OTEL_RESOURCE_ATTRIBUTES", "value": "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)"}),
    ];
    match &cfg.otlp_endpoint {
        Some(endpoint) => {
            env.push(json!({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": endpoint}))
        }
        None => env.push(json!({"name": "OTEL_SDK_DISABLED", "value": "true"})),
    }
    let mut c = json!({
        "name": PROXY_NAME,
        "image": cfg.image,
        "command": ["meshlet-proxy", "run"],
        "env": env,
        "ports": [{"name": "meshlet-admin", "containerPort": 15000, "protocol": "TCP"}],
        "startupProbe": {"httpGet": {"path": "/ready", "port": 15000}, "periodSeconds": 1, "failureThreshold": 120},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 15000}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/live", "port": 15000}, "periodSeconds": 10},
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}
        },
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "128Mi"}},
        "volumeMounts": [
            {"name": "meshlet-token", "mountPath": "/var/run/secrets/meshlet", "readOnly": true},
            {"name": "meshlet-trust-bundle", "mountPath": "/etc/meshlet/trust-bundle", "readOnly": true}
        ]
    });
    match cfg.mode {
        InjectMode::Native => c["restartPolicy"] = json!("Always"),
        // A regular container cannot hold the app back with a startup probe: a postStart
        // hook waiting for /ready does (the kubelet starts the next container after it).
        InjectMode::Container => {
            c["lifecycle"] = json!({"postStart": {"exec": {"command": ["meshlet-proxy", "wait-ready", "--timeout", "120s"]}}});
        }
    }
    c
}

/// Applies `add` operations to `doc` (what the API server does with the patch).
pub fn apply(doc: &mut Value, ops: &[Op]) -> Result<(), String> {
    for op in ops {
        let (parent_path, last) = op
            .path
            .rsplit_once('/')
            .ok_or_else(|| format!("bad path {}", op.path))?;
        let parent = doc
            .pointer_mut(parent_path)
            .ok_or_else(|| format!("no {parent_path} for {}", op.path))?;
        let key = last.replace("~1", "/").replace("~0", "~");
        match parent {
            Value::Object(map) => {
                map.insert(key, op.value.clone());
            }
            Value::Array(items) if key == "-" => items.push(op.value.clone()),
            Value::Array(items) => {
                let i: usize = key
                    .parse()
                    .map_err(|_| format!("bad index in {}", op.path))?;
                if i > items.len() {
                    return Err(format!("index out of range in {}", op.path));
                }
                items.insert(i, op.value.clone());
            }
            _ => return Err(format!("{parent_path} is not a container")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: InjectMode) -> InjectConfig {
        InjectConfig {
            image: "meshlet/meshlet:test".into(),
            mode,
            control_addr: "meshlet-control.meshlet-system.svc:15012".into(),
            control_identity: "spiffe://cluster.local/ns/meshlet-system/sa/meshlet-control".into(),
            otlp_endpoint: None,
        }
    }

    fn injected(pod: Value, mode: InjectMode) -> Value {
        let ops = patch(&pod, &cfg(mode)).expect("a pod").expect("injected");
        let mut out = pod;
        apply(&mut out, &ops).expect("the patch applies");
        out
    }

    fn names(v: &Value, list: &str) -> Vec<String> {
        v["spec"][list]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| c["name"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_plain_pod_gets_init_and_native_sidecar_first() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"}, "spec": {"containers": [{"name": "app", "image": "nginx"}]}});
        let out = injected(pod, InjectMode::Native);
        assert_eq!(
            names(&out, "initContainers"),
            ["meshlet-init", "meshlet-proxy"]
        );
        assert_eq!(names(&out, "containers"), ["app"]);
        assert_eq!(out["spec"]["initContainers"][1]["restartPolicy"], "Always");
        assert_eq!(
            out["spec"]["initContainers"][0]["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN", "NET_RAW"])
        );
        assert_eq!(
            out["spec"]["initContainers"][1]["securityContext"]["runAsUser"],
            1337
        );
        assert_eq!(
            out["spec"]["initContainers"][1]["startupProbe"]["httpGet"]["path"],
            "/ready"
        );
        assert_eq!(out["metadata"]["annotations"][INJECTED], "true");
        let volumes: Vec<&str> = out["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert_eq!(
            volumes,
            ["meshlet-token", "meshlet-trust-bundle", "meshlet-xtables"]
        );
        assert_eq!(
            out["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "meshlet"
        );
    }

    #[test]
    fn existing_init_containers_volumes_and_annotations_are_kept() {
        let pod = json!({"metadata": {"name": "db", "annotations": {"team": "data"}}, "spec": {
            "initContainers": [{"name": "migrate", "image": "m"}],
            "containers": [{"name": "app", "image": "pg"}],
            "volumes": [{"name": "data", "emptyDir": {}}]}});
        let out = injected(pod, InjectMode::Native);
        assert_eq!(
            names(&out, "initContainers"),
            ["meshlet-init", "meshlet-proxy", "migrate"]
        );
        assert_eq!(out["spec"]["volumes"].as_array().expect("volumes").len(), 4);
        assert_eq!(out["metadata"]["annotations"]["team"], "data");
        assert_eq!(out["metadata"]["annotations"][INJECTED], "true");
    }

    #[test]
    fn container_mode_puts_the_sidecar_first_with_a_wait() {
        let pod = json!({"metadata": {}, "spec": {"containers": [{"name": "app", "image": "x"}]}});
        let out = injected(pod, InjectMode::Container);
        assert_eq!(names(&out, "initContainers"), ["meshlet-init"]);
        assert_eq!(names(&out, "containers"), ["meshlet-proxy", "app"]);
        assert!(out["spec"]["containers"][0].get("restartPolicy").is_none());
        assert_eq!(
            out["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"]["command"][1],
            "wait-ready"
        );
    }

    #[test]
    fn some_pods_are_left_alone() {
        let c = cfg(InjectMode::Native);
        let cases = [
            (
                json!({"metadata": {"labels": {"meshlet.io/inject": "disabled"}}, "spec": {"containers": []}}),
                Skip::OptedOut,
            ),
            (
                json!({"spec": {"hostNetwork": true, "containers": []}}),
                Skip::HostNetwork,
            ),
            (
                json!({"metadata": {"annotations": {INJECTED: "true"}}, "spec": {"containers": []}}),
                Skip::AlreadyInjected,
            ),
            (
                json!({"spec": {"initContainers": [{"name": "meshlet-proxy"}], "containers": []}}),
                Skip::AlreadyInjected,
            ),
            (
                json!({"spec": {"containers": [{"name": "meshlet-proxy"}]}}),
                Skip::AlreadyInjected,
            ),
        ];
        for (pod, want) in cases {
            assert_eq!(patch(&pod, &c), Ok(Err(want)), "{pod}");
        }
        // Injecting an injected pod again changes nothing.
        let once = injected(
            json!({"metadata": {}, "spec": {"containers": [{"name": "a"}]}}),
            InjectMode::Native,
        );
        assert_eq!(patch(&once, &c), Ok(Err(Skip::AlreadyInjected)));
    }

    #[test]
    fn non_pods_are_errors() {
        let c = cfg(InjectMode::Native);
        for bad in [
            json!(null),
            json!({}),
            json!({"spec": {}}),
            json!({"spec": {"containers": 3}}),
            json!("pod"),
        ] {
            assert!(patch(&bad, &c).is_err(), "{bad}");
        }
    }
}
