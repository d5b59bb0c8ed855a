"""The open-loop client of mesh_load.py's fixed-rate latency test (see benches/README.md,
"The figures"): HTTP/1.1 over keep-alive connections on loopback, standard library only."""
import collections
import gc
import re
import select
import socket
import time


def fixed_rate_client(port, seconds, warmup, on_window, rate, conns_n):
    """Open loop: request i is due at t0 + i/rate and goes out on the next idle keep-alive
    connection (round robin over conns_n), or waits for one; its latency runs from the due
    time to the response's last byte, so queueing anywhere counts. The loop polls without
    sleeping (epoll with timeout 0) on the load generator's core, so sends are on time to
    microseconds; on_window(0) and on_window(1) mark the measured window (after the warm-up)."""
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    ep, conns, idle = select.epoll(), {}, collections.deque()

    def connect():
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
        conns[s.fileno()] = {"sock": s, "due": None, "buf": bytearray()}
        idle.append(s.fileno())

    def replace(fd):
        ep.unregister(fd)
        conns.pop(fd)["sock"].close()
        if fd in idle:
            idle.remove(fd)
        connect()

    for _ in range(conns_n):
        connect()
    interval, total = 1 / rate, int((seconds + warmup) * rate)
    t0 = time.perf_counter() + 0.05
    measured_from = t0 + warmup
    deadline = t0 + seconds + warmup + 10
    backlog, lat = collections.deque(), []
    sent = errors = non_200 = 0
    in_window = False
    gc.disable()
    try:
        while sent < total or backlog or len(idle) < len(conns):
            now = time.perf_counter()
            if now > deadline:
                errors += len(backlog) + len(conns) - len(idle) + total - sent
                break
            if not in_window and now >= measured_from:
                in_window = True
                on_window(0)
            while sent < total and t0 + sent * interval <= now:
                backlog.append(t0 + sent * interval)
                sent += 1
            while backlog and idle:
                fd = idle.popleft()
                conns[fd]["due"] = backlog.popleft()
                try:
                    conns[fd]["sock"].send(request)
                except OSError:
                    errors += 1
                    replace(fd)
            for fd, _ in ep.poll(0):
                c = conns[fd]
                try:
                    data = c["sock"].recv(65536)
                except OSError:
                    data = b""
                if not data:  # closed under us: count it, replace the connection
                    errors += 1
                    replace(fd)
                    continue
                buf = c["buf"]
                buf += data
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", buf[:end + 2])
                if len(buf) < end + 4 + (int(m.group(1)) if m else 0):
                    continue
                done_at = time.perf_counter()
                if c["due"] >= measured_from:
                    if buf.startswith(b"HTTP/1.1 200"):
                        lat.append((done_at - c["due"]) * 1000)
                    else:
                        non_200 += 1
                buf.clear()
                idle.append(fd)
        on_window(1)
    finally:
        gc.enable()
        for c in conns.values():
            c["sock"].close()
        ep.close()
    return sorted(lat), errors, non_200
