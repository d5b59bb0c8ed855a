//! The control plane started in this process on port 0, and small clients for it.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshlet_control::token::LocalSigner;
use meshlet_control::{Config, Listeners, Running};
use meshlet_identity::csr::build_csr;
use meshlet_identity::{Expected, TrustDomain, tls};
use meshlet_proto::identity::v1::identity_client::IdentityClient;
use meshlet_proto::identity::v1::{CertifyRequest, CertifyResponse};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub struct ControlPlane {
    running: Option<Running>,
    stop: Option<oneshot::Sender<()>>,
    dir: tempfile::TempDir,
}

impl ControlPlane {
    pub async fn start() -> Self {
        Self::start_in(tempfile::tempdir().unwrap()).await
    }

    pub async fn start_in(dir: tempfile::TempDir) -> Self {
        let td = TrustDomain::parse("cluster.local").unwrap();
        let mut config =
            Config::local(dir.path().to_owned(), td, Duration::from_secs(3600)).unwrap();
        // Short, so that the tests see a withdrawal soon after the grace.
        config.withdraw_grace = Duration::from_millis(300);
        let listeners = Listeners::bind(config.grpc_addr, config.admin_addr)
            .await
            .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let running = meshlet_control::run(config, listeners, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        Self {
            running: Some(running),
            stop: Some(stop),
            dir,
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(self.running().trust_bundle_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    pub fn channel_expecting(&self, expected: Expected) -> Channel {
        let roots = tls::root_store(&self.bundle()).unwrap();
        let config =
            tls::client_config(roots, expected, None, &[meshlet_proto::connect::GRPC_ALPN])
                .unwrap();
        meshlet_proto::connect::tls_channel(&self.running().grpc_addr.to_string(), Arc::new(config))
            .unwrap()
    }

    pub fn client(&self) -> IdentityClient<Channel> {
        IdentityClient::new(
            self.channel_expecting(Expected::Exact(self.running().identity.clone())),
        )
    }

    pub fn signer(&self) -> LocalSigner {
        LocalSigner::load_or_create(self.dir.path()).unwrap()
    }

    /// Certifies a fresh key as `ns`/`sa` (pod `pod`) with a good token.
    pub async fn certify_as(
        &self,
        ns: &str,
        sa: &str,
        pod: Option<&str>,
    ) -> Result<CertifyResponse, tonic::Status> {
        let token = self
            .signer()
            .mint(ns, sa, pod, Duration::from_secs(60))
            .unwrap();
        let csr = build_csr(&p256(), None).unwrap();
        let request = CertifyRequest {
            csr,
            token,
            pod_ip: String::new(),
        };
        self.client().certify(request).await.map(|r| r.into_inner())
    }

    pub async fn stop(mut self) -> tempfile::TempDir {
        let _ = self.stop.take().unwrap().send(());
        self.running.take().unwrap().wait().await.unwrap();
        self.dir
    }
}

pub fn p256() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head[9..12].parse().unwrap(), body.to_owned())
}

pub fn metric(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(line_prefix)
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

/// Polls `cond` every 20 ms until it holds: waits on a state the test can observe, never on
/// time alone. Fails naming `what` after `within`. (The sidecar's tests have the same.)
pub async fn eventually(what: &str, within: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
