#!/usr/bin/env python3
"""Side-by-side load harness: the same nginx backend reached directly, through a meshlet
sidecar pair (mutual TLS) and through peer proxies (stunnel, HAProxy L4 and L7), on loopback.

    python3 benches/mesh_load.py [--rounds 3] [--quick] [--json target/mesh-load.json]

Needs nginx and wrk (Debian: nginx wrk); stunnel4 and haproxy are optional peers. The
fixed-rate latency test uses its own open-loop client (fixed_rate.py). Needs
target/dist/meshlet-control, meshlet-proxy and meshletctl (`cargo build --profile dist`, as the image).
Every process it starts is stopped at the end, also on error, Ctrl-C or SIGTERM. See
benches/README.md for what each figure means and how it is measured.
"""
import argparse
import datetime
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fixed_rate import fixed_rate_client
from mesh_report import check_targets, figures, link_order_missing, print_tables

ROOT = Path(__file__).resolve().parent.parent
BODY = b"x" * 63 + b"\n"  # 64 bytes
RATE = 1000  # fixed-rate test, requests per second
LAT_CONNS = 10  # keep-alive connections the fixed-rate client spreads requests over
MAX_CONNS = 64  # wrk keep-alive connections for the maximum-throughput test
CLOSE_CONNS = 16  # wrk connections for the one-connection-per-request test
SERVER_ID = "spiffe://cluster.local/ns/bench/sa/server"
LOADGEN_CPU, SERVER_CPU = "1", "0"
# The core of the client-side proxy of each pair: the server's (default, `--pinning shared`), or
# the load generator's (`--pinning per-pod`: each proxy on the core of the app it serves, as
# sidecars sit in their pods; set in main).
CLIENT_PROXY_CPU = SERVER_CPU
TICKS = os.sysconf("SC_CLK_TCK")
# Idle memory is read right after a round's load and again this much later: a proxy may give
# memory back a while after a burst (meshlet's sidecars do every 10 s).
SETTLE_S = 12



# ---------------------------------------------------------------- processes


class Procs:
    """Every process started, each in its own session (process group), stopped together."""

    def __init__(self, tmp, pin, wrap=None):
        self.tmp, self.pin, self.wrap, self.live = tmp, pin, wrap, []

    def start(self, name, argv, cpu=None, env=None):
        if self.wrap is not None:  # wrap(name, argv) -> argv: under a profiler (link_order.py)
            argv = self.wrap(name, argv)
        if cpu is not None and self.pin:
            argv = ["taskset", "-c", cpu] + argv
        log = open(self.tmp / f"{name}.log", "wb")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, env=env)
        log.close()
        self.live.append((name, p))
        return p

    def stop(self, name, p, grace=5.0):
        if p.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if (name, p) in self.live:
            self.live.remove((name, p))

    def stop_all(self):
        for name, p in reversed(list(self.live)):
            self.stop(name, p)


def free_ports(n):
    """n distinct free loopback ports (bound together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def http_get(port, path="/", timeout=2.0):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.status, r.read()


def wait_until(what, check, timeout=30.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode} (see its log)")
        try:
            if check():
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready within {timeout:.0f} s")


def backend_answers(port):
    status, body = http_get(port)
    if status != 200 or body != BODY:
        raise RuntimeError(f"port {port}: got {status} and {len(body)} bytes, not the 64-byte body")
    return True


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime, all threads


def status_mib(pid, fields):
    """Fields of /proc/PID/status in MiB, in one read. VmRSS: resident memory; RssAnon: its
    anonymous part, the process's own (the rest is file pages: the executable and libraries,
    shared by every process that maps them)."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            found[key] = int(value.split()[0]) / 1024
    return [found.get(f, 0.0) for f in fields]


def rss_mib(pid):
    return status_mib(pid, ("VmRSS",))[0]


def own_cpu(procs):
    """CPU-seconds of this script, its reaped children, and every live process in a group it started."""
    total = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                for f in ("ru_utime", "ru_stime"))
    groups = {p.pid for _, p in procs.live}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in groups:  # process group
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def cpu_times():
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    idle = vals[3] + vals[4]  # idle + iowait
    return sum(vals) - idle, sum(vals)


# ---------------------------------------------------------------- setups


class Setup:
    def __init__(self, name, port, proxies, note=""):
        self.name, self.port, self.proxies, self.note = name, port, proxies, note  # proxies: [(label, pid)]


def start_nginx(procs, tmp):
    (port,) = free_ports(1)
    d = tmp / "nginx"
    d.mkdir()
    conf = d / "nginx.conf"
    temps = " ".join(f"{k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(f"""worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  {temps}
  keepalive_requests 10000000;
  keepalive_timeout 75s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    default_type text/plain;
    location / {{ return 200 "{BODY.decode().strip()}\\n"; }}
  }}
}}
""")
    p = procs.start("nginx", ["nginx", "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")], SERVER_CPU)
    wait_until("nginx", lambda: backend_answers(port), proc=p)
    return port


def start_meshlet(procs, tmp, bins, backend):
    d = tmp / "meshlet"
    d.mkdir()
    grpc, admin, s_in, s_out, s_adm, c_in, c_out, c_adm, route = free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLET_")}
    env["MESHLET_LOG"] = "warn"
    # No collector here: as in a cluster without one, tracing is off (the injector does the
    # same); the peers do not trace either.
    env["OTEL_SDK_DISABLED"] = "true"
    ctl = procs.start("meshlet-control", [str(bins / "meshlet-control"), "serve", "--data-dir", str(d / "data"),
                                          "--grpc-addr", f"127.0.0.1:{grpc}", "--admin-addr", f"127.0.0.1:{admin}"],
                      SERVER_CPU, env)
    wait_until("meshlet-control", lambda: http_get(admin, "/ready")[0] == 200, proc=ctl)
    (d / "bundle.pem").write_bytes(http_get(admin, "/v1/trust-bundle")[1])
    for sa in ("server", "client"):
        token = subprocess.run([str(bins / "meshletctl"), "token", "--data-dir", str(d / "data"), "--namespace",
                                "bench", "--service-account", sa, "--ttl", "24h"], env=env, check=True,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        (d / f"{sa}.token").write_text(token + "\n")

    def sidecar(sa, inbound, outbound, adm, extra):
        argv = [str(bins / "meshlet-proxy"), "run", "--control-addr", f"127.0.0.1:{grpc}",
                "--token-file", str(d / f"{sa}.token"), "--trust-bundle", str(d / "bundle.pem"),
                "--admin-addr", f"127.0.0.1:{adm}", "--inbound-addr", f"127.0.0.1:{inbound}",
                "--outbound-addr", f"127.0.0.1:{outbound}", "--drain-timeout", "2s"] + extra
        p = procs.start(f"meshlet-{sa}", argv, CLIENT_PROXY_CPU if sa == "client" else SERVER_CPU, env)
        wait_until(f"meshlet {sa} sidecar /ready", lambda: http_get(adm, "/ready")[0] == 200, proc=p)
        return p

    srv = sidecar("server", s_in, s_out, s_adm, ["--inbound-mode", "strict", "--app-addr", f"127.0.0.1:{backend}"])
    cli = sidecar("client", c_in, c_out, c_adm, ["--route", f"127.0.0.1:{route}=127.0.0.1:{s_in}@{SERVER_ID}"])
    wait_until("meshlet route", lambda: backend_answers(route))
    setup = Setup("meshlet", route, [("client sidecar", cli.pid), ("server sidecar", srv.pid)],
                  "TLS 1.3, X25519MLKEM768, HTTP pooled over HTTP/2 between the sidecars")
    setup.admin = {"client sidecar": c_adm, "server sidecar": s_adm}
    return setup


def make_certs(tmp):
    """A P-256 CA and two leaves (server.bench, client.bench) for the peer proxies."""
    d = tmp / "pki"
    d.mkdir()

    def ossl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
         "-out", "ca.crt", "-subj", "/CN=bench CA", "-days", "2", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign")
    for name in ("server", "client"):
        ossl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}.bench")
        (d / f"{name}.ext").write_text(f"subjectAltName=DNS:{name}.bench\nbasicConstraints=CA:FALSE\n"
                                       "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
        (d / f"{name}.pem").write_bytes((d / f"{name}.crt").read_bytes() + (d / f"{name}.key").read_bytes())
    return d


def start_stunnel(procs, tmp, pki, backend):
    front, mid = free_ports(2)
    common = (f"CAfile = {pki}/ca.crt\nverifyChain = yes\nsslVersionMin = TLSv1.3\nsessionResume = no\n"
              "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n")
    pids = []
    for role, accept, connect, extra in (("server", mid, backend, ""),
                                          ("client", front, mid, "client = yes\ncheckHost = server.bench\n")):
        conf = tmp / f"stunnel-{role}.conf"
        conf.write_text(f"foreground = yes\npid =\nsyslog = no\ndebug = warning\n[bench]\n{extra}"
                        f"accept = 127.0.0.1:{accept}\nconnect = 127.0.0.1:{connect}\n"
                        f"cert = {pki}/{role}.crt\nkey = {pki}/{role}.key\n{common}")
        p = procs.start(f"stunnel-{role}", [shutil.which("stunnel4") or "stunnel", str(conf)],
                        CLIENT_PROXY_CPU if role == "client" else SERVER_CPU)
        pids.insert(0, (f"{role} stunnel", p))
    wait_until("stunnel pair", lambda: backend_answers(front), proc=pids[0][1])
    return Setup("stunnel", front, [(n, p.pid) for n, p in pids], "TLS 1.3, X25519, no resumption, L4")


def start_haproxy(procs, tmp, pki, backend, mode):
    front, mid = free_ports(2)
    head = ("global\n  nbthread 1\n  maxconn 4096\ndefaults\n"
            f"  mode {mode}\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n")
    reuse = "  http-reuse always\n" if mode == "http" else ""
    tls = f"ca-file {pki}/ca.crt verify required ssl-min-ver TLSv1.3"
    confs = {
        "server": f"{head}frontend fe\n  bind 127.0.0.1:{mid} ssl crt {pki}/server.pem {tls} no-tls-tickets\n"
                  f"  default_backend be\nbackend be\n{reuse}  server nginx 127.0.0.1:{backend}\n",
        "client": f"{head}frontend fe\n  bind 127.0.0.1:{front}\n  default_backend be\nbackend be\n{reuse}"
                  f"  server peer 127.0.0.1:{mid} ssl crt {pki}/client.pem {tls} verifyhost server.bench"
                  " no-ssl-reuse\n",
    }
    name = "haproxy-l7" if mode == "http" else "haproxy-l4"
    pids = []
    for role in ("server", "client"):
        conf = tmp / f"{name}-{role}.cfg"
        conf.write_text(confs[role])
        p = procs.start(f"{name}-{role}", ["haproxy", "-db", "-f", str(conf)],
                        CLIENT_PROXY_CPU if role == "client" else SERVER_CPU)
        pids.insert(0, (f"{role} haproxy", p))
    wait_until(name, lambda: backend_answers(front), proc=pids[0][1])
    note = "L7, pooled upstream (http-reuse always)" if mode == "http" else "L4 (mode tcp)"
    return Setup(name, front, [(n, p.pid) for n, p in pids], f"TLS 1.3, X25519, no resumption, {note}")


# ---------------------------------------------------------------- measurements


def proxies_cpu(setup):
    return sum(cpu_seconds(pid) for _, pid in setup.proxies)


def measure_fixed_rate(setup, dur, warm):
    marks = {}

    def on_window(i):
        marks[i] = (time.perf_counter(), proxies_cpu(setup))

    lat, errors, non_200 = fixed_rate_client(setup.port, dur, warm, on_window, RATE, LAT_CONNS)
    if not lat:
        raise RuntimeError(f"fixed-rate client against {setup.name} measured nothing")
    (ta, ca), (tb, cb) = marks[0], marks[1]
    r = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "p999_ms": pct(lat, 99.9), "max_ms": lat[-1],
         "requests": len(lat), "achieved_rps": len(lat) / (tb - ta), "failed": errors, "non_200": non_200}
    if setup.proxies:
        r["cpu_1k"] = (cb - ca) / len(lat) * 10_000
    return r


def pct(sorted_vals, p):
    return sorted_vals[min(len(sorted_vals) - 1, max(0, round(p / 100 * len(sorted_vals)) - 1))]


def run_wrk(procs, setup, conns, dur, script=None, sample_rss=False):
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{dur}s"] + (["-s", script] if script else [])
    argv.append(f"http://127.0.0.1:{setup.port}/")
    name = f"wrk-{setup.name}"
    cpu0 = proxies_cpu(setup)
    p = procs.start(name, argv, LOADGEN_CPU)
    rss = {label: 0.0 for label, _ in setup.proxies}
    anon = dict(rss)
    try:
        deadline = time.monotonic() + dur + 30
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.25)
            if sample_rss:
                for label, pid in setup.proxies:
                    total, own = status_mib(pid, ("VmRSS", "RssAnon"))
                    rss[label] = max(rss[label], total)
                    anon[label] = max(anon[label], own)
        if p.poll() is None:
            raise RuntimeError(f"{name} did not finish")
    finally:
        procs.stop(name, p)
    cpu1 = proxies_cpu(setup)
    out = (procs.tmp / f"{name}.log").read_text(errors="replace")
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if not m:
        raise RuntimeError(f"wrk against {setup.name} printed no result:\n{out[-800:]}")
    n, secs = int(m.group(1)), float(m.group(2)) / (1000 if m.group(3) == "ms" else 1)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r = {"requests": n, "rps": n / secs, "socket_errors": sum(map(int, sock.groups())) if sock else 0,
         "non_2xx": int(non2xx.group(1)) if non2xx else 0}
    if setup.proxies:
        r["cpu_per_10k"] = (cpu1 - cpu0) / max(n, 1) * 10_000
        if sample_rss:
            r["rss_mib"] = rss
            r["rss_anon_mib"] = anon
    return r


def mem_detail(pid):
    keep = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads")
    lines = [line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()]
    return {k: v.strip() for k, v in lines if k in keep}


def meshlet_health(setup, tmp):
    """What the sidecars counted (requests by status, handshake errors, refusals) and logged."""
    health = {}
    for label, pid in setup.proxies:
        h = health[label] = {"memory": mem_detail(pid)}
        try:
            text = http_get(setup.admin[label], "/metrics")[1].decode()
        except OSError as e:
            h["metrics_error"] = str(e)
            continue
        pattern = (r"(meshlet_(?:requests_total|tls_handshake_errors_total|connections_refused_total|"
                   r"tcp_connections_total)(?:\{[^}]*\})?) ([\d.e+]+)$")
        h["counters"] = {m.group(1): float(m.group(2)) for m in map(lambda x: re.match(pattern, x),
                                                                     text.splitlines()) if m and float(m.group(2))}
        lines = (tmp / f"meshlet-{label.split()[0]}.log").read_text(errors="replace").splitlines()
        h["log_lines"], h["log_head"] = len(lines), lines[:5]
    print("\nmeshlet sidecars after the run (counters > 0, memory, warnings logged)")
    for label, h in health.items():
        print(f"  {label}: {json.dumps(h.get('counters'), sort_keys=True)}")
        print(f"    memory: {h['memory']}; {h.get('log_lines', 0)} log lines")
        for line in h.get("log_head", []):
            print(f"    log: {line[:200]}")
    return health


def machine_info():
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    return {"nproc": os.cpu_count(), "cpu_model": model, "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "cargo_or_rustc_running": builds_running()}


def builds_running():
    out = subprocess.run(["pgrep", "-l", "-x", "cargo|rustc"], capture_output=True, text=True).stdout.split()
    return sorted(set(out[1::2]))


def start_setups(procs, tmp, bins, only):
    backend = start_nginx(procs, tmp)
    setups = [Setup("direct", backend, [], "client -> nginx"), start_meshlet(procs, tmp, bins, backend)]
    pki, skipped = make_certs(tmp), {}
    peers = (("stunnel", "stunnel4", lambda: start_stunnel(procs, tmp, pki, backend)),
             ("haproxy-l4", "haproxy", lambda: start_haproxy(procs, tmp, pki, backend, "tcp")),
             ("haproxy-l7", "haproxy", lambda: start_haproxy(procs, tmp, pki, backend, "http")))
    for name, binary, starter in peers:
        if only and name not in only:
            skipped[name] = "not in --only"
        elif not shutil.which(binary):
            skipped[name] = f"{binary} not installed (apt-get install {binary})"
        else:
            setups.append(starter())
    for name, why in skipped.items():
        print(f"skipping {name}: {why}")
    print("setups: " + "; ".join(f"{s.name} on 127.0.0.1:{s.port}" for s in setups))
    return setups, skipped


def wait_quiet(limit):
    """Waits (polling every 10 s, at most `limit` s) until no cargo/rustc ran for two checks."""
    deadline, quiet = time.monotonic() + limit, 0
    while quiet < 2 and time.monotonic() < deadline:
        quiet = 0 if builds_running() else quiet + 1
        if quiet < 2:
            print("  waiting for cargo/rustc to finish ..." if quiet == 0 else "  quiet; checking again ...")
            time.sleep(10)
    return quiet >= 2


def run_round(procs, tmp, setups, rnd, rounds, durations):
    """Each test for every setup in turn (the order rotates per round), so setups interleave.
    Notes every cargo/rustc seen running between two measurements."""
    fixed_s, warm_s, wrk_s = durations
    order = setups[rnd % len(setups):] + setups[:rnd % len(setups)]
    res, busy = {s.name: {} for s in setups}, set(builds_running())
    (b0, t0), own0 = cpu_times(), own_cpu(procs)
    print(f"\nround {rnd + 1}/{rounds}: " + ", ".join(s.name for s in order))
    tests = (("fixed", lambda s: measure_fixed_rate(s, fixed_s, warm_s), 0.5),
             ("max", lambda s: run_wrk(procs, s, MAX_CONNS, wrk_s, sample_rss=True), 0.5),
             ("close", lambda s: run_wrk(procs, s, CLOSE_CONNS, wrk_s, script=str(write_close_lua(tmp))), 1.0))
    idle_at = {}
    for key, test, pause in tests:
        for s in order:
            res[s.name][key] = test(s)
            busy.update(builds_running())
            time.sleep(pause)  # close: lets TIME_WAIT sockets and handshakes settle
            if key == "close":  # the setup's last load: idle memory now, and SETTLE_S later
                res[s.name]["rss_idle_mib"] = {label: rss_mib(pid) for label, pid in s.proxies}
                res[s.name]["memory_idle"] = {label: mem_detail(pid) for label, pid in s.proxies}
                idle_at[s.name] = time.monotonic()
    (b1, t1), own1 = cpu_times(), own_cpu(procs)
    res["foreign_cpu_share"] = max(0.0, ((b1 - b0) / TICKS - (own1 - own0)) / max((t1 - t0) / TICKS, 1e-9))
    for s in order:
        time.sleep(max(0.0, idle_at[s.name] + SETTLE_S - time.monotonic()))
        res[s.name]["rss_settled_mib"] = {label: rss_mib(pid) for label, pid in s.proxies}
        res[s.name]["memory_settled"] = {label: mem_detail(pid) for label, pid in s.proxies}
    for s in setups:
        f, m, c = res[s.name]["fixed"], res[s.name]["max"], res[s.name]["close"]
        errs = f["failed"] + f["non_200"] + m["socket_errors"] + m["non_2xx"] + c["socket_errors"] + c["non_2xx"]
        print(f"  {s.name:11s} p50 {f['p50_ms']:.3f} p99 {f['p99_ms']:.3f} ms at {f['achieved_rps']:.0f} rps"
              f" | max {m['rps']:,.0f} req/s | close {c['rps']:,.0f} conn/s" + (f" | ERRORS {errs}" if errs else ""))
    res["builds_running"] = sorted(busy)
    print(f"  other processes used {res['foreign_cpu_share']:.1%} of all CPU time in this round"
          + (f"; {', '.join(sorted(busy))} ran during it" if busy else ""))
    return res


def run_rounds(procs, tmp, setups, rounds, durations, wait_limit):
    """The rounds; with wait_limit > 0, each waits for a quiet machine and one disturbed by a
    cargo/rustc run is repeated (at most twice per round; discarded rounds are kept apart)."""
    kept, discarded = [], []
    for rnd in range(rounds):
        for attempt in range(3):
            if wait_limit and not wait_quiet(wait_limit):
                print(f"  still busy after {wait_limit} s; measuring anyway")
            res = run_round(procs, tmp, setups, rnd, rounds, durations)
            if not (wait_limit and res["builds_running"] and attempt < 2):
                break
            print("  round disturbed by a build: repeating it")
            discarded.append(res)
        kept.append(res)
    return kept, discarded


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 round, short runs: a smoke test (about 65 s)")
    ap.add_argument("--json", default=str(ROOT / "target" / "mesh-load.json"))
    ap.add_argument("--bin-dir", default=str(ROOT / "target" / "dist"))
    ap.add_argument("--wait-quiet", type=int, default=1200, metavar="SECONDS",
                    help="before each round wait up to this long for no cargo/rustc, and repeat a round one "
                         "ran in (0: never wait; --quick: 0)")
    ap.add_argument("--only", default="", help="comma-separated peers to run (stunnel,haproxy-l4,haproxy-l7)")
    ap.add_argument("--pinning", choices=("shared", "per-pod"), default="shared",
                    help="shared: nginx and both proxies of a pair on one core, the load generators on the other; "
                         "per-pod: the client-side proxy on the load generators' core (no target is judged then)")
    args = ap.parse_args()
    rounds = 1 if args.quick else max(1, args.rounds)
    durations = (2, 1, 2) if args.quick else (10, 2, 5)  # fixed-rate s, its warm-up s, each wrk s
    wait_limit = 0 if args.quick else max(0, args.wait_quiet)
    bins = Path(args.bin_dir)
    for tool in ("nginx", "wrk", "openssl", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install -y --no-install-recommends nginx wrk openssl util-linux")
    for b in ("meshlet-control", "meshlet-proxy", "meshletctl"):
        if not (bins / b).is_file():
            sys.exit(f"{bins / b} not found: run `cargo build --profile dist` first (or pass --bin-dir)")
    pin = (os.cpu_count() or 1) >= 2
    global CLIENT_PROXY_CPU
    if pin and args.pinning == "per-pod":
        CLIENT_PROXY_CPU = LOADGEN_CPU
    if pin:
        os.sched_setaffinity(0, {int(LOADGEN_CPU)})  # keep this script off the proxies' core

    machine = machine_info()
    listed, missing = link_order_missing(bins / "meshlet-proxy")
    machine["link_order_present"] = [len(listed) - len(missing), len(listed)]
    print("sidecar link order: {} of {} listed functions in the executable".format(*machine["link_order_present"]))
    b0, t0 = cpu_times()
    time.sleep(2)
    b1, t1 = cpu_times()
    machine["idle_share_before"] = 1 - (b1 - b0) / max(t1 - t0, 1)
    print(f"machine: {machine['nproc']} x {machine['cpu_model']}, load average {' '.join(machine['loadavg'])}, "
          f"{machine['idle_share_before']:.0%} idle in the 2 s before start"
          + (f"; BUSY: {', '.join(busy)} running" if (busy := machine["cargo_or_rustc_running"]) else ""))
    print("pinning: " + ("none (one core)" if not pin else
                         f"load generators on core {LOADGEN_CPU}; nginx, proxies and control plane on core {SERVER_CPU}"
                         if CLIENT_PROXY_CPU == SERVER_CPU else
                         f"load generators and the client-side proxies on core {LOADGEN_CPU}; nginx, the server-side "
                         f"proxies and the control plane on core {SERVER_CPU} (per pod: no target is judged, as the "
                         "load generators share a core with the client proxies)"))

    signal.signal(signal.SIGTERM, on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="mesh-load-"))
    procs = Procs(tmp, pin)
    start_busy, own_start = cpu_times(), own_cpu(procs)
    try:
        setups, skipped = start_setups(procs, tmp, bins, {x for x in args.only.split(",") if x})
        fresh = {s.name: {label: rss_mib(pid) for label, pid in s.proxies} for s in setups}
        fresh_detail = {label: mem_detail(pid) for label, pid in setups[1].proxies}
        all_rounds, discarded = run_rounds(procs, tmp, setups, rounds, durations, wait_limit)
        figs = figures(all_rounds, setups)
        print_tables(figs, setups, fresh, {"rate": RATE, "lat_conns": LAT_CONNS, "max_conns": MAX_CONNS,
                                           "close_conns": CLOSE_CONNS, "settle_s": SETTLE_S})
        targets = check_targets(figs["meshlet"], judged=CLIENT_PROXY_CPU == SERVER_CPU)
        health = meshlet_health(setups[1], tmp)
        health["memory_at_start"] = fresh_detail
    except BaseException:
        print(f"logs of every process are kept in {tmp}", file=sys.stderr)
        raise
    finally:
        procs.stop_all()
    (end_busy, end_total), own_end = cpu_times(), own_cpu(procs)
    machine["foreign_cpu_share"] = max(0.0, ((end_busy - start_busy[0]) / TICKS - (own_end - own_start))
                                       / max((end_total - start_busy[1]) / TICKS, 1e-9))
    machine["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nmachine during the whole run (waits included): {machine['foreign_cpu_share']:.1%} of all CPU time "
          f"went to processes this harness did not start; load average at the end {' '.join(machine['loadavg_end'])}")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine, "pinned": pin, "skipped": skipped, "rss_at_start_mib": fresh,
              "config": {"rounds": rounds, "quick": args.quick, "pinning": args.pinning if pin else "none", "fixed_rate_rps": RATE, "fixed_conns": LAT_CONNS,
                         "fixed_seconds": durations[0], "warmup_seconds": durations[1], "wrk_seconds": durations[2],
                         "max_conns": MAX_CONNS, "close_conns": CLOSE_CONNS, "body_bytes": len(BODY)},
              "setups": {s.name: {"port": s.port, "proxies": [p for p, _ in s.proxies], "note": s.note}
                         for s in setups},
              "rounds": all_rounds, "discarded_rounds": discarded, "figures": figs, "targets": targets,
              "meshlet_health": health}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    shutil.rmtree(tmp, ignore_errors=True)


def on_sigterm(*_):
    raise KeyboardInterrupt


def write_close_lua(tmp):
    path = tmp / "close.lua"
    path.write_text('wrk.headers["Connection"] = "close"\n')
    return path


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; every process started was stopped")
