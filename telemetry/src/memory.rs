//! Giving freed memory back to the system.
//!
//! glibc's allocator returns memory to the kernel only from the top of its heap: after a
//! burst of connections, the freed buffers below whatever is still live stay resident, so a
//! sidecar would keep its peak footprint for as long as it runs. [`release_free_memory`]
//! asks glibc for all of it back (`malloc_trim(0)`, which `madvise`s the free pages of every
//! arena), and [`release_when_quiet`] does that as soon as traffic stops, and at least every
//! [`RELEASE_INTERVAL`]. [`pow`] keeps glibc's libm, and the 0.5-0.6 MiB it makes resident,
//! out of the process.

use std::time::{Duration, Instant};

/// The longest the binaries keep freed memory while busy. A trim holds the thread that runs
/// it: on a sidecar under full load (a heap of a few MiB) it took 14-414 µs
/// (benches/README.md), so under steady load at most one request in ten seconds waits that
/// long.
pub const RELEASE_INTERVAL: Duration = Duration::from_secs(10);

/// How often [`release_when_quiet`] looks at the activity count. A check with no new activity
/// after some counts as quiet: the memory a burst left comes back within half a second of its
/// end, when no request is waiting for the thread. Four checks a second are an atomic load
/// each.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Returns the allocator's free pages to the kernel; true if any were returned. A no-op
/// (false) where the C library is not glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes no pointer and touches only the allocator's own state, under
    // the allocator's locks; glibc documents it as MT-Safe (callable from any thread; not
    // from a signal handler, and this is not one).
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Returns the allocator's free pages to the kernel; true if any were returned. A no-op
/// (false) where the C library is not glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

/// `pow` for the whole process, so that glibc's libm is never loaded: 0.5-0.6 MiB of every
/// process's resident memory (its code and tables, mapped 64 KB around each page its loader
/// touches) for this one function, which Tokio's multi-thread scheduler calls for its
/// statistics, and nothing else here needs. The executable's own definition binds first, and
/// the linker then leaves libm out (`--as-needed`). The `libm` crate is musl's, in Rust, from the
/// Rust project: within one unit in the last place, as glibc's. Unlike glibc's, it does not set
/// `errno` (nothing here reads it after `pow`). The symbol is exported: a library loaded later
/// would get this `pow` too (the binaries load none). It calls no `pow` itself (`.ci/run` checks
/// that the binaries need no libm).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

/// Whether to hand freed memory back at a check: when there was activity since the last
/// release and none since the last check (traffic stopped), or when the last release is
/// `RELEASE_INTERVAL` old, whatever the activity (steady load, or traffic the count does not
/// see, such as bytes on long-lived connections).
fn should_release(
    active_since_release: bool,
    active_since_check: bool,
    since_release: Duration,
) -> bool {
    since_release >= RELEASE_INTERVAL || (active_since_release && !active_since_check)
}

/// Calls [`release_free_memory`] as `should_release` says, checking every `check`
/// ([`CHECK_INTERVAL`]), for as long as the runtime runs. `activity` is a count that grows
/// with the work done (a sidecar's connections and requests); with one that never changes
/// (`|| 0`) and `check` at [`RELEASE_INTERVAL`], a release every ten seconds and no other
/// wake-up.
pub async fn release_when_quiet(check: Duration, activity: impl Fn() -> u64) {
    let mut tick = tokio::time::interval(check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let (mut seen, mut released_at, mut active_since_release) = (activity(), Instant::now(), false);
    loop {
        tick.tick().await;
        let count = activity();
        let active_since_check = count != seen;
        seen = count;
        active_since_release |= active_since_check;
        if !should_release(
            active_since_release,
            active_since_check,
            released_at.elapsed(),
        ) {
            continue;
        }
        let started = Instant::now();
        let released = release_free_memory();
        (released_at, active_since_release) = (Instant::now(), false);
        tracing::debug!(
            released,
            took_us = started.elapsed().as_micros(),
            "freed memory handed back"
        );
    }
}

#[cfg(test)]
mod decision {
    use super::*;

    #[test]
    fn releases_when_traffic_stops_and_at_least_every_interval() {
        let (soon, late) = (Duration::from_secs(1), RELEASE_INTERVAL);
        // (active since the last release, active since the last check, since the last release, release?)
        let table = [
            (false, false, soon, false), // idle, nothing to give back
            (true, true, soon, false),   // busy: keep the memory the next requests will use
            (true, false, soon, true),   // traffic stopped: give back what it left
            (true, true, late, true),    // busy for ten seconds: give back anyway
            (false, false, late, true),  // unseen traffic: the periodic release still runs
        ];
        for (since_release, since_check, elapsed, want) in table {
            assert_eq!(
                should_release(since_release, since_check, elapsed),
                want,
                "active since release {since_release}, since check {since_check}, {elapsed:?}"
            );
        }
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// `RssAnon` of this process, in KiB.
    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("Linux has /proc");
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("/proc/self/status has RssAnon")
    }

    #[test]
    fn freed_memory_below_a_live_allocation_goes_back() {
        // 64 MiB in blocks small enough for the heap (not mmap), touched so they are
        // resident, then everything freed but the last block, which pins the heap's top:
        // glibc alone keeps all of it.
        let mut blocks: Vec<Vec<u8>> = (0..16 * 1024).map(|_| vec![1u8; 4096]).collect();
        let last = blocks.pop().expect("16k blocks were made");
        drop(blocks);
        let before = rss_anon_kib();
        assert!(release_free_memory(), "glibc returned nothing");
        let after = rss_anon_kib();
        assert!(
            after + 32 * 1024 < before,
            "RssAnon {before} KiB -> {after} KiB: expected at least 32 MiB back"
        );
        drop(last);
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn pow_gives_the_c_library_values() {
        // the values of the function above, called directly (glibc's gives the same ones)
        let cases = [
            (2.0, 10.0, 1024.0),
            (-2.0, 3.0, -8.0),
            (0.5, -1.0, 2.0),
            (9.0, 0.5, 3.0),
            (0.0, 0.0, 1.0),
            (f64::NAN, 0.0, 1.0),
            (0.0, -1.0, f64::INFINITY),
        ];
        for (x, y, want) in cases {
            assert_eq!(pow(x, y), want, "pow({x}, {y})");
        }
        assert!(
            pow(-8.0, 1.0 / 3.0).is_nan(),
            "a negative base to a fraction"
        );
        // Tokio's use: the weight of an EWMA over n polls
        let weight = 1.0 - pow(1.0 - 0.1, 7.0);
        assert!((weight - 0.521_703_1).abs() < 1e-7, "{weight}");
    }
}
