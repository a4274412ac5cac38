#!/usr/bin/env python3
"""Runs xfuser-bench and scripts/bench_pytorch.py in turn (A B A B ...) and prints the median
ratio rust/torch as the last line.

    cargo build --release -p xfuser-bench
    .venv/bin/python scripts/bench_compare.py pixart-forward --rounds 3
    .venv/bin/python scripts/bench_compare.py pipeline --rounds 3 -- --steps 20
    .venv/bin/python scripts/bench_compare.py sd3-forward --rounds 3
    .venv/bin/python scripts/bench_compare.py flux-forward --rounds 3 -- --iters 1
    .venv/bin/python scripts/bench_compare.py vae --rounds 3 -- --latent 32

`sd3-forward` compares one SD3Transformer2DModel forward at SD3-medium width (24 blocks,
hidden 1536, 256 px, batch 2, 333 text tokens; shrink with e.g. `-- --layers 2`), as
`pixart-forward` does PixArt's. `flux-forward` compares one FluxTransformer2DModel forward at
Flux.1-dev width (hidden 3072, 2 double + 4 single blocks by default, 256 px, batch 1, 512
text tokens; change with e.g. `-- --double-layers 1 --single-layers 2 --text-len 256`).
`vae` compares one VAE decode of the full-size PixArt VAE (`xfuser-bench vae --one-process
bands`: the pipelines' decoder, in this process) with diffusers' `AutoencoderKL.decode`.

`parallel` compares the parallel loops with the serial one instead, all in Rust: each round
runs `xfuser-bench pipeline` and then `xfuser-bench parallel --mode M` for every mode of
--modes, and prints per mode the median ratio parallel/serial (same round's serial run):

    python3 scripts/bench_compare.py parallel --modes cfg,ulysses,ring,pipefusion --rounds 3

With `--launcher mpi` (xfuser-bench built with `--features mpi`, Open MPI's mpirun on the
PATH) every mode also runs as `mpirun -n <world>` processes in the same round, and the script
prints per mode the median ratio process/thread as well:

    cargo build --release -p xfuser-bench --features mpi
    python3 scripts/bench_compare.py parallel --launcher mpi --rounds 3 -- --steps 20

`cache` compares the step caches with the uncached loop, all in Rust: each round runs
`xfuser-bench pipeline` plain, with `--use-fbcache` replaying `--fb-pattern` and with
`--use-teacache` replaying `--tea-pattern` (C: every block runs, S: the cached residual is
reused, one letter per step), and prints the median ratio cached/uncached of each:

    python3 scripts/bench_compare.py cache --fb-pattern CSSSC... --tea-pattern CSSCS... \
        --rounds 3 -- --steps 20

Arguments after `--` go to both benchmarks (same flag names on both sides). Before each run
the script waits (up to --quiet-wait seconds) until no compiler runs on the machine, because
a build on the same cores halves either side's speed.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUSY = ("rustc", "cargo", "cc1", "cc1plus", "ld")


def busy():
    try:
        out = subprocess.run(["ps", "-eo", "comm="], capture_output=True, text=True).stdout
    except OSError:
        return False
    return any(line.strip() in BUSY for line in out.splitlines())


def wait_quiet(limit):
    t = time.time()
    while limit > 0 and busy() and time.time() - t < limit:
        time.sleep(2)


def run(cmd, key):
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    m = re.findall(rf"^{key}=([0-9.eE+-]+)$", p.stdout, re.M)
    if not m:
        sys.exit(f"{' '.join(cmd)} printed no {key}=:\n{p.stdout}")
    return float(m[-1])


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command",
                   choices=["pixart-forward", "sd3-forward", "flux-forward", "pipeline", "gemm-floor",
                            "parallel", "cache", "vae"])
    p.add_argument("--modes", default="cfg,ulysses,ring,pipefusion",
                   help="parallel: the --mode values to compare with the serial loop")
    p.add_argument("--world", type=int, default=2, help="parallel: ranks")
    p.add_argument("--launcher", choices=["threads", "mpi"], default="threads",
                   help="parallel: mpi also runs every mode as mpirun processes")
    p.add_argument("--fb-pattern", help="cache: First-Block-Cache's skip pattern (C/S per step)")
    p.add_argument("--tea-pattern", help="cache: TeaCache's skip pattern (C/S per step)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rust-bin", default=str(ROOT / "target" / "release" / "xfuser-bench"))
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--quiet-wait", type=float, default=300.0)
    args = p.parse_args(argv)

    if args.command == "parallel":
        return compare_parallel(args, extra)
    if args.command == "cache":
        return compare_cache(args, extra)
    rust = [args.rust_bin, args.command, *extra]
    if args.command == "vae":
        rust = [args.rust_bin, "vae", "--one-process", "bands", *extra]
    torch = [args.python, str(ROOT / "scripts" / "bench_pytorch.py"), args.command, *extra]
    rs, ts, ratios = [], [], []
    for r in range(args.rounds):
        wait_quiet(args.quiet_wait)
        a = run(rust, "rust_seconds")
        wait_quiet(args.quiet_wait)
        b = run(torch, "torch_seconds")
        rs.append(a)
        ts.append(b)
        ratios.append(a / b)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"round {r}: rust {a:.4f}s torch {b:.4f}s ratio {a / b:.3f} (load {load:.2f})",
              flush=True)
    print(f"rust_median={statistics.median(rs):.4f}")
    print(f"torch_median={statistics.median(ts):.4f}")
    print(f"ratio={statistics.median(ratios):.3f}")


def compare_parallel(args, extra):
    modes = [m for m in args.modes.split(",") if m]
    serial = [args.rust_bin, "pipeline", *extra]
    mpirun = ["mpirun", "-n", str(args.world), "--oversubscribe", "--allow-run-as-root",
              "--mca", "btl", "self,vader"]
    ratios = {m: [] for m in modes}
    process_ratios = {m: [] for m in modes}
    for r in range(args.rounds):
        wait_quiet(args.quiet_wait)
        base = run(serial, "rust_seconds")
        line = [f"round {r}: serial {base:.3f}s"]
        for m in modes:
            wait_quiet(args.quiet_wait)
            cmd = [args.rust_bin, "parallel", "--mode", m, "--world", str(args.world), *extra]
            t = run(cmd, "rust_seconds")
            ratios[m].append(t / base)
            line.append(f"{m} {t:.3f}s ({t / base:.3f})")
            if args.launcher == "mpi":
                wait_quiet(args.quiet_wait)
                tp = run(mpirun + cmd, "rust_seconds")
                process_ratios[m].append(tp / t)
                line.append(f"{m} processes {tp:.3f}s ({tp / t:.3f} of threads)")
        print(", ".join(line), flush=True)
    for m in modes:
        print(f"{m}_over_serial={statistics.median(ratios[m]):.3f}")
        if args.launcher == "mpi":
            print(f"{m}_process_over_thread={statistics.median(process_ratios[m]):.3f}")


def compare_cache(args, extra):
    if not args.fb_pattern or not args.tea_pattern:
        sys.exit("cache: give --fb-pattern and --tea-pattern (C/S per step)")
    plain = [args.rust_bin, "pipeline", *extra]
    caches = {
        "fbcache": ("--use-fbcache", args.fb_pattern),
        "teacache": ("--use-teacache", args.tea_pattern),
    }
    ratios = {c: [] for c in caches}
    for r in range(args.rounds):
        wait_quiet(args.quiet_wait)
        base = run(plain, "rust_seconds")
        line = [f"round {r}: uncached {base:.3f}s"]
        for name, (flag, pattern) in caches.items():
            wait_quiet(args.quiet_wait)
            t = run([*plain, flag, "--cache-pattern", pattern], "rust_seconds")
            ratios[name].append(t / base)
            line.append(f"{name} {t:.3f}s ({t / base:.3f})")
        print(", ".join(line), flush=True)
    for name in caches:
        print(f"{name}_over_uncached={statistics.median(ratios[name]):.3f}")


if __name__ == "__main__":
    main()
