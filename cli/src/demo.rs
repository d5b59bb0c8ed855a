//! `meshletctl demo`: a whole mesh on loopback, every step checked.
//!
//! In this process: a control plane (CA in a fresh folder unless `--data-dir`), two apps
//! (HTTP "orders", TCP echo "ledger") each behind a server sidecar in strict mode, and a
//! client sidecar ("frontend") whose routes lead to them; discovery tells it they are
//! meshed. HTTP and TCP cross the mesh; the demo prints what each side verified and exits
//! non-zero naming the first check that failed. `--netns` does the same with real capture
//! in network namespaces (see [`crate::netns`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use meshlet_control::token::LocalSigner;
use meshlet_control::{Config, Listeners};
use meshlet_identity::csr::build_csr;
use meshlet_identity::{Expected, SpiffeId, TrustDomain, tls};
use meshlet_proto::identity::v1::CertifyRequest;
use meshlet_proto::identity::v1::identity_client::IdentityClient;
use meshlet_proxy::inbound::InboundMode;
use meshlet_proxy::metrics::{ConnEvent, Direction};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;

use crate::apps;

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Keep the CA here (reused on the next run); default: a fresh temporary folder.
    #[arg(long, env = "MESHLET_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Write an issued certificate chain (PEM, no key) and the trust bundle to this folder,
    /// for inspection with e.g. `openssl x509 -text`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Certificate lifetime.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    /// Run the mesh in network namespaces with real iptables capture (needs root,
    /// iproute2 and iptables; the meshlet-control and meshlet-proxy binaries beside this one).
    #[arg(long)]
    netns: bool,
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.netns {
        return crate::netns::run().await;
    }
    let temp = tempfile::tempdir().context("creating a temporary folder")?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_owned());
    let td = TrustDomain::parse("cluster.local").expect("a valid constant trust domain");
    let config = Config::local(data_dir.clone(), td.clone(), args.cert_ttl)?;
    let listeners = Listeners::bind(config.grpc_addr, config.admin_addr).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let control = meshlet_control::run(config, listeners, async move {
        let _ = stopped.await;
    })
    .await?;

    println!("meshlet demo: a mesh on loopback (explicit mode, no root needed)\n");
    println!(
        "control plane  gRPC {} (TLS, presents {})",
        control.grpc_addr, control.identity
    );
    println!(
        "               admin http://{}/v1/certs",
        control.admin_addr
    );
    let result = async {
        identity_checks(&args, &control, &data_dir, &td).await?;
        mesh(&control, &data_dir).await
    }
    .await;
    let _ = stop.send(());
    control.wait().await?;
    match &result {
        Ok(()) => println!("\nall checks passed"),
        Err(e) => println!("\nFAILED: {e:#}"),
    }
    result
}

pub(crate) fn check(what: &str, ok: bool) -> anyhow::Result<()> {
    ensure!(ok, "check failed: {what}");
    println!("  [ok] {what}");
    Ok(())
}

/// The CA directly: a certificate for a workload, and a CSR for another identity refused.
async fn identity_checks(
    args: &DemoArgs,
    control: &meshlet_control::Running,
    data_dir: &Path,
    td: &TrustDomain,
) -> anyhow::Result<()> {
    let bundle: Vec<CertificateDer<'static>> =
        rustls::pki_types::pem::PemObject::pem_slice_iter(control.trust_bundle_pem.as_bytes())
            .collect::<Result<_, _>>()
            .context("reading the trust bundle")?;
    let grpc_tls = tls::client_config(
        tls::root_store(&bundle)?,
        Expected::Exact(control.identity.clone()),
        None,
        &[meshlet_proto::connect::GRPC_ALPN],
    )?;
    let mut client = IdentityClient::new(meshlet_proto::connect::tls_channel(
        &control.grpc_addr.to_string(),
        Arc::new(grpc_tls),
    )?);
    let signer = LocalSigner::load_or_create(data_dir)?;
    let token = signer.mint("demo", "batch", Some("batch-0"), Duration::from_secs(600))?;
    let want = SpiffeId::for_service_account(td, "demo", "batch")?;

    println!("\n1. the CA, called directly");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let response = client
        .certify(CertifyRequest {
            csr: build_csr(&key, None)?,
            token: token.clone(),
            pod_ip: String::new(),
        })
        .await
        .context("Certify over TLS")?
        .into_inner();
    let chain: Vec<CertificateDer<'static>> = response
        .certificate_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let leaf = meshlet_identity::cert::summarize(
        chain.first().context("no certificate in the response")?,
    )?;
    check(
        &format!("a token for demo/batch got {want}, serial {}", leaf.serial),
        leaf.spiffe_id.as_ref() == Some(&want),
    )?;
    let other = SpiffeId::for_service_account(td, "demo", "admin")?;
    let sneaky = build_csr(
        &rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        Some(&other),
    )?;
    match client
        .certify(CertifyRequest {
            csr: sneaky,
            token,
            pod_ip: String::new(),
        })
        .await
    {
        Err(status) if status.code() == tonic::Code::PermissionDenied => {
            check(
                &format!("a CSR asking for {other} with that token is refused"),
                true,
            )?;
        }
        other => bail!("a CSR for another identity was not refused: {other:?}"),
    }
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)?;
        let pem: String = chain
            .iter()
            .map(|c| meshlet_identity::ca::pem("CERTIFICATE", c))
            .collect();
        std::fs::write(out.join("svid.pem"), pem)?;
        std::fs::write(out.join("bundle.pem"), &control.trust_bundle_pem)?;
        println!(
            "  wrote {} and bundle.pem (certificates only; the key stayed in memory)",
            out.join("svid.pem").display()
        );
    }
    Ok(())
}

/// Starts a sidecar for `ns`/`sa` in explicit mode and waits for its certificate.
async fn sidecar(
    control: &meshlet_control::Running,
    data_dir: &Path,
    sa: &str,
    app: Option<std::net::SocketAddr>,
    routes: Vec<meshlet_proxy::Route>,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<meshlet_proxy::Running> {
    let signer = LocalSigner::load_or_create(data_dir)?;
    let token_file = data_dir.join(format!("{sa}.token"));
    write_private(
        &token_file,
        &signer.mint(
            "demo",
            sa,
            Some(&format!("{sa}-0")),
            Duration::from_secs(3600),
        )?,
    )?;
    let bundle_file = data_dir.join("trust-bundle.pem");
    std::fs::write(&bundle_file, &control.trust_bundle_pem)?;
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().expect("a valid constant address");
    let config = meshlet_proxy::Config {
        control_addr: control.grpc_addr.to_string(),
        control_identity: control.identity.clone(),
        token_file,
        trust_bundle: bundle_file,
        pod_ip: None,
        admin_addr: loopback,
        inbound_addr: loopback,
        outbound_addr: loopback,
        inbound_mode: InboundMode::Strict,
        routes,
        app_addr: app,
        drain_timeout: Duration::from_secs(5),
        sniff_timeout: Duration::from_millis(300),
        discovery_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(5),
        max_connections: 10_000,
        max_header_bytes: 64 * 1024,
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(3600),
        app_idle_timeout: Duration::from_secs(3),
        http2_max_streams: 256,
        tracing: meshlet_telemetry::traces::TraceConfig::from_env(|k| std::env::var(k).ok())?,
    };
    let listeners = meshlet_proxy::Listeners::bind(&config).await?;
    let stop = stop.clone();
    let running =
        meshlet_proxy::run(config, listeners, async move { stop.cancelled().await }).await?;
    tokio::time::timeout(Duration::from_secs(10), running.ready())
        .await
        .with_context(|| format!("the {sa} sidecar got no certificate within 10 s"))?;
    Ok(running)
}

async fn mesh(control: &meshlet_control::Running, data_dir: &Path) -> anyhow::Result<()> {
    println!("\n2. two apps and three sidecars (servers strict: mutual TLS only)");
    let orders_listener = TcpListener::bind("127.0.0.1:0").await?;
    let ledger_listener = TcpListener::bind("127.0.0.1:0").await?;
    let (orders_app, ledger_app) = (orders_listener.local_addr()?, ledger_listener.local_addr()?);
    tokio::spawn(apps::serve_http(orders_listener, "orders"));
    tokio::spawn(apps::serve_echo(ledger_listener));

    let stop = tokio_util::sync::CancellationToken::new();
    let result = async {
        let orders = sidecar(control, data_dir, "orders", Some(orders_app), vec![], &stop).await?;
        let ledger = sidecar(control, data_dir, "ledger", Some(ledger_app), vec![], &stop).await?;
        let routes = vec![route(orders.inbound_addr)?, route(ledger.inbound_addr)?];
        let frontend = sidecar(control, data_dir, "frontend", None, routes, &stop).await?;
        for (name, s) in [("frontend", &frontend), ("orders", &orders), ("ledger", &ledger)] {
            let certs: serde_json::Value = serde_json::from_str(&admin_get(s.admin_addr, "/certs").await?)?;
            println!(
                "  {name:<9} {}  expires {}  renews {}",
                certs["spiffe_id"].as_str().unwrap_or("?"),
                certs["not_after"].as_str().unwrap_or("?"),
                certs["renew_at"].as_str().unwrap_or("?")
            );
        }
        println!("  apps: orders (HTTP) {orders_app}, ledger (TCP echo) {ledger_app}; frontend routes {} and {}", frontend.route_addrs[0], frontend.route_addrs[1]);
        traffic(&frontend, &orders, &ledger).await
    }
    .await;
    stop.cancel();
    result
}

fn route(upstream: std::net::SocketAddr) -> anyhow::Result<meshlet_proxy::Route> {
    // No identity in the route: discovery says the upstream is meshed, and as whom.
    format!("127.0.0.1:0={upstream}")
        .parse::<meshlet_proxy::Route>()
        .map_err(anyhow::Error::msg)
}

async fn traffic(
    frontend: &meshlet_proxy::Running,
    orders: &meshlet_proxy::Running,
    ledger: &meshlet_proxy::Running,
) -> anyhow::Result<()> {
    let mut frontend_events = frontend.events();
    let mut ledger_events = ledger.events();

    println!("\n3. HTTP: frontend app -> frontend sidecar =mTLS=> orders sidecar -> orders app");
    let mut client = apps::HttpClient::connect(frontend.route_addrs[0]).await?;
    let mut traces = Vec::new();
    for path in ["/orders/1", "/orders/2", "/health"] {
        let trace_id = random_hex(16);
        let traceparent = format!("00-{trace_id}-{}-01", random_hex(8));
        let (status, body) = client.get_traced(path, &traceparent).await?;
        println!("  GET {path} -> {status} {body:?}  (trace {trace_id})");
        traces.push(trace_id);
        check(
            &format!("GET {path} answered by the orders app"),
            status == 200 && body == format!("orders: GET {path}"),
        )?;
    }
    drop(client);

    println!("\n4. TCP: 256 KiB through frontend =mTLS=> ledger, echoed back");
    let payload: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let back = apps::echo(frontend.route_addrs[1], &payload).await?;
    check(
        "every byte came back, in order, after a half-close",
        back == payload,
    )?;

    println!("\n5. what each side verified");
    let out_http = next_tls(&mut frontend_events, "http1").await?;
    let out_tcp = next_tls(&mut frontend_events, "opaque").await?;
    let in_tcp = next_tls(&mut ledger_events, "opaque").await?;
    for (who, e) in [
        ("frontend -> orders", &out_http),
        ("frontend -> ledger", &out_tcp),
        ("ledger <- frontend", &in_tcp),
    ] {
        let tls = e.tls.as_ref().context("a mesh connection without TLS")?;
        println!(
            "  {who}: peer {} | {} | key exchange {} | {} | {} bytes",
            tls.peer, tls.version, tls.key_exchange, e.protocol, e.bytes
        );
    }
    // HTTP between the sidecars rides a pooled connection that stays open for the next
    // requests: the orders side counts the requests it took over mutual TLS.
    let orders_mtls = orders
        .metrics
        .requests
        .get_or_create(&meshlet_proxy::metrics::RequestLabels {
            direction: Direction::inbound,
            status_code: 200,
            tls: true,
        })
        .get();
    println!(
        "  orders <- frontend: {orders_mtls} requests over one pooled HTTP/2 mutual-TLS connection"
    );
    let peer = |e: &ConnEvent| e.tls.as_ref().map(|t| t.peer.clone()).unwrap_or_default();
    check(
        "frontend verified orders as spiffe://cluster.local/ns/demo/sa/orders",
        peer(&out_http) == "spiffe://cluster.local/ns/demo/sa/orders",
    )?;
    check(
        "frontend verified ledger as spiffe://cluster.local/ns/demo/sa/ledger",
        peer(&out_tcp) == "spiffe://cluster.local/ns/demo/sa/ledger",
    )?;
    check(
        "ledger verified the client as spiffe://cluster.local/ns/demo/sa/frontend",
        peer(&in_tcp) == "spiffe://cluster.local/ns/demo/sa/frontend",
    )?;
    check(
        "orders took the 3 HTTP requests over mutual TLS",
        orders_mtls == 3,
    )?;
    let all_tls13 = [&out_http, &out_tcp, &in_tcp]
        .iter()
        .all(|e| e.tls.as_ref().is_some_and(|t| t.version == "TLSv1_3"));
    check("every hop between sidecars was TLS 1.3", all_tls13)?;

    report_traces(frontend, &traces).await?;

    println!("\n6. what must not work");
    let plain = apps::echo(orders.inbound_addr, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap_or_default();
    check(
        "a plaintext client talking straight to the orders sidecar gets nothing (strict mode)",
        plain.is_empty(),
    )?;
    Ok(())
}

/// The next finished mesh connection of `protocol` on this sidecar (within 5 s).
async fn next_tls(
    events: &mut tokio::sync::broadcast::Receiver<ConnEvent>,
    protocol: &str,
) -> anyhow::Result<ConnEvent> {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.recv().await {
                Ok(e)
                    if e.tls.is_some()
                        && e.protocol == protocol
                        && matches!(e.direction, Direction::inbound | Direction::outbound) =>
                {
                    return Ok(e);
                }
                Ok(_) => continue,
                Err(e) => bail!("connection events: {e}"),
            }
        }
    })
    .await
    .with_context(|| format!("no {protocol} mesh connection finished within 5 s"))?
}

/// A GET to an admin API on loopback; the body when the answer is 200.
pub(crate) async fn admin_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut client = apps::HttpClient::connect(addr).await?;
    let (status, body) = client.get(path).await?;
    ensure!(status == 200, "GET {path}: {status} {body}");
    Ok(body)
}

/// Says where the spans of `traces` went: exported, failed (no collector), or tracing off.
async fn report_traces(frontend: &meshlet_proxy::Running, traces: &[String]) -> anyhow::Result<()> {
    println!(
        "\n   traces (a CLIENT span in frontend's sidecar, its SERVER child in orders'): {}",
        traces.join(", ")
    );
    let Some(config) = meshlet_telemetry::traces::TraceConfig::from_env(|k| std::env::var(k).ok())?
    else {
        println!("   tracing is off (OTEL_SDK_DISABLED=true)");
        return Ok(());
    };
    let protocol = match config.protocol {
        meshlet_telemetry::traces::OtlpProtocol::Grpc => "OTLP gRPC",
        meshlet_telemetry::traces::OtlpProtocol::HttpProtobuf => "OTLP HTTP/protobuf",
    };
    // Spans leave in batches within ~200 ms; wait for the frontend's outcome (at most 3 s).
    let counters = &frontend.metrics.traces;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while counters.exported.get() + counters.export_failures.get() < traces.len() as u64
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match (counters.exported.get(), counters.export_failures.get()) {
        (0, 0) => println!(
            "   spans are still queued for {} ({protocol})",
            config.endpoint
        ),
        (ok, 0) => println!(
            "   {ok} spans exported to {} ({protocol}): open Jaeger and search for these trace IDs",
            config.endpoint
        ),
        (_, failed) => println!(
            "   {failed} spans could not be exported to {} ({protocol}): no collector there? Set OTEL_EXPORTER_OTLP_ENDPOINT (README: Tracing)",
            config.endpoint
        ),
    }
    Ok(())
}

/// `n` random bytes as lowercase hex.
fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    let _ = rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a bearer token readable by its owner only (mode 0600, set at creation).
pub(crate) fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}
