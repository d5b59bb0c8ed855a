//! Certificate issuance through real gRPC and TLS, at several concurrencies.
//!
//! Starts a control plane in this process on loopback, pre-builds a pool of CSRs and tokens
//! (so client-side key generation is not measured), then for each concurrency runs a bounded
//! number of Certify calls for a bounded time and reports throughput and p50/p99 latency.
//! The baseline, measured in the same run, is the CPU cost of the three checks every
//! issuance must do (JWT signature, CSR signature, leaf signature), from which the ceiling
//! for this machine follows; the result is reported as a share of that ceiling.
//!
//! `cargo run --release -p meshlet-benches --bin certify-load -- [--seconds 5] [--json FILE]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use meshlet_control::token::{Authenticator, LocalSigner};
use meshlet_control::{Config, Listeners};
use meshlet_identity::csr::{build_csr, check_csr};
use meshlet_identity::{Expected, SpiffeId, TrustDomain, tls};
use meshlet_proto::identity::v1::CertifyRequest;
use meshlet_proto::identity::v1::identity_client::IdentityClient;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

#[derive(Debug, Parser)]
struct Args {
    /// Seconds per concurrency level (each level also stops after --max-requests).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 200_000)]
    max_requests: usize,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// gRPC connections shared by the callers.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, serde::Serialize)]
struct Level {
    concurrency: usize,
    requests: usize,
    errors: usize,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let td = TrustDomain::parse("cluster.local").expect("valid constant");
    let config = Config::local(
        dir.path().to_owned(),
        td.clone(),
        Duration::from_secs(86400),
    )?;
    let listeners = Listeners::bind(config.grpc_addr, config.admin_addr).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let control = meshlet_control::run(config, listeners, async move {
        let _ = stopped.await;
    })
    .await?;

    let signer = LocalSigner::load_or_create(dir.path())?;
    let pool: Vec<CertifyRequest> = (0..64)
        .map(|i| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            Ok(CertifyRequest {
                csr: build_csr(&key, None)?,
                token: signer.mint(
                    "bench",
                    &format!("sa-{i}"),
                    Some(&format!("pod-{i}")),
                    Duration::from_secs(3600),
                )?,
                pod_ip: String::new(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let baseline = baseline(&signer, &pool, &td)?;

    let bundle: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(control.trust_bundle_pem.as_bytes())
            .collect::<Result<_, _>>()?;
    let tls = Arc::new(tls::client_config(
        tls::root_store(&bundle)?,
        Expected::Exact(control.identity.clone()),
        None,
        &[meshlet_proto::connect::GRPC_ALPN],
    )?);
    let channels: Vec<_> = (0..args.connections.max(1))
        .map(|_| meshlet_proto::connect::tls_channel(&control.grpc_addr.to_string(), tls.clone()))
        .collect::<Result<_, _>>()?;

    let mut levels = Vec::new();
    for &c in &args.concurrency {
        levels.push(level(c, &args, &channels, &pool).await?);
    }
    let _ = stop.send(());
    control.wait().await?;

    println!(
        "certificate issuance through gRPC + TLS on loopback ({} cores)",
        cores()
    );
    println!(
        "baseline (same run): JWT verify {:.1} us, CSR verify {:.1} us, leaf sign {:.1} us per issuance -> ceiling {:.0}/s on {} cores",
        baseline.jwt_us,
        baseline.csr_us,
        baseline.sign_us,
        baseline.ceiling_per_second,
        cores()
    );
    println!(
        "{:>11} {:>9} {:>7} {:>10} {:>9} {:>9} {:>12}",
        "concurrency", "requests", "errors", "certs/s", "p50 ms", "p99 ms", "of ceiling"
    );
    for l in &levels {
        println!(
            "{:>11} {:>9} {:>7} {:>10.0} {:>9.2} {:>9.2} {:>11.0}%",
            l.concurrency,
            l.requests,
            l.errors,
            l.per_second,
            l.p50_ms,
            l.p99_ms,
            100.0 * l.per_second / baseline.ceiling_per_second
        );
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({"baseline": baseline, "levels": levels, "cores": cores()});
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn level(
    concurrency: usize,
    args: &Args,
    channels: &[tonic::transport::Channel],
    pool: &[CertifyRequest],
) -> anyhow::Result<Level> {
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let per_worker = args.max_requests / concurrency.max(1);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let mut client = IdentityClient::new(channels[w % channels.len()].clone());
        let pool = pool.to_vec();
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(1024);
            let mut errors = 0usize;
            for i in 0..per_worker {
                if Instant::now() >= deadline {
                    break;
                }
                let req = pool[(w + i) % pool.len()].clone();
                let t = Instant::now();
                match client.certify(req).await {
                    Ok(_) => latencies.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    while let Some(done) = workers.join_next().await {
        let (l, e) = done?;
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Ok(Level {
        concurrency,
        requests: all.len(),
        errors,
        per_second: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    })
}

#[derive(Debug, serde::Serialize)]
struct Baseline {
    jwt_us: f64,
    csr_us: f64,
    sign_us: f64,
    ceiling_per_second: f64,
}

/// Times the three cryptographic operations an issuance cannot skip, single-threaded.
fn baseline(
    signer: &LocalSigner,
    pool: &[CertifyRequest],
    td: &TrustDomain,
) -> anyhow::Result<Baseline> {
    const N: usize = 2000;
    let auth = Authenticator::new(vec![signer.trusted_key()], None);
    let t = Instant::now();
    for i in 0..N {
        auth.authenticate(&pool[i % pool.len()].token)?;
    }
    let jwt_us = t.elapsed().as_secs_f64() * 1e6 / N as f64;

    let id = SpiffeId::for_service_account(td, "bench", "sa-0")?;
    let t = Instant::now();
    let mut key = None;
    for _ in 0..N {
        key = Some(check_csr(&pool[0].csr, &id)?);
    }
    let csr_us = t.elapsed().as_secs_f64() * 1e6 / N as f64;

    let dir = tempfile::tempdir()?;
    let ca = meshlet_identity::ca::Ca::load_or_create(dir.path(), td)?;
    let key = key.context("at least one CSR checked")?;
    let now = time::OffsetDateTime::now_utc();
    let t = Instant::now();
    for _ in 0..N {
        ca.issue(&id, &key, Duration::from_secs(3600), now)?;
    }
    let sign_us = t.elapsed().as_secs_f64() * 1e6 / N as f64;
    let ceiling_per_second = cores() as f64 * 1e6 / (jwt_us + csr_us + sign_us);
    Ok(Baseline {
        jwt_us,
        csr_us,
        sign_us,
        ceiling_per_second,
    })
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
