#!/usr/bin/env python3
"""numpy/OpenBLAS baseline for the Fisher reduction F = GᵀG (f32), and the CPU backend's ratio to it.

The CPU backend of fisher-engine is compared against this number: numpy dispatches
`G.T @ G` (a transposed view times its own base) to BLAS SYRK, which computes one triangle,
so it does N·P² multiply-adds; we nevertheless count 2·N·P² flops, the same convention the
criterion benches and `examples/cpu_throughput.rs` use for every backend, so that GFLOP/s
figures compare directly.

Needs numpy (`pip install numpy`). Usage:

    python3 benches/numpy_baseline.py [N] [P] [repeats]
    python3 benches/numpy_baseline.py [N] [P] [repeats] --vs target/release/examples/cpu_throughput [--rounds R]

The first form prints numpy's best-of-`repeats` time and GFLOP/s. The second alternates R
rounds of numpy and of the given binary (called as `BINARY N P repeats`, which must print a
line with "<x> GFLOP/s"), so that both see the same machine load, and prints the best of
each and their ratio: on a shared machine only such interleaved ratios mean anything.
"""

import argparse
import os
import re
import subprocess
import sys
import time

try:
    import numpy as np
except ImportError:  # pragma: no cover - message for a bare machine
    sys.exit("numpy is missing: pip install numpy")


def numpy_best(g: "np.ndarray", repeats: int) -> float:
    """Best wall time of `repeats` runs of g.T @ g, after one warm-up run."""
    g.T @ g  # warm-up: thread pool start, page faults of the output
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f = g.T @ g
        best = min(best, time.perf_counter() - t0)
    assert f.dtype == np.float32 and f.shape == (g.shape[1], g.shape[1])
    return best


def binary_gflops(binary: str, n: int, p: int, repeats: int) -> float:
    out = subprocess.run([binary, str(n), str(p), str(repeats)], check=True, capture_output=True, text=True).stdout
    match = re.search(r"([0-9.]+) GFLOP/s", out)
    if not match:
        sys.exit(f"{binary} printed no 'GFLOP/s' figure:\n{out}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=4096)
    parser.add_argument("p", nargs="?", type=int, default=2048)
    parser.add_argument("repeats", nargs="?", type=int, default=10)
    parser.add_argument("--vs", help="binary to compare with (e.g. target/release/examples/cpu_throughput)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(7)
    g = rng.standard_normal((args.n, args.p), dtype=np.float32)
    flops = 2.0 * args.n * args.p * args.p
    threads = os.environ.get("OPENBLAS_NUM_THREADS", f"default ({os.cpu_count()} cpus)")
    print(f"numpy {np.__version__} G.T @ G  f32  N={args.n} P={args.p}  threads={threads}")

    if not args.vs:
        best = numpy_best(g, args.repeats)
        print(f"best of {args.repeats}: {best * 1e3:.1f} ms  {flops / best / 1e9:.1f} GFLOP/s (2*N*P^2 flops)")
        return

    best_numpy, best_other = 0.0, 0.0
    for r in range(args.rounds):
        numpy_gflops = flops / numpy_best(g, args.repeats) / 1e9
        other_gflops = binary_gflops(args.vs, args.n, args.p, args.repeats)
        load = os.getloadavg()[0]
        print(f"round {r + 1}: numpy {numpy_gflops:.1f}  {os.path.basename(args.vs)} {other_gflops:.1f} GFLOP/s  (load {load:.2f})")
        best_numpy, best_other = max(best_numpy, numpy_gflops), max(best_other, other_gflops)
    print(f"best: numpy {best_numpy:.1f} GFLOP/s, {os.path.basename(args.vs)} {best_other:.1f} GFLOP/s, "
          f"ratio {best_other / best_numpy:.2f}")


if __name__ == "__main__":
    main()
