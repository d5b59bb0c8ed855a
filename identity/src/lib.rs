//! meshlet's identity layer: SPIFFE IDs, the CA that issues X509-SVIDs, and the rustls
//! pieces that check a peer's SPIFFE ID. Shared by the control plane and the sidecar.
//!
//! # Layout
//! - [`spiffe`]: [`SpiffeId`] and [`TrustDomain`], parsed once by the SPIFFE-ID spec.
//! - [`ca`]: the root + intermediate CA on disk, and SVID issuance.
//! - [`csr`]: the checks a CSR passes before its key is signed; building a CSR.
//! - [`cert`]: X509-SVID leaf rules and certificate summaries for status APIs.
//! - [`verify`]: rustls verifiers: webpki chain validation, then the SPIFFE ID check.
//! - [`tls`]: TLS 1.3-only rustls configurations built from the above.
//! - [`authz`]: the authorization policy model and its decisions (pure).

pub mod authz;
pub mod ca;
pub mod cert;
pub mod csr;
pub mod spiffe;
pub mod tls;
pub mod verify;

pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use verify::Expected;

/// The ALPN protocol that marks a connection between meshlet sidecars.
pub const MESH_ALPN: &[u8] = b"meshlet/1";

/// The ALPN protocol of a pooled connection between sidecars: HTTP/2 carrying the HTTP
/// requests of many app connections, each stream saying its original protocol in the
/// `meshlet-orig-proto` header. A sidecar that does not know it negotiates [`MESH_ALPN`].
pub const POOLED_ALPN: &[u8] = b"meshlet/h2";
