//! meshlet's wire protocol, generated at build time from `proto/meshlet/**.proto`.
//!
//! # Layout
//! - [`identity::v1`]: `meshlet.identity.v1.Identity/Certify`, CSR + token in, SVID out.
//! - [`discovery::v1`]: `meshlet.discovery.v1.Discovery/Watch`, one destination's state and
//!   the trust bundle, streamed.
//! - [`connect`]: a tonic channel to the control plane over TLS.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.

/// `meshlet.identity.v1`
pub mod identity {
    /// Version 1 of the identity protocol.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("meshlet.identity.v1");
    }
}

/// `meshlet.discovery.v1`
pub mod discovery {
    /// Version 1 of the discovery protocol.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("meshlet.discovery.v1");
    }
}

/// The encoded `FileDescriptorSet` of every meshlet proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/meshlet_descriptor.bin"));

pub mod connect;
