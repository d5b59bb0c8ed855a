//! The build script's candidate linker arguments (`build/link_layout.rs`), as a table. Whether
//! the linker takes them is tried at build time; CI checks the result in the image's build
//! (`benches/link_order.py --check`).

#[path = "../build/link_layout.rs"]
mod link_layout;

use link_layout::{Build, candidates, glibc_version};
use std::path::Path;

const X86: &str = "x86_64-unknown-linux-gnu";
const ARM: &str = "aarch64-unknown-linux-gnu";
const ORDER: &str = "-Wl,--symbol-ordering-file=/src/sidecar/link-order.txt";
const NO_WARN: &str = "-Wl,--no-warn-symbol-ordering";
const RELR: &str = "-Wl,-z,pack-relative-relocs";

fn dist() -> Build<'static> {
    Build {
        target: X86,
        host: X86,
        opt_level: "s",
        glibc: Some((2, 36)),
        order_file: Some(Path::new("/src/sidecar/link-order.txt")),
    }
}

#[test]
fn candidates_for_optimized_builds_relocations_only_for_glibc_2_36_here() {
    let both = vec![vec![ORDER, NO_WARN], vec![RELR]];
    let order_only = vec![vec![ORDER, NO_WARN]];
    let cases: Vec<(&str, Build<'static>, Vec<Vec<&str>>)> = vec![
        ("the image's build", dist(), both.clone()),
        (
            "release profile",
            Build {
                opt_level: "3",
                ..dist()
            },
            both.clone(),
        ),
        (
            "dev profile",
            Build {
                opt_level: "0",
                ..dist()
            },
            vec![],
        ),
        (
            "no ordering file",
            Build {
                order_file: None,
                ..dist()
            },
            vec![vec![RELR]],
        ),
        (
            "glibc 2.35 (Ubuntu 22.04)",
            Build {
                glibc: Some((2, 35)),
                ..dist()
            },
            order_only.clone(),
        ),
        (
            "glibc unknown",
            Build {
                glibc: None,
                ..dist()
            },
            order_only.clone(),
        ),
        (
            "a newer glibc",
            Build {
                glibc: Some((3, 0)),
                ..dist()
            },
            both.clone(),
        ),
        (
            "cross build",
            Build {
                host: ARM,
                ..dist()
            },
            order_only.clone(),
        ),
        (
            "arm64, native",
            Build {
                target: ARM,
                host: ARM,
                ..dist()
            },
            both.clone(),
        ),
        (
            "musl",
            Build {
                target: "x86_64-unknown-linux-musl",
                ..dist()
            },
            order_only.clone(),
        ),
    ];
    for (what, build, want) in cases {
        let want: Vec<Vec<String>> = want
            .iter()
            .map(|group| group.iter().map(|arg| (*arg).to_owned()).collect())
            .collect();
        assert_eq!(candidates(&build), want, "{what}");
    }
}

#[test]
fn glibc_version_is_read_from_ldd() {
    let debian = "ldd (Debian GLIBC 2.36-9+deb12u14) 2.36\nCopyright (C) 2022\n";
    assert_eq!(glibc_version(debian), Some((2, 36)));
    assert_eq!(
        glibc_version("ldd (Ubuntu GLIBC 2.35-0ubuntu3.8) 2.35"),
        Some((2, 35))
    );
    // musl's ldd prints its usage to stderr, nothing on stdout
    assert_eq!(glibc_version(""), None);
    assert_eq!(glibc_version("ldd 1.2.3.4"), None);
}
