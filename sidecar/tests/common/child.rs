//! A sidecar as a child process (the built `meshlet-proxy` binary), for faults that need a
//! real process: SIGKILL, resource limits. Dropping the handle kills and reaps it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::*;

/// A `meshlet-proxy run` child process in explicit mode, logging to a file. Dropping it
/// kills and reaps it, so a failing assertion leaks no process.
pub struct ChildSidecar {
    child: std::process::Child,
    log: PathBuf,
    pub admin: SocketAddr,
    pub inbound: SocketAddr,
}

/// The command for a sidecar as `demo/<sa>` with `extra` flags; every listener not named in
/// `extra` on port 0. With `nofile`, under `prlimit --nofile=N:N`: None when `prlimit` is
/// not installed.
pub fn sidecar_command(
    cp: &ControlPlane,
    sa: &str,
    extra: &[String],
    nofile: Option<u32>,
    log: &Path,
) -> Option<Command> {
    let bin = env!("CARGO_BIN_EXE_meshlet-proxy");
    let mut cmd = match nofile {
        None => Command::new(bin),
        Some(n) => {
            let prlimit = std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|dir| dir.join("prlimit"))
                .find(|p| p.is_file())?;
            let mut cmd = Command::new(prlimit);
            cmd.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin);
            cmd
        }
    };
    cmd.arg("run");
    let mut flags = vec![
        ("--control-addr", cp.addr().to_string()),
        (
            "--control-identity",
            cp.running.as_ref().unwrap().identity.to_string(),
        ),
        (
            "--token-file",
            cp.token_file("demo", sa).display().to_string(),
        ),
        ("--trust-bundle", cp.bundle_file.display().to_string()),
        ("--drain-timeout", "2s".to_owned()),
    ];
    for listener in ["--admin-addr", "--inbound-addr", "--outbound-addr"] {
        if !extra.iter().any(|e| e == listener) {
            flags.push((listener, "127.0.0.1:0".to_owned()));
        }
    }
    for (flag, value) in flags {
        cmd.arg(flag).arg(value);
    }
    cmd.args(extra);
    // The child's flags are its command line only: nothing of this process's environment.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("MESHLET_") || key.starts_with("OTEL_") {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env("MESHLET_LOG", "info")
        .env("NO_COLOR", "1")
        .env("OTEL_SDK_DISABLED", "true");
    let file = std::fs::File::create(log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    Some(cmd)
}

impl ChildSidecar {
    /// Spawns `cmd`, reads its addresses from its "sidecar serving" log line and waits for
    /// its `/ready` (at most 15 s in all).
    pub async fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let child = cmd.spawn().unwrap();
        let mut s = Self {
            child,
            log,
            admin: "0.0.0.0:0".parse().unwrap(),
            inbound: "0.0.0.0:0".parse().unwrap(),
        };
        let mut serving = None;
        eventually(
            "the child sidecar logs its addresses",
            Duration::from_secs(10),
            async || {
                s.assert_alive();
                serving = s
                    .log()
                    .lines()
                    .find(|l| l.contains("sidecar serving"))
                    .map(str::to_owned);
                serving.is_some()
            },
        )
        .await;
        let serving = serving.unwrap();
        s.admin = field(&serving, "admin=");
        s.inbound = field(&serving, "inbound=");
        let admin = s.admin;
        eventually(
            "the child sidecar is ready",
            Duration::from_secs(5),
            async || {
                s.assert_alive();
                get_within(admin, "/ready", Duration::from_secs(1))
                    .await
                    .map(|r| r.0)
                    == Some(200)
            },
        )
        .await;
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the child sidecar exited ({status}):\n{}", self.log());
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// CPU time used so far (user + system), from /proc/<pid>/stat.
    pub fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which may hold spaces): state is the first; utime
        // and stime are the 12th and 13th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 1000 / clock_ticks())
    }

    /// Open file descriptors numbered below `below`, from /proc/<pid>/fd (it may have
    /// inherited others, numbered higher, from whatever started the test).
    pub fn fds(&self, below: usize) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_str().unwrap().parse::<usize>().unwrap() < below
            })
            .count()
    }
}

impl Drop for ChildSidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100, Linux's value, if that cannot run).
pub fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// The address after `key` in a log line.
pub fn field(line: &str, key: &str) -> SocketAddr {
    let start = line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len();
    line[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{key} in {line}: {e}"))
}

/// GETs `path` over a fresh connection: None when that does not complete within `within`.
pub async fn get_within(addr: SocketAddr, path: &str, within: Duration) -> Option<(u16, String)> {
    get_outcome(addr, path, within).await.ok()
}

/// GETs `path` over a fresh connection: the answer, or why there is none ("timed out" when
/// nothing happened within `within`).
pub async fn get_outcome(
    addr: SocketAddr,
    path: &str,
    within: Duration,
) -> Result<(u16, String), String> {
    tokio::time::timeout(within, async {
        HttpClient::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?
            .get(path)
            .await
            .map_err(|e| format!("request: {e}"))
    })
    .await
    .map_err(|_| "timed out".to_owned())?
}
