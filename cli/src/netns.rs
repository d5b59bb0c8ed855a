//! `meshletctl demo --netns`: the mesh with real capture, as in a cluster, on one machine.
//!
//! Network namespaces stand in for pods, joined by a bridge in a namespace of their own,
//! with addresses only these namespaces (and a leg into this one) can reach:
//!
//! | namespace | address | runs |
//! | --- | --- | --- |
//! | ctl | .1 | `meshlet-control serve` |
//! | a | .2 | `meshlet-proxy init`, `meshlet-proxy run` as UID 1337, the client app |
//! | b | .3 | the same, strict inbound, in front of an HTTP app (:8080) and a TCP echo (:9000) |
//! | c | .4 | the same apps, no sidecar |
//!
//! The apps know nothing of the mesh: A's app calls `http://<b>:8080` and `<b>:9000` in
//! plaintext. A packet capture on A's link checks that meshed traffic is TLS 1.3 and carries
//! no plaintext. Everything started is stopped and every namespace deleted on the way out.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use meshlet_control::token::LocalSigner;
use tokio::process::{Child, Command};

use crate::demo::{admin_get, check};

const SUBNET: [u8; 3] = [10, 233, 77];
const CERT_TTL: &str = "10s";

fn ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], host)
}

/// The namespaces and processes of one run; dropping it kills the processes and deletes
/// the namespaces.
struct Lab {
    id: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }

    async fn sh(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .await
            .with_context(|| format!("running {}", args[0]))?;
        ensure!(
            out.status.success(),
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `args` in namespace `ns`, logging to a file in the lab folder.
    fn spawn(&mut self, ns: &str, log: &str, args: &[&str]) -> anyhow::Result<()> {
        let log_file = std::fs::File::create(self.dir.path().join(format!("{log}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .args(args)
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {log}"))?;
        self.children.push(child);
        Ok(())
    }

    /// Runs `args` in namespace `ns` to completion: (success, stdout).
    async fn exec(&self, ns: &str, args: &[&str]) -> anyhow::Result<(bool, String)> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .args(args)
            .output()
            .await?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    async fn setup(&self) -> anyhow::Result<()> {
        let sw = self.ns("sw");
        self.sh(&["ip", "netns", "add", &sw]).await?;
        self.sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])
            .await?;
        self.sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])
            .await?;
        for (name, host) in [("ctl", 1u8), ("a", 2), ("b", 3), ("c", 4)] {
            let ns = self.ns(name);
            self.sh(&["ip", "netns", "add", &ns]).await?;
            let port = format!("port-{name}");
            self.sh(&[
                "ip", "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])
            .await?;
            self.sh(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"])
                .await?;
            self.sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", ip(host)),
                "dev",
                "eth0",
            ])
            .await?;
            self.sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])
                .await?;
            self.sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])
                .await?;
        }
        // A leg from this namespace, so this process can reach the admin APIs.
        let leg = format!("{}h", self.id);
        self.sh(&[
            "ip", "link", "add", &leg, "type", "veth", "peer", "name", "host", "netns", &sw,
        ])
        .await?;
        self.sh(&[
            "ip", "-n", &sw, "link", "set", "host", "master", "br0", "up",
        ])
        .await?;
        self.sh(&["ip", "addr", "add", &format!("{}/24", ip(254)), "dev", &leg])
            .await?;
        self.sh(&["ip", "link", "set", &leg, "up"]).await?;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.start_kill();
        }
        for name in ["ctl", "a", "b", "c", "sw"] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.ns(name)])
                .status();
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &format!("{}h", self.id)])
            .status();
    }
}

/// Whether this machine can run the netns demo; the reason when not.
pub(crate) fn missing_requirement() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        return Some("needs root (network namespaces, iptables)".into());
    }
    for tool in [
        "ip",
        "iptables-restore",
        "ip6tables-restore",
        "setpriv",
        "tcpdump",
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        if !found {
            return Some(format!(
                "needs {tool} (Debian: iproute2, iptables, util-linux, tcpdump)"
            ));
        }
    }
    None
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    ensure!(
        path.exists(),
        "{} not found beside {} (cargo build --workspace first)",
        name,
        exe.display()
    );
    Ok(path)
}

pub(crate) async fn run() -> anyhow::Result<()> {
    if let Some(reason) = missing_requirement() {
        bail!("demo --netns {reason}");
    }
    let id = format!("ml{}", std::process::id() % 100_000);
    let mut lab = Lab {
        id,
        children: Vec::new(),
        dir: tempfile::tempdir()?,
    };
    println!("meshlet demo --netns: pods as network namespaces, real iptables capture\n");
    let result = async {
        lab.setup().await?;
        scenario(&mut lab).await
    }
    .await;
    if result.is_err() {
        for log in ["control", "sidecar-a", "sidecar-b"] {
            if let Ok(text) = std::fs::read_to_string(lab.dir.path().join(format!("{log}.log"))) {
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                println!(
                    "--- last lines of {log}.log\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }
    drop(lab);
    match &result {
        Ok(()) => println!("\nall checks passed; namespaces removed"),
        Err(e) => println!("\nFAILED: {e:#}"),
    }
    result
}

async fn scenario(lab: &mut Lab) -> anyhow::Result<()> {
    let control_bin = sibling("meshlet-control")?;
    let proxy_bin = sibling("meshlet-proxy")?;
    let me = std::env::current_exe()?;
    let data = lab.dir.path().join("control");
    let (control, proxy, me) = (
        path_str(&control_bin)?,
        path_str(&proxy_bin)?,
        path_str(&me)?,
    );

    // The control plane.
    let signer = LocalSigner::load_or_create(&data)?;
    let grpc = format!("{}:15012", ip(1));
    let admin = SocketAddr::from((ip(1), 15014));
    lab.spawn(
        "ctl",
        "control",
        &[
            control,
            "serve",
            "--data-dir",
            path_str(&data)?,
            "--grpc-addr",
            &grpc,
            "--admin-addr",
            &admin.to_string(),
            "--cert-ttl",
            CERT_TTL,
        ],
    )?;
    wait_ready(admin, "/ready")
        .await
        .context("the control plane did not start")?;
    let bundle = lab.dir.path().join("bundle.pem");
    std::fs::write(&bundle, admin_get(admin, "/v1/trust-bundle").await?)?;
    println!("control plane  {grpc} (certificates live {CERT_TTL})");

    // Apps in B and C, the sidecars in A and B.
    for ns in ["b", "c"] {
        lab.spawn(
            ns,
            &format!("apps-{ns}"),
            &[
                me,
                "demo-app",
                "serve",
                "--http",
                "0.0.0.0:8080",
                "--echo",
                "0.0.0.0:9000",
            ],
        )?;
    }
    for (ns, host, mode) in [("b", 3u8, "strict"), ("a", 2, "permissive")] {
        let token = lab.dir.path().join(format!("{ns}.token"));
        crate::demo::write_private(
            &token,
            &signer.mint(
                "shop",
                if ns == "a" { "frontend" } else { "orders" },
                Some(&format!("{ns}-pod")),
                Duration::from_secs(3600),
            )?,
        )?;
        std::os::unix::fs::chown(&token, Some(1337), Some(1337))?;
        lab.exec(ns, &[proxy, "init"]).await.and_then(|(ok, out)| {
            if ok {
                Ok(out)
            } else {
                bail!("init failed in {ns}")
            }
        })?;
        let pod_ip = ip(host).to_string();
        lab.spawn(
            ns,
            &format!("sidecar-{ns}"),
            &[
                "setpriv",
                "--reuid",
                "1337",
                "--regid",
                "1337",
                "--clear-groups",
                proxy,
                "run",
                "--control-addr",
                &grpc,
                "--token-file",
                path_str(&token)?,
                "--trust-bundle",
                path_str(&bundle)?,
                "--pod-ip",
                &pod_ip,
                "--inbound-mode",
                mode,
            ],
        )?;
        wait_ready(SocketAddr::from((ip(host), 15000)), "/ready")
            .await
            .with_context(|| format!("sidecar {ns} not ready"))?;
        let certs: serde_json::Value =
            serde_json::from_str(&admin_get(SocketAddr::from((ip(host), 15000)), "/certs").await?)?;
        println!(
            "pod {ns} ({pod_ip})  sidecar {mode}, {} until {}",
            certs["spiffe_id"].as_str().unwrap_or("?"),
            certs["not_after"].as_str().unwrap_or("?")
        );
    }
    let (b, c) = (ip(3), ip(4));
    println!("pod c ({c})  no sidecar\n");

    // Plain HTTP and TCP from A's app, captured on A's link.
    let pcap = lab.dir.path().join("a.pcap");
    lab.spawn(
        "a",
        "tcpdump",
        &[
            "tcpdump",
            "-i",
            "eth0",
            "-U",
            "-w",
            path_str(&pcap)?,
            "tcp",
            "and",
            "not",
            "port",
            "15012",
            "and",
            "not",
            "port",
            "15000",
        ],
    )?;
    tokio::time::sleep(Duration::from_millis(800)).await; // tcpdump opens its capture; no readiness signal to wait on
    let marker = "/orders/secret-4711";
    let (ok, out) = lab
        .exec("a", &[me, "demo-app", "get", &format!("{b}:8080"), marker])
        .await?;
    println!("  A -> http://{b}:8080{marker}: {}", out.trim());
    check(
        "plain HTTP from A's app reached B's app through both sidecars",
        ok && out.contains(&format!("orders: GET {marker}")),
    )?;
    let (ok, out) = lab
        .exec(
            "a",
            &[
                me,
                "demo-app",
                "echo",
                &format!("{b}:9000"),
                "--bytes",
                "200000",
            ],
        )
        .await?;
    check(
        &format!(
            "plain TCP from A's app was echoed by B's app ({})",
            out.trim()
        ),
        ok,
    )?;
    let (ok, out) = lab
        .exec(
            "a",
            &[me, "demo-app", "get", &format!("{c}:8080"), "/plain-to-c"],
        )
        .await?;
    check(
        "A's app reached C, which has no sidecar: passed through",
        ok && out.contains("GET /plain-to-c"),
    )?;
    let (ok, _) = lab
        .exec(
            "ctl",
            &[
                me,
                "demo-app",
                "echo",
                &format!("{b}:9000"),
                "--bytes",
                "100",
            ],
        )
        .await?;
    check(
        "a plaintext client outside the mesh is refused by B (strict)",
        !ok,
    )?;
    tokio::time::sleep(Duration::from_millis(500)).await; // let tcpdump flush the last packets
    let capture = std::fs::read(&pcap)?;
    let has = |needle: &[u8]| capture.windows(needle.len()).any(|w| w == needle);
    check(
        "the capture of A's link holds a ClientHello offering ALPN meshlet/1",
        has(b"\x09meshlet/1"),
    )?;
    check(
        "... and a ServerHello choosing TLS 1.3 (supported_versions 0x0304)",
        has(&[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]),
    )?;
    // The marker is in the meshed request's path and echoed in its reply.
    check(
        "... and no plaintext of the meshed request or reply",
        !has(marker.as_bytes()),
    )?;
    check(
        "... while the passthrough to C is plaintext, as it should be",
        has(b"GET /plain-to-c"),
    )?;

    // Continuous requests while certificates rotate, then with the control plane gone.
    println!("\ncontinuous requests from A to B while certificates rotate (every ~5 s)");
    let rotations = |host: u8| async move {
        let certs: serde_json::Value =
            serde_json::from_str(&admin_get(SocketAddr::from((ip(host), 15000)), "/certs").await?)?;
        anyhow::Ok(certs["rotations"].as_u64().unwrap_or(0))
    };
    // The client runs until told to stop (or 40 s): when both sidecars rotated 3 times.
    let stop_file = lab.dir.path().join("stop-load");
    let load = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("a"),
            me,
            "demo-app",
            "get",
            &format!("{b}:8080"),
            "/rotate",
        ])
        .args([
            "--count",
            "100000",
            "--until-secs",
            "40",
            "--stop-file",
            path_str(&stop_file)?,
        ])
        .kill_on_drop(true)
        .output();
    let watch = async {
        loop {
            let (ra, rb) = (rotations(2).await?, rotations(3).await?);
            if ra >= 3 && rb >= 3 {
                std::fs::write(&stop_file, b"")?;
                return anyhow::Ok((ra, rb));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let (load, watched) = tokio::join!(load, tokio::time::timeout(Duration::from_secs(45), watch));
    let load = load?;
    let (ra, rb) = watched.context("fewer than 3 rotations within 45 s")??;
    let (ok, out) = (
        load.status.success(),
        String::from_utf8_lossy(&load.stdout).into_owned(),
    );
    println!("  {}; rotations: A {ra}, B {rb}", out.trim());
    check("no request lost across the rotations", ok)?;
    check(
        "each sidecar rotated its certificate at least 3 times",
        ra >= 3 && rb >= 3,
    )?;
    for child in lab.children.iter_mut().take(1) {
        child.kill().await?; // the control plane is the first process started
    }
    let (ok, out) = lab
        .exec(
            "a",
            &[
                me,
                "demo-app",
                "get",
                &format!("{b}:8080"),
                "/after-control-plane",
                "--count",
                "20",
            ],
        )
        .await?;
    check(
        &format!(
            "with the control plane stopped, traffic goes on with the current certificates ({})",
            out.trim()
        ),
        ok,
    )?;
    Ok(())
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("a temporary path that is not UTF-8")
}

/// Polls `path` on `addr` until it answers 200 (at most 20 s).
async fn wait_ready(addr: SocketAddr, path: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if admin_get(addr, path).await.is_ok() {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{addr}{path} not ready within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
