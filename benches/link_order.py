#!/usr/bin/env python3
"""Writes sidecar/link-order.txt: the sidecar's functions that run, hottest first.

    cargo build --profile dist -p meshlet-control -p meshlet-proxy -p meshletctl
    python3 benches/link_order.py
    cargo build --profile dist -p meshlet-control -p meshlet-proxy -p meshletctl   # in order
    python3 benches/link_order.py --check   # what CI runs: was the sidecar linked in order?

sidecar/build.rs hands the list to the linker (lld's --symbol-ordering-file), which puts these
functions together at the start of the code. The kernel maps a sidecar's code 64 KB around
each page it faults on; with the functions that run spread over the whole executable, nearly
all of it ends up resident. Together, they take about half.

How: the mesh_load.py pair (control plane, client and server sidecars, nginx) with both
sidecars under valgrind's callgrind, driven through what a sidecar does in a pod: start-up
and identity, HTTP through mutual TLS at a steady rate, at full speed over keep-alive
connections and with one request per connection, metrics and health probes, a memory trim,
a graceful stop; once on one core and once on two (Tokio's two schedulers). Each function's
own instruction count ranks it. Then the same natively under perf, for the assembly AWS-LC picks
only on the real CPU, and once more recording page faults, for the functions whose code the
kernel had to map although they were not listed (run it again after relinking to find more).
Needs valgrind and wrk (perf optional), and a dist build with its symbol table (the profile
keeps it).

Symbol names carry a hash of the compiler version, the profile, and each crate's version and
features (so build the three packages together, as the image does): after a toolchain or
dependency update most names no longer match, and the linker leaves those functions where
they were (no error, the old layout). Run this again then; benches/README.md shows the effect.
"""
import argparse
import collections
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import mesh_load as m
from mesh_report import ORDER, defined_symbols, link_order_missing, listed_functions

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIDES = ("client", "server")
TOP = 500  # the hottest entries, which --check wants all present


def run_pair(bins, prefix, pin):
    """The pair with each sidecar started under prefix(side, dir), driven, stopped; returns the
    directory with its logs and the files the wrappers wrote. Pinned to one core, as
    mesh_load.py runs them, a sidecar runs Tokio's current-thread scheduler; on two, its
    multi-thread one: each has its own copies of the task code."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="meshlet-order-"))

    def wrap(name, argv):
        side = name.removeprefix("meshlet-")
        return prefix(side, tmp) + argv if side in SIDES else argv

    procs = m.Procs(tmp, pin and (os.cpu_count() or 1) >= 2, wrap)
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
    m.measure_fixed_rate(setup, 3, 1)  # mesh_load's three loads: a steady 1,000 rps ...
    m.run_wrk(procs, setup, m.MAX_CONNS, 3)  # ... as many as fit, keep-alive ...
    m.run_wrk(procs, setup, m.CLOSE_CONNS, 3, script=m.write_close_lua(tmp))  # ... a connection each
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
    npos, ir = 1, 0  # positions per cost line, and the index of the Ir event after them
    after_calls = False
    for line in open(path, errors="replace"):
        key, _, rest = line.partition("=")
        if key in ("ob", "cob", "fn", "cfn", "fl", "fi", "fe", "cfi", "cfl"):
            # "(id) name" the first time, "(id)" after (name compression), or a plain name
            ref = re.match(r"\((\d+)\)\s*(.*)", rest.strip())
            table = names[kinds.get(key, "file")]
            if ref is None:
                value = rest.strip()
            else:
                if ref.group(2):
                    table[ref.group(1)] = ref.group(2)
                value = table.get(ref.group(1))
            if key == "ob":
                ob = value
            elif key == "fn":
                fn = re.sub(r"'\d+$", "", value or "")  # a recursion level: name'2
            continue
        if line.startswith("positions:"):
            npos = len(line.split()) - 1  # "line" by default; "instr line" with --dump-instr
            continue
        if line.startswith("events:"):
            ir = line.split()[1:].index("Ir")
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
        if ob is not None and ob.endswith("/" + binary_name) and fn and len(fields) > npos + ir:
            cost[fn] += int(fields[npos + ir])
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


def faulted(path, binary_name):
    """[symbol] of the given object's functions that took a page fault on their own code, in
    order, from a `perf record -e page-faults -d` file (an instruction fetch: the faulting
    address is the instruction's)."""
    out = subprocess.run(["perf", "script", "-i", str(path), "-F", "addr,ip,sym,dso", "--no-demangle"],
                         capture_output=True, text=True).stdout
    names = []
    for line in out.splitlines():
        fields = line.split()  # data address, (its symbol and object), instruction address, symbol, (object)
        if (len(fields) == 6 and fields[0] == fields[3] and fields[5].endswith("/" + binary_name + ")")
                and fields[4] != "[unknown]" and fields[4] not in names):
            names.append(fields[4])
    return names


def list_rustc():
    """The rustc version the list was written with ("1.95.0"), from its header."""
    header = ORDER.read_text().split("\n", 3)[:3]
    found = [h.group(1) for h in (re.search(r"rustc (\S+)", line) for line in header) if h]
    return found[0] if found else ""


def check(binary):
    """None if the binary was linked in the list's order with packed relocations, else what is
    wrong. A build with another compiler than the list's is not checked (the image pins it)."""
    wanted = list_rustc()
    here = subprocess.run(["rustc", "-V"], capture_output=True, text=True).stdout.split()
    if wanted and here[1:2] != [wanted]:
        print(f"not checked: the list is for rustc {wanted}, this is {' '.join(here)} (the Dockerfile pins the list's)")
        return None
    names, missing = link_order_missing(binary)
    print(f"{binary}: {len(names) - len(missing)} of {len(names)} listed functions")
    if set(missing) & set(names[:TOP]) or len(missing) > 0.01 * len(names):
        return ("the link order is stale (another toolchain, dependency versions, or packages not built "
                f"together; missing: {missing[:3]}): write it again with benches/link_order.py")
    out = subprocess.run(["nm", "-n", "--defined-only", str(binary)], capture_output=True, text=True).stdout
    code = [f[2] for f in map(str.split, out.splitlines()) if len(f) == 3 and f[1] in "tTwW"]
    if not code or code[0] != names[0]:
        return f"the code does not start with {names[0]} but {code[:1]}: the linker did not take the order"
    ldd = subprocess.run(["ldd", "--version"], capture_output=True, text=True).stdout.split("\n")[0].split()
    version = re.match(r"^(\d+)\.(\d+)$", ldd[-1]) if ldd else None
    relr = version is not None and (int(version.group(1)), int(version.group(2))) >= (2, 36)
    dynamic = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True).stdout
    if relr and "(RELR)" not in dynamic:
        return "no packed relative relocations (DT_RELR) in the dynamic section, with glibc 2.36 here"
    print("the code starts with the listed functions" + ("; relative relocations packed" if relr else ""))
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bins", type=pathlib.Path, default=ROOT / "target" / "dist")
    ap.add_argument("--out", type=pathlib.Path, default=ORDER)
    ap.add_argument("--fresh", action="store_true",
                    help="do not keep the functions of the current list that did not run this time")
    ap.add_argument("--check", action="store_true",
                    help="only check that the sidecar in --bins was linked in the list's order (CI)")
    args = ap.parse_args()
    if args.check:
        sys.exit(check(args.bins / "meshlet-proxy"))
    for tool in ("valgrind", "wrk", "nginx", "nm"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (Debian: apt-get install {tool})")
    known = defined_symbols(args.bins / "meshlet-proxy")
    if not known:
        sys.exit(f"{args.bins / 'meshlet-proxy'} has no symbol table: build it with the dist profile")

    # Every function that runs, however briefly, under callgrind (which reports the CPU as
    # one without AVX-512 and SHA extensions, so AWS-LC picks other assembly there) ...
    total = collections.Counter()
    for pin in (True, False):
        cg = run_pair(args.bins, lambda side, tmp: [
            "valgrind", "--tool=callgrind", "--demangle=no", f"--callgrind-out-file={tmp / side}.cg"], pin)
        for side in SIDES:
            if not (cg / f"{side}.cg").exists():
                sys.exit(f"callgrind wrote no {cg / side}.cg: see {cg}/meshlet-{side}.log")
            total.update(self_cost(cg / f"{side}.cg", "meshlet-proxy"))
        shutil.rmtree(cg)
    # ... and the functions sampled natively at full speed, after them.
    if shutil.which("perf"):
        native = run_pair(args.bins, lambda side, tmp: [
            "perf", "record", "-q", "-e", "cpu-clock", "-F", "20000", "-o", f"{tmp / side}.perf", "--"], True)
        samples = collections.Counter()
        for side in SIDES:
            samples.update(sampled(native / f"{side}.perf", "meshlet-proxy"))
        shutil.rmtree(native)
        extra = {name: n for name, n in samples.items() if name not in total}
        print(f"perf: {len(extra)} functions sampled natively that callgrind did not see")
        low = min(total.values(), default=1)
        for rank, (name, _) in enumerate(sorted(extra.items(), key=lambda kv: -kv[1])):
            total[name] = low / (rank + 2)  # after every function callgrind saw
        # ... and, last, the functions whose own code faulted natively outside the list: each
        # such fault makes the kernel map its neighbours as well, so one left out costs up to
        # 64 KB resident. A fault maps pages around the first one touched, so this finds the
        # first unlisted function in each such window, per run: after a relink, a run of this
        # script finds the next, and the functions of the current list still in the binary
        # stay (--fresh drops them).
        native = run_pair(args.bins, lambda side, tmp: [
            "perf", "record", "-q", "-e", "page-faults", "-c", "1", "-d", "-o", f"{tmp / side}.perf", "--"], True)
        faults = [n for side in SIDES for n in faulted(native / f"{side}.perf", "meshlet-proxy")]
        shutil.rmtree(native)
        earlier = [] if args.fresh else listed_functions()
        late = list(dict.fromkeys(n for n in faults + earlier if n not in total and n in known))
        print(f"page faults: {len(set(faults) - set(total))} more functions; "
              f"{len(late)} with those kept from the current list")
        low, after = min(total.values(), default=1), len(total) + 2
        for rank, name in enumerate(late):
            total[name] = low / (after + rank)  # after the functions sampled
    else:
        print("perf not found: the list has only what ran under callgrind")
    ordered = [name for name, _ in total.most_common() if name in known]
    if len(ordered) < 1000:
        sys.exit(f"only {len(ordered)} functions of the sidecar ran: not writing {args.out}")
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
