//! `meshlet-proxy init`: the capture rules of a pod's network namespace.
//!
//! IPv4 (nat table): TCP arriving at the pod goes to the inbound port, except the skipped
//! ports and the admin port; TCP the pod sends goes to the outbound port, except the proxy's
//! own UID, loopback and the skipped ports. IPv6 (filter table): TCP other than loopback is
//! refused with a reset, so it can never be a way around the proxy (meshlet meshes IPv4).
//!
//! The rules are our own chains, rewritten whole on every run (`iptables-restore
//! --noflush` flushes a chain it declares), plus one jump from each built-in chain, added
//! only when absent: running init twice leaves the same rules.

use std::io::Write;
use std::process::{Command, Stdio};

/// Flags of `meshlet-proxy init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// The sidecar's UID: its own traffic is not captured.
    #[arg(long, env = "MESHLET_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Where inbound TCP is redirected.
    #[arg(long, env = "MESHLET_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// Where outbound TCP is redirected.
    #[arg(long, env = "MESHLET_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// The sidecar's admin port, never captured (probes reach it directly).
    #[arg(long, env = "MESHLET_ADMIN_PORT", default_value_t = 15000)]
    pub admin_port: u16,
    /// Inbound ports not captured, comma separated.
    #[arg(long, env = "MESHLET_SKIP_INBOUND_PORTS", value_delimiter = ',')]
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports not captured, comma separated.
    #[arg(long, env = "MESHLET_SKIP_OUTBOUND_PORTS", value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
    /// Print the rules instead of installing them.
    #[arg(long, env = "MESHLET_DRY_RUN")]
    pub dry_run: bool,
}

const IN: &str = "MESHLET_INBOUND";
const OUT: &str = "MESHLET_OUTPUT";
const IN6: &str = "MESHLET_INBOUND6";
const OUT6: &str = "MESHLET_OUTPUT6";

/// Why the rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("running {0}: {1} (is iptables installed, and do we have NET_ADMIN?)")]
    Spawn(&'static str, std::io::Error),
    #[error("{0} failed: {1}")]
    Failed(&'static str, String),
}

/// `iptables-restore --noflush` input for IPv4. `existing` is `iptables-save -t nat`.
pub fn ipv4_rules(a: &InitArgs, existing: &str) -> String {
    let mut r = vec![
        "*nat".to_owned(),
        format!(":{IN} - [0:0]"),
        format!(":{OUT} - [0:0]"),
    ];
    for port in std::iter::once(&a.admin_port).chain(&a.skip_inbound_ports) {
        r.push(format!("-A {IN} -p tcp --dport {port} -j RETURN"));
    }
    r.push(format!(
        "-A {IN} -p tcp -j REDIRECT --to-ports {}",
        a.inbound_port
    ));
    r.push(format!(
        "-A {OUT} -m owner --uid-owner {} -j RETURN",
        a.proxy_uid
    ));
    r.push(format!("-A {OUT} -o lo -j RETURN"));
    r.push(format!("-A {OUT} -d 127.0.0.0/8 -j RETURN"));
    for port in &a.skip_outbound_ports {
        r.push(format!("-A {OUT} -p tcp --dport {port} -j RETURN"));
    }
    r.push(format!(
        "-A {OUT} -p tcp -j REDIRECT --to-ports {}",
        a.outbound_port
    ));
    jump(&mut r, existing, format!("-A PREROUTING -p tcp -j {IN}"));
    jump(&mut r, existing, format!("-A OUTPUT -p tcp -j {OUT}"));
    r.push("COMMIT".to_owned());
    r.join("\n") + "\n"
}

/// `ip6tables-restore --noflush` input: IPv6 TCP refused except on loopback.
/// `existing` is `ip6tables-save -t filter`.
pub fn ipv6_rules(existing: &str) -> String {
    let mut r = vec![
        "*filter".to_owned(),
        format!(":{IN6} - [0:0]"),
        format!(":{OUT6} - [0:0]"),
    ];
    r.push(format!("-A {IN6} -i lo -j RETURN"));
    r.push(format!("-A {IN6} -p tcp -j REJECT --reject-with tcp-reset"));
    r.push(format!("-A {OUT6} -o lo -j RETURN"));
    r.push(format!(
        "-A {OUT6} -p tcp -j REJECT --reject-with tcp-reset"
    ));
    jump(&mut r, existing, format!("-A INPUT -j {IN6}"));
    jump(&mut r, existing, format!("-A OUTPUT -j {OUT6}"));
    r.push("COMMIT".to_owned());
    r.join("\n") + "\n"
}

fn jump(rules: &mut Vec<String>, existing: &str, rule: String) {
    if !existing.lines().any(|l| l.trim() == rule) {
        rules.push(rule);
    }
}

/// Installs (or with `--dry-run` prints) the rules.
pub fn apply(a: &InitArgs) -> Result<(), InitError> {
    let ipv6 = std::path::Path::new("/proc/net/if_inet6").exists();
    if a.dry_run {
        print!("# iptables-restore --noflush\n{}", ipv4_rules(a, ""));
        print!("# ip6tables-restore --noflush\n{}", ipv6_rules(""));
        return Ok(());
    }
    let existing = output("iptables-save", &["-t", "nat"])?;
    restore("iptables-restore", &ipv4_rules(a, &existing))?;
    if ipv6 {
        let existing = output("ip6tables-save", &["-t", "filter"])?;
        restore("ip6tables-restore", &ipv6_rules(&existing))?;
    } else {
        println!("IPv6 is disabled in this network namespace: no IPv6 rules needed");
    }
    println!(
        "capture rules installed: inbound -> {}, outbound -> {}, proxy uid {} excluded",
        a.inbound_port, a.outbound_port, a.proxy_uid
    );
    Ok(())
}

fn output(cmd: &'static str, args: &[&str]) -> Result<String, InitError> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| InitError::Spawn(cmd, e))?;
    if !out.status.success() {
        return Err(InitError::Failed(
            cmd,
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn restore(cmd: &'static str, input: &str) -> Result<(), InitError> {
    let mut child = Command::new(cmd)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| InitError::Spawn(cmd, e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| InitError::Spawn(cmd, e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| InitError::Spawn(cmd, e))?;
    if !out.status.success() {
        return Err(InitError::Failed(
            cmd,
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> InitArgs {
        InitArgs {
            proxy_uid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 15000,
            skip_inbound_ports: vec![22],
            skip_outbound_ports: vec![53, 443],
            dry_run: false,
        }
    }

    #[test]
    fn ipv4_rules_capture_everything_but_the_exceptions() {
        let rules = ipv4_rules(&args(), "");
        let want = [
            "-A MESHLET_INBOUND -p tcp --dport 15000 -j RETURN",
            "-A MESHLET_INBOUND -p tcp --dport 22 -j RETURN",
            "-A MESHLET_INBOUND -p tcp -j REDIRECT --to-ports 15006",
            "-A MESHLET_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A MESHLET_OUTPUT -o lo -j RETURN",
            "-A MESHLET_OUTPUT -p tcp --dport 53 -j RETURN",
            "-A MESHLET_OUTPUT -p tcp --dport 443 -j RETURN",
            "-A MESHLET_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
            "-A PREROUTING -p tcp -j MESHLET_INBOUND",
            "-A OUTPUT -p tcp -j MESHLET_OUTPUT",
        ];
        for line in want {
            assert!(
                rules.lines().any(|l| l == line),
                "missing {line:?} in\n{rules}"
            );
        }
        // Exceptions come before the redirect in each chain.
        let pos = |s: &str| rules.find(s).unwrap_or(usize::MAX);
        assert!(pos("--uid-owner 1337") < pos("--to-ports 15001"));
        assert!(pos("--dport 22 -j RETURN") < pos("--to-ports 15006"));
        assert!(rules.starts_with("*nat\n") && rules.ends_with("COMMIT\n"));
    }

    #[test]
    fn jumps_are_not_added_twice() {
        let existing = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p tcp -j MESHLET_INBOUND\n-A OUTPUT -p tcp -j MESHLET_OUTPUT\nCOMMIT\n";
        let rules = ipv4_rules(&args(), existing);
        assert!(!rules.contains("-A PREROUTING"), "{rules}");
        assert!(
            !rules.contains("-A OUTPUT -p tcp -j MESHLET_OUTPUT"),
            "{rules}"
        );
        assert!(
            rules.contains(":MESHLET_INBOUND - [0:0]"),
            "chains are still rewritten whole"
        );
        let v6 = ipv6_rules("-A INPUT -j MESHLET_INBOUND6\n");
        assert!(
            !v6.contains("-A INPUT -j") && v6.contains("-A OUTPUT -j MESHLET_OUTPUT6"),
            "{v6}"
        );
    }

    #[test]
    fn ipv6_tcp_is_refused_except_loopback() {
        let v6 = ipv6_rules("");
        assert!(v6.contains("-A MESHLET_OUTPUT6 -o lo -j RETURN\n-A MESHLET_OUTPUT6 -p tcp -j REJECT --reject-with tcp-reset"));
        assert!(v6.contains("-A MESHLET_INBOUND6 -i lo -j RETURN\n-A MESHLET_INBOUND6 -p tcp -j REJECT --reject-with tcp-reset"));
    }
}
