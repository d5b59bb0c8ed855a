#!/usr/bin/env python3
"""Checks the Helm chart charts/meshlet and the pods the injector writes to target/injected/.

Offline once installed; needs only (pinned in .ci/requirements-chart.txt):
  helm-python-sdk==0.2.2     import helm_python: the Helm v4.2.3 SDK (render, lint), no helm binary
  kubernetes-validate==1.37.0  JSON schemas of Kubernetes 1.25 to 1.37, bundled

  python3 -m pip install -q -r .ci/requirements-chart.txt && python3 .ci/chart_check.py

The chart is rendered with its defaults and a few variations, linted, and every object is
validated in strict mode (no unknown fields) for Kubernetes 1.29 and 1.33; then the fields
those tools cannot judge are asserted. Prints one line per check, then `N passed, M failed`.
"""
import base64
import functools
import json
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "meshlet"
INJECTED = ROOT / "target" / "injected"
NS = "meshlet-system"
VERSIONS = ["1.29", "1.33"]
LABELS = ["app.kubernetes.io/" + k for k in ("name", "instance", "version", "component", "part-of", "managed-by")]
# PKCS#8 of a P-256 key: SEQUENCE { INTEGER 0, SEQUENCE { ecPublicKey, prime256v1 } ...
P256_PKCS8_HEADER = bytes.fromhex("308193020100301306072a8648ce3d020106082a8648ce3d030107")

# The schemas are re-read from disk on every call; read each file once.
kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)

results = {"passed": 0, "failed": 0}


def check(name, ok, detail=""):
    results["passed" if ok else "failed"] += 1
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + ("" if ok or not detail else f": {detail}"))
    return ok


def k8s_errors(obj, version):
    """Strict schema validation; an unknown kind/apiVersion is an error too."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
        return None
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(str(p) for p in e.path)}: {e.message}"
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
        return e.message


def validate_all(label, objs, versions):
    for version in versions:
        errs = [f"{o['kind']}/{o['metadata']['name']}: {err}" for o in objs if (err := k8s_errors(o, version))]
        check(f"{label}: {len(objs)} objects valid for Kubernetes {version} (strict)", not errs, "; ".join(errs))


def render(values):
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name="meshlet", namespace=NS)
    return [d for path, text in sorted(out.items()) if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]


def find(objs, kind, name):
    return next((o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name), None)


def flag(args, name):
    return args[args.index(name) + 1] if name in args else None


def b64(s):
    return base64.b64decode(s).decode()


# ---------------------------------------------------------------- the chart
def check_chart(label, values, expect):
    try:
        objs = render(values)
    except helm.HelmError as e:
        return check(f"{label}: renders", False, str(e))
    check(f"{label}: renders ({len(objs)} objects)", True)
    versions = VERSIONS + (["1.27"] if expect.get("mode") == "container" else [])
    for kube in versions:
        report = helm.lint(CHART, values, strict=True, namespace=NS, kube_version=f"v{kube}.0")
        bad = [m["error"].strip() for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        check(f"{label}: helm lint --strict --kube-version {kube}", not bad, "; ".join(bad))
    validate_all(label, objs, versions)

    def labelled(meta):
        return all(k in meta.get("labels", {}) for k in LABELS)
    unlabelled = [f"{o['kind']}/{o['metadata']['name']}" for o in objs if not labelled(o["metadata"])
                  or ("template" in o.get("spec", {}) and not labelled(o["spec"]["template"]["metadata"]))]
    check(f"{label}: every object (and pod template) has the app.kubernetes.io labels",
          not unlabelled, ", ".join(unlabelled))

    # The webhook.
    mwc = find(objs, "MutatingWebhookConfiguration", "meshlet-sidecar-injector")
    hooks = mwc["webhooks"] if mwc else []
    wh = hooks[0] if len(hooks) == 1 else {}
    want = {
        "name": "inject.meshlet.io", "failurePolicy": "Fail", "sideEffects": "None", "timeoutSeconds": 5,
        "reinvocationPolicy": "Never", "admissionReviewVersions": ["v1"],
        "namespaceSelector": {"matchLabels": {"meshlet.io/inject": "enabled"}, "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [NS, "kube-system"]}]},
        "objectSelector": {"matchExpressions": [{"key": "meshlet.io/inject", "operator": "NotIn", "values": ["disabled"]}]},
    }
    diff = [f"{k}={wh.get(k)!r}" for k, v in want.items() if wh.get(k) != v]
    rules = wh.get("rules", [])
    if [(r["operations"], r["apiGroups"], r["apiVersions"], r["resources"]) for r in rules] != [(["CREATE"], [""], ["v1"], ["pods"])]:
        diff.append(f"rules={rules!r}")
    client = wh.get("clientConfig", {})
    if client.get("service") != {"name": "meshlet-control", "namespace": NS, "path": "/inject", "port": 443}:
        diff.append(f"clientConfig.service={client.get('service')!r}")
    ca_bundle = b64(client.get("caBundle", ""))
    check(f"{label}: webhook inject.meshlet.io (Fail, None, selectors, CREATE pods, service /inject:443)",
          mwc is not None and not diff, "; ".join(diff) or "missing")
    tls = find(objs, "Secret", "meshlet-webhook-tls")
    check(f"{label}: webhook caBundle is the CA of Secret meshlet-webhook-tls",
          tls is not None and "BEGIN CERTIFICATE" in ca_bundle and b64(tls["data"].get("ca.crt", "")) == ca_bundle
          and {"tls.crt", "tls.key"} <= set(tls["data"]))

    # The control plane.
    dep = find(objs, "Deployment", "meshlet-control")
    pod = dep["spec"]["template"]["spec"] if dep else {}
    c = (pod.get("containers") or [{}])[0]
    sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
    sc_ok = (sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 1337 and sc.get("readOnlyRootFilesystem") is True
             and sc.get("allowPrivilegeEscalation") is False and sc.get("capabilities") == {"drop": ["ALL"]}
             and sc.get("seccompProfile", psc.get("seccompProfile")) == {"type": "RuntimeDefault"})
    check(f"{label}: control plane securityContext (non-root 1337, read-only root, no escalation, drop ALL, RuntimeDefault)", sc_ok, json.dumps(sc))
    args = c.get("command", [])[-1:] + c.get("args", [])
    want_args = {
        "--data-dir": "/var/lib/meshlet", "--ca-dir": "/etc/meshlet/ca", "--trust-domain": expect.get("td", "cluster.local"),
        "--grpc-addr": "0.0.0.0:15012", "--admin-addr": "0.0.0.0:15014", "--webhook-addr": "0.0.0.0:15017",
        "--webhook-tls-cert": "/etc/meshlet/webhook/tls.crt", "--webhook-tls-key": "/etc/meshlet/webhook/tls.key",
        "--cert-ttl": "24h", "--jwks-url": "https://kubernetes.default.svc/openid/v1/jwks",
        "--jwks-ca-file": "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        "--jwks-token-file": "/var/run/secrets/kubernetes.io/serviceaccount/token",
        "--proxy-image": "ghcr.io/meshlet/meshlet:0.1.0", "--inject-mode": expect.get("mode", "native"),
        "--pod-control-addr": f"meshlet-control.{NS}.svc:15012", "--pod-otlp-endpoint": expect.get("otlp"),
    }
    diff = [f"{k} {flag(args, k)!r} (want {v!r})" for k, v in want_args.items() if flag(args, k) != v]
    if args[:2] != ["meshlet-control", "serve"]:
        diff.append(f"command {args[:2]}")
    diff += [f"{f} missing" for f in ("--local-tokens=false", "--kubernetes", "--identity", "--admin-identity") if f not in args]
    check(f"{label}: control plane command line", not diff, "; ".join(diff))
    probes = (c.get("readinessProbe", {}).get("httpGet", {}), c.get("livenessProbe", {}).get("httpGet", {}))
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    check(f"{label}: probes /ready and /live on the admin port 15014",
          [p.get("path") for p in probes] == ["/ready", "/live"]
          and all(ports.get(p.get("port"), p.get("port")) == 15014 for p in probes))
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    vol = lambda path: vols.get(mounts.get(path), {})  # noqa: E731
    check(f"{label}: volumes (emptyDir data, Secrets meshlet-ca and meshlet-webhook-tls with mode 0400)",
          "emptyDir" in vol("/var/lib/meshlet")
          and vol("/etc/meshlet/ca").get("secret") == {"secretName": "meshlet-ca", "defaultMode": 0o400}
          and vol("/etc/meshlet/webhook").get("secret") == {"secretName": "meshlet-webhook-tls", "defaultMode": 0o400})
    replicas = expect.get("replicas", 2)
    pdb = find(objs, "PodDisruptionBudget", "meshlet-control")
    check(f"{label}: replicas {replicas}, PodDisruptionBudget {'minAvailable 1' if replicas > 1 else 'absent'}",
          dep is not None and dep["spec"]["replicas"] == replicas
          and ((pdb or {}).get("spec", {}).get("minAvailable") == 1 if replicas > 1 else pdb is None))
    svc = find(objs, "Service", "meshlet-control") or {"spec": {"ports": []}}
    svc_ports = sorted((p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"])
    check(f"{label}: Service meshlet-control ports grpc 15012, admin 15014, webhook 443->15017",
          svc_ports == [("admin", 15014, 15014), ("grpc", 15012, 15012), ("webhook", 443, 15017)], str(svc_ports))

    # RBAC: exactly what the control plane needs.
    role = find(objs, "ClusterRole", "meshlet-control") or {"rules": []}
    got = sorted(json.dumps(r, sort_keys=True) for r in role["rules"])
    want_rules = sorted(json.dumps(r, sort_keys=True) for r in [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["list"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["meshlet-trust-bundle"], "verbs": ["get", "patch", "update"]},
        {"apiGroups": ["meshlet.io"], "resources": ["accesspolicies", "meshpolicies"], "verbs": ["get", "list"]},
        {"nonResourceURLs": ["/openid/v1/jwks", "/.well-known/openid-configuration"], "verbs": ["get"]}])
    binding = find(objs, "ClusterRoleBinding", "meshlet-control") or {}
    check(f"{label}: RBAC is least privilege, bound to ServiceAccount meshlet-control",
          got == want_rules and find(objs, "ServiceAccount", "meshlet-control") is not None
          and binding.get("subjects") == [{"kind": "ServiceAccount", "name": "meshlet-control", "namespace": NS}]
          and binding.get("roleRef", {}).get("name") == "meshlet-control", "\n".join(got))

    # The CA and the trust bundle.
    ca = find(objs, "Secret", "meshlet-ca")
    data = {k: b64(v) for k, v in (ca or {}).get("data", {}).items()}
    bundle = (find(objs, "ConfigMap", "meshlet-trust-bundle") or {}).get("data", {}).get("bundle.pem", "")
    ok = ({"bundle.crt", "issuer.crt", "issuer.key"} <= set(data)
          and bundle.strip() == data["bundle.crt"].strip())
    if ok and "ca" in expect:
        ok = all(data.get(k) == v for k, v in expect["ca"].items())
    elif ok:  # generated: one self-signed root signs directly, its key in PKCS#8
        key = data["issuer.key"]
        ok = (data["bundle.crt"] == data["issuer.crt"] == data.get("root.crt") and key == data.get("root.key")
              and key.startswith("-----BEGIN PRIVATE KEY-----")
              and base64.b64decode("".join(key.splitlines()[1:-1])).startswith(P256_PKCS8_HEADER))
    kind = "given" if "ca" in expect else "generated, P-256 PKCS#8"
    check(f"{label}: CA Secret meshlet-ca ({kind}) and ConfigMap meshlet-trust-bundle agree", ok)

    jaeger = find(objs, "Deployment", "meshlet-jaeger")
    if expect.get("jaeger"):
        jc = jaeger["spec"]["template"]["spec"]["containers"][0] if jaeger else {}
        jsvc = find(objs, "Service", "meshlet-jaeger") or {"spec": {"ports": []}}
        check(f"{label}: Jaeger v2 all-in-one (image 2.x, ports 4317/4318/16686, restricted)",
              jc.get("image", "").startswith("jaegertracing/jaeger:2.")
              and sorted(p["port"] for p in jsvc["spec"]["ports"]) == [4317, 4318, 16686]
              and jc.get("securityContext", {}).get("readOnlyRootFilesystem") is True
              and jc["securityContext"].get("runAsNonRoot") is True and jc["securityContext"].get("capabilities") == {"drop": ["ALL"]})
    else:
        check(f"{label}: no Jaeger", jaeger is None)
    return objs


def check_refused(label, values):
    try:
        render(values)
        check(f"chart refuses {label}", False, "rendered")
    except helm.HelmError as e:
        check(f"chart refuses {label}", True, str(e))


# ---------------------------------------------------------------- injected pods
def check_injected():
    files = sorted(INJECTED.glob("*.json")) if INJECTED.is_dir() else []
    if not files:
        print("no injected pods to validate (run cargo test first)")
        return
    for f in files:
        container_mode = "container-mode" in f.name
        try:
            pod = json.loads(f.read_text())
        except ValueError as e:
            check(f"{f.name}: is JSON", False, str(e))
            continue
        label = f"injected {f.name}"
        if not check(f"{label}: is a Pod", pod.get("kind") == "Pod" and isinstance(pod.get("spec"), dict), str(pod.get("kind"))):
            continue
        for version in VERSIONS + (["1.27"] if container_mode else []):
            err = k8s_errors(pod, version)
            check(f"{label}: valid for Kubernetes {version} (strict)", err is None, err or "")
        spec = pod["spec"]
        inits = {c["name"]: c for c in spec.get("initContainers", [])}
        regular = {c["name"]: c for c in spec.get("containers", [])}
        init = inits.get("meshlet-init", {})
        check(f"{label}: init container meshlet-init adds exactly NET_ADMIN, NET_RAW",
              sorted(init.get("securityContext", {}).get("capabilities", {}).get("add", [])) == ["NET_ADMIN", "NET_RAW"],
              str(init.get("securityContext")))
        if container_mode:
            proxy = regular.get("meshlet-proxy")
            check(f"{label}: sidecar meshlet-proxy is a regular container", proxy is not None and "meshlet-proxy" not in inits)
        else:
            proxy = inits.get("meshlet-proxy")
            check(f"{label}: sidecar meshlet-proxy is a native sidecar (init container, restartPolicy Always)",
                  proxy is not None and proxy.get("restartPolicy") == "Always" and "meshlet-proxy" not in regular)
        proxy = proxy or {}
        check(f"{label}: sidecar runs as UID 1337", proxy.get("securityContext", {}).get("runAsUser") == 1337)
        probe = proxy.get("startupProbe", {}).get("httpGet", {})
        check(f"{label}: sidecar startupProbe GET /ready on 15000", probe.get("path") == "/ready" and probe.get("port") == 15000, str(probe))


def main():
    print(f"helm SDK {helm.helm_sdk_version()}, kubernetes-validate {kubernetes_validate.__version__}")
    default = check_chart("default", {}, {})
    check_chart("jaeger", {"tracing": {"jaeger": {"enabled": True}}},
                {"jaeger": True, "otlp": f"http://meshlet-jaeger.{NS}.svc:4317"})
    check_chart("otlp", {"tracing": {"otlpEndpoint": "http://otel.obs.svc:4317"}, "trustDomain": "example.org"},
                {"otlp": "http://otel.obs.svc:4317", "td": "example.org"})
    check_chart("container-mode", {"injection": {"mode": "container"}}, {"mode": "container"})
    check_chart("replicas-1", {"replicas": 1}, {"replicas": 1})
    # A user-given CA: the one the default render generated, passed back as values.
    made = (find(default or [], "Secret", "meshlet-ca") or {"data": {}})["data"]
    given = {k: b64(made.get(k, "")) for k in ("bundle.crt", "issuer.crt", "issuer.key")}
    check_chart("user-ca", {"ca": {"bundle": given["bundle.crt"], "issuerCert": given["issuer.crt"],
                                   "issuerKey": given["issuer.key"]}}, {"ca": given})
    check_refused("injection.mode=sidecar", {"injection": {"mode": "sidecar"}})
    check_refused("an unknown top-level key", {"replicaCount": 3})
    check_refused("half a CA (ca.bundle alone)", {"ca": {"bundle": given["bundle.crt"]}})
    check_injected()
    print(f"{results['passed']} passed, {results['failed']} failed")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
