//! What the CA has issued, per workload, for `/v1/certs` and for discovery.
//!
//! A workload is a pod when the token names one, else its SPIFFE ID. Entries are kept until
//! an hour after their certificate expired, so an expired workload is still reported.
//!
//! Discovery reads the address index: one watch channel per address ("ip" or "ip:port")
//! holding the SPIFFE ID served there, so a change wakes only the sidecars watching that
//! address. An address stops being meshed when its certificate expires.

use std::time::Duration;

use dashmap::DashMap;
use meshlet_identity::SpiffeId;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;

/// How long an expired entry is still reported before it is forgotten.
pub const KEEP_EXPIRED: Duration = Duration::from_secs(3600);

/// One issued certificate, as recorded.
#[derive(Debug, Clone)]
pub struct Issued {
    pub spiffe_id: SpiffeId,
    pub namespace: String,
    pub pod: Option<String>,
    /// Where the workload serves: "ip" (a pod) or "ip:port" (explicit mode).
    pub address: Option<String>,
    pub serial: String,
    pub issued_at: OffsetDateTime,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

#[derive(Debug, Clone)]
struct Entry {
    last: Issued,
    renewals: u64,
}

pub use meshlet_identity::cert::CertState;

/// One workload in `/v1/certs`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadStatus {
    pub spiffe_id: SpiffeId,
    pub pod: Option<String>,
    pub pod_ip: Option<String>,
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    pub renewals: u64,
    pub state: CertState,
}

/// The issued-certificate registry.
#[derive(Debug, Default)]
pub struct Registry {
    entries: DashMap<String, Entry>,
    addresses: DashMap<String, watch::Sender<Option<SpiffeId>>>,
    /// The latest announcement of each announced address, counted up.
    announcements: DashMap<String, u64>,
}

impl Registry {
    /// Records an issuance; a workload that already had a certificate counts a renewal.
    pub fn record(&self, issued: Issued) {
        let key = match &issued.pod {
            Some(pod) => format!("{}/{pod}", issued.namespace),
            None => issued.spiffe_id.to_string(),
        };
        if let Some(address) = &issued.address {
            self.set_address(address, Some(issued.spiffe_id.clone()));
        }
        self.entries
            .entry(key)
            .and_modify(|e| {
                e.renewals += 1;
                e.last = issued.clone();
            })
            .or_insert(Entry {
                last: issued,
                renewals: 0,
            });
    }

    /// The workloads, sorted by SPIFFE ID then pod.
    pub fn snapshot(&self, now: OffsetDateTime, expiring_share: f64) -> Vec<WorkloadStatus> {
        let mut out: Vec<WorkloadStatus> = self
            .entries
            .iter()
            .map(|e| {
                let i = &e.last;
                WorkloadStatus {
                    spiffe_id: i.spiffe_id.clone(),
                    pod: i.pod.as_ref().map(|p| format!("{}/{p}", i.namespace)),
                    pod_ip: i.address.clone(),
                    serial: i.serial.clone(),
                    issued_at: i.issued_at,
                    not_after: i.not_after,
                    renewals: e.renewals,
                    state: meshlet_identity::cert::state(
                        i.issued_at,
                        i.not_after,
                        now,
                        expiring_share,
                        true,
                    ),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.spiffe_id, &a.pod).cmp(&(&b.spiffe_id, &b.pod)));
        out
    }

    /// Forgets workloads whose certificate expired more than [`KEEP_EXPIRED`] ago, and stops
    /// reporting addresses whose certificate expired as meshed.
    pub fn prune(&self, now: OffsetDateTime) {
        for e in self.entries.iter() {
            if let Some(address) = &e.last.address
                && e.last.not_after <= now
            {
                self.unset_address_if(address, &e.last.spiffe_id);
            }
        }
        self.entries
            .retain(|_, e| e.last.not_after + KEEP_EXPIRED >= now);
        self.addresses
            .retain(|_, tx| tx.receiver_count() > 0 || tx.borrow().is_some());
    }

    /// A sidecar says it serves `address` as `id` (over its open bundle watch): rebuilds
    /// what a restarted or other replica never saw issued. Returns this announcement's
    /// generation, for [`Registry::withdraw`].
    pub fn announce(&self, address: &str, id: SpiffeId) -> u64 {
        let generation = {
            let mut g = self.announcements.entry(address.to_owned()).or_insert(0);
            *g += 1;
            *g
        };
        self.set_address(address, Some(id));
        generation
    }

    /// The sidecar that announced `address` as `id` (announcement `generation`) has gone:
    /// unless it, or another, has announced the address since.
    pub fn withdraw(&self, address: &str, id: &SpiffeId, generation: u64) {
        if self
            .announcements
            .remove_if(address, |_, latest| *latest == generation)
            .is_some()
        {
            self.unset_address_if(address, id);
        }
    }

    /// Subscribes to the SPIFFE ID served at `address` (None: not meshed).
    pub fn watch_address(&self, address: &str) -> watch::Receiver<Option<SpiffeId>> {
        self.addresses
            .entry(address.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    fn set_address(&self, address: &str, id: Option<SpiffeId>) {
        let tx = self
            .addresses
            .entry(address.to_owned())
            .or_insert_with(|| watch::channel(None).0);
        tx.send_if_modified(|current| {
            let changed = *current != id;
            *current = id;
            changed
        });
    }

    fn unset_address_if(&self, address: &str, id: &SpiffeId) {
        if let Some(tx) = self.addresses.get(address) {
            tx.send_if_modified(|current| {
                let ours = current.as_ref() == Some(id);
                if ours {
                    *current = None;
                }
                ours
            });
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn renewals_count_per_pod_and_expired_entries_are_pruned() {
        let reg = Registry::default();
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").expect("valid");
        let at = datetime!(2026-01-01 00:00 UTC);
        let issued = |pod: &str, h: i64| Issued {
            spiffe_id: id.clone(),
            namespace: "a".into(),
            pod: Some(pod.into()),
            address: Some(format!("10.0.0.{h}")),
            serial: format!("{h:02x}"),
            issued_at: at + time::Duration::hours(h),
            not_before: at + time::Duration::hours(h),
            not_after: at + time::Duration::hours(h + 24),
        };
        reg.record(issued("p1", 0));
        reg.record(issued("p1", 12));
        reg.record(issued("p2", 0));
        let snap = reg.snapshot(at + time::Duration::hours(13), 1.0 / 3.0);
        let summary: Vec<_> = snap
            .iter()
            .map(|w| {
                (
                    w.pod.clone().unwrap_or_default(),
                    w.renewals,
                    w.serial.clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("a/p1".into(), 1, "0c".into()),
                ("a/p2".into(), 0, "00".into())
            ]
        );

        let p2_address = reg.watch_address("10.0.0.0");
        assert_eq!(p2_address.borrow().as_ref(), Some(&id));
        reg.prune(at + time::Duration::hours(25)); // p2 expired an hour ago: still kept
        assert_eq!(reg.len(), 2);
        assert_eq!(
            *p2_address.borrow(),
            None,
            "an expired certificate's address is not meshed"
        );
        assert_eq!(reg.watch_address("10.0.0.12").borrow().as_ref(), Some(&id));
        reg.prune(at + time::Duration::hours(25) + time::Duration::minutes(1));
        assert_eq!(reg.len(), 1);
    }
}
