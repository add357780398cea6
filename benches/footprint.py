#!/usr/bin/env python3
"""Measure legate's footprint: binary size, start-to-ready time, idle RSS, and RSS with
10,000 idle proxied connections (client -> legate -> a real redis-server, loopback only).

    benches/footprint.py [BINARY]      # default: target/static/legate (scripts/build-static)

Standard library only. Raises the descriptor limit (legate needs two per connection), so
run it as root or with a hard limit of at least 25,000. Bounded: gives up after a minute.
"""
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

CONNECTIONS = int(os.environ.get("CONNECTIONS", "10000"))
DEADLINE = 60.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode()
    except OSError:
        return None, ""


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def metric(port, name):
    _, body = get(port, "/metrics")
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def until(what, check, deadline):
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.005)
    sys.exit(f"footprint: {what} did not happen in time")


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/static/legate"
    if not os.access(binary, os.X_OK):
        sys.exit(f"footprint: {binary} not found; run scripts/build-static first")
    if not shutil.which("redis-server"):
        sys.exit("footprint: redis-server not found (apt-get install redis-server)")
    global CONNECTIONS
    want = CONNECTIONS * 2 + 200  # legate holds two descriptors per proxied connection
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        # Raising the hard limit needs CAP_SYS_RESOURCE; measure what the limit allows.
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        CONNECTIONS = min(CONNECTIONS, (hard - 200) // 2)
        print(f"footprint: descriptor hard limit {hard}: measuring {CONNECTIONS} connections",
              file=sys.stderr)
    deadline = time.monotonic() + DEADLINE

    work = tempfile.mkdtemp(prefix="legate-footprint-")
    redis_port, listen_port, admin_port = free_port(), free_port(), free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--maxclients", str(CONNECTIONS + 1000), "--tcp-backlog", "4096",
         "--dir", work],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    legate = None
    clients = []
    try:
        until("redis-server to listen", lambda: _connects(redis_port), deadline)
        config = os.path.join(work, "legate.toml")
        with open(config, "w") as f:
            f.write(f"""[admin]
listen = "127.0.0.1:{admin_port}"

[[listeners]]
name = "redis"
listen = "127.0.0.1:{listen_port}"
upstream = ["127.0.0.1:{redis_port}"]
max_connections = {CONNECTIONS * 2}
connect_timeout = "5s"
health = {{ check = "redis", interval = "5s", timeout = "1s" }}
""")
        started = time.monotonic()
        legate = subprocess.Popen([binary, "run", "-c", config, "--log-level", "warn"],
                                  stdout=subprocess.DEVNULL)
        until("/ready to be 200", lambda: get(admin_port, "/ready")[0] == 200, deadline)
        start_to_ready = time.monotonic() - started
        time.sleep(1)
        idle = rss_kib(legate.pid)

        for _ in range(CONNECTIONS):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.connect(("127.0.0.1", listen_port))
            clients.append(s)
            # In steps, so neither accept backlog overflows (a dropped SYN costs a 1s retry).
            if len(clients) % 500 == 0:
                until(f"{len(clients)} connections to be active",
                      lambda: metric(admin_port, "legate_connections_active") >= len(clients),
                      deadline)
        until(f"{CONNECTIONS} connections to be active",
              lambda: metric(admin_port, "legate_connections_active") >= CONNECTIONS, deadline)
        # Every upstream leg is open: redis counts its clients.
        probe = socket.create_connection(("127.0.0.1", redis_port))
        probe.sendall(b"INFO clients\r\n")
        time.sleep(0.2)
        info = probe.recv(65536).decode()
        probe.close()
        upstream = [int(l.split(":")[1]) for l in info.splitlines() if l.startswith("connected_clients:")][0]
        time.sleep(1)
        loaded = rss_kib(legate.pid)
        # And they still carry bytes.
        clients[-1].sendall(b"PING\r\n")
        assert clients[-1].recv(16) == b"+PONG\r\n"

        size = os.path.getsize(binary)
        print(f"binary:              {binary} {size} bytes ({size / 1048576:.1f} MiB)")
        print(f"start to ready:      {start_to_ready * 1000:.0f} ms (spawn to /ready 200, one redis backend)")
        print(f"idle RSS:            {idle / 1024:.1f} MiB")
        per = (loaded - idle) / CONNECTIONS
        print(f"RSS, {CONNECTIONS} idle conns: {loaded / 1024:.1f} MiB "
              f"({per:.2f} KiB per proxied connection; redis saw {upstream - 1} other clients)")
        if CONNECTIONS < 10000:
            print(f"RSS, 10000 (linear): {(idle + per * 10000) / 1024:.1f} MiB")
    finally:
        for s in clients:
            s.close()
        for proc in (legate, redis):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def _connects(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
