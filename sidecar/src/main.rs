//! `meshlet-proxy`: parses flags and calls [`meshlet_proxy::run`] or [`meshlet_proxy::init`].

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshlet_proxy::init::InitArgs;
use meshlet_proxy::{Listeners, RunArgs};

#[derive(Debug, Parser)]
#[command(name = "meshlet-proxy", version, about = "meshlet's sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy: get a certificate, capture and proxy traffic.
    Run(Box<RunArgs>),
    /// Install the traffic capture rules in this network namespace (needs NET_ADMIN).
    Init(InitArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    init_logging();
    match Cli::parse().command {
        Command::Init(args) => Ok(meshlet_proxy::init::apply(&args)?),
        Command::Run(mut config) => {
            config.tracing =
                meshlet_telemetry::traces::TraceConfig::from_env(|k| std::env::var(k).ok())?;
            tracing::info!(?config, "starting");
            let listeners = Listeners::bind(&config)
                .await
                .context("binding listeners")?;
            let running = meshlet_proxy::run(*config, listeners, shutdown_signal()).await?;
            running.wait().await;
            Ok(())
        }
    }
}

fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter: tracing_subscriber::filter::Targets = std::env::var("MESHLET_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        });
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}

/// Completes on SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down");
}
