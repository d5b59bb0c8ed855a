//! Which linker arguments lay out the sidecar's executable so that less of it is resident.
//!
//! A pure decision, shared by `build.rs` and its table test (`tests/link_layout.rs`):
//!
//! - `--symbol-ordering-file=link-order.txt` puts the functions a sidecar runs together at the
//!   start of the code. The kernel maps code 64 KB around each page a process touches; spread
//!   over the executable, the functions that run made nearly all of it resident.
//! - `-z pack-relative-relocs` stores the 12,000 relocations of a position-independent
//!   executable in a few KB instead of 300 KB, which the loader reads at every start.
//!
//! Only lld takes the first (rustc's own lld links x86_64 Linux by default from Rust 1.90), and
//! only glibc 2.36 and later load the second: the executable then names the glibc version it
//! needs (`GLIBC_ABI_DT_RELR`), so an older one refuses it with that name instead of crashing.

use std::path::Path;

/// What the build script knows about this build.
#[derive(Debug, Clone)]
pub(crate) struct Build<'a> {
    /// Cargo's `TARGET` and `HOST` triples.
    pub(crate) target: &'a str,
    pub(crate) host: &'a str,
    /// Cargo's `OPT_LEVEL`: "0" for the dev profile.
    pub(crate) opt_level: &'a str,
    /// The minor version of rustc (`1.N`), if it could be read.
    pub(crate) rustc_minor: Option<u32>,
    /// A linker chosen instead of rustc's default (`RUSTC_LINKER`, or linker flags).
    pub(crate) linker_chosen: bool,
    /// The glibc of the machine that builds, (major, minor), if it could be read.
    pub(crate) glibc: Option<(u32, u32)>,
    /// The ordering file, if the package has one.
    pub(crate) order_file: Option<&'a Path>,
}

/// The arguments for `cargo:rustc-link-arg-bins`, in order; empty where nothing applies.
pub(crate) fn link_args(build: &Build<'_>) -> Vec<String> {
    let lld = build.target == "x86_64-unknown-linux-gnu"
        && build.opt_level != "0"
        && build.rustc_minor.is_some_and(|minor| minor >= 90)
        && !build.linker_chosen;
    if !lld {
        return Vec::new();
    }
    let mut args = Vec::new();
    if let Some(order) = build.order_file {
        args.push(format!("-Wl,--symbol-ordering-file={}", order.display()));
        // A name the build does not have (a stale list) costs memory, not a failed build.
        args.push("-Wl,--no-warn-symbol-ordering".to_owned());
    }
    // Run where it is built (the demo, the benchmarks) or in the image, built on the same glibc.
    if build.host == build.target && build.glibc.is_some_and(|v| v >= (2, 36)) {
        args.push("-Wl,-z,pack-relative-relocs".to_owned());
    }
    args
}

/// "rustc 1.95.0 (59807616e 2026-04-14)" → 95.
pub(crate) fn rustc_minor(version: &str) -> Option<u32> {
    version
        .split_whitespace()
        .nth(1)?
        .split('.')
        .nth(1)?
        .parse()
        .ok()
}

/// "ldd (Debian GLIBC 2.36-9+deb12u14) 2.36" → (2, 36): the last word of the first line.
pub(crate) fn glibc_version(ldd_version: &str) -> Option<(u32, u32)> {
    let version = ldd_version.lines().next()?.split_whitespace().last()?;
    let (major, minor) = version.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}
