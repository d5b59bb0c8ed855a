//! `meshletctl`: the mesh's command line.
//!
//! - `demo`: a local mesh that needs no cluster ([`demo`]); `--netns` with real capture
//!   ([`netns`]). [`apps`]: the plain apps behind the demo's sidecars.
//! - `token`: mints a development workload token with the control plane's local key.

mod apps;
mod demo;
mod netns;

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
    /// The demo's plain apps and clients (used inside the --netns demo's namespaces).
    #[command(subcommand, hide = true)]
    DemoApp(netns::DemoApp),
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match Cli::parse().command {
        Command::Demo(args) => demo::run(args).await,
        Command::DemoApp(cmd) => netns::demo_app(cmd).await,
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
