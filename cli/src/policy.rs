//! `meshletctl policy check`: would this call be allowed, and by which rule? It runs the
//! sidecar's own decision function on the policy of a file or of the control plane.

use anyhow::{Context, bail};
use meshlet_identity::SpiffeId;
use meshlet_identity::authz::{ConnectionVerdict, PolicySet, Request, Target};

#[derive(Debug, clap::Args)]
pub(crate) struct CheckArgs {
    /// The caller's SPIFFE ID, or "plaintext" for a client outside the mesh.
    #[arg(long)]
    from: String,
    /// The workload called: NAMESPACE/SERVICE_ACCOUNT[:PORT].
    #[arg(long)]
    to: String,
    /// An HTTP method (with --path): decide a request rather than a connection.
    #[arg(long, requires = "path")]
    method: Option<String>,
    #[arg(long, requires = "method")]
    path: Option<String>,
    /// Read the policy from this file instead of the control plane.
    #[arg(short = 'f', long = "filename")]
    file: Option<std::path::PathBuf>,
    /// The control plane's admin API, host:port.
    #[arg(long, env = "MESHLET_CONTROL_ADMIN", default_value = "127.0.0.1:15014")]
    control_admin: String,
}

/// The answer, as printed: (allowed, line).
pub(crate) fn explain(
    set: &PolicySet,
    from: Option<&SpiffeId>,
    to: &Target<'_>,
    request: Option<Request<'_>>,
) -> (bool, String) {
    let who = from.map_or("plaintext", |f| f.as_str());
    let target = format!("{}/{}:{}", to.namespace, to.service_account, to.port);
    match request {
        Some(r) => {
            let d = set.request(to, from, r);
            let verb = if d.allowed { "allow" } else { "deny" };
            (
                d.allowed,
                format!(
                    "{verb}: {who} -> {target} {} {} (rule: {})",
                    r.method, r.path, d.rule
                ),
            )
        }
        None => match set.connection(to, from) {
            ConnectionVerdict::Allow(d) => {
                (true, format!("allow: {who} -> {target} (rule: {})", d.rule))
            }
            ConnectionVerdict::Deny(d) => {
                (false, format!("deny: {who} -> {target} (rule: {})", d.rule))
            }
            ConnectionVerdict::PerRequest => (
                false,
                format!(
                    "deny for TCP: {who} -> {target}: only HTTP rules match; pass --method and --path"
                ),
            ),
        },
    }
}

pub(crate) async fn check(args: CheckArgs) -> anyhow::Result<bool> {
    let set: PolicySet = match &args.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_yaml_ng::from_str(&text)
                .with_context(|| format!("{} is not a policy", path.display()))?
        }
        None => {
            let mut client = crate::apps::HttpClient::connect(args.control_admin.as_str()).await?;
            let (status, body) = client.get("/v1/policy").await?;
            if status != 200 {
                bail!("GET /v1/policy answered {status}: {body}");
            }
            serde_json::from_str(&body).context("reading /v1/policy")?
        }
    };
    let from = match args.from.as_str() {
        "plaintext" => None,
        id => Some(SpiffeId::parse(id).with_context(|| format!("--from {id:?}"))?),
    };
    let (workload, port) = match args.to.rsplit_once(':') {
        Some((w, p)) => (
            w,
            p.parse::<u16>()
                .with_context(|| format!("--to: port {p:?}"))?,
        ),
        None => (args.to.as_str(), 0),
    };
    let (namespace, service_account) = workload.split_once('/').with_context(|| {
        format!(
            "--to {:?}: expected NAMESPACE/SERVICE_ACCOUNT[:PORT]",
            args.to
        )
    })?;
    let target = Target {
        namespace,
        service_account,
        port,
    };
    let request = args
        .method
        .as_deref()
        .zip(args.path.as_deref())
        .map(|(method, path)| Request { method, path });
    let (allowed, line) = explain(&set, from.as_ref(), &target, request);
    println!("{line}");
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_name_the_rule() {
        let set: PolicySet = serde_yaml_ng::from_str(
            "policies:\n  - {name: orders, namespace: shop, serviceAccount: orders, allow: [{identities: [\"spiffe://td/ns/shop/sa/web\"]}]}\n",
        )
        .expect("a policy");
        let web = SpiffeId::parse("spiffe://td/ns/shop/sa/web").expect("valid");
        let other = SpiffeId::parse("spiffe://td/ns/x/sa/y").expect("valid");
        let to = Target {
            namespace: "shop",
            service_account: "orders",
            port: 80,
        };
        let (ok, line) = explain(&set, Some(&web), &to, None);
        assert!(ok && line.contains("shop/orders allow[0]"), "{line}");
        let (ok, line) = explain(
            &set,
            Some(&other),
            &to,
            Some(Request {
                method: "GET",
                path: "/",
            }),
        );
        assert!(
            !ok && line.starts_with("deny") && line.contains("no rule allows"),
            "{line}"
        );
        let (ok, line) = explain(
            &set,
            None,
            &Target {
                namespace: "web",
                service_account: "blog",
                port: 80,
            },
            None,
        );
        assert!(ok && line.contains("mesh default"), "{line}");
    }
}
