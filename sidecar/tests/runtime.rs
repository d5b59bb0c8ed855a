//! `--worker-threads`: the sidecar's Tokio runtime, checked on the built binary (the runtime
//! is made in `main`, which logs its scheduler and workers). One thread runs everything on
//! the current-thread scheduler; more start that many workers; a value that is not a number
//! is refused, naming the flag. (What 0 means is a table test in `main.rs`.)
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::Duration;

use common::child::*;
use common::*;

/// The sidecar's threads: its main thread, its workers, and the blocking-pool threads
/// that file reads start (each lives 10 s after its last use).
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

async fn sidecar_with(cp: &ControlPlane, threads_flag: &str) -> (ChildSidecar, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sidecar.log");
    let extra = ["--worker-threads".to_owned(), threads_flag.to_owned()];
    let cmd = sidecar_command(cp, "client", &extra, None, &log).unwrap();
    (ChildSidecar::spawn(cmd, log).await, dir)
}

#[tokio::test]
async fn one_worker_thread_runs_the_sidecar_on_its_main_thread() {
    let cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let (one, _dir1) = sidecar_with(&cp, "1").await;
    let (three, _dir3) = sidecar_with(&cp, "3").await;
    // Both got a certificate over gRPC and answer their admin API (spawn waited for /ready).
    let starting = |s: &ChildSidecar| {
        s.log()
            .lines()
            .find(|l| l.contains("starting"))
            .map(str::to_owned)
            .unwrap()
    };
    let (one_log, three_log) = (starting(&one), starting(&three));
    assert!(
        one_log.contains("scheduler=\"current_thread\"") && one_log.contains("workers=1"),
        "{one_log}"
    );
    assert!(
        three_log.contains("scheduler=\"multi_thread\"") && three_log.contains("workers=3"),
        "{three_log}"
    );
    // And the process has the threads that says: Tokio's blocking pool (file reads) may add
    // a thread or two, which is all that --worker-threads 1 may have beside the main one.
    let (one_threads, three_threads) = (threads(one.pid()), threads(three.pid()));
    assert!(
        one_threads <= 3,
        "--worker-threads 1: {one_threads} threads, expected the main thread and at most two of the blocking pool"
    );
    assert!(
        three_threads >= 4,
        "--worker-threads 3: {three_threads} threads, expected the main thread and 3 workers"
    );
    let metrics = get_within(one.admin, "/metrics", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(metrics.0, 200);
}

#[tokio::test]
async fn a_worker_thread_count_that_is_not_a_number_is_refused_naming_the_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshlet-proxy"))
        .args(["run", "--worker-threads", "many"])
        .env_remove("MESHLET_WORKER_THREADS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid value 'many'") && stderr.contains("--worker-threads"),
        "{stderr}"
    );
}
