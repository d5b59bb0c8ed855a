//! The build script's choice of linker arguments (`build/link_layout.rs`), as a table.

#[path = "../build/link_layout.rs"]
mod link_layout;

use link_layout::{Build, glibc_version, link_args, rustc_minor};
use std::path::Path;

const X86: &str = "x86_64-unknown-linux-gnu";
const ORDERED: [&str; 2] = [
    "-Wl,--symbol-ordering-file=/src/sidecar/link-order.txt",
    "-Wl,--no-warn-symbol-ordering",
];
const RELR: &str = "-Wl,-z,pack-relative-relocs";

fn dist() -> Build<'static> {
    Build {
        target: X86,
        host: X86,
        opt_level: "s",
        rustc_minor: Some(95),
        linker_chosen: false,
        glibc: Some((2, 36)),
        order_file: Some(Path::new("/src/sidecar/link-order.txt")),
    }
}

#[test]
fn link_arguments_only_where_lld_links_an_optimized_build() {
    let all: Vec<&str> = ORDERED.iter().copied().chain([RELR]).collect();
    let cases: Vec<(&str, Build<'static>, Vec<&str>)> = vec![
        ("the image's build", dist(), all.clone()),
        (
            "no ordering file",
            Build {
                order_file: None,
                ..dist()
            },
            vec![RELR],
        ),
        (
            "glibc 2.35 (Ubuntu 22.04)",
            Build {
                glibc: Some((2, 35)),
                ..dist()
            },
            ORDERED.to_vec(),
        ),
        (
            "glibc unknown",
            Build {
                glibc: None,
                ..dist()
            },
            ORDERED.to_vec(),
        ),
        (
            "a newer glibc",
            Build {
                glibc: Some((3, 0)),
                ..dist()
            },
            all.clone(),
        ),
        (
            "cross build",
            Build {
                host: "aarch64-unknown-linux-gnu",
                ..dist()
            },
            ORDERED.to_vec(),
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
            "rustc 1.89 links with cc's ld",
            Build {
                rustc_minor: Some(89),
                ..dist()
            },
            vec![],
        ),
        (
            "rustc version unknown",
            Build {
                rustc_minor: None,
                ..dist()
            },
            vec![],
        ),
        (
            "another linker chosen",
            Build {
                linker_chosen: true,
                ..dist()
            },
            vec![],
        ),
        (
            "arm64",
            Build {
                target: "aarch64-unknown-linux-gnu",
                ..dist()
            },
            vec![],
        ),
        (
            "musl",
            Build {
                target: "x86_64-unknown-linux-musl",
                ..dist()
            },
            vec![],
        ),
    ];
    for (what, build, want) in cases {
        assert_eq!(link_args(&build), want, "{what}");
    }
}

#[test]
fn versions_are_read_from_the_tools_output() {
    assert_eq!(rustc_minor("rustc 1.95.0 (59807616e 2026-04-14)"), Some(95));
    assert_eq!(
        rustc_minor("rustc 1.90.0-nightly (abc 2025-06-01)"),
        Some(90)
    );
    assert_eq!(rustc_minor(""), None);
    assert_eq!(rustc_minor("rustc"), None);
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
