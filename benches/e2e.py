#!/usr/bin/env python3
"""End-to-end benchmark of legate beside the proxies users would otherwise pick.

    benches/e2e.py target/release/legate      (run through benches/e2e, which installs and builds)

For each proxy -- none (client straight to the backend: the physical limit), legate,
HAProxy `mode tcp` with `option splice-auto`, HAProxy with `option splice-request` +
`option splice-response`, nginx `stream`, socat -- it starts a fresh backend and a fresh
proxy on loopback and measures:

  bulk      iperf3 through the proxy, 1 and 4 streams: Gbit/s, proxy CPU s per GB
  redis     redis-benchmark -t set,get -c 50 at pipeline 1 and 16: ops/s, p50, p99 (ms),
            proxy CPU s per 100k requests
  connrate  redis-benchmark -t ping_inline -c 50 -k 0: a new connection per PING, so
            short connections/s (connect, one request, close); CPU s per 100k connections
  memory    proxy RSS idle, and with N_IDLE idle proxied connections open (every upstream
            leg open too: the backend counts them) -> KiB per connection

The proxy runs on core 1, the load generator and the backend on core 0 (taskset). Every
proxy is given one core and one worker (HAProxy nbthread 1, nginx worker_processes 1,
legate's runtime sizes itself from its CPU affinity). Measurements are interleaved
(round r of every proxy, then round r+1) so a noisy neighbour hits all of them alike;
each figure is the median of RUNS rounds with its spread ((max-min)/2 as % of the median).
Ratios are legate over the better HAProxy figure of the same run and legate over no proxy.

Environment: RUNS (3), N_IDLE (9000), BULK_SECONDS (3), ONLY (comma list of proxies),
SKIP (comma list of workloads: bulk,redis,connrate,memory). Standard library only; every
wait is bounded; every process it starts is stopped before it returns.
"""
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = int(os.environ.get("RUNS", "3"))
N_IDLE = int(os.environ.get("N_IDLE", "9000"))
BULK_SECONDS = int(os.environ.get("BULK_SECONDS", "3"))
PROXY_CORE, LOAD_CORE = "1", "0"
TICK = os.sysconf("SC_CLK_TCK")
DEADLINE = time.monotonic() + 15 * 60  # hard stop for the whole run
HERE = os.path.dirname(os.path.abspath(__file__))

PROXIES = ["none", "legate", "haproxy-auto", "haproxy-splice", "nginx", "socat"]
HAPROXIES = ["haproxy-auto", "haproxy-splice"]


def log(*args):
    print("e2e:", *args, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port):
    """True when something listens on 127.0.0.1:port (read from /proc: no probe
    connection, which an iperf3 server would take for a client)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":
                return True
    return False


def until(what, check, timeout=10.0):
    end = min(time.monotonic() + timeout, DEADLINE)
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.01)
    raise RuntimeError(f"{what} did not happen in time")


def tree(pid):
    """pid and all its descendants (nginx's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def cpu_seconds(pid):
    """User + system CPU of the proxy's processes, reaped children included (socat forks
    one per connection; it reaps them, so their time lands in its cutime/cstime)."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])
        except OSError:
            pass
    return total / TICK


def rss_kib(pid):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def spawn(cmd, core, **kw):
    return subprocess.Popen(["taskset", "-c", core] + cmd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL),
                            start_new_session=True, **kw)


def stop(proc):
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- the proxies


class Proxy:
    """A started proxy: its port, the process to measure, and how to stop it."""

    def __init__(self, name, backend_port, work, legate):
        self.name, self.proc = name, None
        if name == "none":
            self.port = backend_port
            return
        self.port = free_port()
        cmd = self.command(name, backend_port, work, legate)
        self.proc = spawn(cmd, PROXY_CORE)
        try:
            until(f"{name} to listen", lambda: self.proc.poll() is None and listening(self.port))
            if name == "legate":
                until("legate /ready", lambda: http_status(self.admin, "/ready") == 200)
        except Exception:
            stop(self.proc)
            raise

    def command(self, name, backend, work, legate):
        up = f"127.0.0.1:{backend}"
        listen = f"127.0.0.1:{self.port}"
        if name == "legate":
            self.admin = free_port()
            path = os.path.join(work, "legate.toml")
            with open(path, "w") as f:
                f.write(f"""[admin]
listen = "127.0.0.1:{self.admin}"

[[listeners]]
name = "bench"
listen = "{listen}"
upstream = ["{up}"]
max_connections = 20000
connect_timeout = "5s"
health = {{ check = "none" }}
""")
            return [legate, "run", "-c", path, "--log-level", "warn"]
        if name.startswith("haproxy"):
            splice = ("option splice-auto" if name == "haproxy-auto"
                      else "option splice-request\n    option splice-response")
            path = os.path.join(work, f"{name}.cfg")
            with open(path, "w") as f:
                # maxpipes bounds the pipes HAProxy may hold, so 9,000 connections plus
                # their pipes fit the 20,000-descriptor limit (bulk uses at most 4).
                f.write(f"""global
    maxconn 9700
    maxpipes 256
    nbthread 1

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    {splice}

frontend bench
    bind {listen}
    default_backend upstream

backend upstream
    server s1 {up}
""")
            return ["haproxy", "-db", "-f", path]
        if name == "nginx":
            path = os.path.join(work, "nginx.conf")
            with open(path, "w") as f:
                f.write(f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
worker_processes 1;
worker_rlimit_nofile 20000;
error_log {work}/nginx-error.log error;
pid {work}/nginx.pid;
events {{ worker_connections 19500; }}
stream {{
    server {{
        listen {listen} backlog=4096;
        proxy_pass {up};
    }}
}}
""")
            return ["nginx", "-e", f"{work}/nginx-error.log", "-p", work, "-c", path]
        if name == "socat":
            return ["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
                    f"TCP:{up}"]
        raise ValueError(name)

    def cpu(self):
        return cpu_seconds(self.proc.pid) if self.proc else 0.0

    def rss(self):
        return rss_kib(self.proc.pid)

    def close(self):
        stop(self.proc)


def http_status(port, path):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
            data = s.recv(64)
        return int(data.split()[1])
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------- backends


class Redis:
    def __init__(self, work):
        self.port = free_port()
        self.proc = spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "no", "--maxclients", "19000",
                           "--tcp-backlog", "4096", "--dir", work], LOAD_CORE)
        until("redis-server to listen", lambda: listening(self.port))

    def info(self, key):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"INFO\r\n")
            data = b""
            while not data.endswith(b"\r\n\r\n") and len(data) < 1 << 20:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if b"\r\n" in data:
                    size = int(data[1:data.index(b"\r\n")])
                    if len(data) >= data.index(b"\r\n") + 2 + size:
                        break
        for line in data.decode().splitlines():
            if line.startswith(key + ":"):
                return int(line.split(":")[1])
        raise RuntimeError(f"no {key} in INFO")

    def close(self):
        stop(self.proc)


class Iperf:
    def __init__(self):
        self.port = free_port()
        self.proc = spawn(["iperf3", "-s", "-p", str(self.port), "-B", "127.0.0.1"], LOAD_CORE)
        until("iperf3 -s to listen", lambda: listening(self.port))

    def close(self):
        stop(self.proc)


def run(cmd, timeout):
    out = subprocess.run(["taskset", "-c", LOAD_CORE] + cmd, capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({out.returncode}): {out.stderr.strip()[:300]}")
    return out.stdout


# ---------------------------------------------------------------- workloads


def bulk(name, work, legate, streams):
    backend = Iperf()
    proxy = None
    try:
        proxy = Proxy(name, backend.port, work, legate)
        before = proxy.cpu()
        out = run(["iperf3", "-c", "127.0.0.1", "-p", str(proxy.port), "-t", str(BULK_SECONDS),
                   "-P", str(streams), "-J"], timeout=BULK_SECONDS + 30)
        cpu = proxy.cpu() - before
        end = json.loads(out)["end"]
        moved = end["sum_received"]["bytes"]
        result = {"gbps": end["sum_received"]["bits_per_second"] / 1e9}
        if proxy.proc:
            result["cpu_s_per_gb"] = cpu / (moved / 1e9)
        return result
    finally:
        if proxy:
            proxy.close()
        backend.close()


def parse_csv(out):
    rows = {}
    lines = [l for l in out.splitlines() if l.startswith('"')]
    header = [h.strip('"') for h in lines[0].split(",")]
    for line in lines[1:]:
        values = [v.strip('"') for v in line.split(",")]
        rows[values[0]] = dict(zip(header, values))
    return rows


def redis(name, work, legate, pipeline):
    backend = Redis(work)
    proxy = None
    n = 100_000 if pipeline == 1 else 500_000
    try:
        proxy = Proxy(name, backend.port, work, legate)
        before = proxy.cpu()
        out = run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(proxy.port), "-t", "set,get",
                   "-c", "50", "-n", str(n), "-P", str(pipeline), "--csv", "--precision", "3"],
                  timeout=120)
        cpu = proxy.cpu() - before
        rows = parse_csv(out)
        set_, get = rows["SET"], rows["GET"]
        # Both tests' requests over both tests' time.
        seconds = n / float(set_["rps"]) + n / float(get["rps"])
        result = {
            "ops": 2 * n / seconds,
            "p50_ms": max(float(set_["p50_latency_ms"]), float(get["p50_latency_ms"])),
            "p99_ms": max(float(set_["p99_latency_ms"]), float(get["p99_latency_ms"])),
        }
        if proxy.proc:
            result["cpu_s_per_100k"] = cpu / (2 * n / 1e5)
        return result
    finally:
        if proxy:
            proxy.close()
        backend.close()


def connrate(name, work, legate):
    backend = Redis(work)
    proxy = None
    n = 20_000
    try:
        proxy = Proxy(name, backend.port, work, legate)
        accepted = backend.info("total_connections_received")
        before = proxy.cpu()
        out = run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(proxy.port), "-t",
                   "ping_inline", "-c", "50", "-n", str(n), "-k", "0", "--csv"], timeout=120)
        cpu = proxy.cpu() - before
        row = parse_csv(out)["PING_INLINE"]
        # Every request came on its own upstream connection (nothing pooled or kept).
        fresh = backend.info("total_connections_received") - accepted
        result = {"conns_per_s": float(row["rps"]), "backend_connections": fresh,
                  "p99_ms": float(row["p99_latency_ms"])}
        if proxy.proc:
            result["cpu_s_per_100k"] = cpu / (n / 1e5)
        return result
    finally:
        if proxy:
            proxy.close()
        backend.close()


def memory(name, work, legate):
    backend = Redis(work)
    proxy = None
    clients = []
    try:
        proxy = Proxy(name, backend.port, work, legate)
        time.sleep(0.5)
        idle = proxy.rss()
        base = backend.info("connected_clients")
        linger0 = b"\x01\x00\x00\x00\x00\x00\x00\x00"
        for i in range(N_IDLE):
            s = socket.socket()
            # Reset on close: no TIME_WAIT left to crowd the next runs' ports.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
            s.connect(("127.0.0.1", proxy.port))
            clients.append(s)
            # In steps, so no accept backlog overflows (a dropped SYN costs a 1s retry).
            if len(clients) % 500 == 0 or len(clients) == N_IDLE:
                until(f"{len(clients)} upstream connections",
                      lambda: backend.info("connected_clients") - base >= len(clients), 20)
        time.sleep(1)
        loaded = proxy.rss()
        clients[-1].sendall(b"PING\r\n")
        clients[-1].settimeout(5)
        assert clients[-1].recv(16) == b"+PONG\r\n", "the last connection does not carry bytes"
        return {"idle_rss_kib": idle, "loaded_rss_kib": loaded,
                "kib_per_conn": (loaded - idle) / N_IDLE}
    finally:
        for s in clients:
            s.close()
        if proxy:
            proxy.close()
        backend.close()


WORKLOADS = {
    "bulk1": (lambda n, w, l: bulk(n, w, l, 1), PROXIES),
    "bulk4": (lambda n, w, l: bulk(n, w, l, 4), PROXIES),
    "redis_p1": (lambda n, w, l: redis(n, w, l, 1), PROXIES),
    "redis_p16": (lambda n, w, l: redis(n, w, l, 16), PROXIES),
    "connrate": (connrate, PROXIES),
    # socat forks a process per connection: 9,000 processes is not a figure anyone runs.
    "memory": (memory, [p for p in PROXIES if p not in ("none", "socat")]),
}
GROUP = {"bulk1": "bulk", "bulk4": "bulk", "redis_p1": "redis", "redis_p16": "redis",
         "connrate": "connrate", "memory": "memory"}

# (workload, key, label, higher is better)
ROWS = [
    ("bulk1", "gbps", "bulk, 1 stream (Gbit/s)", True),
    ("bulk4", "gbps", "bulk, 4 streams (Gbit/s)", True),
    ("bulk1", "cpu_s_per_gb", "proxy CPU s per GB, 1 stream", False),
    ("bulk4", "cpu_s_per_gb", "proxy CPU s per GB, 4 streams", False),
    ("redis_p1", "ops", "redis set+get P1 (ops/s)", True),
    ("redis_p1", "p50_ms", "redis P1 p50 (ms)", False),
    ("redis_p1", "p99_ms", "redis P1 p99 (ms)", False),
    ("redis_p16", "ops", "redis set+get P16 (ops/s)", True),
    ("redis_p16", "p50_ms", "redis P16 p50 (ms)", False),
    ("redis_p16", "p99_ms", "redis P16 p99 (ms)", False),
    ("redis_p1", "cpu_s_per_100k", "proxy CPU s per 100k requests, P1", False),
    ("redis_p16", "cpu_s_per_100k", "proxy CPU s per 100k requests, P16", False),
    ("connrate", "conns_per_s", "short connections/s", True),
    ("connrate", "cpu_s_per_100k", "proxy CPU s per 100k connections", False),
    ("memory", "idle_rss_kib", "idle RSS (KiB)", False),
    ("memory", "loaded_rss_kib", f"RSS with {N_IDLE} idle connections (KiB)", False),
    ("memory", "kib_per_conn", "RSS per idle connection (KiB)", False),
]

# Issue 7's goals: (workload, key) -> the ratio legate/HAProxy must reach.
GOALS = {
    ("bulk1", "gbps"): (">=", 1.0), ("bulk4", "gbps"): (">=", 1.0),
    ("bulk1", "cpu_s_per_gb"): ("<=", 0.8), ("bulk4", "cpu_s_per_gb"): ("<=", 0.8),
    ("redis_p1", "ops"): (">=", 1.0), ("redis_p16", "ops"): (">=", 1.0),
    ("redis_p1", "p99_ms"): ("<=", 1.0), ("redis_p16", "p99_ms"): ("<=", 1.0),
    ("connrate", "conns_per_s"): (">=", 1.0),
    ("memory", "loaded_rss_kib"): ("<=", 1.0),
}


def summary(values):
    if not values:
        return None
    med = statistics.median(values)
    spread = (max(values) - min(values)) / 2 / med * 100 if med else 0.0
    return {"median": med, "spread_pct": spread, "runs": values}


def fmt(x):
    if x is None:
        return "–"
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name, cmd in [("haproxy", ["haproxy", "-v"]), ("nginx", ["nginx", "-v"]),
                      ("socat", ["socat", "-V"]), ("redis", ["redis-server", "--version"]),
                      ("iperf3", ["iperf3", "-v"])]:
        out = subprocess.run(cmd, capture_output=True, text=True)
        text = (out.stdout + out.stderr).strip().splitlines()
        versions[name] = next((l for l in text if "version" in l.lower()), text[0] if text else "")
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "load_before": os.getloadavg(), "versions": versions}


def table(results, only):
    cols = [p for p in PROXIES if p in only]
    head = "| figure | " + " | ".join(cols) + " | legate / HAProxy | legate / no proxy | goal |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    for workload, key, label, higher in ROWS:
        if workload not in results:
            continue
        cells = []
        for p in cols:
            s = results[workload].get(p, {}).get(key)
            cells.append("–" if s is None else f"{fmt(s['median'])} ±{s['spread_pct']:.0f}%")
        r = results[workload].get("ratios", {}).get(key, {})
        vs_h, vs_n = r.get("vs_haproxy"), r.get("vs_none")
        goal = GOALS.get((workload, key))
        goal_cell = ""
        if goal and vs_h is not None:
            op, target = goal
            met = vs_h >= target if op == ">=" else vs_h <= target
            goal_cell = f"{op} {target:.1f}× {'met' if met else '**not met**'}"
        lines.append(f"| {label} | " + " | ".join(cells) +
                     f" | {'–' if vs_h is None else f'{vs_h:.2f}×'}"
                     f" | {'–' if vs_n is None else f'{vs_n:.2f}×'} | {goal_cell} |")
    return "\n".join(lines)


def main():
    legate = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/legate")
    only = os.environ.get("ONLY", ",".join(PROXIES)).split(",")
    skip = set(os.environ.get("SKIP", "").split(","))
    for tool in ("taskset", "iperf3", "redis-server", "redis-benchmark", "haproxy", "nginx", "socat"):
        if not shutil.which(tool):
            sys.exit(f"e2e: {tool} not found; run benches/e2e, which installs it")
    # Each proxy holds two descriptors per proxied connection, and inherits this limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    global N_IDLE
    if N_IDLE * 2 + 1000 > hard:
        N_IDLE = (hard - 1000) // 2
        log(f"descriptor limit {hard}: holding {N_IDLE} idle connections")

    info = machine()
    log(f"{info['nproc']} cpus, {info['cpu']}, kernel {info['kernel']}, load {info['load_before']}")
    started = time.monotonic()
    raw = {}
    work = tempfile.mkdtemp(prefix="legate-e2e-")
    try:
        for workload, (fn, proxies) in WORKLOADS.items():
            if GROUP[workload] in skip or workload in skip:
                continue
            proxies = [p for p in proxies if p in only]
            raw[workload] = {p: [] for p in proxies}
            for round_ in range(RUNS):
                for p in proxies:
                    if time.monotonic() > DEADLINE:
                        raise RuntimeError("out of time")
                    try:
                        raw[workload][p].append(fn(p, work, legate))
                    except Exception as error:  # a failed run is reported, not fatal
                        log(f"{workload} {p} round {round_ + 1}: {error}")
                log(f"{workload} round {round_ + 1}/{RUNS} done ({time.monotonic() - started:.0f}s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {}
    for workload, per in raw.items():
        results[workload] = {}
        for p, runs in per.items():
            keys = sorted({k for r in runs for k in r})
            results[workload][p] = {k: summary([r[k] for r in runs if k in r]) for k in keys}
        ratios = {}
        for _, key, _, higher in [row for row in ROWS if row[0] == workload]:
            med = lambda p: (results[workload].get(p, {}).get(key) or {}).get("median")
            mine = med("legate")
            if mine is None:
                continue
            # Compared with the better HAProxy of the two (for bulk: splice-request/response).
            hs = [med(h) for h in HAPROXIES if med(h)]
            best = (max(hs) if higher else min(hs)) if hs else None
            ratios[key] = {
                "vs_haproxy": mine / best if best else None,
                "vs_haproxy_auto": mine / med("haproxy-auto") if med("haproxy-auto") else None,
                "vs_haproxy_splice": mine / med("haproxy-splice") if med("haproxy-splice") else None,
                "vs_none": mine / med("none") if med("none") else None,
            }
        results[workload]["ratios"] = ratios

    elapsed = time.monotonic() - started
    info["load_after"] = os.getloadavg()
    md = table(results, only)
    cmd = "benches/e2e"
    header = (f"{info['nproc']} cores ({info['cpu']}), kernel {info['kernel']}; load average "
              f"{info['load_before'][0]:.2f} before, {info['load_after'][0]:.2f} after; "
              f"{RUNS} runs each, {elapsed:.0f}s; idle connections N = {N_IDLE}.")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "e2e.md"), "w") as f:
        f.write(f"`{cmd}` — {header}\n\n{md}\n")
    with open(os.path.join(HERE, "results", "e2e.json"), "w") as f:
        json.dump({"command": cmd, "machine": info, "runs": RUNS, "n_idle": N_IDLE,
                   "seconds": elapsed, "proxy_core": PROXY_CORE, "load_core": LOAD_CORE,
                   "results": results}, f, indent=1)
    print(header + "\n")
    print(md)


if __name__ == "__main__":
    main()
