//! `meshletctl`: the mesh's command line.
//!
//! - `demo`: a local mesh that needs no cluster ([`demo`]); `--netns` with real capture
//!   ([`netns`]). [`apps`]: the plain apps behind the demo's sidecars.
//! - `token`: mints a development workload token with the control plane's local key.
//! - `certs`, `check`, `ca`: the certificate view, the loud check, CA rotation ([`certs`]).
//! - `inject`: the webhook's patch applied to YAML ([`inject`]).
//! - `policy check`: an authorization decision and its rule ([`policy`]).

mod apps;
mod certs;
mod demo;
mod inject;
mod netns;
mod policy;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use meshlet_control::token::LocalSigner;

#[derive(Debug, Parser)]
#[command(
    name = "meshletctl",
    version,
    about = "Operate and try out the meshlet service mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local mesh demo: a control plane on loopback issues certificates and every
    /// result is checked. Needs no cluster and no root.
    Demo(demo::DemoArgs),
    /// Mint a workload token with the local signing key of a control plane's data dir.
    Token(TokenArgs),
    /// Show every workload's certificate, and the CA (or one sidecar's view with --proxy).
    Certs(CertsArgs),
    /// Exit non-zero, saying what to do, if the control plane is unreachable or any root,
    /// intermediate or workload certificate is expired, expiring or overdue.
    Check(AdminArgs),
    /// Add the sidecar to the pods of Kubernetes YAML (as the webhook does) and print it.
    Inject(inject::InjectArgs),
    /// Authorization policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Rotate the CA through the control plane's admin API (needs an admin token).
    #[command(subcommand)]
    Ca(CaCommand),
    /// The demo's plain apps and clients (used inside the --netns demo's namespaces).
    #[command(subcommand, hide = true)]
    DemoApp(apps::DemoApp),
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// The control plane's --data-dir (the key is created there if absent).
    #[arg(long, env = "MESHLET_DATA_DIR", default_value = "/var/lib/meshlet")]
    data_dir: PathBuf,
    /// The workload's namespace.
    #[arg(long, env = "MESHLET_NAMESPACE")]
    namespace: String,
    /// The workload's service account.
    #[arg(long, env = "MESHLET_SERVICE_ACCOUNT")]
    service_account: String,
    /// The pod name recorded in the token (optional).
    #[arg(long, env = "MESHLET_POD")]
    pod: Option<String>,
    /// How long the token is valid, e.g. 1h, 10m.
    #[arg(long, env = "MESHLET_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// The control plane's admin API, host:port.
    #[arg(long, env = "MESHLET_CONTROL_ADMIN", default_value = "127.0.0.1:15014")]
    control_admin: String,
}

#[derive(Debug, clap::Args)]
struct CertsArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Show this sidecar's view instead (its admin address, host:port).
    #[arg(long)]
    proxy: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    output: String,
    /// Only workloads of this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only workloads in this state (valid, expiring, overdue, expired).
    #[arg(long)]
    state: Option<String>,
}

#[derive(Debug, clap::Args)]
struct CaArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// A file holding a token for an admin identity (e.g. meshlet-system/meshlet-admin).
    #[arg(long, env = "MESHLET_ADMIN_TOKEN_FILE")]
    token_file: std::path::PathBuf,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Would a call be allowed? Prints allow or deny with the rule that decided; exit 1 on
    /// deny.
    Check(policy::CheckArgs),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Step 1: add a new root to the trust bundle (streamed to every sidecar).
    AddRoot(CaArgs),
    /// Step 2: issue from a new intermediate under the newest root.
    RotateIntermediate(CaArgs),
    /// Step 3: remove a root from the bundle, once every workload has renewed.
    RetireRoot {
        #[command(flatten)]
        args: CaArgs,
        /// The root's serial (hex), as `meshletctl certs` shows it.
        serial: String,
    },
    /// Re-read a CA mounted from files (after the Secret was updated).
    Reload(CaArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match Cli::parse().command {
        Command::Demo(args) => demo::run(args).await,
        Command::DemoApp(cmd) => apps::demo_app(cmd).await,
        Command::Inject(args) => inject::run(args),
        Command::Policy(PolicyCommand::Check(args)) => {
            if !policy::check(args).await? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Certs(a) => {
            let query: Vec<String> = [("namespace", &a.namespace), ("state", &a.state)]
                .into_iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
                .collect();
            let query = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            certs::certs(
                &a.admin.control_admin,
                a.proxy.as_deref(),
                a.output == "json",
                &query,
            )
            .await
        }
        Command::Check(a) => {
            if !certs::check(&a.control_admin).await? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Ca(step) => {
            let (args, path) = match &step {
                CaCommand::AddRoot(a) => (a, "/v1/ca/roots".to_owned()),
                CaCommand::RotateIntermediate(a) => (a, "/v1/ca/intermediate".to_owned()),
                CaCommand::RetireRoot { args, serial } => {
                    (args, format!("/v1/ca/retire-root?serial={serial}"))
                }
                CaCommand::Reload(a) => (a, "/v1/ca/reload".to_owned()),
            };
            let token = std::fs::read_to_string(&args.token_file)
                .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", args.token_file.display()))?;
            certs::ca_step(&args.admin.control_admin, &path, token.trim()).await
        }
        Command::Token(args) => {
            let signer = LocalSigner::load_or_create(&args.data_dir)?;
            let token = signer.mint(
                &args.namespace,
                &args.service_account,
                args.pod.as_deref(),
                args.ttl,
            )?;
            println!("{token}");
            Ok(())
        }
    }
}
