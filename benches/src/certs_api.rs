//! How fast the control plane's `/v1/certs` answers with 10,000 workloads: the registry
//! snapshot (states computed, sorted), filtered, and encoded as JSON, as the admin handler
//! does. Baseline in the same run: encoding the same entries without the registry.
//!
//! `cargo run --release -p meshlet-benches --bin certs-api`

use std::time::{Duration, Instant};

use meshlet_control::registry::{Issued, Registry};
use meshlet_identity::SpiffeId;
use time::OffsetDateTime;

fn main() -> anyhow::Result<()> {
    const N: usize = 10_000;
    const ROUNDS: usize = 20;
    let registry = Registry::default();
    let now = OffsetDateTime::now_utc();
    for i in 0..N {
        let ns = format!("ns-{}", i % 50);
        registry.record(Issued {
            spiffe_id: SpiffeId::parse(&format!(
                "spiffe://cluster.local/ns/{ns}/sa/sa-{}",
                i % 200
            ))?,
            namespace: ns,
            pod: Some(format!("pod-{i}")),
            address: Some(format!("10.{}.{}.{}", i / 65_536, (i / 256) % 256, i % 256)),
            serial: format!("{i:032x}"),
            issued_at: now,
            not_before: now - time::Duration::minutes(1),
            not_after: now + time::Duration::hours(24),
        });
    }
    let materialised = registry.snapshot(now, 0.25);
    let mut all = Vec::new();
    let mut filtered = Vec::new();
    let mut encode_only = Vec::new();
    let mut size = 0;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let snapshot = registry.snapshot(OffsetDateTime::now_utc(), 0.25);
        let json = serde_json::to_vec(&snapshot)?;
        all.push(t.elapsed());
        size = json.len();

        let t = Instant::now();
        let mut snapshot = registry.snapshot(OffsetDateTime::now_utc(), 0.25);
        snapshot.retain(|w| w.spiffe_id.path().starts_with("/ns/ns-7/"));
        let _ = serde_json::to_vec(&snapshot)?;
        filtered.push(t.elapsed());

        let t = Instant::now();
        let _ = serde_json::to_vec(&materialised)?;
        encode_only.push(t.elapsed());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    println!("/v1/certs with {N} workloads ({size} bytes of JSON), median of {ROUNDS}:");
    println!("  all workloads           {:.2} ms", median(&mut all));
    println!("  ?namespace= (200 shown) {:.2} ms", median(&mut filtered));
    println!(
        "  baseline: JSON of the entries alone {:.2} ms",
        median(&mut encode_only)
    );
    Ok(())
}
