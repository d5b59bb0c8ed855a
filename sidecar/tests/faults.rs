//! Faults of issue #9 that need a real sidecar process, started from the built binary as a
//! child of the test: a peer sidecar killed (SIGKILL) while an opaque TCP stream and a
//! pooled HTTP/2 request run through it (the client side ends promptly, the client sidecar
//! keeps serving, and reaches the peer again once it is back), and a sidecar out of file
//! descriptors (`RLIMIT_NOFILE` 64, with `prlimit`): connections it cannot take stall or are
//! refused, established ones go on, the process neither exits nor spins, and it serves new
//! connections again once descriptors are free.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::child::*;
use common::*;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use meshlet_proxy::inbound::InboundMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";
const OTHER_ID: &str = "spiffe://cluster.local/ns/demo/sa/other";

/// An app for HTTP and opaque TCP on one port: a connection whose first byte is an ASCII
/// capital (an HTTP method, or HTTP/2's preface) is served HTTP, where `GET /slow` tells
/// `arrived` and never answers, and anything else answers `ok`; other connections are echoed.
async fn mixed_app() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let arrived_tx = arrived_tx.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if tcp.peek(&mut first).await.unwrap_or(0) == 0 {
                    return;
                }
                if !first[0].is_ascii_uppercase() {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                    return;
                }
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    let arrived_tx = arrived_tx.clone();
                    async move {
                        if req.uri().path() == "/slow" {
                            let _ = arrived_tx.send(());
                            std::future::pending::<()>().await;
                        }
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from("ok"))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            });
        }
    });
    (addr, arrived)
}

/// Strict server-side flags in front of `app`, on `inbound` if given.
fn server_flags(app: SocketAddr, inbound: Option<SocketAddr>) -> Vec<String> {
    let mut flags = vec![
        "--inbound-mode".to_owned(),
        "strict".to_owned(),
        "--app-addr".to_owned(),
        app.to_string(),
    ];
    if let Some(inbound) = inbound {
        flags.extend(["--inbound-addr".to_owned(), inbound.to_string()]);
    }
    flags
}

#[tokio::test]
async fn a_peer_sidecar_killed_mid_stream_ends_its_streams_at_once_and_is_reached_again_when_back()
{
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let (app, mut arrived) = mixed_app().await;
    let log = dir.path().join("server-1.log");
    let cmd = sidecar_command(&cp, "server", &server_flags(app, None), None, &log).unwrap();
    let mut b = ChildSidecar::spawn(cmd, log).await;

    // Other traffic of the client sidecar: a second peer, in this process.
    let mut c = sidecar_config(&cp, cp.token_file("demo", "other"));
    c.app_addr = Some(http_app("other").await);
    c.inbound_mode = InboundMode::Strict;
    let mut c = Sidecar::start_ready(c).await;
    let mut a = sidecar_config(&cp, cp.token_file("demo", "client"));
    a.routes = vec![
        route(b.inbound, Some(SERVER_ID)),
        route(c.r().inbound_addr, Some(OTHER_ID)),
    ];
    let mut a = Sidecar::start_ready(a).await;
    assert_eq!(http_get(a.route(0), "/hello").await, (200, "ok".into()));

    // (b) A request in flight over the pooled HTTP/2 connection, its app still thinking.
    let mut client = HttpClient::connect(a.route(0)).await.unwrap();
    let slow = tokio::spawn(async move {
        let outcome = client.get("/slow").await.map_err(|e| e.to_string());
        (Instant::now(), outcome)
    });
    tokio::time::timeout(Duration::from_secs(10), arrived.recv())
        .await
        .expect("the slow request reaches the app")
        .unwrap();

    // (a) An opaque stream mid-transfer: 16 KiB each way every 10 ms, until it ends.
    let rounds = Arc::new(AtomicUsize::new(0));
    let mut tcp = TcpStream::connect(a.route(0)).await.unwrap();
    let counted = rounds.clone();
    let opaque = tokio::spawn(async move {
        let chunk = vec![0u8; 16 * 1024];
        let mut back = vec![0u8; chunk.len()];
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for _ in 0..3000 {
            tick.tick().await;
            if let Err(e) = tcp.write_all(&chunk).await {
                return (Instant::now(), format!("write: {e}"));
            }
            if let Err(e) = tcp.read_exact(&mut back).await {
                return (Instant::now(), format!("read: {e}"));
            }
            assert_eq!(back, chunk);
            counted.fetch_add(1, Ordering::Relaxed);
        }
        (Instant::now(), "still open after 3000 rounds".to_owned())
    });
    eventually(
        "the opaque stream is flowing",
        Duration::from_secs(10),
        async || rounds.load(Ordering::Relaxed) >= 10,
    )
    .await;

    let killed = Instant::now();
    b.kill();

    let (ended, outcome) = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("the in-flight request ends within 5 s of the kill, not hangs")
        .unwrap();
    match &outcome {
        Ok((status, _)) => assert_eq!(*status, 502, "{outcome:?}"),
        Err(e) => eprintln!("in-flight request: connection closed ({e})"),
    }
    eprintln!(
        "in-flight HTTP request ended {:?} after the kill: {outcome:?}",
        ended - killed
    );
    let (ended, outcome) = tokio::time::timeout(Duration::from_secs(5), opaque)
        .await
        .expect("the opaque stream ends within 5 s of the kill, not hangs")
        .unwrap();
    assert!(
        outcome.starts_with("read: ") || outcome.starts_with("write: "),
        "{outcome}"
    );
    eprintln!(
        "opaque stream ended {:?} after the kill, after {} rounds: {outcome}",
        ended - killed,
        rounds.load(Ordering::Relaxed)
    );

    // The client sidecar serves the rest, and answers for the dead peer at once.
    assert_eq!(
        get_within(a.r().admin_addr, "/live", Duration::from_secs(2))
            .await
            .map(|r| r.0),
        Some(200)
    );
    for _ in 0..3 {
        assert_eq!(http_get(a.route(1), "/").await, (200, "other GET /".into()));
    }
    // A new connection for the dead peer is refused (closed) at once, and counted.
    let started = Instant::now();
    let outcome = get_outcome(a.route(0), "/hello", Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(
        matches!(&outcome, Err(e) if e != "timed out") || matches!(&outcome, Ok((502, _))),
        "{outcome:?}"
    );
    eprintln!("a new request for the dead peer: {outcome:?} in {took:?}");
    let am = a.metrics().await;
    let (bad_gateway, unreachable) = (
        metric(
            &am,
            r#"meshlet_requests_total{direction="outbound",status_code="502",tls="true"}"#,
        ),
        metric(
            &am,
            r#"meshlet_connections_refused_total{direction="outbound",reason="upstream_unreachable"}"#,
        ),
    );
    eprintln!(
        "client sidecar: {bad_gateway} requests answered 502, {unreachable} connections refused as upstream_unreachable"
    );
    assert!(bad_gateway >= 1.0 && unreachable >= 1.0, "{am}");

    // A new server sidecar on the same inbound address is reached again, both ways.
    let log = dir.path().join("server-2.log");
    let flags = server_flags(app, Some(b.inbound));
    let cmd = sidecar_command(&cp, "server", &flags, None, &log).unwrap();
    let b2 = ChildSidecar::spawn(cmd, log).await;
    assert_eq!(b2.inbound, b.inbound);
    let back = Instant::now();
    eventually(
        "the client sidecar reaches the restarted peer",
        Duration::from_secs(10),
        async || {
            get_within(a.route(0), "/hello", Duration::from_secs(2)).await
                == Some((200, "ok".into()))
        },
    )
    .await;
    eprintln!(
        "restarted peer answered {:?} after its /ready",
        back.elapsed()
    );
    assert_eq!(
        echo_round_trip(a.route(0), b"\x00opaque again")
            .await
            .unwrap(),
        b"\x00opaque again"
    );

    drop(b2);
    a.stop().await;
    c.stop().await;
    cp.stop().await;
}

/// One round trip of `byte` on an open connection: Ok, or how it failed ("timed out",
/// "closed", or the error).
async fn echo(tcp: &mut TcpStream, byte: u8, within: Duration) -> Result<(), String> {
    let round = async {
        tcp.write_all(&[byte]).await?;
        let mut back = [0u8; 1];
        tcp.read_exact(&mut back).await?;
        std::io::Result::Ok(back[0])
    };
    match tokio::time::timeout(within, round).await {
        Err(_) => Err("timed out".to_owned()),
        Ok(Ok(b)) if b == byte => Ok(()),
        Ok(Ok(b)) => Err(format!("echoed {b}, not {byte}")),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err("closed".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn a_sidecar_out_of_file_descriptors_keeps_its_connections_and_recovers() {
    const NOFILE: usize = 64;
    let mut cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    // Permissive: the test's plain connections are passed through to the echo app; a mesh
    // ClientHello left unanswered holds one descriptor for the long handshake time box.
    let flags = vec![
        "--inbound-mode".to_owned(),
        "permissive".to_owned(),
        "--app-addr".to_owned(),
        echo_app().await.to_string(),
        "--handshake-timeout".to_owned(),
        "60s".to_owned(),
    ];
    let nofile = u32::try_from(NOFILE).unwrap();
    let Some(cmd) = sidecar_command(&cp, "server", &flags, Some(nofile), &log) else {
        if std::env::var("MESHLET_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("this test is required here but cannot run: prlimit is not installed");
        }
        eprintln!(
            "SKIPPED a_sidecar_out_of_file_descriptors_keeps_its_connections_and_recovers: \
             prlimit (util-linux) is not installed"
        );
        cp.stop().await;
        return;
    };
    let mut b = ChildSidecar::spawn(cmd, log).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", b.pid())).unwrap();
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files")
            && l.split_whitespace()
                .filter(|w| *w == NOFILE.to_string())
                .count()
                == 2),
        "{limits}"
    );
    let base = b.fds(NOFILE);

    let mut established = TcpStream::connect(b.inbound).await.unwrap();
    echo(&mut established, 1, Duration::from_secs(5))
        .await
        .unwrap();

    // Proxied connections (two descriptors each) until one is not served: its connection
    // to the app cannot be made, so it is refused.
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..NOFILE {
        let mut tcp = TcpStream::connect(b.inbound).await.unwrap();
        match echo(&mut tcp, 2, Duration::from_secs(2)).await {
            Ok(()) => held.push(tcp),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.unwrap_or_else(|| panic!("{} connections all served", held.len()));
    eprintln!(
        "descriptors at ready: {base}; {} proxied connections served, then one was not: {refused}",
        held.len()
    );
    assert!(held.len() >= 5, "only {} connections served", held.len());
    // Which limit came first depends on the descriptors' parity: the connection to the app
    // (refused and counted) or the accept itself (the connection waits in the backlog).
    let refused_by_sidecar = refused != "timed out";
    b.assert_alive();

    // Then mesh handshakes left hanging, one descriptor each (the sidecar answers the
    // ClientHello and waits for the rest), until one is not answered: it waits unaccepted.
    let mut hanging = Vec::new();
    let (mut waiting, mut closed) = (None, 0);
    for _ in 0..NOFILE {
        let mut tcp = TcpStream::connect(b.inbound).await.unwrap();
        tcp.write_all(&mesh_client_hello()).await.unwrap();
        let mut first = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut first)).await {
            Ok(Ok(1)) => hanging.push(tcp),
            Ok(_) => closed += 1,
            Err(_) => {
                waiting = Some(tcp);
                break;
            }
        }
    }
    let mut waiting = waiting.expect("a connection beyond the limit waits");
    let fds = b.fds(NOFILE);
    eprintln!(
        "then {} hanging handshakes ({closed} closed at once); a connection waits; {fds} descriptors open",
        hanging.len()
    );
    assert_eq!(fds, NOFILE);

    // Out of descriptors: the established connection goes on; /live is asked (it may wait).
    echo(&mut established, 4, Duration::from_secs(5))
        .await
        .unwrap();
    let admin = b.admin;
    let live = tokio::spawn(async move {
        let answer = get_within(admin, "/live", Duration::from_secs(20)).await;
        (Instant::now(), answer)
    });
    // Over a window of 2 s, a process that backs off uses little CPU; a spinning one ~2 s.
    let failed = || b.log().matches("accept failed").count();
    let (cpu, failed_before, window) = (b.cpu(), failed(), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (used, failed_accepts, window) =
        (b.cpu() - cpu, failed() - failed_before, window.elapsed());
    b.assert_alive();
    eprintln!(
        "out of descriptors: {used:?} of CPU in {window:?}; {failed_accepts} failed accepts logged"
    );
    assert!(
        used < Duration::from_millis(500),
        "{used:?} of CPU in {window:?}"
    );
    // Retried every 50 ms, not in a loop: about 40 in 2 s per waiting listener.
    assert!(
        (10..=200).contains(&failed_accepts),
        "{failed_accepts} failed accepts"
    );
    echo(&mut established, 5, Duration::from_secs(5))
        .await
        .unwrap();

    // Descriptors free again: the waiting connection, /live and new connections are served.
    let released = Instant::now();
    drop(held);
    drop(hanging);
    let mut first = [0u8; 1];
    let served = tokio::time::timeout(Duration::from_secs(5), waiting.read(&mut first)).await;
    assert!(matches!(served, Ok(Ok(1))), "{served:?}");
    let (answered, answer) = tokio::time::timeout(Duration::from_secs(10), live)
        .await
        .expect("/live answers once descriptors are free")
        .unwrap();
    assert_eq!(answer.as_ref().map(|r| r.0), Some(200), "{answer:?}");
    eprintln!(
        "after the release: the waiting connection served in {:?}, /live answered in {:?}",
        released.elapsed(),
        answered.saturating_duration_since(released)
    );
    assert_eq!(
        echo_round_trip(b.inbound, b"\x00again").await.unwrap(),
        b"\x00again"
    );
    echo(&mut established, 7, Duration::from_secs(5))
        .await
        .unwrap();
    b.assert_alive();
    let metrics = get_within(b.admin, "/metrics", Duration::from_secs(5))
        .await
        .unwrap()
        .1;
    let refused: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("meshlet_connections_refused_total"))
        .collect();
    eprintln!("server sidecar, refused: {refused:?}");
    // Nothing leaked: what is left open is what was open at ready, the established
    // connection (two) and the waiting one, now a hanging handshake (one).
    eventually(
        "descriptors back to where they were",
        Duration::from_secs(5),
        async || b.fds(NOFILE) <= base + 3,
    )
    .await;
    let unreachable = metric(
        &metrics,
        r#"meshlet_connections_refused_total{direction="inbound",reason="upstream_unreachable"}"#,
    );
    assert_eq!(unreachable >= 1.0, refused_by_sidecar, "{metrics}");

    drop((established, waiting));
    drop(b);
    cp.stop().await;
}
