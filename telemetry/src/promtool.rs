//! `promtool check metrics`, as the test suites run it on both admin APIs' `/metrics`.

use std::io::Write;
use std::process::{Command, Stdio};

/// Runs `promtool check metrics` on `text`: `Some((clean, report))`, or `None` after
/// printing why when promtool is missing and `MESHLET_REQUIRE_TOOLS=1` is not set (with it,
/// a missing promtool panics: CI may not skip this check).
pub fn check(text: &str) -> Option<(bool, String)> {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var("MESHLET_REQUIRE_TOOLS").as_deref() == Ok("1") => {
            panic!("promtool is required (MESHLET_REQUIRE_TOOLS=1) but cannot run: {e}")
        }
        Err(e) => {
            eprintln!(
                "SKIPPED promtool check: promtool not available ({e}); install Debian's `prometheus` package"
            );
            return None;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().ok()?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success() && report.trim().is_empty(), report))
}
