#!/usr/bin/env python3
"""Memory under hostile clients, on loopback: the proxy's RSS before, during and after.

  idle     N connections (default 10,000) that send nothing
  bodies   N connections (default 3,000) that announce a kept-size body (64 KiB) and send
           all of it but the last byte

Runs the identity and Mosaic stand-ins and the release proxy as separate processes, so
the RSS is the proxy's alone; checks that a request still goes through while the attack
holds, and stops everything when done. Bounded: one pass, every wait has a limit.

  python3 benches/hostile.py idle
  N=3000 python3 benches/hostile.py bodies
  SERVER='max_header_bytes = 16384' python3 benches/hostile.py bodies   # extra [server] keys
"""
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "mosaic-auth-proxy")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(url, limit=20.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status
        except Exception:
            time.sleep(0.1)
    sys.exit(f"no answer from {url}")


def status(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except Exception as e:
        return f"failed: {e}"


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "idle"
    n = int(os.environ.get("N", "10000" if mode == "idle" else "3000"))
    hold = float(os.environ.get("HOLD", "3"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if n + 64 > hard:
        sys.exit(f"the open-file limit ({hard}) is too low for N={n}")
    if not os.path.exists(BINARY):
        sys.exit("build first: cargo build --release")

    identity, upstream, listen, admin = (free_port() for _ in range(4))
    procs = []
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "proxy.toml")
        with open(config, "w") as f:
            f.write(f"""
[server]
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
max_connections = {n + 100}
header_timeout = "60s"
body_timeout = "60s"
{os.environ.get("SERVER", "")}
[identity]
origin = "http://127.0.0.1:{identity}"
[accounts.main]
client_id = "demo-client"
client_secret_env = "BENCH_SECRET"
[[routes]]
upstream = "http://127.0.0.1:{upstream}"
account = "main"
""")
        try:
            procs.append(subprocess.Popen(
                [BINARY, "identity-stub", "--listen", f"127.0.0.1:{identity}"], env=env,
                stdout=subprocess.DEVNULL))
            procs.append(subprocess.Popen(
                [BINARY, "upstream-stub", "--listen", f"127.0.0.1:{upstream}",
                 "--identity-origin", f"http://127.0.0.1:{identity}"], env=env,
                stdout=subprocess.DEVNULL))
            proxy = subprocess.Popen(
                [BINARY, "run", "--config", config],
                env=dict(env, BENCH_SECRET="demo-secret"))
            procs.append(proxy)
            wait_for(f"http://127.0.0.1:{admin}/ready")
            url = f"http://127.0.0.1:{listen}/whoami"
            for _ in range(200):  # warm up: pools, token, allocator
                status(url)
            before = rss_kib(proxy.pid)

            held = []
            started = time.monotonic()
            body = b"x" * 65535
            for _ in range(n):
                s = socket.create_connection(("127.0.0.1", listen))
                if mode == "bodies":
                    s.sendall(b"POST /whoami HTTP/1.1\r\nHost: a\r\n"
                              b"Content-Type: application/json\r\n"
                              b"Content-Length: 65536\r\n\r\n" + body)
                held.append(s)
            opened_s = time.monotonic() - started
            time.sleep(hold)
            during = rss_kib(proxy.pid)
            fds_during = open_fds(proxy.pid)
            served = status(url)
            probe = status(f"http://127.0.0.1:{admin}/health")
            for s in held:
                s.close()
            held.clear()
            time.sleep(hold)
            after = rss_kib(proxy.pid)
            fds_after = open_fds(proxy.pid)
            served_after = status(url)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()

    print(f"mode: {mode}, connections: {n} (opened in {opened_s:.1f} s)")
    print(f"proxy RSS before: {before / 1024:.1f} MiB")
    print(f"proxy RSS with the connections held: {during / 1024:.1f} MiB "
          f"({(during - before) * 1024 / n / 1024:.1f} KiB per connection), "
          f"{fds_during} open files")
    print(f"request through the proxy meanwhile: {served}; admin /health: {probe}")
    print(f"proxy RSS {hold:.0f} s after they closed: {after / 1024:.1f} MiB; "
          f"{fds_after} open files; request then: {served_after}")


if __name__ == "__main__":
    main()
