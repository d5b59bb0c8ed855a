//! `meshletctl inject -f FILE|-`: the webhook's patch applied to YAML, for clusters without
//! the webhook or to see what it does. Pods and the pod templates of Deployments,
//! StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs are injected; other documents
//! pass through unchanged. Several documents in one file are kept in order.

use std::io::Read;

use anyhow::{Context, bail};
use meshlet_control::inject::{self, InjectConfig, InjectMode, Skip};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub(crate) struct InjectArgs {
    /// The YAML file, or - for standard input.
    #[arg(short = 'f', long = "filename")]
    file: String,
    /// The sidecar image.
    #[arg(
        long,
        env = "MESHLET_PROXY_IMAGE",
        default_value = "ghcr.io/meshlet/meshlet:0.1.0"
    )]
    proxy_image: String,
    #[arg(
        long,
        env = "MESHLET_INJECT_MODE",
        value_enum,
        default_value = "native"
    )]
    inject_mode: InjectMode,
    /// The control plane as pods reach it.
    #[arg(
        long,
        env = "MESHLET_POD_CONTROL_ADDR",
        default_value = "meshlet-control.meshlet-system.svc:15012"
    )]
    control_addr: String,
    #[arg(
        long,
        env = "MESHLET_CONTROL_IDENTITY",
        default_value = "spiffe://cluster.local/ns/meshlet-system/sa/meshlet-control"
    )]
    control_identity: String,
    /// Where the sidecars export traces (OTLP gRPC).
    #[arg(long, env = "MESHLET_POD_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

/// Where a kind keeps its pod (template): the path of the object holding `metadata` and `spec`.
fn pod_path(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// Injects every pod of `docs` in place; returns what happened to each, for stderr.
pub(crate) fn inject_docs(docs: &mut [Value], cfg: &InjectConfig) -> anyhow::Result<Vec<String>> {
    let mut report = Vec::new();
    for (i, doc) in docs.iter_mut().enumerate() {
        let kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let Some(path) = pod_path(&kind) else {
            report.push(format!(
                "document {}: {kind} {name} has no pod: unchanged",
                i + 1
            ));
            continue;
        };
        let pod = doc
            .pointer_mut(path)
            .with_context(|| format!("document {}: {kind} {name} has no {path}", i + 1))?;
        match inject::patch(pod, cfg)
            .with_context(|| format!("document {}: {kind} {name}", i + 1))?
        {
            Ok(ops) => {
                inject::apply(pod, &ops).map_err(anyhow::Error::msg)?;
                report.push(format!("document {}: {kind} {name}: injected", i + 1));
            }
            Err(skip) => {
                let why = match skip {
                    Skip::OptedOut => "opted out (meshlet.io/inject=disabled)",
                    Skip::HostNetwork => "host network",
                    Skip::AlreadyInjected => "already injected",
                };
                report.push(format!(
                    "document {}: {kind} {name}: left alone, {why}",
                    i + 1
                ));
            }
        }
    }
    Ok(report)
}

pub(crate) fn run(args: InjectArgs) -> anyhow::Result<()> {
    let mut text = String::new();
    if args.file == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
    } else {
        text = std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file))?;
    }
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let doc = Value::deserialize(de)
            .with_context(|| format!("{}: document {} is not valid YAML", args.file, i + 1))?;
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    if docs.is_empty() {
        bail!("{}: no YAML documents", args.file);
    }
    let cfg = InjectConfig {
        image: args.proxy_image,
        mode: args.inject_mode,
        control_addr: args.control_addr,
        control_identity: args.control_identity,
        otlp_endpoint: args.otlp_endpoint,
    };
    for line in inject_docs(&mut docs, &cfg)? {
        eprintln!("{line}");
    }
    let out: Vec<String> = docs
        .iter()
        .map(serde_yaml_ng::to_string)
        .collect::<Result<_, _>>()?;
    print!("{}", out.join("---\n"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_workload_kind_is_injected_in_its_template() {
        let cfg = InjectConfig {
            image: "img".into(),
            mode: InjectMode::Native,
            control_addr: "cp:15012".into(),
            control_identity: "spiffe://cluster.local/ns/meshlet-system/sa/meshlet-control".into(),
            otlp_endpoint: None,
        };
        let template = json!({"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "app", "image": "x"}]}});
        let mut docs = vec![
            json!({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "x"}]}}),
            json!({"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": template}}),
            json!({"kind": "StatefulSet", "metadata": {"name": "s"}, "spec": {"template": template}}),
            json!({"kind": "DaemonSet", "metadata": {"name": "ds"}, "spec": {"template": template}}),
            json!({"kind": "Job", "metadata": {"name": "j"}, "spec": {"template": template}}),
            json!({"kind": "CronJob", "metadata": {"name": "c"}, "spec": {"jobTemplate": {"spec": {"template": template}}}}),
            json!({"kind": "Service", "metadata": {"name": "svc"}, "spec": {"ports": [{"port": 80}]}}),
        ];
        let report = inject_docs(&mut docs, &cfg).expect("injects");
        for (doc, path) in docs.iter().zip([
            "",
            "/spec/template",
            "/spec/template",
            "/spec/template",
            "/spec/template",
            "/spec/jobTemplate/spec/template",
        ]) {
            let pod = doc.pointer(path).expect("pod");
            assert_eq!(
                pod.pointer("/spec/initContainers/1/name"),
                Some(&json!("meshlet-proxy")),
                "{doc}"
            );
            assert_eq!(
                pod.pointer("/metadata/annotations/meshlet.io~1injected"),
                Some(&json!("true")),
                "{doc}"
            );
        }
        assert_eq!(
            docs[6],
            json!({"kind": "Service", "metadata": {"name": "svc"}, "spec": {"ports": [{"port": 80}]}})
        );
        assert!(report[6].contains("unchanged"), "{report:?}");
        // Twice changes nothing more.
        let before = docs.clone();
        let again = inject_docs(&mut docs, &cfg).expect("injects");
        assert_eq!(docs, before);
        assert!(again[0].contains("already injected"));
    }
}
