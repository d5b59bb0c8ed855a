"""What mesh_load.py reports: each figure's median and spread over the rounds, the tables,
meshlet's targets (see benches/README.md), and whether the sidecar was linked in order."""
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (key, label, bound, "max" = value must be at most bound / "min" = at least)
TARGETS = [
    ("added_p50_ms", "added p50 at 1,000 rps (ms)", 0.25, "max"),
    ("added_p99_ms", "added p99 at 1,000 rps (ms)", 0.6, "max"),
    ("cpu_1k", "CPU-s per 10k requests at 1,000 rps (both sidecars)", 1.4, "max"),
    ("cpu_max", "CPU-s per 10k requests at max load (both sidecars)", 0.75, "max"),
    ("max_ratio", "max keep-alive rps, share of direct", 0.35, "min"),
    ("close_ratio", "new connections/s, share of direct", 0.45, "min"),
    ("rss_idle_mib", "RSS per sidecar idle after load (MiB, larger of the two)", 6, "max"),
    ("rss_64_mib", "RSS per sidecar at 64 connections (MiB, larger)", 10, "max"),
]


def summarize(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def fmt(s, digits=3):
    if s is None:
        return "-"
    f = f"{{:,.{digits}f}}"
    if len({round(s["min"], digits), round(s["max"], digits)}) == 1:
        return f.format(s["median"])
    return f"{f.format(s['median'])} ({f.format(s['min'])}-{f.format(s['max'])})"


def per_round(res, direct):
    """The figures of one setup in one round; ratios and added latency against direct's same round."""
    f, m, c = res["fixed"], res["max"], res["close"]
    out = {"p50_ms": f["p50_ms"], "p99_ms": f["p99_ms"], "added_p50_ms": f["p50_ms"] - direct["fixed"]["p50_ms"],
           "added_p99_ms": f["p99_ms"] - direct["fixed"]["p99_ms"], "max_rps": m["rps"],
           "max_ratio": m["rps"] / direct["max"]["rps"], "close_cps": c["rps"],
           "close_ratio": c["rps"] / direct["close"]["rps"], "cpu_1k": f.get("cpu_1k"),
           "cpu_max": m.get("cpu_per_10k"), "cpu_close": c.get("cpu_per_10k")}
    for kind, rss in (("rss_idle_mib", res.get("rss_idle_mib")), ("rss_settled_mib", res.get("rss_settled_mib")),
                      ("rss_64_mib", m.get("rss_mib")), ("rss_64_anon_mib", m.get("rss_anon_mib"))):
        if rss:  # per process, and the larger of the pair (what the per-sidecar target is judged on)
            out.update({f"{kind}/{label}": v for label, v in rss.items()})
            out[kind] = max(rss.values())
    return out


def figures(rounds, setups):
    """Per setup and figure: median, min and max over the rounds."""
    out = {}
    for s in setups:
        rows = [per_round(rnd[s.name], rnd["direct"]) for rnd in rounds]
        out[s.name] = {k: summarize([r.get(k) for r in rows]) for k in rows[0]}
    return out


def print_tables(figs, setups, fresh, load):
    """load: the run's parameters for the titles (rate, lat_conns, max_conns, close_conns,
    settle_s)."""
    def table(title, cols):
        rows = [["setup"] + [c[0] for c in cols]]
        for s in setups:
            rows.append([s.name] + [fmt(figs[s.name].get(c[1]), c[2]) for c in cols])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print(f"\n{title}")
        for i, r in enumerate(rows):
            print("  " + " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                print("  " + "-+-".join("-" * w for w in widths))

    table(f"Latency at {load['rate']:,} rps, open loop over {load['lat_conns']} keep-alive connections "
          "(ms; median (min-max) over rounds)",
          [("p50", "p50_ms", 3), ("p99", "p99_ms", 3), ("added p50", "added_p50_ms", 3),
           ("added p99", "added_p99_ms", 3)])
    table(f"Throughput (wrk -t1 -c{load['max_conns']} keep-alive; wrk -t1 -c{load['close_conns']} with Connection: close)",
          [("max req/s", "max_rps", 0), ("of direct", "max_ratio", 2), ("new conn/s", "close_cps", 0),
           ("of direct", "close_ratio", 2)])
    table("Proxy cost (CPU: both proxies, CPU-s per 10k requests or connections; RSS: the larger process)",
          [("@1k rps", "cpu_1k", 3), ("@max", "cpu_max", 3), ("per 10k conns", "cpu_close", 2),
           ("RSS idle MiB", "rss_idle_mib", 1), (f"{load['settle_s']} s later", "rss_settled_mib", 1),
           ("RSS @64 conns MiB", "rss_64_mib", 1)])
    print(f"  RSS idle is taken after each setup's last load in a round, and again {load['settle_s']} s later; at start, before any load: "
          + "; ".join(f"{name} {' / '.join(f'{v:.1f}' for v in rss.values())}" for name, rss in fresh.items() if rss))
    print("  RSS @64 conns, its anonymous part (the process's own memory; the rest is file pages, shared by every "
          "copy of the executable and libraries on a host): "
          + "; ".join(f"{s.name} {fmt(figs[s.name].get('rss_64_anon_mib'), 1)}" for s in setups if s.proxies))


def check_targets(fig, judged):
    """judged: False with per-pod pinning, where the load generators share a core with the
    client proxies, so no target is judged."""
    results = []
    for key, label, bound, kind in TARGETS:
        if not judged:
            continue
        s = fig.get(key)
        value = s["median"] if s else None
        ok = value is not None and (value <= bound if kind == "max" else value >= bound)
        results.append({"figure": key, "label": label, "target": f"{'<=' if kind == 'max' else '>='} {bound}",
                        "median": value, "min": s and s["min"], "max": s and s["max"], "met": ok})
    print("\nmeshlet against its targets (median (min-max) over rounds)"
          + ("" if judged else ": judged with --pinning shared only"))
    for r in results:
        v = "-" if r["median"] is None else f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"
        print(f"  {'pass' if r['met'] else 'MISS'}  {r['label']}: {v}, target {r['target']}")
    return results


ORDER = ROOT / "sidecar" / "link-order.txt"


def listed_functions():
    """The functions of sidecar/link-order.txt, in order (its `#` lines are the header)."""
    lines = ORDER.read_text().splitlines() if ORDER.exists() else []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def defined_symbols(binary):
    """The names the executable defines (its symbol table; empty when stripped)."""
    out = subprocess.run(["nm", "--defined-only", str(binary)], capture_output=True, text=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def link_order_missing(binary):
    """The functions of sidecar/link-order.txt, in order, and those the sidecar lacks: some when
    the list is stale (another toolchain, dependency versions or packages built together)."""
    listed, have = listed_functions(), defined_symbols(binary)
    return listed, [name for name in listed if name not in have]
