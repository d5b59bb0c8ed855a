//! `meshlet-proxy init` in a network namespace made for the test: the rules capture what
//! they should, and running init twice leaves the same rules. `--dry-run` needs no root.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

fn proxy(args: &[&str], netns: Option<&str>) -> std::process::Output {
    let bin = env!("CARGO_BIN_EXE_meshlet-proxy");
    match netns {
        Some(ns) => Command::new("ip")
            .args(["netns", "exec", ns, bin])
            .args(args)
            .output()
            .unwrap(),
        None => Command::new(bin).args(args).output().unwrap(),
    }
}

#[test]
fn dry_run_prints_both_families() {
    let out = proxy(
        &["init", "--dry-run", "--skip-inbound-ports", "22,2222"],
        None,
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("-A MESHLET_INBOUND -p tcp --dport 2222 -j RETURN"),
        "{text}"
    );
    assert!(
        text.contains("-A MESHLET_OUTPUT6 -p tcp -j REJECT --reject-with tcp-reset"),
        "{text}"
    );
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn missing() -> Option<&'static str> {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root {
        return Some("not root");
    }
    let has = |t: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !has("ip") || !has("iptables-save") || !has("ip6tables-save") {
        return Some("iproute2 or iptables is not installed");
    }
    None
}

fn save(ns: &str, cmd: &str, table: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, cmd, "-t", table])
        .output()
        .unwrap();
    assert!(out.status.success());
    // Drop comments and packet counters: only the rules.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            if l.starts_with(':') {
                l.split(' ').take(2).collect::<Vec<_>>().join(" ")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn init_is_idempotent_in_a_fresh_namespace() {
    if let Some(reason) = missing() {
        if std::env::var("MESHLET_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("this test is required here but cannot run: {reason}");
        }
        eprintln!(
            "SKIPPED init_is_idempotent_in_a_fresh_namespace: {reason} (needs root, iproute2, iptables)"
        );
        return;
    }
    let ns = Netns(format!("mlinit{}", std::process::id()));
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success()
    );

    let first = proxy(&["init", "--skip-outbound-ports", "53"], Some(&ns.0));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let (nat1, filter1) = (
        save(&ns.0, "iptables-save", "nat"),
        save(&ns.0, "ip6tables-save", "filter"),
    );
    let second = proxy(&["init", "--skip-outbound-ports", "53"], Some(&ns.0));
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(
        save(&ns.0, "iptables-save", "nat"),
        nat1,
        "a second run changed the IPv4 rules"
    );
    assert_eq!(
        save(&ns.0, "ip6tables-save", "filter"),
        filter1,
        "a second run changed the IPv6 rules"
    );

    for rule in [
        "-A PREROUTING -p tcp -j MESHLET_INBOUND",
        "-A OUTPUT -p tcp -j MESHLET_OUTPUT",
        "-A MESHLET_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A MESHLET_OUTPUT -p tcp -m tcp --dport 53 -j RETURN",
        "-A MESHLET_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        "-A MESHLET_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
        "-A MESHLET_INBOUND -p tcp -j REDIRECT --to-ports 15006",
    ] {
        assert_eq!(nat1.matches(rule).count(), 1, "{rule:?} once in\n{nat1}");
    }
    assert_eq!(
        filter1.matches("-A OUTPUT -j MESHLET_OUTPUT6").count(),
        1,
        "{filter1}"
    );
}
