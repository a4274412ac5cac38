#!/usr/bin/env python3
"""A bounded loopback load test of `xfuser serve` on the bundled model.

Starts the server on 127.0.0.1 with an ephemeral port, sends a fixed number of `POST /generate`
requests at each concurrency level (1, 4 and 16 clients by default; each level also stops
issuing requests after --max-seconds), and prints requests per second and p50/p95 latency per
level, and the server's resident memory (VmRSS, from /proc/<pid>/status) after a warm-up
request and at the end. Then it stops the server with SIGTERM and checks that it exits 0.

    cargo build --release
    python3 scripts/serve_load.py                       # target/release/xfuser
    python3 scripts/serve_load.py --bin target/debug/xfuser --requests 16

Only the standard library is used; nothing leaves the loopback interface.
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_kib(pid):
    """VmRSS and VmHWM of `pid` in KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def start_server(binary, max_queue, timeout):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("RUST_LOG", None)
    proc = subprocess.Popen(
        [binary, "serve", "--host", "127.0.0.1", "--port", "0", "--max-queue", str(max_queue)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    found = {}

    def read():
        for line in proc.stdout:
            if line.startswith("listening on "):
                found["base"] = line.split("listening on ", 1)[1].strip()
                break
        for _ in proc.stdout:  # keep draining
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while "base" not in found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit("the server did not start")
        time.sleep(0.05)
    return proc, found["base"]


def post(url, body, timeout):
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as e:
        e.read()
        status = e.code
    return status, time.monotonic() - started


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def run_level(url, clients, requests, max_seconds, body, timeout):
    """`requests` requests from `clients` threads; no new request after `max_seconds`."""
    lock = threading.Lock()
    next_index = [0]
    latencies, statuses = [], {}
    deadline = time.monotonic() + max_seconds

    def client():
        while True:
            with lock:
                if next_index[0] >= requests or time.monotonic() > deadline:
                    return
                i = next_index[0]
                next_index[0] += 1
            status, seconds = post(url, dict(body, seed=i), timeout)
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(seconds)

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    return {
        "clients": clients,
        "requests": sum(statuses.values()),
        "ok": statuses.get(200, 0),
        "statuses": statuses,
        "seconds": elapsed,
        "rps": statuses.get(200, 0) / elapsed if elapsed > 0 else float("nan"),
        "p50": percentile(latencies, 0.50),
        "p95": percentile(latencies, 0.95),
    }


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default=str(ROOT / "target" / "release" / "xfuser"))
    parser.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per level")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="height and width")
    parser.add_argument("--timeout", type=float, default=300.0, help="per request")
    args = parser.parse_args()

    levels = [int(x) for x in args.levels.split(",")]
    proc, base = start_server(args.bin, max(levels), args.timeout)
    url = base + "/generate"
    body = {
        "prompt": "a lighthouse on a cliff at dusk",
        "num_inference_steps": args.steps,
        "height": args.size,
        "width": args.size,
    }
    try:
        status, _ = post(url, dict(body, seed=0), args.timeout)  # warm-up
        if status != 200:
            sys.exit(f"warm-up request answered {status}")
        before = rss_kib(proc.pid)
        results = []
        for n in levels:
            result = run_level(url, n, args.requests, args.max_seconds, body, args.timeout)
            result["rss"] = rss_kib(proc.pid)["VmRSS"]
            results.append(result)
        after = rss_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed after 60 s"

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)")
    print(f"binary: {args.bin}")
    print(f"request: {args.size}x{args.size}, {args.steps} steps, bundled model")
    print()
    print(
        "| clients | requests | 200 | other statuses | req/s | p50 latency | p95 latency "
        "| RSS after |"
    )
    print(
        "|--------:|---------:|----:|----------------|------:|------------:|------------:"
        "|----------:|"
    )
    for r in results:
        other = {k: v for k, v in r["statuses"].items() if k != 200} or "-"
        print(
            f"| {r['clients']} | {r['requests']} | {r['ok']} | {other} | {r['rps']:.2f} "
            f"| {r['p50'] * 1000:.0f} ms | {r['p95'] * 1000:.0f} ms "
            f"| {r['rss'] / 1024:.1f} MiB |"
        )
    print()
    print(
        f"server RSS after warm-up: {before['VmRSS'] / 1024:.1f} MiB; after the run: "
        f"{after['VmRSS'] / 1024:.1f} MiB (peak {after['VmHWM'] / 1024:.1f} MiB)"
    )
    print(f"exit status after SIGTERM: {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
