//! Compiles the .proto files with protox (pure Rust), so `cargo build` needs no protoc.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "meshlet/identity/v1/identity.proto",
    "meshlet/discovery/v1/discovery.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // The encoded descriptor set feeds gRPC server reflection.
    std::fs::write(
        out.join("meshlet_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
