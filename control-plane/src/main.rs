//! `meshlet-control`: parses flags and calls [`meshlet_control::run`].

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshlet_control::{Config, Listeners, ServeArgs};

#[derive(Debug, Parser)]
#[command(
    name = "meshlet-control",
    version,
    about = "meshlet's control plane: the mesh CA and its APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Identity gRPC API and the admin API.
    Serve(ServeArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    meshlet_telemetry::process::init_logging();
    let Command::Serve(args) = Cli::parse().command;
    let kubernetes = args.kubernetes;
    let mut config = Config::try_from(args)?;
    if kubernetes {
        config.cluster = Some(
            meshlet_control::cluster::Cluster::in_cluster()
                .await
                .context("--kubernetes: connecting to the Kubernetes API")?,
        );
    }
    tracing::info!(?config, "starting");
    // Without an activity count: a release every ten seconds.
    tokio::spawn(meshlet_telemetry::memory::release_when_quiet(
        meshlet_telemetry::memory::RELEASE_INTERVAL,
        || 0,
    ));
    let mut listeners = Listeners::bind(config.grpc_addr, config.admin_addr)
        .await
        .with_context(|| format!("binding {} and {}", config.grpc_addr, config.admin_addr))?;
    if config.webhook_tls.is_some() {
        listeners.webhook = Some(
            tokio::net::TcpListener::bind(config.webhook_addr)
                .await
                .with_context(|| format!("binding {}", config.webhook_addr))?,
        );
    }
    let running = meshlet_control::run(
        config,
        listeners,
        meshlet_telemetry::process::shutdown_signal(),
    )
    .await?;
    running.wait().await?;
    Ok(())
}
