//! A mesh in one process: the real control plane, real sidecars in explicit mode and small
//! apps, all on loopback with port 0. Each piece stops when its handle says so.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod child;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshlet_control::token::LocalSigner;
use meshlet_identity::TrustDomain;
use meshlet_proxy::inbound::InboundMode;
use meshlet_proxy::{Config, Listeners, Route};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub struct ControlPlane {
    pub running: Option<meshlet_control::Running>,
    stop: Option<oneshot::Sender<()>>,
    pub dir: tempfile::TempDir,
    pub bundle_file: PathBuf,
    /// The gRPC address, kept across stop and restart.
    grpc: SocketAddr,
}

impl ControlPlane {
    pub async fn start(cert_ttl: Duration) -> Self {
        Self::start_with(cert_ttl, None).await
    }

    /// Starts a control plane enforcing the policy file `policy` (YAML or JSON), if given.
    pub async fn start_with(cert_ttl: Duration, policy: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::parse("cluster.local").unwrap();
        let mut config =
            meshlet_control::Config::local(dir.path().to_owned(), td, cert_ttl).unwrap();
        if let Some(policy) = policy {
            let path = dir.path().join("policy.yaml");
            std::fs::write(&path, policy).unwrap();
            config.policy_file = Some(path);
        }
        let listeners = meshlet_control::Listeners::bind(config.grpc_addr, config.admin_addr)
            .await
            .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let running = meshlet_control::run(config, listeners, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        let bundle_file = dir.path().join("bundle.pem");
        std::fs::write(&bundle_file, &running.trust_bundle_pem).unwrap();
        Self {
            grpc: running.grpc_addr,
            running: Some(running),
            stop: Some(stop),
            dir,
            bundle_file,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.grpc
    }

    /// Writes a token for `ns`/`sa` into a file and returns its path.
    pub fn token_file(&self, ns: &str, sa: &str) -> PathBuf {
        let signer = LocalSigner::load_or_create(self.dir.path()).unwrap();
        let token = signer
            .mint(ns, sa, Some(&format!("{sa}-0")), Duration::from_secs(3600))
            .unwrap();
        let path = self.dir.path().join(format!("{ns}-{sa}.token"));
        std::fs::write(&path, token).unwrap();
        path
    }

    /// What discovery says about `address` now: the SPIFFE ID it is meshed as, if any.
    pub async fn discovered(&self, address: SocketAddr) -> Option<String> {
        use meshlet_proto::discovery::v1::{WatchRequest, discovery_client::DiscoveryClient};
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let pem = std::fs::read(&self.bundle_file).unwrap();
        let bundle: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .unwrap();
        let tls = meshlet_identity::tls::client_config(
            meshlet_identity::tls::root_store(&bundle).unwrap(),
            meshlet_identity::Expected::Exact(self.running.as_ref()?.identity.clone()),
            None,
            &[meshlet_proto::connect::GRPC_ALPN],
        )
        .unwrap();
        let channel =
            meshlet_proto::connect::tls_channel(&self.addr().to_string(), std::sync::Arc::new(tls))
                .unwrap();
        let request = WatchRequest {
            token: std::fs::read_to_string(self.token_file("demo", "observer")).unwrap(),
            address: address.to_string(),
            announce: String::new(),
        };
        let mut stream = DiscoveryClient::new(channel)
            .watch(request)
            .await
            .ok()?
            .into_inner();
        let first = stream.message().await.ok()??;
        first.endpoint.filter(|e| e.meshed).map(|e| e.identity)
    }

    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            self.running.take().unwrap().wait().await.unwrap();
        }
    }

    /// Stops (if running) and starts again on the same gRPC address with the same CA: a
    /// fresh process, whose registry of issued certificates is empty.
    pub async fn restart(&mut self) {
        let grpc = self.addr();
        self.stop().await;
        let td = TrustDomain::parse("cluster.local").unwrap();
        let config = meshlet_control::Config::local(
            self.dir.path().to_owned(),
            td,
            Duration::from_secs(3600),
        )
        .unwrap();
        let listeners = meshlet_control::Listeners {
            grpc: TcpListener::bind(grpc).await.unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            webhook: None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let running = meshlet_control::run(config, listeners, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        self.running = Some(running);
        self.stop = Some(stop);
    }
}

/// Client sidecar A (demo/client) routes to server sidecar B (demo/server, `b_mode`) in
/// front of `app`; the route names `route_identity`, or leaves it to discovery.
pub async fn pair(
    cp: &ControlPlane,
    app: SocketAddr,
    b_mode: InboundMode,
    route_identity: Option<&str>,
) -> (Sidecar, Sidecar) {
    pair_with(cp, server_config(cp, app, b_mode), route_identity).await
}

/// The configuration of server sidecar B (demo/server) in front of `app`.
pub fn server_config(cp: &ControlPlane, app: SocketAddr, mode: InboundMode) -> Config {
    let mut b = sidecar_config(cp, cp.token_file("demo", "server"));
    b.app_addr = Some(app);
    b.inbound_mode = mode;
    b
}

/// Client sidecar A (demo/client) routes to server sidecar B, started from `b`; the route
/// names `route_identity`, or leaves it to discovery.
pub async fn pair_with(
    cp: &ControlPlane,
    b: Config,
    route_identity: Option<&str>,
) -> (Sidecar, Sidecar) {
    let b = Sidecar::start_ready(b).await;
    let mut a = sidecar_config(cp, cp.token_file("demo", "client"));
    a.routes = vec![route(b.r().inbound_addr, route_identity)];
    let a = Sidecar::start_ready(a).await;
    (a, b)
}

/// A sidecar configuration for explicit mode on loopback.
pub fn sidecar_config(cp: &ControlPlane, token_file: PathBuf) -> Config {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Config {
        control_addr: cp.addr().to_string(),
        control_identity: cp.running.as_ref().unwrap().identity.clone(),
        token_file,
        trust_bundle: cp.bundle_file.clone(),
        pod_ip: None,
        admin_addr: any,
        inbound_addr: any,
        outbound_addr: any,
        inbound_mode: InboundMode::Permissive,
        routes: vec![],
        app_addr: None,
        drain_timeout: Duration::from_secs(5),
        sniff_timeout: Duration::from_millis(300),
        discovery_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        max_connections: 10_000,
        max_header_bytes: 64 * 1024,
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(3600),
        app_idle_timeout: Duration::from_secs(3),
        http2_max_streams: 256,
        tracing: None,
    }
}

pub struct Sidecar {
    pub running: Option<meshlet_proxy::Running>,
    stop: Option<oneshot::Sender<()>>,
}

impl Sidecar {
    pub async fn start(config: Config) -> Self {
        let listeners = Listeners::bind(&config).await.unwrap();
        Self::start_on(config, listeners).await
    }

    /// Starts on listeners the test bound itself (to know their addresses beforehand).
    pub async fn start_on(config: Config, listeners: Listeners) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let running = meshlet_proxy::run(config, listeners, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        Self {
            running: Some(running),
            stop: Some(stop),
        }
    }

    /// Starts and waits for the first certificate (at most 10 s).
    pub async fn start_ready(config: Config) -> Self {
        let s = Self::start(config).await;
        tokio::time::timeout(Duration::from_secs(10), s.r().ready())
            .await
            .expect("a certificate within 10 s");
        s
    }

    pub fn r(&self) -> &meshlet_proxy::Running {
        self.running.as_ref().unwrap()
    }

    pub fn route(&self, i: usize) -> SocketAddr {
        self.r().route_addrs[i]
    }

    /// Waits until the control plane's policy named `name` has reached this sidecar.
    pub async fn wait_for_policy(&self, name: &str) {
        let (admin, quoted) = (self.r().admin_addr, format!("\"{name}\""));
        eventually(
            &format!("policy {name} reaches the sidecar"),
            Duration::from_secs(5),
            async || http_get(admin, "/policy").await.1.contains(&quoted),
        )
        .await;
    }

    pub async fn metrics(&self) -> String {
        http_get(self.r().admin_addr, "/metrics").await.1
    }

    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            tokio::time::timeout(Duration::from_secs(10), self.running.take().unwrap().wait())
                .await
                .unwrap();
        }
    }
}

pub fn route(upstream: SocketAddr, identity: Option<&str>) -> Route {
    Route {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream,
        identity: identity.map(|i| i.parse().unwrap()),
    }
}

/// An HTTP app answering `<name> <method> <path>` (and the request body) to every request.
pub async fn http_app(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        let head = format!("{name} {} {}", req.method(), req.uri().path());
                        let body = req.into_body().collect().await?.to_bytes();
                        let mut out = head.into_bytes();
                        if !body.is_empty() {
                            out.extend_from_slice(b" ");
                            out.extend_from_slice(&body);
                        }
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from(out))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            });
        }
    });
    addr
}

/// A TCP app that echoes everything until the client half-closes, then closes.
pub async fn echo_app() -> SocketAddr {
    echo_app_on("127.0.0.1").await
}

/// [`echo_app`] on another loopback address, such as `127.0.0.77`.
pub async fn echo_app_on(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A TCP app that speaks first: it greets, then echoes.
pub async fn greeting_app(greeting: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.write_all(greeting).await;
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Sends `payload`, half-closes, and reads everything back.
pub async fn echo_round_trip(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(addr).await?;
    let (mut r, mut w) = tcp.split();
    let write = async {
        w.write_all(payload).await?;
        w.shutdown().await
    };
    let mut back = Vec::new();
    let read = r.read_to_end(&mut back);
    let (wrote, read) =
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(write, read) })
            .await
            .map_err(|_| std::io::Error::other("timed out"))?;
    wrote?;
    read?;
    Ok(back)
}

/// GETs `path` over a fresh HTTP/1.1 connection: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut client = HttpClient::connect(addr).await.unwrap();
    client.get(path).await.unwrap()
}

/// An HTTP/1.1 client keeping one connection open.
pub struct HttpClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl HttpClient {
    pub async fn connect(
        addr: SocketAddr,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let tcp = TcpStream::connect(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(Self { sender })
    }

    pub async fn get(
        &mut self,
        path: &str,
    ) -> Result<(u16, String), Box<dyn std::error::Error + Send + Sync>> {
        self.request("GET", path, Bytes::new()).await
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, String), Box<dyn std::error::Error + Send + Sync>> {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "app")
            .body(Full::new(body))?;
        self.send(req).await
    }

    /// Sends `req` on the connection and reads the answer whole: (status, body).
    pub async fn send(
        &mut self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<(u16, String), Box<dyn std::error::Error + Send + Sync>> {
        self.sender.ready().await?;
        let resp =
            tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(req)).await??;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Waits (at most 10 s) for the response `sent` and reads it whole: (status, body).
pub async fn answer(
    sent: impl std::future::Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>>,
) -> (u16, String) {
    let resp = tokio::time::timeout(Duration::from_secs(10), sent)
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// GETs `uri` (absolute: it names the authority) over a fresh prior-knowledge HTTP/2
/// connection to `addr`: (status, body).
pub async fn h2_get(addr: SocketAddr, uri: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(uri)
        .body(Full::new(Bytes::new()))
        .unwrap();
    answer(sender.send_request(req)).await
}

/// The value of the first metric line starting with `prefix` (0 when absent).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(prefix)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// Asserts that the sample `series` in the metrics text `m` is `want`; shows `m` if not.
#[track_caller]
pub fn assert_metric(m: &str, series: &str, want: f64) {
    assert_eq!(metric(m, series), want, "{series}:\n{m}");
}

/// Asserts that `s`, which has no certificate, sends nothing of an app connection on its
/// first route out (never fail open) and counts it as refused for that (once, so far).
pub async fn assert_refused_without_certificate(s: &Sidecar) {
    let result = echo_round_trip(s.route(0), b"no certificate yet").await;
    assert!(
        result.map(|b| b.is_empty()).unwrap_or(true),
        "traffic went out without a certificate"
    );
    assert_metric(
        &s.metrics().await,
        r#"meshlet_connections_refused_total{direction="outbound",reason="no_certificate"}"#,
        1.0,
    );
}

/// Polls `cond` every 20 ms until it holds: waits on a state the test can observe, never on
/// time alone. Fails naming `what` after `within`.
pub async fn eventually(what: &str, within: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first flight of a real TLS 1.3 client offering the mesh ALPN (a ClientHello).
pub fn mesh_client_hello() -> Vec<u8> {
    client_hello(&[meshlet_identity::MESH_ALPN])
}

/// The first flight of a real TLS 1.3 client offering `alpn` (a ClientHello).
pub fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from("mesh.invalid").unwrap();
    let mut client = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    hello
}
