//! `meshletctl demo`: the identity round trip on loopback, checked step by step.
//!
//! It starts a control plane in this process (CA in a fresh folder unless `--data-dir`),
//! mints a workload token, makes a key and a CSR, calls `Identity/Certify` over TLS
//! (verifying the control plane by its SPIFFE ID), and checks what came back. It exits
//! non-zero naming the first check that failed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use meshlet_control::token::LocalSigner;
use meshlet_control::{Config, Listeners};
use meshlet_identity::csr::build_csr;
use meshlet_identity::{Expected, SpiffeId, TrustDomain, cert, tls};
use meshlet_proto::identity::v1::CertifyRequest;
use meshlet_proto::identity::v1::identity_client::IdentityClient;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use time::OffsetDateTime;

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Keep the CA here (reused on the next run); default: a fresh temporary folder.
    #[arg(long, env = "MESHLET_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Write the issued certificate chain (PEM, no key) to this folder, for inspection
    /// with e.g. `openssl x509 -text`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Certificate lifetime.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
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

    println!("meshlet demo: identity round trip on loopback\n");
    println!("control plane");
    println!(
        "  gRPC (TLS)   {}  presents {}",
        control.grpc_addr, control.identity
    );
    println!("  admin        http://{}/v1/certs", control.admin_addr);
    println!("  CA folder    {}", data_dir.join("ca").display());

    let result = round_trip(&args, &control, &data_dir, &td).await;
    let _ = stop.send(());
    control.wait().await?;
    match &result {
        Ok(()) => println!("\nall checks passed"),
        Err(e) => println!("\nFAILED: {e:#}"),
    }
    result
}

async fn round_trip(
    args: &DemoArgs,
    control: &meshlet_control::Running,
    data_dir: &std::path::Path,
    td: &TrustDomain,
) -> anyhow::Result<()> {
    let bundle: Vec<CertificateDer<'static>> =
        rustls::pki_types::pem::PemObject::pem_slice_iter(control.trust_bundle_pem.as_bytes())
            .collect::<Result<_, _>>()
            .context("reading the trust bundle")?;
    let roots = tls::root_store(&bundle)?;
    let grpc_tls = tls::client_config(
        roots.clone(),
        Expected::Exact(control.identity.clone()),
        None,
        &[meshlet_proto::connect::GRPC_ALPN],
    )?;
    let mut client = IdentityClient::new(meshlet_proto::connect::tls_channel(
        &control.grpc_addr.to_string(),
        Arc::new(grpc_tls),
    )?);

    let signer = LocalSigner::load_or_create(data_dir)?;
    let (ns, sa) = ("demo", "web");
    let token = signer.mint(ns, sa, Some("web-0"), Duration::from_secs(600))?;
    let want = SpiffeId::for_service_account(td, ns, sa)?;
    println!("\nworkload {ns}/{sa} (pod web-0)");
    println!("  token        minted with the local signing key, audience \"meshlet\"");

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = build_csr(&key, None)?;
    println!(
        "  key + CSR    ECDSA P-256, made in memory ({} byte CSR)",
        csr.len()
    );
    let response = client
        .certify(CertifyRequest {
            csr,
            token: token.clone(),
            pod_ip: "127.0.0.1".into(),
        })
        .await
        .context("Certify over TLS")?
        .into_inner();
    check(
        "the control plane's TLS certificate carried its SPIFFE ID",
        true,
    )?;

    let chain: Vec<CertificateDer<'static>> = response
        .certificate_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let leaf = chain.first().context("the response has no certificate")?;
    let summary = cert::summarize(leaf)?;
    println!(
        "  certificate  {}",
        summary
            .spiffe_id
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    println!("               serial {}", summary.serial);
    println!(
        "               valid {} .. {}",
        rfc3339(summary.not_before),
        rfc3339(summary.not_after)
    );
    check(
        &format!("the certificate names {want}"),
        summary.spiffe_id.as_ref() == Some(&want),
    )?;
    check(
        "expires_at_unix matches the certificate",
        response.expires_at_unix == summary.not_after.unix_timestamp(),
    )?;
    let verifier = meshlet_identity::verify::SpiffeServerVerifier::new(
        roots,
        Expected::Exact(want.clone()),
        &tls::provider(),
    );
    let name = ServerName::try_from("demo.invalid")?;
    let verified = verifier.verify_server_cert(leaf, &chain[1..], &name, &[], UnixTime::now());
    check(
        "the chain verifies against the trust bundle (rustls-webpki) with the X509-SVID rules",
        verified.is_ok(),
    )?;
    check(
        "the trust bundle in the response is the CA's",
        response
            .trust_bundle
            .iter()
            .map(|c| &c[..])
            .eq(bundle.iter().map(|c| &c[..])),
    )?;

    // The identity comes from the token, never from the CSR.
    let other = SpiffeId::for_service_account(td, ns, "admin")?;
    let sneaky = build_csr(
        &rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        Some(&other),
    )?;
    let refused = client
        .certify(CertifyRequest {
            csr: sneaky,
            token,
            pod_ip: String::new(),
        })
        .await;
    match refused {
        Err(status) if status.code() == tonic::Code::PermissionDenied => {
            check(
                &format!("a CSR asking for {other} is refused: {}", status.message()),
                true,
            )?;
        }
        other => bail!("a CSR for another identity was not refused: {other:?}"),
    }

    let certs = http_get(control.admin_addr, "/v1/certs").await?;
    let listed = certs.contains(want.as_str()) && certs.contains("\"state\":\"valid\"");
    println!("\nadmin API /v1/certs\n  {certs}");
    check(
        "the control plane lists the workload's certificate as valid",
        listed,
    )?;

    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)?;
        let pem: String = chain
            .iter()
            .map(|c| meshlet_identity::ca::pem("CERTIFICATE", c))
            .collect();
        std::fs::write(out.join("svid.pem"), pem)?;
        std::fs::write(out.join("bundle.pem"), &control.trust_bundle_pem)?;
        println!(
            "\nwrote {} and bundle.pem (certificates only; the key stayed in memory)",
            out.join("svid.pem").display()
        );
    }
    Ok(())
}

fn check(what: &str, ok: bool) -> anyhow::Result<()> {
    ensure!(ok, "check failed: {what}");
    println!("  [ok] {what}");
    Ok(())
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// A minimal HTTP/1.0 GET to the admin API on loopback.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: meshlet\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8(buf)?;
    match text.split_once("\r\n\r\n") {
        Some((head, body))
            if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") =>
        {
            Ok(body.to_owned())
        }
        _ => bail!("GET {path}: unexpected answer {text:?}"),
    }
}
