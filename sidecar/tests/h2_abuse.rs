//! HTTP/2 abuse at the sidecar's HTTP/2 server: an app speaks prior-knowledge h2 to an
//! outbound route that leads to a meshed peer, with hand-made frames: rapid reset, a
//! CONTINUATION flood, an HPACK bomb and a flood of empty DATA frames. Each must end the
//! connection or refuse the stream within a bounded time, must not reach the peer's app as
//! a request, and must leave the sidecar serving good HTTP/2 and HTTP/1 clients. h2's own
//! limits (reset streams pending accept, CONTINUATION frames per header block, decoded
//! header list size, empty DATA frames) end each with GOAWAY ENHANCE_YOUR_CALM.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// `:status 431` as h2 writes it: literal with indexing of static name 8, Huffman-coded.
const STATUS_431: [u8; 5] = [0x48, 0x83, 0x69, 0x90, 0xff];

/// HPACK, no Huffman: `:method GET`, `:scheme http`, `:path /`, `:authority app`.
const GET: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x03, b'a', b'p', b'p'];
/// The same with `:method POST`.
const POST: &[u8] = &[0x83, 0x86, 0x84, 0x01, 0x03, b'a', b'p', b'p'];

/// One frame: the 9-byte header (length, type, flags, stream), then the payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `first`.
fn hpack_int(first: u8, n: u32, mut value: usize) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if value < max {
        return vec![first | value as u8];
    }
    let mut out = vec![first | max as u8];
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
    out
}

/// A literal header field with a new name, no Huffman: `first` 0x40 adds it to the
/// dynamic table, 0x00 does not.
fn literal(first: u8, name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.extend(hpack_int(0x00, 7, name.len()));
    out.extend(name);
    out.extend(hpack_int(0x00, 7, value.len()));
    out.extend(value);
    out
}

/// What the sidecar sent back on a raw connection.
#[derive(Debug, Default)]
struct Seen {
    /// The GOAWAY's error code and debug data.
    goaway: Option<(u32, String)>,
    /// (stream, error code)
    resets: Vec<(u32, u32)>,
    /// (stream, the first bytes of its response header block)
    responses: Vec<(u32, Vec<u8>)>,
    closed: bool,
}

/// A client that writes whatever frames it is given and records what comes back.
struct RawH2 {
    w: OwnedWriteHalf,
    seen: Arc<Mutex<Seen>>,
}

async fn read_frame(r: &mut OwnedReadHalf) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok((head[3], head[4], stream, payload))
}

fn code(payload: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(payload[at..at + 4].try_into().unwrap())
}

impl RawH2 {
    /// Sends the preface and settings, acknowledges the server's settings, and records
    /// every frame that follows.
    async fn connect(addr: SocketAddr) -> Self {
        let (mut r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
        w.write_all(&[PREFACE, &frame(SETTINGS, 0, 0, &[])].concat())
            .await
            .unwrap();
        let settings = async { while read_frame(&mut r).await.unwrap().0 != SETTINGS {} };
        tokio::time::timeout(Duration::from_secs(5), settings)
            .await
            .expect("the server's SETTINGS within 5 s");
        w.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((kind, _, stream, payload)) = read_frame(&mut r).await {
                let mut s = record.lock().unwrap();
                match kind {
                    GOAWAY => {
                        let debug = String::from_utf8_lossy(&payload[8..]).into_owned();
                        s.goaway = Some((code(&payload, 4), debug));
                    }
                    RST_STREAM => s.resets.push((stream, code(&payload, 0))),
                    HEADERS => s
                        .responses
                        .push((stream, payload.into_iter().take(5).collect())),
                    _ => {}
                }
            }
            record.lock().unwrap().closed = true;
        });
        Self { w, seen }
    }

    /// Writes `bytes`; false once the sidecar no longer takes them.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.w.write_all(bytes).await.is_ok()
    }

    /// The GOAWAY's error code, once one came.
    fn goaway(&self) -> Option<u32> {
        self.seen.lock().unwrap().goaway.as_ref().map(|g| g.0)
    }

    fn ended(&self) -> bool {
        let s = self.seen.lock().unwrap();
        s.goaway.is_some() || s.closed
    }

    /// Waits (at most `within`) until a stream is answered or reset, or the connection
    /// ends; returns what was seen, for messages.
    async fn outcome(&self, within: Duration) -> String {
        let seen = self.seen.clone();
        eventually(
            "a stream answered or reset, or the connection ended",
            within,
            async || {
                let s = seen.lock().unwrap();
                s.goaway.is_some() || s.closed || !s.resets.is_empty() || !s.responses.is_empty()
            },
        )
        .await;
        format!("{:?}", self.seen.lock().unwrap())
    }

    /// Writes `batch(i)` for i in 0.. until the connection ends, `max` batches were sent
    /// or 10 s passed; then waits (at most 5 s) for the end. Returns the batches sent.
    async fn flood(&mut self, max: u32, batch: impl Fn(u32) -> Vec<u8>) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sent = 0;
        while sent < max && Instant::now() < deadline && !self.ended() {
            if !self.send(&batch(sent)).await {
                break;
            }
            sent += 1;
        }
        let seen = self.seen.clone();
        eventually(
            "the sidecar ends the connection (GOAWAY or close)",
            Duration::from_secs(5),
            async || seen.lock().unwrap().goaway.is_some() || seen.lock().unwrap().closed,
        )
        .await;
        sent
    }
}

/// A client sidecar whose route 0 leads to `orders` (an HTTP app behind its sidecar).
struct Mesh {
    cp: ControlPlane,
    orders: Sidecar,
    client: Sidecar,
}

impl Mesh {
    async fn start() -> Self {
        let cp = ControlPlane::start(Duration::from_secs(3600)).await;
        let mut orders = sidecar_config(&cp, cp.token_file("demo", "orders"));
        orders.app_addr = Some(http_app("orders").await);
        let orders = Sidecar::start_ready(orders).await;
        let mut client = sidecar_config(&cp, cp.token_file("demo", "client"));
        client.routes = vec![route(
            orders.r().inbound_addr,
            Some("spiffe://cluster.local/ns/demo/sa/orders"),
        )];
        let client = Sidecar::start_ready(client).await;
        Self { cp, orders, client }
    }

    fn to(&self) -> SocketAddr {
        self.client.route(0)
    }

    /// Requests the orders app answered, as its sidecar counts them.
    async fn answered(&self) -> f64 {
        let m = self.orders.metrics().await;
        m.lines()
            .filter(|l| l.starts_with(r#"meshlet_requests_total{direction="inbound""#))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The client sidecar counted a connection it ended for abuse (`kind="flood"`).
    async fn counted_flood(&self) {
        let name = r#"meshlet_http_connection_errors_total{direction="outbound",kind="flood"}"#;
        eventually(
            "the flood to be counted",
            Duration::from_secs(5),
            async || metric(&self.client.metrics().await, name) >= 1.0,
        )
        .await;
    }

    /// Good clients of both HTTP versions are served.
    async fn still_serves(&self, after: &str) {
        let want = (200, "orders GET /good".to_owned());
        assert_eq!(
            h2_get(self.to(), "http://app/good").await,
            want,
            "h2 after {after}"
        );
        assert_eq!(http_get(self.to(), "/good").await, want, "h1 after {after}");
    }

    async fn stop(mut self) {
        self.client.stop().await;
        self.orders.stop().await;
        self.cp.stop().await;
    }
}

#[tokio::test]
async fn rapid_reset_is_ended_with_goaway() {
    let mesh = Mesh::start().await;
    mesh.still_serves("start").await;
    let before = mesh.answered().await;
    let mut raw = RawH2::connect(mesh.to()).await;
    let started = Instant::now();
    // Each batch: 50 streams opened and cancelled at once.
    let sent = raw
        .flood(1_000, |b| {
            (0..50u32)
                .flat_map(|i| {
                    let id = (b * 50 + i) * 2 + 1;
                    let headers = frame(HEADERS, END_HEADERS | END_STREAM, id, GET);
                    [headers, frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes())].concat()
                })
                .collect()
        })
        .await;
    let seen = format!("{:?}", raw.seen.lock().unwrap().goaway);
    let answered = mesh.answered().await;
    println!(
        "rapid reset: {sent} batches of 50 written in {:?}, GOAWAY {seen}, {} reached the app",
        started.elapsed(),
        answered - before
    );
    assert!(sent < 1_000, "50,000 reset streams were all taken");
    assert_eq!(answered, before, "reset streams reached the app");
    assert_eq!(raw.goaway(), Some(ENHANCE_YOUR_CALM), "{seen}");
    mesh.counted_flood().await;
    mesh.still_serves("rapid reset").await;
    mesh.stop().await;
}

#[tokio::test]
async fn a_continuation_flood_is_ended() {
    let mesh = Mesh::start().await;
    let before = mesh.answered().await;
    let mut raw = RawH2::connect(mesh.to()).await;
    assert!(raw.send(&frame(HEADERS, END_STREAM, 1, GET)).await);
    // Endless CONTINUATION frames, each a small literal header, never END_HEADERS.
    let field = literal(0x00, b"x-a", b"aaaaaaaa");
    let sent = raw
        .flood(100_000, |_| frame(CONTINUATION, 0, 1, &field))
        .await;
    let seen = format!("{:?}", raw.seen.lock().unwrap());
    println!("continuation flood: {sent} frames, then {seen}");
    assert!(sent < 100_000, "every CONTINUATION frame was taken");
    assert_eq!(raw.goaway(), Some(ENHANCE_YOUR_CALM), "{seen}");
    mesh.counted_flood().await;
    assert_eq!(mesh.answered().await, before, "the request reached the app");
    mesh.still_serves("a CONTINUATION flood").await;
    mesh.stop().await;
}

#[tokio::test]
async fn an_hpack_bomb_is_refused() {
    let mesh = Mesh::start().await;
    let before = mesh.answered().await;
    let mut raw = RawH2::connect(mesh.to()).await;
    // One 4,000-byte header enters the dynamic table (index 62), then 3,000 one-byte
    // references to it: 12 KB on the wire, 12 MB decoded, against a 64 KiB limit.
    let mut block = GET.to_vec();
    block.extend(literal(0x40, b"x-bomb", &[b'b'; 4_000]));
    block.extend(std::iter::repeat_n(0x80 | 62, 3_000));
    assert!(
        raw.send(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block))
            .await
    );
    let seen = raw.outcome(Duration::from_secs(5)).await;
    println!("hpack bomb: {seen}");
    assert!(
        raw.seen.lock().unwrap().responses.is_empty(),
        "the bomb got an answer: {seen}"
    );
    assert_eq!(raw.goaway(), Some(ENHANCE_YOUR_CALM), "{seen}");
    mesh.counted_flood().await;
    assert_eq!(mesh.answered().await, before, "the request reached the app");
    mesh.still_serves("an HPACK bomb").await;
    mesh.stop().await;
}

#[tokio::test]
async fn a_header_list_over_the_limit_is_refused() {
    let mesh = Mesh::start().await;
    let before = mesh.answered().await;
    let mut raw = RawH2::connect(mesh.to()).await;
    // 20 headers of 4,000 bytes each: 80 KB decoded, over the 64 KiB --max-header-bytes.
    let mut block = GET.to_vec();
    for _ in 0..20 {
        block.extend(literal(0x00, b"x-big", &[b'c'; 4_000]));
    }
    let (first, rest) = block.split_at(16_000);
    assert!(raw.send(&frame(HEADERS, END_STREAM, 1, first)).await);
    for (i, chunk) in rest.chunks(16_000).enumerate() {
        let last = (i + 1) * 16_000 >= rest.len();
        let flags = if last { END_HEADERS } else { 0 };
        assert!(raw.send(&frame(CONTINUATION, flags, 1, chunk)).await);
    }
    let seen = raw.outcome(Duration::from_secs(5)).await;
    println!("header list over the limit: {seen}");
    assert_eq!(
        raw.seen.lock().unwrap().responses,
        [(1, STATUS_431.to_vec())],
        "{seen}"
    );
    assert!(!raw.ended(), "the connection itself goes on: {seen}");
    assert_eq!(mesh.answered().await, before, "the request reached the app");
    drop(raw);
    mesh.still_serves("a header list over the limit").await;
    mesh.stop().await;
}

#[tokio::test]
async fn an_empty_data_flood_is_ended() {
    let mesh = Mesh::start().await;
    let mut raw = RawH2::connect(mesh.to()).await;
    assert!(raw.send(&frame(HEADERS, END_HEADERS, 1, POST)).await);
    let started = Instant::now();
    let empty: Vec<u8> = (0..1_000).flat_map(|_| frame(DATA, 0, 1, &[])).collect();
    let mut sent = 0;
    while sent < 100 && !raw.ended() && started.elapsed() < Duration::from_secs(10) {
        if !raw.send(&empty).await {
            break;
        }
        sent += 1;
    }
    let _ = raw.send(&frame(DATA, END_STREAM, 1, b"done")).await;
    let seen = raw.outcome(Duration::from_secs(10)).await;
    println!(
        "empty DATA flood: {} frames in {:?}, then {seen}",
        sent * 1_000,
        started.elapsed()
    );
    assert_eq!(raw.goaway(), Some(ENHANCE_YOUR_CALM), "{seen}");
    mesh.counted_flood().await;
    mesh.still_serves("an empty DATA flood").await;
    mesh.stop().await;
}
