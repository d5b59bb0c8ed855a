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
    Run {
        #[command(flatten)]
        config: Box<RunArgs>,
        /// Threads that run the proxy. 0: one per CPU this process may use (its affinity and
        /// cgroup CPU quota), at most 2, so a sidecar on a large node without a CPU limit does
        /// not start a thread per core. With 1, everything runs on one thread: no cross-thread
        /// wake-ups and one allocator arena, the cheapest set-up for a sidecar given one core.
        #[arg(long, env = "MESHLET_WORKER_THREADS", default_value_t = 0)]
        worker_threads: usize,
    },
    /// Install the traffic capture rules in this network namespace (needs NET_ADMIN).
    Init(InitArgs),
    /// Wait until the sidecar reports ready (for a postStart hook in container mode).
    WaitReady {
        /// The sidecar's admin address.
        #[arg(long, env = "MESHLET_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
        admin_addr: std::net::SocketAddr,
        /// Give up after this long.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    meshlet_telemetry::process::init_logging();
    match Cli::parse().command {
        Command::Init(args) => Ok(meshlet_proxy::init::apply(&args)?),
        Command::WaitReady {
            admin_addr,
            timeout,
        } => runtime(1)?.block_on(wait_ready(admin_addr, timeout)),
        Command::Run {
            config,
            worker_threads,
        } => runtime(worker_threads)?.block_on(run(config)),
    }
}

/// Threads a sidecar starts with `--worker-threads 0`, at most.
const AUTO_THREADS_MAX: usize = 2;

/// A Tokio runtime with `threads` workers (0: one per usable CPU, at most
/// [`AUTO_THREADS_MAX`]); one means the current-thread scheduler, on the thread that calls
/// `block_on`.
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let available = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = worker_threads(threads, available);
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder
        .enable_all()
        .build()
        .context("starting the Tokio runtime")
}

/// The threads `--worker-threads flag` means on a machine where this process may use
/// `available` CPUs.
fn worker_threads(flag: usize, available: usize) -> usize {
    match flag {
        0 => available.clamp(1, AUTO_THREADS_MAX),
        n => n,
    }
}

/// Gets the tracing settings from `OTEL_*`, binds the listeners and runs until SIGTERM.
async fn run(mut config: Box<RunArgs>) -> anyhow::Result<()> {
    config.tracing = meshlet_telemetry::traces::TraceConfig::from_env(|k| std::env::var(k).ok())?;
    let runtime = tokio::runtime::Handle::current();
    let workers = runtime.metrics().num_workers();
    let scheduler = match runtime.runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => "current_thread",
        _ => "multi_thread",
    };
    tracing::info!(?config, scheduler, workers, "starting");
    let listeners = Listeners::bind(&config)
        .await
        .context("binding listeners")?;
    let running = meshlet_proxy::run(
        *config,
        listeners,
        meshlet_telemetry::process::shutdown_signal(),
    )
    .await?;
    let metrics = running.metrics.clone();
    tokio::spawn(meshlet_telemetry::memory::release_when_quiet(
        meshlet_telemetry::memory::CHECK_INTERVAL,
        move || metrics.activity.get(),
    ));
    running.wait().await;
    Ok(())
}

/// Polls `GET /ready` on the admin port until it answers 200, or fails after `timeout`.
async fn wait_ready(
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ready = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(b"GET /ready HTTP/1.0\r\n\r\n").await?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head).await?;
            std::io::Result::Ok(head.ends_with(b" 200"))
        };
        if let Ok(Ok(true)) = tokio::time::timeout(std::time::Duration::from_secs(1), ready).await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("the sidecar at {addr} was not ready within {timeout:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn worker_thread_counts() {
        // (flag, CPUs available, threads)
        let cases = [
            (0, 1, 1),
            (0, 2, 2),
            (0, 64, 2),
            (0, 0, 1),
            (1, 64, 1),
            (3, 1, 3),
            (8, 64, 8),
        ];
        for (flag, available, want) in cases {
            assert_eq!(
                worker_threads(flag, available),
                want,
                "flag {flag}, {available} CPUs"
            );
        }
    }
}
