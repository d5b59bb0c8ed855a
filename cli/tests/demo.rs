//! The README's main command, run as a user would: `meshletctl demo` (no root), and
//! `meshletctl demo --netns` (root, real iptables capture in network namespaces: the
//! end-to-end test of capture, mutual TLS on the wire, passthrough, strict mode, rotation
//! under load and the control plane stopping).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

fn demo(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshletctl"))
        .arg("demo")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn demo_runs_the_mesh_on_loopback() {
    let (ok, out) = demo(&[]);
    assert!(ok, "{out}");
    for line in [
        "[ok] frontend verified orders as spiffe://cluster.local/ns/demo/sa/orders",
        "[ok] ledger verified the client as spiffe://cluster.local/ns/demo/sa/frontend",
        "[ok] orders took the 3 HTTP requests over mutual TLS",
        "[ok] every hop between sidecars was TLS 1.3",
        "[ok] a plaintext client talking straight to the orders sidecar gets nothing (strict mode)",
        "all checks passed",
    ] {
        assert!(out.contains(line), "missing {line:?} in\n{out}");
    }
}

/// Why this machine cannot run the netns demo, if it cannot.
fn missing() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root {
        return Some("not root".into());
    }
    for tool in [
        "ip",
        "iptables-restore",
        "ip6tables-restore",
        "setpriv",
        "tcpdump",
    ] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Some(format!("{tool} is not installed"));
        }
    }
    let bins =
        std::path::Path::new(env!("CARGO_BIN_EXE_meshletctl")).with_file_name("meshlet-proxy");
    if !bins.exists() {
        return Some("meshlet-proxy is not built (cargo build --workspace)".into());
    }
    None
}

#[test]
fn demo_netns_captures_real_traffic() {
    if let Some(reason) = missing() {
        if std::env::var("MESHLET_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("demo --netns is required here but cannot run: {reason}");
        }
        eprintln!(
            "SKIPPED demo_netns_captures_real_traffic: {reason} (needs root, iproute2, iptables, util-linux setpriv, tcpdump)"
        );
        return;
    }
    let (ok, out) = demo(&["--netns"]);
    assert!(ok, "{out}");
    for line in [
        "[ok] plain HTTP from A's app reached B's app through both sidecars",
        "[ok] plain TCP from A's app was echoed by B's app",
        "[ok] A's app reached C, which has no sidecar: passed through",
        "[ok] a plaintext client outside the mesh is refused by B (strict)",
        "[ok] ... and a ServerHello choosing TLS 1.3 (supported_versions 0x0304)",
        "[ok] ... and no plaintext of the meshed request or reply",
        "[ok] no request lost across the rotations",
        "[ok] each sidecar rotated its certificate at least 3 times",
        "[ok] with the control plane stopped, traffic goes on with the current certificates",
        "namespaces removed",
    ] {
        assert!(out.contains(line), "missing {line:?} in\n{out}");
    }
}
