//! Which linker arguments lay out the sidecar's executable so that less of it is resident.
//!
//! A pure decision, shared by `build.rs` and its table test (`tests/link_layout.rs`):
//!
//! - `--symbol-ordering-file=link-order.txt` puts the functions a sidecar runs together at the
//!   start of the code. The kernel maps code 64 KB around each page a process touches; spread
//!   over the executable, the functions that run made nearly all of it resident.
//! - `-z pack-relative-relocs` stores the 12,600 relocations of a position-independent
//!   executable in 7 KB instead of 302 KB, which the loader reads at every start.
//!
//! Each group is a candidate: `build.rs` links a small program with it first and passes it on
//! only if that works, as only some linkers take it (lld takes both; rustup's Rust links x86_64
//! Linux with its own lld from 1.90 on; GNU ld takes only the second, from 2.38). Only glibc
//! 2.36 and later load packed relocations: the executable then names the glibc version it needs
//! (`GLIBC_ABI_DT_RELR`), so an older one refuses it with that name instead of crashing.

use std::path::Path;

/// What the build script knows about this build.
#[derive(Debug, Clone)]
pub(crate) struct Build<'a> {
    /// Cargo's `TARGET` and `HOST` triples.
    pub(crate) target: &'a str,
    pub(crate) host: &'a str,
    /// Cargo's `OPT_LEVEL`: "0" for the dev profile.
    pub(crate) opt_level: &'a str,
    /// The glibc of the machine that builds, (major, minor), if it could be read.
    pub(crate) glibc: Option<(u32, u32)>,
    /// The ordering file, if the package has one.
    pub(crate) order_file: Option<&'a Path>,
}

/// The groups of `cargo:rustc-link-arg-bins` arguments to try, in order; none for a dev build.
pub(crate) fn candidates(build: &Build<'_>) -> Vec<Vec<String>> {
    if build.opt_level == "0" {
        return Vec::new();
    }
    let mut groups = Vec::new();
    if let Some(order) = build.order_file {
        groups.push(vec![
            format!("-Wl,--symbol-ordering-file={}", order.display()),
            // A name the build does not have (a stale list) costs memory, not a failed build.
            "-Wl,--no-warn-symbol-ordering".to_owned(),
        ]);
    }
    // Run where it is built (the demo, the benchmarks) or in the image, built on the same glibc.
    let glibc_target = build.target.ends_with("-linux-gnu");
    if glibc_target && build.host == build.target && build.glibc.is_some_and(|v| v >= (2, 36)) {
        groups.push(vec!["-Wl,-z,pack-relative-relocs".to_owned()]);
    }
    groups
}

/// "ldd (Debian GLIBC 2.36-9+deb12u14) 2.36" → (2, 36): the last word of the first line.
pub(crate) fn glibc_version(ldd_version: &str) -> Option<(u32, u32)> {
    let version = ldd_version.lines().next()?.split_whitespace().last()?;
    let (major, minor) = version.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}
