#!/usr/bin/env python3
"""Writes sidecar/link-order.txt: the sidecar's functions that run, hottest first.

    cargo build --profile dist -p meshlet-control -p meshlet-proxy -p meshletctl
    python3 benches/link_order.py
    cargo build --profile dist -p meshlet-proxy     # links again, in that order

sidecar/build.rs hands the list to the linker (lld's --symbol-ordering-file), which puts these
functions together at the start of the code. The kernel maps a sidecar's code 64 KB around
each page it faults on; with the functions that run spread over the whole executable, nearly
all of it ends up resident. Together, they take about half.

How: the mesh_load.py pair (control plane, client and server sidecars, nginx) with both
sidecars under valgrind's callgrind, driven through what a sidecar does in a pod: start-up
and identity, keep-alive and one-request-per-connection HTTP through mutual TLS, metrics and
health probes, a memory trim, a graceful stop. Each function's own instruction count ranks
it. Needs valgrind and wrk, and a dist build with its symbol table (the profile keeps it).

Symbol names carry a hash of the compiler version, the profile and each crate's version: after
a toolchain or dependency update most names no longer match, and the linker leaves them where
they were (no error, the old layout). Run this again then; benches/README.md shows the effect.
"""
import argparse
import collections
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import mesh_load as m

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIDES = ("client", "server")
START = m.Procs.start


def wrap_sidecars(prefix):
    """Starts each sidecar of mesh_load's pair under prefix(side) + its command line."""

    def start_wrapped(self, name, argv, cpu=None, env=None):
        side = name.removeprefix("meshlet-")
        return START(self, name, (prefix(side) if side in SIDES else []) + argv, cpu, env)

    m.Procs.start = start_wrapped


def run_pair(bins, prefix):
    """The pair, its sidecars started under prefix, driven, stopped; returns its directory."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="meshlet-order-"))
    wrap_sidecars(lambda side: prefix(side, tmp))
    procs = m.Procs(tmp, False)
    try:
        backend = m.start_nginx(procs, tmp)
        setup = m.start_meshlet(procs, tmp, bins, backend)
        drive(procs, setup, tmp)
    finally:
        procs.stop_all()  # callgrind and perf write their files as the sidecars exit
    return tmp


def drive(procs, setup, tmp):
    """What a sidecar does in a pod, each part bounded in time."""
    for _ in range(20):
        m.backend_answers(setup.port)
    m.run_wrk(procs, setup, m.MAX_CONNS, 3)
    m.run_wrk(procs, setup, m.CLOSE_CONNS, 2, script=m.write_close_lua(tmp))
    for port in setup.admin.values():
        for path in ("/metrics", "/ready", "/live"):
            m.http_get(port, path, timeout=10)
    time.sleep(11)  # one memory trim (every 10 s)


def self_cost(path, binary_name):
    """{symbol: instructions executed in it} for the functions of the given object."""
    kinds = {"ob": "ob", "cob": "ob", "fn": "fn", "cfn": "fn"}  # the rest name files
    names = {"ob": {}, "fn": {}, "file": {}}
    cost = collections.Counter()
    ob = fn = None
    after_calls = False
    for line in open(path, errors="replace"):
        key, _, rest = line.partition("=")
        if key in ("ob", "cob", "fn", "cfn", "fl", "fi", "fe", "cfi", "cfl"):
            # "(id) name" the first time, "(id)" after (callgrind's name compression)
            ref = re.match(r"\((\d+)\)\s*(.*)", rest.strip())
            if ref is None:
                continue
            table = names[kinds.get(key, "file")]
            if ref.group(2):
                table[ref.group(1)] = ref.group(2)
            if key == "ob":
                ob = table.get(ref.group(1))
            elif key == "fn":
                fn = table.get(ref.group(1))
            continue
        if key == "calls":
            after_calls = True
            continue
        fields = line.split()
        if len(fields) < 2 or not re.match(r"^[-+*0-9]", fields[0]):
            continue
        if after_calls:  # the inclusive cost of a call, counted in the callee
            after_calls = False
            continue
        if ob is not None and ob.endswith("/" + binary_name) and fn:
            cost[fn] += int(fields[-1])
    return cost


def sampled(path, binary_name):
    """{symbol: samples} of the given object in a perf.data file."""
    out = subprocess.run(["perf", "script", "-i", str(path), "-F", "ip,sym,dso", "--no-demangle"],
                         capture_output=True, text=True).stdout
    counts = collections.Counter()
    for line in out.splitlines():
        fields = line.split()  # address, symbol, (object)
        if len(fields) == 3 and fields[2].endswith("/" + binary_name + ")") and fields[1] != "[unknown]":
            counts[fields[1]] += 1
    return counts


def check(binary):
    """None if the binary has the listed functions, the first of them where the code starts, and
    packed relocations; else what is wrong."""
    present, listed = m.link_order_present(binary)
    print(f"{binary}: {present} of {listed} listed functions")
    if present < 0.9 * listed:
        return ("the link order is stale (another toolchain, dependency versions, or packages not "
                "built together): write it again with benches/link_order.py (benches/README.md)")
    first = next(line.strip() for line in (ROOT / "sidecar" / "link-order.txt").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    code = [line.split() for line in subprocess.run(["nm", "-n", "--defined-only", str(binary)],
                                                      capture_output=True, text=True).stdout.splitlines()]
    code = [fields[2] for fields in code if len(fields) == 3 and fields[1] in "tTwW"]
    if not code or code[0] != first:
        return f"the code does not start with {first} but {code[:1]}: the linker did not take the order"
    dynamic = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True).stdout
    if "(RELR)" not in dynamic:
        return "no packed relative relocations (DT_RELR) in the dynamic section"
    print("the code starts with the listed functions; relative relocations packed")
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bins", type=pathlib.Path, default=ROOT / "target" / "dist")
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "sidecar" / "link-order.txt")
    ap.add_argument("--check", action="store_true",
                    help="only check that the sidecar in --bins was linked in the list's order (CI)")
    args = ap.parse_args()
    if args.check:
        sys.exit(check(args.bins / "meshlet-proxy"))
    for tool in ("valgrind", "wrk", "nginx", "nm"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (Debian: apt-get install {tool})")
    symbols = subprocess.run(["nm", "--defined-only", str(args.bins / "meshlet-proxy")],
                             capture_output=True, text=True)
    if symbols.returncode or not symbols.stdout:
        sys.exit(f"{args.bins / 'meshlet-proxy'} has no symbol table: build it with the dist profile")
    known = {line.split()[-1] for line in symbols.stdout.splitlines()}

    # Every function that runs, however briefly, under callgrind (which reports the CPU as
    # one without AVX-512 and SHA extensions, so AWS-LC picks other assembly there) ...
    cg = run_pair(args.bins, lambda side, tmp: [
        "valgrind", "--tool=callgrind", "--demangle=no", f"--callgrind-out-file={tmp / side}.cg"])
    total = collections.Counter()
    for side in SIDES:
        if not (cg / f"{side}.cg").exists():
            sys.exit(f"callgrind wrote no {cg / side}.cg: see {cg}/meshlet-{side}.log")
        total.update(self_cost(cg / f"{side}.cg", "meshlet-proxy"))
    # ... and the functions sampled natively at full speed, after them.
    if shutil.which("perf"):
        native = run_pair(args.bins, lambda side, tmp: [
            "perf", "record", "-q", "-e", "cpu-clock", "-F", "20000", "-o", f"{tmp / side}.perf", "--"])
        samples = collections.Counter()
        for side in SIDES:
            samples.update(sampled(native / f"{side}.perf", "meshlet-proxy"))
        extra = {name: n for name, n in samples.items() if name not in total}
        print(f"perf: {len(extra)} functions sampled natively that callgrind did not see")
        low = min(total.values(), default=1)
        for rank, (name, _) in enumerate(sorted(extra.items(), key=lambda kv: -kv[1])):
            total[name] = low / (rank + 2)  # after every function callgrind saw
    else:
        print("perf not found: the list has only what ran under callgrind")
    ordered = [name for name, _ in total.most_common() if name in known]
    rustc = subprocess.run(["rustc", "-V"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    header = (f"# Written by benches/link_order.py (commit {commit}, {rustc}): the {len(ordered)}\n"
              "# functions of the sidecar that ran, hottest first. sidecar/build.rs passes this\n"
              "# file to the linker; see the script for why and when to run it again.\n")
    args.out.write_text(header + "\n".join(ordered) + "\n")
    print(f"{args.out}: {len(ordered)} functions that ran, of {len(known)} symbols")


if __name__ == "__main__":
    main()
