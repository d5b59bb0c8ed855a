//! `meshletctl certs`, `meshletctl check` and `meshletctl ca`: the certificate view of the
//! mesh, a check that fails loudly, and the CA rotation steps.
//!
//! They read the control plane's admin API (`/v1/certs`) or one sidecar's (`/certs`).
//! [`problems`] is the whole judgement of `check`, pure and tested as a table.

use anyhow::{Context, bail};
use serde::Deserialize;
use time::OffsetDateTime;

use crate::apps::HttpClient;

/// The control plane's `/v1/certs`, as read here.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct CertsView {
    pub(crate) workloads: Vec<Workload>,
    pub(crate) ca: CaView,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Workload {
    pub(crate) spiffe_id: String,
    pub(crate) pod: Option<String>,
    pub(crate) serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub(crate) not_after: OffsetDateTime,
    pub(crate) renewals: u64,
    pub(crate) state: String,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct CaView {
    pub(crate) roots: Vec<CaCert>,
    pub(crate) intermediate: Option<CaCert>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct CaCert {
    pub(crate) subject: String,
    pub(crate) serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub(crate) not_after: OffsetDateTime,
    pub(crate) state: String,
}

/// One thing `check` found wrong: what, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) what: String,
    pub(crate) fix: String,
}

/// Everything wrong in `view` at `now`.
pub(crate) fn problems(view: &CertsView, now: OffsetDateTime) -> Vec<Problem> {
    let mut found = Vec::new();
    for root in &view.ca.roots {
        let what = format!("root {} (serial {})", root.subject, root.serial);
        match root.state.as_str() {
            "expired" => found.push(Problem {
                what: format!("{what} expired {} ago", human(now - root.not_after)),
                fix: "every certificate under it is invalid: add a new root, rotate the intermediate, and retire this root (README: Rotating the roots)".into(),
            }),
            "expiring" => found.push(Problem {
                what: format!("{what} expires in {}", human(root.not_after - now)),
                fix: "rotate the roots now: meshletctl ca add-root, then ca rotate-intermediate, then ca retire-root".into(),
            }),
            _ => {}
        }
    }
    match &view.ca.intermediate {
        Some(i) if i.state == "expired" => found.push(Problem {
            what: format!(
                "the issuing intermediate (serial {}) expired {} ago",
                i.serial,
                human(now - i.not_after)
            ),
            fix: "no workload can renew: meshletctl ca rotate-intermediate".into(),
        }),
        Some(i) if i.state == "expiring" => found.push(Problem {
            what: format!(
                "the issuing intermediate (serial {}) expires in {}",
                i.serial,
                human(i.not_after - now)
            ),
            fix: "meshletctl ca rotate-intermediate".into(),
        }),
        _ => {}
    }
    for w in &view.workloads {
        let who = match &w.pod {
            Some(pod) => format!("{} (pod {pod})", w.spiffe_id),
            None => w.spiffe_id.clone(),
        };
        let fix = "check that its sidecar is running and reaches the control plane (its /certs shows last_error)";
        match w.state.as_str() {
            "expired" => found.push(Problem {
                what: format!(
                    "{who}: certificate expired {} ago",
                    human(now - w.not_after)
                ),
                fix: fix.into(),
            }),
            "expiring" => found.push(Problem {
                what: format!(
                    "{who}: certificate expires in {} and was not renewed",
                    human(w.not_after - now)
                ),
                fix: fix.into(),
            }),
            "overdue" => found.push(Problem {
                what: format!(
                    "{who}: renewal is overdue (expires in {})",
                    human(w.not_after - now)
                ),
                fix: fix.into(),
            }),
            _ => {}
        }
    }
    found
}

/// "3d4h", "5m2s", "800ms".
fn human(d: time::Duration) -> String {
    let secs = d.whole_seconds().max(0);
    match secs {
        0 => format!("{}ms", d.whole_milliseconds().max(0)),
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

async fn fetch(admin: &str, path: &str) -> anyhow::Result<String> {
    let mut client = HttpClient::connect(admin).await?;
    let (status, body) = client.get(path).await?;
    if status != 200 {
        bail!("GET {path} answered {status}: {}", body.trim());
    }
    Ok(body)
}

/// `meshletctl certs`.
pub(crate) async fn certs(
    admin: &str,
    proxy: Option<&str>,
    json: bool,
    query: &str,
) -> anyhow::Result<()> {
    if let Some(proxy) = proxy {
        let body = fetch(proxy, "/certs").await?;
        if json {
            println!("{body}");
            return Ok(());
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        for key in [
            "spiffe_id",
            "serial",
            "not_before",
            "not_after",
            "renew_at",
            "rotations",
            "last_rotation",
            "last_error",
        ] {
            println!("{key:<14} {}", v[key]);
        }
        for root in v["trust_bundle"].as_array().into_iter().flatten() {
            println!(
                "{:<14} {} until {}",
                "trusted root", root["subject"], root["not_after"]
            );
        }
        return Ok(());
    }
    let body = fetch(admin, &format!("/v1/certs{query}")).await?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let view: CertsView = serde_json::from_str(&body).context("reading /v1/certs")?;
    let now = OffsetDateTime::now_utc();
    println!(
        "{:<52} {:<24} {:<12} {:>10} {:>8}  STATE",
        "SPIFFE ID", "POD", "SERIAL", "EXPIRES IN", "RENEWALS"
    );
    for w in &view.workloads {
        let expires = if w.not_after > now {
            human(w.not_after - now)
        } else {
            format!("-{}", human(now - w.not_after))
        };
        let serial: String = w.serial.chars().take(12).collect();
        let pod = w.pod.clone().unwrap_or_else(|| "-".into());
        println!(
            "{:<52} {:<24} {:<12} {:>10} {:>8}  {}",
            w.spiffe_id, pod, serial, expires, w.renewals, w.state
        );
    }
    println!();
    for root in &view.ca.roots {
        println!(
            "root          {} (serial {}) expires in {}, {}",
            root.subject,
            root.serial,
            human(root.not_after - now),
            root.state
        );
    }
    if let Some(i) = &view.ca.intermediate {
        println!(
            "intermediate  {} (serial {}) expires in {}, {}",
            i.subject,
            i.serial,
            human(i.not_after - now),
            i.state
        );
    }
    Ok(())
}

/// `meshletctl check`: prints what is wrong and fails, or says all is well.
pub(crate) async fn check(admin: &str) -> anyhow::Result<bool> {
    let body = match fetch(admin, "/v1/certs").await {
        Ok(body) => body,
        Err(e) => {
            println!("✗ the control plane's admin API at {admin} is unreachable: {e:#}");
            println!(
                "  → is meshlet-control running? (kubectl -n meshlet-system get pods; or pass --control-admin)"
            );
            return Ok(false);
        }
    };
    let view: CertsView = serde_json::from_str(&body).context("reading /v1/certs")?;
    let found = problems(&view, OffsetDateTime::now_utc());
    for p in &found {
        println!("✗ {}\n  → {}", p.what, p.fix);
    }
    if found.is_empty() {
        println!(
            "✓ {} root(s), the intermediate and {} workload certificate(s) are valid",
            view.ca.roots.len(),
            view.workloads.len()
        );
    }
    Ok(found.is_empty())
}

/// `meshletctl ca ...`: one rotation step through the admin API.
pub(crate) async fn ca_step(admin: &str, path: &str, token: &str) -> anyhow::Result<()> {
    let mut client = HttpClient::connect(admin).await?;
    let (status, body) = client.send(http::Method::POST, path, Some(token)).await?;
    if status != 200 {
        bail!("POST {path} answered {status}: {}", body.trim());
    }
    println!("{}", body.trim());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(root: &str, intermediate: &str, workloads: &[&str]) -> CertsView {
        let t = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let cert = |state: &str| CaCert {
            subject: "CN=r".into(),
            serial: "ab".into(),
            not_after: t,
            state: state.into(),
        };
        CertsView {
            workloads: workloads
                .iter()
                .map(|s| Workload {
                    spiffe_id: "spiffe://td/ns/a/sa/b".into(),
                    pod: Some("a/b-0".into()),
                    serial: "cd".into(),
                    not_after: t,
                    renewals: 0,
                    state: (*s).into(),
                })
                .collect(),
            ca: CaView {
                roots: vec![cert(root)],
                intermediate: Some(cert(intermediate)),
            },
        }
    }

    #[test]
    fn check_finds_every_unhealthy_certificate() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(19_999);
        let cases: Vec<(&str, CertsView, Vec<&str>)> = vec![
            (
                "all well",
                view("valid", "valid", &["valid", "valid"]),
                vec![],
            ),
            ("no workloads yet", view("valid", "valid", &[]), vec![]),
            (
                "root expiring",
                view("expiring", "valid", &["valid"]),
                vec!["root CN=r (serial ab) expires in 1d0h"],
            ),
            (
                "root expired",
                view("expired", "valid", &[]),
                vec!["expired"],
            ),
            (
                "intermediate expiring",
                view("valid", "expiring", &[]),
                vec!["the issuing intermediate (serial ab) expires in 1d0h"],
            ),
            (
                "intermediate expired",
                view("valid", "expired", &[]),
                vec!["intermediate"],
            ),
            (
                "workload overdue",
                view("valid", "valid", &["valid", "overdue"]),
                vec!["spiffe://td/ns/a/sa/b (pod a/b-0): renewal is overdue"],
            ),
            (
                "workload expiring",
                view("valid", "valid", &["expiring"]),
                vec!["was not renewed"],
            ),
            (
                "workload expired",
                view("valid", "valid", &["expired"]),
                vec!["certificate expired"],
            ),
            (
                "several",
                view("expiring", "expiring", &["expired", "overdue"]),
                vec!["root", "intermediate", "expired", "overdue"],
            ),
        ];
        for (name, v, want) in cases {
            let got = problems(&v, now);
            assert_eq!(got.len(), want.len(), "{name}: {got:?}");
            for (p, w) in got.iter().zip(&want) {
                assert!(p.what.contains(w), "{name}: {:?} lacks {w:?}", p.what);
                assert!(!p.fix.is_empty(), "{name}: every problem says what to do");
            }
        }
    }

    #[test]
    fn durations_read_well() {
        let cases = [
            (0.5, "500ms"),
            (5.0, "5s"),
            (125.0, "2m5s"),
            (7_260.0, "2h1m"),
            (90_000.0, "1d1h"),
        ];
        for (secs, want) in cases {
            assert_eq!(human(time::Duration::seconds_f64(secs)), want);
        }
    }
}
