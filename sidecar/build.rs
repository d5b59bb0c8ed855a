//! Lays out the sidecar's executable so that less of it is resident in every pod: the decision
//! and why are in `build/link_layout.rs`; the function list comes from `benches/link_order.py`.

use std::{env, path::Path, process::Command};

#[path = "build/link_layout.rs"]
mod link_layout;

const ORDER: &str = "link-order.txt";

fn main() {
    println!("cargo:rerun-if-changed={ORDER}");
    println!("cargo:rerun-if-changed=build/link_layout.rs");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let var = |key: &str| env::var(key).unwrap_or_default();
    let output = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default()
    };
    let order = Path::new(&var("CARGO_MANIFEST_DIR")).join(ORDER);
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    let (target, host, opt_level) = (var("TARGET"), var("HOST"), var("OPT_LEVEL"));
    let build = link_layout::Build {
        target: &target,
        host: &host,
        opt_level: &opt_level,
        rustc_minor: link_layout::rustc_minor(&output(&var("RUSTC"), "--version")),
        linker_chosen: env::var_os("RUSTC_LINKER").is_some()
            || flags.contains("linker")
            || flags.contains("fuse-ld"),
        glibc: link_layout::glibc_version(&output("ldd", "--version")),
        order_file: order.exists().then_some(order.as_path()),
    };
    for arg in link_layout::link_args(&build) {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
