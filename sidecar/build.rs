//! Lays out the sidecar's executable so that less of it is resident in every pod: the decision
//! and why are in `build/link_layout.rs`; the function list comes from `benches/link_order.py`.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

#[path = "build/link_layout.rs"]
mod link_layout;

const ORDER: &str = "link-order.txt";

fn main() {
    println!("cargo:rerun-if-changed={ORDER}");
    println!("cargo:rerun-if-changed=build/link_layout.rs");
    let var = |key: &str| env::var(key).unwrap_or_default();
    let ldd = Command::new("ldd")
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    let order = Path::new(&var("CARGO_MANIFEST_DIR")).join(ORDER);
    let (target, host, opt_level) = (var("TARGET"), var("HOST"), var("OPT_LEVEL"));
    let build = link_layout::Build {
        target: &target,
        host: &host,
        opt_level: &opt_level,
        glibc: link_layout::glibc_version(&ldd),
        order_file: order.exists().then_some(order.as_path()),
    };
    for group in link_layout::candidates(&build) {
        if links_with(&target, &group) {
            for arg in group {
                println!("cargo:rustc-link-arg-bins={arg}");
            }
        }
    }
}

/// Whether an empty program links with these arguments, through the compiler, linker and flags
/// of this build: the linker says whether it takes them.
fn links_with(target: &str, args: &[String]) -> bool {
    let Some(out) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        return false;
    };
    let source = out.join("link_probe.rs");
    if fs::write(&source, "fn main() {}\n").is_err() {
        return false;
    }
    let mut rustc = Command::new(env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc")));
    rustc
        .args([
            "--edition=2021",
            "--crate-type=bin",
            "--target",
            target,
            "-o",
        ])
        .arg(out.join("link_probe"))
        .arg(&source);
    if let Some(linker) = env::var_os("RUSTC_LINKER") {
        rustc
            .arg("-C")
            .arg(format!("linker={}", linker.to_string_lossy()));
    }
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    rustc.args(flags.split('\x1f').filter(|flag| !flag.is_empty()));
    rustc.args(args.iter().map(|arg| format!("-Clink-arg={arg}")));
    rustc
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
