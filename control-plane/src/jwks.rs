//! Fetching a JWKS over HTTP(S), such as a cluster's `/openid/v1/jwks`.
//!
//! HTTPS verifies the server's host name against `--jwks-ca-file` (in a pod: the service
//! account's `ca.crt`); a bearer token file (the pod's own token) is sent when given.

use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;

/// The largest JWKS document we read.
const MAX_JWKS_LEN: usize = 1 << 20;

/// Where and how to fetch the JWKS.
#[derive(Debug, Clone)]
pub struct JwksSource {
    pub url: http::Uri,
    pub ca_file: Option<PathBuf>,
    pub bearer_token_file: Option<PathBuf>,
}

/// Why the JWKS could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("--jwks-url {0}: {1}")]
    Url(String, &'static str),
    #[error("{0}: {1}")]
    File(PathBuf, std::io::Error),
    #[error("--jwks-ca-file: {0}")]
    Tls(String),
    #[error("fetching the JWKS: {0}")]
    Fetch(String),
    #[error("the JWKS server answered {0}")]
    Status(http::StatusCode),
}

impl JwksSource {
    /// Fetches the document once, within 10 s.
    pub async fn fetch(&self) -> Result<Vec<u8>, JwksError> {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.fetch_unbounded())
            .await
            .map_err(|_| JwksError::Fetch("no answer within 10 s".into()))?
    }

    async fn fetch_unbounded(&self) -> Result<Vec<u8>, JwksError> {
        let url = &self.url;
        let https = match url.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(JwksError::Url(
                    url.to_string(),
                    "the scheme must be http or https",
                ));
            }
        };
        let host = url
            .host()
            .ok_or_else(|| JwksError::Url(url.to_string(), "no host"))?
            .to_owned();
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let mut request =
            http::Request::get(url.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
                .header(http::header::HOST, &host)
                .header(http::header::ACCEPT, "application/json");
        if let Some(file) = &self.bearer_token_file {
            let token =
                std::fs::read_to_string(file).map_err(|e| JwksError::File(file.clone(), e))?;
            request = request.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            );
        }
        let request = request
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| JwksError::Fetch(e.to_string()))?;
        let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| JwksError::Fetch(e.to_string()))?;
        let response = if https {
            let tls = self.tls_config()?;
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|_| JwksError::Url(url.to_string(), "the host is not a valid TLS name"))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| JwksError::Fetch(e.to_string()))?;
            send(stream, request).await?
        } else {
            send(tcp, request).await?
        };
        Ok(response)
    }

    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, JwksError> {
        let file = self
            .ca_file
            .as_ref()
            .ok_or_else(|| JwksError::Tls("required for an https JWKS URL".into()))?;
        let pem = std::fs::read(file).map_err(|e| JwksError::File(file.clone(), e))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| JwksError::Tls(e.to_string()))?;
            roots.add(cert).map_err(|e| JwksError::Tls(e.to_string()))?;
        }
        // TLS 1.3 only, like the rest of the mesh; every supported Kubernetes API server has it.
        let config = rustls::ClientConfig::builder_with_provider(meshlet_identity::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| JwksError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

async fn send<S>(
    stream: S,
    request: http::Request<Empty<bytes::Bytes>>,
) -> Result<Vec<u8>, JwksError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let fetch = |e: hyper::Error| JwksError::Fetch(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(fetch)?;
    let conn = tokio::spawn(conn);
    let response = sender.send_request(request).await.map_err(fetch)?;
    if !response.status().is_success() {
        conn.abort();
        return Err(JwksError::Status(response.status()));
    }
    let body = Limited::new(response.into_body(), MAX_JWKS_LEN)
        .collect()
        .await
        .map_err(|e| JwksError::Fetch(e.to_string()))?;
    conn.abort();
    Ok(body.to_bytes().to_vec())
}
