#!/usr/bin/env python3
"""numpy/OpenBLAS baseline for the Fisher reduction F = GᵀG (f32).

The CPU backend of fisher-engine is compared against this number: numpy dispatches
`G.T @ G` (a transposed view times its own base) to BLAS SYRK, which computes one triangle,
so it does N·P² multiply-adds; we nevertheless count 2·N·P² flops, the same convention the
criterion benches use for every backend, so that GFLOP/s figures compare directly.

Needs numpy (`pip install numpy`). Usage:

    python3 benches/numpy_baseline.py [N] [P] [repeats]

Prints the best-of-`repeats` time and GFLOP/s, plus the BLAS thread count hint.
"""

import os
import sys
import time

try:
    import numpy as np
except ImportError:  # pragma: no cover - message for a bare machine
    sys.exit("numpy is missing: pip install numpy")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    p = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 10

    rng = np.random.default_rng(7)
    g = rng.standard_normal((n, p), dtype=np.float32)

    g.T @ g  # warm-up: thread pool start, page faults of the output
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f = g.T @ g
        best = min(best, time.perf_counter() - t0)
    assert f.dtype == np.float32 and f.shape == (p, p)

    flops = 2.0 * n * p * p
    threads = os.environ.get("OPENBLAS_NUM_THREADS", f"default ({os.cpu_count()} cpus)")
    print(f"numpy {np.__version__} G.T @ G  f32  N={n} P={p}  threads={threads}")
    print(f"best of {repeats}: {best * 1e3:.1f} ms  {flops / best / 1e9:.1f} GFLOP/s (2*N*P^2 flops)")


if __name__ == "__main__":
    main()
