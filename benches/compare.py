#!/usr/bin/env python3
"""fisher-engine against its PyTorch/numpy peers on fixed workloads, on the CPU, in one run.

Each workload is timed by `fisher bench --backend cpu --json` (one call per row; its best of
--repeat calls after one warm-up) and, right after it, by every peer, each in its own worker
process (`python compare.py --worker NAME ...`): imports, model and data loading are outside
the clock; one warm-up call, then the best of --repeat timed calls; peak RSS of the process
from os.wait4. A peer that fails, refuses or runs past --timeout gets a row saying so and
the run goes on. The table at the end gives the engine's time, the best peer, the ratio
ours / best peer and the target ratio of each workload.

Workloads (the names are the `workload` field of `fisher bench --json`; N/8 with --quick):

  W1 reduce/full/4096x2048          F = GᵀG/N, G f32 4096×2048 (the bench's own G,
                                    `synthetic::gradient_like(N, P, 0)`, rebuilt here)
  W2 network/full/true/64-32-10x1797        dense true Fisher, MLP 64-32-10 tanh
  W3 network/{diag/empirical, diag/true, kfac/true, kfac/mc1, top10/true}/784-512-512-10x4096
                                    MLP 784-512-512-10 ReLU, P = 669,706

The peers work on the very model and data `fisher bench` times: `bench::network_problem`
(`train::init_mlp` with seed 0, `train::classification_task` with seed 0 ^ 0x7A5C), rebuilt
here bit for bit (SplitMix64; the inputs to ~1e-7, as ndarray and numpy sum the warp product
in different orders) and written to --workdir as model.safetensors, X.npy, y.npy. Every peer
computes the Fisher of the log-likelihood averaged over the samples, F = (1/N) Σᵢ E_y[∇ℓ ∇ℓᵀ]
(ℓ = log p(y|xᵢ), softmax likelihood):

  W1  numpy_matmul     F = G.T @ G; F *= 1/N (numpy hands a transposed view times its
                       own base to BLAS ?syrk; upper and lower triangle both written)
      scipy_ssyrk      scipy.linalg.blas.ssyrk(alpha=1/N, a=G, trans=1), G handed over
                       in Fortran order (converted before the clock: f2py would copy a C-order
                       G on every call); upper triangle only. Checked against numpy on a
                       small case in the worker before timing.
      scipy_ssyrk_t0   ssyrk(alpha=1/N, a=G.T, trans=0): the same product on the free
                       transposed view of the C-order G (no conversion at all)
  W2  nngeometry_dense FIM(model, loader, PMatDense, variant="classif_logits").to_torch()
                       (nngeometry 0.4 has no n_output argument: it reads it off the logits)
      torch_func_jac   J = vmap(jacrev(logits))(θ, X) (N×10×P, per batch), Λ = diag(p) − ppᵀ,
                       F = Σ_batches J.reshape(-1, P).T @ (ΛJ).reshape(-1, P) / N
  W3 empirical diag
      backpack_sum_grad_squared  SumGradSquared, CrossEntropyLoss(reduction="sum"), Σ / N
      backpack_batch_grad        BatchGrad, Σ_batches (grad_batch ** 2).sum(0) / N
      torch_func_grad            vmap(grad(per-sample CE loss)), squares summed, / N
  W3 true diag
      nngeometry_diag            FIM(..., PMatDiag, variant="classif_logits").get_diag()
      backpack_diag_ggn_exact    DiagGGNExact, CrossEntropyLoss(reduction="sum"), Σ / N
                                 (the GGN of the cross-entropy is the true Fisher)
  W3 true KFAC
      nngeometry_kfac            FIM(..., PMatKFAC, variant="classif_logits")
      backpack_kflr              KFLR (exact loss Hessian square root), one batch of N
      curvlinops_kfac            KFACLinearOperator(model, CrossEntropyLoss(reduction="mean"),
                                 params, loader, fisher_type="type-2",
                                 separate_weight_and_bias=False, check_deterministic=False,
                                 num_data=N, num_per_example_loss_terms=1)
                                 .compute_kronecker_factors() (inside the clock)
  W3 MC KFAC (one label draw per input)
      backpack_kfac              KFAC(mc_samples=1), one batch of N
      curvlinops_kfac_mc         as curvlinops_kfac with fisher_type="mc", mc_samples=1
  W3 top-10 eigenvalues of the true Fisher (= the GGN of the mean cross-entropy)
      curvlinops_ggn_eigsh       GGNLinearOperator(model, CrossEntropyLoss(reduction="mean"),
                                 params, loader, check_deterministic=False, num_data=N)
                                 .to_scipy() (float64 vectors, float32 products), then
                                 scipy.sparse.linalg.eigsh(op, k=10, which="LA", tol=1e-3,
                                 return_eigenvectors=False) — tol is ARPACK's relative
                                 accuracy (its default, 0, means machine precision); the
                                 warm-up is one product, the clock covers building the
                                 operator and eigsh

Correctness, loosely (outside every clock; --no-check skips the engine side): each worker
asserts the shapes of its result and reports tr F (diag: the sum; KFAC: Σ_l tr A_l tr G_l, the
trace of the Kronecker approximation, with tr(G)·1 for a bias kept apart, which equals the
engine's joint [W|b] factor); the parent runs `fisher compute --weights model.safetensors
--inputs X.npy --labels y.npy --backend cpu` for the same form and variant and shows its
"trace" beside them (MC traces differ by the label draws); for top10, `fisher report --form
implicit --top 10` (its "top_eigenvalues" and F·v count; eigsh's products are counted too);
for W1, `fisher reduce --synthetic N,P --seed 0 --form full`, the G the peers rebuilt.

The engine's rows: `fisher bench --shapes 4096x2048 --forms full --network none --backend cpu
--json --repeat R` and `fisher bench --shapes none --network W --samples N --activation A
--variant V [--mc-samples 1] --net-forms F --backend cpu --json --repeat R`; for top10, where
`fisher bench --help` offers `--top K`, `--net-forms diag --top 10 --top-tol 1e-3` (the same
tolerance as eigsh; the diag result that rides along is ignored), else `--net-forms top`.
A flag or form the binary refuses is reported as "not available in this binary".
Every child (engine and peers) runs with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (some
machines set them, and OpenBLAS then falls back to slow kernels); the header shows the BLAS
libraries and kernels the workers see (threadpoolctl). Peers use torch.set_num_threads(cores).

Usage (in the venv with torch, numpy, scipy, safetensors, nngeometry, backpack-for-pytorch,
curvlinops-for-pytorch, threadpoolctl):

    python benches/compare.py [--only W1,W2,W3|W3:diag_empirical,...] [--repeat 3] [--quick]
        [--timeout 600] [--rounds 1] [--fisher-bin target/release/fisher] [--json OUT.json] [--workdir DIR]
        [--peers p1,p2,...] [--batch B] [--no-check]

--quick divides every N by 8 (a smoke test); --timeout covers a worker's whole process (its
imports too); --peers keeps only the named peers; --batch
overrides every peer's batch size (defaults: the whole data set where its memory stays small,
256 for the per-sample-gradient peers of W3); --only also takes single rows (W3:diag_empirical,
see --help). Run it with nothing else on the machine: on a shared 2-core machine the numbers
move by tens of per cent, and not evenly — with a concurrent build, torch's OpenMP peers
slowed down 3–10× where the engine slowed down 1.5×, so ratios taken under load flatter
the engine (and a busy BLAS can flatter W1's peers); --rounds R alternates the engine and the peers of each workload R
times and keeps each method's best round, so that both see the same drifting load.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# --------------------------------------------------------------------------------------------
# workloads


def workloads(quick, bench_top_flag=True):
    """The rows of the comparison, in order; each a dict (see the module docs). bench_top_flag:
    whether `fisher bench` has `--top K --top-tol TOL` (else the top row asks for `--net-forms top`)."""
    div = 8 if quick else 1
    n1, p1 = 4096 // div, 2048
    w2, n2 = [64, 32, 10], 1797 // div
    w3, n3 = [784, 512, 512, 10], 4096 // div
    net = lambda w, n, act: dict(widths=w, n=n, activation=act)  # noqa: E731
    rows = [
        dict(group="W1", key="full", workload=f"reduce/full/{n1}x{p1}", n=n1, p=p1,
             engine=["--shapes", f"{n1}x{p1}", "--forms", "full", "--network", "none"],
             peers=["numpy_matmul", "scipy_ssyrk", "scipy_ssyrk_t0"],
             target=(1.1, ["scipy_ssyrk", "scipy_ssyrk_t0"], "scipy ssyrk")),
        dict(group="W2", key="full_true", form="full", variant="true", **net(w2, n2, "tanh"),
             peers=["nngeometry_dense", "torch_func_jac"],
             target=(0.55, ["nngeometry_dense"], "nngeometry")),
        dict(group="W3", key="diag_empirical", form="diag", variant="empirical", **net(w3, n3, "relu"),
             peers=["backpack_sum_grad_squared", "backpack_batch_grad", "torch_func_grad"],
             target=(0.7, ["backpack_sum_grad_squared", "backpack_batch_grad"], "BackPACK")),
        dict(group="W3", key="diag_true", form="diag", variant="true", **net(w3, n3, "relu"),
             peers=["nngeometry_diag", "backpack_diag_ggn_exact"],
             target=(0.3, ["nngeometry_diag"], "nngeometry")),
        dict(group="W3", key="kfac_true", form="kfac", variant="true", **net(w3, n3, "relu"),
             peers=["nngeometry_kfac", "backpack_kflr", "curvlinops_kfac"],
             target=(0.5, None, "best peer")),
        dict(group="W3", key="kfac_mc", form="kfac", variant="mc", **net(w3, n3, "relu"),
             peers=["backpack_kfac", "curvlinops_kfac_mc"],
             target=(0.5, None, "best peer")),
        dict(group="W3", key="top_true", form="top", variant="true", **net(w3, n3, "relu"),
             peers=["curvlinops_ggn_eigsh"],
             target=(0.5, ["curvlinops_ggn_eigsh"], "curvlinops+eigsh")),
    ]
    for r in rows:
        if r["group"] == "W1":
            continue
        wl = "-".join(map(str, r["widths"]))
        variant = "mc1" if r["variant"] == "mc" else r["variant"]
        form = "top10" if r["form"] == "top" else r["form"]
        r["workload"] = f"network/{form}/{variant}/{wl}x{r['n']}"
        r["engine"] = ["--shapes", "none", "--network", ",".join(map(str, r["widths"])), "--samples", str(r["n"]),
                       "--activation", r["activation"], "--variant", r["variant"], "--net-forms", r["form"]]
        if r["form"] == "top" and bench_top_flag:  # diag rides along: --net-forms takes no empty list
            r["engine"][-1] = "diag"
            r["engine"] += ["--top", str(TOP_K), "--top-tol", f"{EIGSH_TOL:g}"]
        if r["variant"] == "mc":
            r["engine"] += ["--mc-samples", "1"]
    return rows


EIGSH_TOL = 1e-3
TOP_K = 10
W3_SMALL_BATCH = 256  # peers that hold per-sample gradients (batch × P floats)

# --------------------------------------------------------------------------------------------
# the bench's problem, rebuilt (fisher_engine::synthetic::SplitMix64, bench::network_problem)

_GAMMA = 0x9E3779B97F4A7C15


def splitmix(seed, start, count):
    """Outputs start .. start+count-1 of SplitMix64(seed) (uint64), vectorised."""
    import numpy as np

    u = np.uint64
    with np.errstate(over="ignore"):
        k = np.arange(start + 1, start + count + 1, dtype=u)
        z = u(seed) + k * u(_GAMMA)
        z = (z ^ (z >> u(30))) * u(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> u(27))) * u(0x94D049BB133111EB)
        return z ^ (z >> u(31))


def _uniform(bits):
    import numpy as np

    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def _normal(bits):
    """Box–Muller on consecutive pairs (one of each pair's results discarded, as the engine does)."""
    import numpy as np

    u1 = 1.0 - _uniform(bits[0::2])
    u2 = _uniform(bits[1::2])
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _below(bits, n):
    """((bits as u128 * n) >> 64), exactly, for small n."""
    import numpy as np

    u = np.uint64
    return ((bits >> u(32)) * u(n) + (((bits & u(0xFFFFFFFF)) * u(n)) >> u(32))) >> u(32)


def gradient_like(rows, cols, seed):
    """fisher_engine::synthetic::gradient_like: normal entries, column scales over 1.5 decades."""
    import numpy as np

    g = np.empty((rows, cols), dtype=np.float32)
    step = max(1, (1 << 22) // cols)
    for r0 in range(0, rows, step):  # in slabs: the uint64 temporaries stay small
        r1 = min(rows, r0 + step)
        g[r0:r1] = _normal(splitmix(seed, 2 * r0 * cols, 2 * (r1 - r0) * cols)).reshape(r1 - r0, cols)
    denom = max(cols, 2) - 1
    g *= (10.0 ** (-3.0 * np.arange(cols) / denom * 0.5)).astype(np.float32)
    return g


def init_mlp(widths, seed):
    """train::init_mlp with biases: PyTorch's nn.Linear default, U(±1/√in), one stream."""
    import numpy as np

    pos, layers = 0, []
    for i, o in zip(widths[:-1], widths[1:]):
        bound = 1.0 / np.sqrt(i)
        v = ((2.0 * _uniform(splitmix(seed, pos, o * i + o)) - 1.0) * bound).astype(np.float32)
        pos += o * i + o
        layers.append((v[: o * i].reshape(o, i), v[o * i:].copy()))
    return layers


def classification_task(n, d, c, seed):
    """train::classification_task: Gaussian clusters warped by a fixed random tanh layer."""
    import numpy as np

    pos = 0
    means = (1.5 * _normal(splitmix(seed, pos, 2 * c * d))).astype(np.float32).reshape(c, d)
    pos += 2 * c * d
    warp = (_normal(splitmix(seed, pos, 2 * d * d)) / np.sqrt(d)).astype(np.float32).reshape(d, d)
    pos += 2 * d * d
    bits = splitmix(seed, pos, n * (1 + 2 * d)).reshape(n, 1 + 2 * d)
    y = _below(bits[:, 0], c).astype(np.int64)
    point = means[y] + _normal(bits[:, 1:].reshape(-1)).astype(np.float32).reshape(n, d)
    x = np.tanh(np.float32(2.0) * (point @ warp)) + point * np.float32(0.5)
    return np.ascontiguousarray(x, dtype=np.float32), y


def prepare(workdir, row, seed=0):
    """Writes the row's problem into workdir (once per problem); returns its directory."""
    import numpy as np

    if row["group"] == "W1":
        d = os.path.join(workdir, f"W1_{row['n']}x{row['p']}")
        if not os.path.exists(os.path.join(d, "G.npy")):
            os.makedirs(d, exist_ok=True)
            np.save(os.path.join(d, "G.npy"), gradient_like(row["n"], row["p"], seed))
        return d
    wl = "-".join(map(str, row["widths"]))
    d = os.path.join(workdir, f"net_{wl}_{row['activation']}_{row['n']}")
    if not os.path.exists(os.path.join(d, "y.npy")):
        from safetensors.numpy import save_file

        os.makedirs(d, exist_ok=True)
        layers = init_mlp(row["widths"], seed)
        tensors = {}
        for l, (w, b) in enumerate(layers):
            tensors[f"{2 * l}.weight"], tensors[f"{2 * l}.bias"] = w, b
        save_file(tensors, os.path.join(d, "model.safetensors"))
        x, y = classification_task(row["n"], row["widths"][0], row["widths"][-1], seed ^ 0x7A5C)
        np.save(os.path.join(d, "X.npy"), x)
        np.save(os.path.join(d, "y.npy"), y)
    return d


# --------------------------------------------------------------------------------------------
# child processes


def child_env():
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    return env


def run_measured(cmd, timeout, env=None):
    """Runs cmd; returns (wall s, peak RSS MiB of that process, exit code or None on timeout, stdout, stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=child_env() if env is None else env)
        code = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                _, _, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = code
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return wall, usage.ru_maxrss / 1024.0, code, out.read().decode(errors="replace"), err.read().decode(errors="replace")


def first_line(text):
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


# --------------------------------------------------------------------------------------------
# workers


def worker_info():
    """Versions and the BLAS libraries a worker sees (threadpoolctl)."""
    import importlib.metadata as md

    import numpy
    import scipy
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS)
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "torch_threads": None, "torch_cpu_capability": None, "blas": []}
    for pkg in ["nngeometry", "backpack-for-pytorch", "curvlinops-for-pytorch", "threadpoolctl", "safetensors"]:
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    torch.set_num_threads(os.cpu_count())
    info["torch_threads"] = torch.get_num_threads()
    try:
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        pass
    cfg = torch.__config__.show()
    info["torch_blas"] = next((p.split("=")[1] for p in cfg.replace(",", " ").split() if p.startswith("BLAS_INFO=")), None)
    try:
        from threadpoolctl import threadpool_info

        for lib in threadpool_info():
            if lib.get("user_api") == "blas":
                info["blas"].append({k: lib.get(k) for k in ["internal_api", "prefix", "version", "architecture",
                                                             "num_threads", "threading_layer", "filepath"]})
    except ImportError:
        info["blas"] = None
    print("RESULT " + json.dumps(info))


def build_model(widths, activation, path):
    import torch
    from safetensors.torch import load_file

    act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[activation]
    mods = []
    for l, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(torch.nn.Linear(i, o))
        if l < len(widths) - 2:
            mods.append(act())
    model = torch.nn.Sequential(*mods)
    model.load_state_dict(load_file(path))
    return model.eval()


def kfac_trace(factors):
    """Σ over layers of tr(A)·tr(G) (+ tr(G_b) for a bias kept apart): the trace of the approximation."""
    return float(sum(float(a.trace()) * float(g.trace()) if a is not None else float(g.trace()) for a, g in factors))


def peer_fn(name, row, d, batch, used):
    """(fn, warm, check): fn() computes the Fisher; warm() the untimed warm-up (None: fn);
    check(out) returns the loose check's numbers (asserting shapes). used["batch"]: the batch size."""
    import numpy as np

    if row["group"] == "W1":
        g = np.load(os.path.join(d, "G.npy"))
        n, p = g.shape
        used["batch"] = n
        inv_n = np.float32(1.0 / n)
        if name == "numpy_matmul":
            def fn():
                f = g.T @ g
                f *= inv_n
                return f
        else:
            from scipy.linalg.blas import ssyrk

            small = np.random.default_rng(1).standard_normal((64, 24), dtype=np.float32)
            ref = small.T @ small / 64
            for a, trans in [(np.asfortranarray(small), 1), (small.T, 0)]:
                got = ssyrk(alpha=1.0 / 64, a=a, trans=trans)
                assert got.shape == (24, 24), got.shape
                iu = np.triu_indices(24)
                assert np.allclose(got[iu], ref[iu], rtol=1e-4, atol=1e-5), f"ssyrk trans={trans} is not GᵀG/N"
            if name == "scipy_ssyrk":
                gf = np.asfortranarray(g)
                del g
                fn = lambda: ssyrk(alpha=1.0 / n, a=gf, trans=1)  # noqa: E731
            elif name == "scipy_ssyrk_t0":
                gt = g.T  # Fortran-contiguous view: no copy
                fn = lambda: ssyrk(alpha=1.0 / n, a=gt, trans=0)  # noqa: E731
            else:
                raise ValueError(name)

        def check(f):
            assert f.shape == (p, p) and f.dtype == np.float32, (f.shape, f.dtype)
            return {"trace": float(np.trace(f, dtype=np.float64))}

        return fn, None, check

    import torch

    widths = row["widths"]
    model = build_model(widths, row["activation"], os.path.join(d, "model.safetensors"))
    x = torch.from_numpy(np.load(os.path.join(d, "X.npy")))
    y = torch.from_numpy(np.load(os.path.join(d, "y.npy")))
    n = x.shape[0]
    P = sum(p.numel() for p in model.parameters())
    from torch.utils.data import DataLoader, TensorDataset

    def loader(b):
        return DataLoader(TensorDataset(x, y), batch_size=b, shuffle=False)

    def batches(b):
        return [(x[i:i + b], y[i:i + b]) for i in range(0, n, b)]

    def check_vec(vals):
        flat = torch.cat([v.reshape(-1) for v in vals])
        assert flat.numel() == P, (flat.numel(), P)
        assert bool(torch.isfinite(flat).all()) and bool((flat >= -1e-6).all())
        return {"trace": float(flat.double().sum())}

    def check_dense(f):
        assert tuple(f.shape) == (P, P), tuple(f.shape)
        return {"trace": float(torch.diagonal(f).double().sum())}

    def check_kfac(factors):
        for a, g in factors:
            assert g.shape[0] == g.shape[1] and (a is None or a.shape[0] == a.shape[1])
        return {"trace": kfac_trace(factors), "factors": len(factors)}

    if name.startswith("backpack_"):
        from backpack import backpack, extend
        from backpack.extensions import KFAC, KFLR, BatchGrad, DiagGGNExact, SumGradSquared

        model = extend(model)
        loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
        if name in ("backpack_kflr", "backpack_kfac"):
            ext, attr = (KFLR, "kflr") if name == "backpack_kflr" else (lambda: KFAC(mc_samples=1), "kfac")
            bb = used["batch"] = n if batch is None else batch
            if bb < n:
                raise ValueError("BackPACK's Kronecker factors are per batch: run it on one batch of N (no --batch)")

            def fn():
                model.zero_grad()
                loss = loss_fn(model(x), y)
                with backpack(ext()):
                    loss.backward()
                out = []
                for mod in model.modules():
                    if isinstance(mod, torch.nn.Linear):
                        gw, aw = getattr(mod.weight, attr)  # [G, A]: G from the sum loss (Σ over
                        (gb,) = getattr(mod.bias, attr)     # samples), A the mean of a aᵀ
                        out.append((aw, gw / n))
                        out.append((None, gb / n))
                return out

            return fn, None, check_kfac

        ext, attr, square, bb = {
            "backpack_sum_grad_squared": (SumGradSquared, "sum_grad_squared", False, n),
            "backpack_batch_grad": (BatchGrad, "grad_batch", True, W3_SMALL_BATCH),
            "backpack_diag_ggn_exact": (DiagGGNExact, "diag_ggn_exact", False, n),
        }[name]
        bb = used["batch"] = bb if batch is None else batch
        data = batches(bb)

        def fn():
            acc = [torch.zeros_like(p) for p in model.parameters()]
            for xb, yb in data:
                model.zero_grad()
                loss = loss_fn(model(xb), yb)
                with backpack(ext()):
                    loss.backward()
                for a, p in zip(acc, model.parameters()):
                    v = getattr(p, attr)
                    a.add_((v * v).sum(0) if square else v)
            return [a / n for a in acc]

        return fn, None, check_vec

    if name.startswith("nngeometry_"):
        from nngeometry.metrics import FIM
        from nngeometry.object import PMatDense, PMatDiag, PMatKFAC

        rep = {"nngeometry_dense": PMatDense, "nngeometry_diag": PMatDiag, "nngeometry_kfac": PMatKFAC}[name]
        ld = loader(used.setdefault("batch", n if batch is None else batch))

        def fn():
            return FIM(model=model, loader=ld, representation=rep, variant="classif_logits", device="cpu")

        if name == "nngeometry_dense":
            return fn, None, lambda fim: check_dense(fim.to_torch())
        if name == "nngeometry_diag":
            return fn, None, lambda fim: check_vec([fim.get_diag()])
        return fn, None, lambda fim: check_kfac(list(fim.data.values()))

    if name.startswith("curvlinops_"):
        from curvlinops import GGNLinearOperator, KFACLinearOperator

        params = [p for p in model.parameters() if p.requires_grad]
        loss_fn = torch.nn.CrossEntropyLoss(reduction="mean")  # F = (1/N) Σ Jᵀ Λ J
        ld = loader(used.setdefault("batch", n if batch is None else batch))
        if name in ("curvlinops_kfac", "curvlinops_kfac_mc"):
            kw = dict(fisher_type="type-2") if name == "curvlinops_kfac" else dict(fisher_type="mc", mc_samples=1)

            def fn():
                op = KFACLinearOperator(model, loss_fn, params, ld, check_deterministic=False, num_data=n,
                                        num_per_example_loss_terms=1, separate_weight_and_bias=False, **kw)
                op.compute_kronecker_factors()
                return op

            def check(op):
                factors = [(op._input_covariances.get(m), op._gradient_covariances[m]) for m in op._mapping]
                out = check_kfac(factors)
                out["trace_curvlinops"] = float(op.trace)
                return out

            return fn, None, check

        if name == "curvlinops_ggn_eigsh":
            from scipy.sparse.linalg import LinearOperator, eigsh

            products = [0]

            def make():
                op = GGNLinearOperator(model, loss_fn, params, ld, check_deterministic=False, num_data=n).to_scipy()

                def matvec(v):  # counts the F·v products eigsh asks for
                    products[0] += 1
                    return op @ v

                return LinearOperator(op.shape, matvec=matvec, dtype=op.dtype)

            def fn():
                products[0] = 0
                return eigsh(make(), k=TOP_K, which="LA", tol=EIGSH_TOL, return_eigenvectors=False)

            def warm():  # one product: the functorch transforms compiled, the caches warm
                return make() @ np.ones(P)

            def check(vals):
                vals = np.sort(np.asarray(vals))[::-1]
                assert vals.shape == (TOP_K,)
                return {"eigenvalues": [float(v) for v in vals], "tol": EIGSH_TOL, "products": products[0]}

            return fn, warm, check
        raise ValueError(name)

    if name.startswith("torch_func_"):
        from torch.func import functional_call, grad, jacrev, vmap

        params = {k: v.detach() for k, v in model.named_parameters()}
        names = list(params)

        if name == "torch_func_jac":  # W2: the dense true Fisher
            bb = used["batch"] = n if batch is None else batch
            data = batches(bb)

            def logits(ps, xi):
                return functional_call(model, ps, (xi.unsqueeze(0),)).squeeze(0)

            jac_fn = vmap(jacrev(logits), in_dims=(None, 0))

            def fn():
                f = torch.zeros(P, P)
                with torch.no_grad():
                    for xb, _ in data:
                        jac = jac_fn(params, xb)
                        J = torch.cat([jac[k].reshape(xb.shape[0], widths[-1], -1) for k in names], dim=2)
                        p = torch.softmax(functional_call(model, params, (xb,)), dim=1)
                        LJ = p.unsqueeze(2) * J - p.unsqueeze(2) * torch.bmm(p.unsqueeze(1), J)  # (diag p − ppᵀ) J
                        f.addmm_(J.reshape(-1, P).T, LJ.reshape(-1, P))
                return f / n

            return fn, None, check_dense

        if name == "torch_func_grad":  # W3: the empirical diag
            bb = used["batch"] = W3_SMALL_BATCH if batch is None else batch
            data = batches(bb)

            def loss1(ps, xi, yi):
                out = functional_call(model, ps, (xi.unsqueeze(0),))
                return torch.nn.functional.cross_entropy(out, yi.unsqueeze(0), reduction="sum")

            g_fn = vmap(grad(loss1), in_dims=(None, 0, 0))

            def fn():
                acc = {k: torch.zeros_like(v) for k, v in params.items()}
                for xb, yb in data:
                    gs = g_fn(params, xb, yb)
                    for k in names:
                        acc[k].add_((gs[k] * gs[k]).sum(0))
                return [acc[k] / n for k in names]

            return fn, None, check_vec
    raise ValueError(f"unknown peer {name}")


def worker(name, key, quick, workdir, repeat, batch):
    import warnings

    warnings.simplefilter("ignore")
    row = next(r for r in workloads(quick) if r["key"] == key)
    if row["group"] != "W1":  # W1's workers never import torch (its RSS would be theirs)
        import torch

        torch.set_num_threads(os.cpu_count())
    d = prepare(workdir, row)
    result = {"peer": name, "workload": row["workload"], "status": "ok", "times_s": [], "batch": batch}
    try:
        t0 = time.perf_counter()
        used = {}
        fn, warm, check = peer_fn(name, row, d, batch, used)
        result["setup_s"] = time.perf_counter() - t0
        result["batch"] = used.get("batch")
        t0 = time.perf_counter()
        out = (warm or fn)()
        result["warmup_s"] = time.perf_counter() - t0
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            result["times_s"].append(time.perf_counter() - t0)
            print(f"  {name}: {result['times_s'][-1]:.3f} s", file=sys.stderr, flush=True)
        result["best_s"] = min(result["times_s"])
        result["median_s"] = sorted(result["times_s"])[len(result["times_s"]) // 2]
        result["check"] = check(out)
    except Exception as e:  # reported as the row's status; the run goes on
        result["status"] = f"failed: {type(e).__name__}: {first_line(e)}"[:300]
    result["self_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------------------------
# parent


def parse_result(out):
    return next((json.loads(l[7:]) for l in out.splitlines() if l.startswith("RESULT ")), None)


def run_engine(row, args):
    cmd = [args.fisher_bin, "bench", *row["engine"], "--backend", "cpu", "--json", "--repeat", str(args.repeat)]
    wall, rss, code, out, err = run_measured(cmd, args.timeout)
    rec = {"cmd": " ".join(cmd), "wall_s": wall, "rss_mib": rss, "exit": code}
    if code is None:
        rec["status"] = f"timeout after {args.timeout:g} s"
        return rec
    if code != 0:
        if code == 2 and ("invalid value" in err or "unexpected argument" in err):
            rec["status"] = "not available in this binary"
        else:
            tail = (err.strip().splitlines() or [""])[-1]
            rec["status"] = f"failed: exit {code}: {tail}"[:300]
        rec["stderr"] = err.strip()[-2000:]
        return rec
    try:
        doc = json.loads(next(l for l in out.splitlines() if l.startswith("{")))
    except (StopIteration, json.JSONDecodeError) as e:
        rec["status"] = f"failed: no JSON on stdout ({e})"
        return rec
    cpu = [r for r in doc.get("results", []) if r.get("backend", "cpu") == "cpu"]
    res = next((r for r in cpu if r.get("workload") == row["workload"]), None)
    if res is None and len(cpu) == 1:
        res = cpu[0]
    if res is None:
        rec["status"] = f"failed: no result for {row['workload']} in {[r.get('workload') for r in cpu]}"
        return rec
    rec.update(status="ok", workload=res.get("workload"), best_s=res.get("best_s"), median_s=res.get("median_s"),
               times_s=res.get("times_s"), peak_rss_bytes=doc.get("peak_rss_bytes"), machine=doc.get("machine"),
               result=res)
    eig = [v for k, v in res.items() if ("eig" in k or "top" in k) and isinstance(v, list)]
    if eig:
        rec["eigenvalues"] = eig[0]
    return rec


def best_round(recs):
    """The round with the best time (the first if none succeeded), with every round's times added."""
    ok = [r for r in recs if r.get("status") == "ok" and r.get("best_s")]
    best = dict(min(ok, key=lambda r: r["best_s"]) if ok else recs[0])
    if len(recs) > 1:
        best["rounds_best_s"] = [r.get("best_s") for r in recs]
    return best


def run_peer(name, row, args, workdir):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--worker-key", row["key"], "--workdir", workdir,
           "--repeat", str(args.repeat)] + (["--quick"] if args.quick else []) + \
          (["--batch", str(args.batch)] if args.batch else [])
    wall, rss, code, out, err = run_measured(cmd, args.timeout)
    rec = {"peer": name, "wall_s": wall, "rss_mib": rss, "exit": code}
    res = parse_result(out)
    if code is None:
        rec["status"] = f"timeout after {args.timeout:g} s"
        if res:
            rec.update({k: v for k, v in res.items() if k != "status"})
    elif res is not None:
        rec.update(res)
    else:
        tail = (err.strip().splitlines() or [""])[-1]
        rec["status"] = f"failed: exit {code}: {tail}"[:300]
    return rec


def engine_check(row, args, d):
    """The engine's tr F (or top eigenvalues) on the peers' files: fisher compute / report
    (W1: `fisher reduce --synthetic N,P`, the very G the peers rebuilt)."""
    if row["group"] == "W1":
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [args.fisher_bin, "reduce", "--synthetic", f"{row['n']},{row['p']}", "--seed", "0", "--form", "full",
                   "--backend", "cpu", "--json", "--out", os.path.join(tmp, "F.safetensors")]
            wall, _, code, out, err = run_measured(cmd, args.timeout)
        return check_record(cmd, wall, code, out, err, args)
    data = ["--weights", os.path.join(d, "model.safetensors"), "--inputs", os.path.join(d, "X.npy"),
            "--labels", os.path.join(d, "y.npy"), "--activation", row["activation"], "--backend", "cpu", "--json"]
    variant = ["--variant", row["variant"]] + (["--mc-samples", "1"] if row["variant"] == "mc" else [])
    with tempfile.TemporaryDirectory() as tmp:
        if row["form"] == "top":
            cmd = [args.fisher_bin, "report", *data, *variant, "--form", "implicit", "--top", str(TOP_K)]
            cmd += ["--only", "top"] if args.caps["report_only"] else \
                ["--probes", "2", "--lanczos-steps", "2", "--coupling-probes", "2"]
        else:
            cmd = [args.fisher_bin, "compute", *data, *variant, "--form", row["form"],
                   "--out", os.path.join(tmp, "F.safetensors"), "--force"]
        wall, _, code, out, err = run_measured(cmd, args.timeout)
    return check_record(cmd, wall, code, out, err, args)


def check_record(cmd, wall, code, out, err, args):
    if code != 0:
        why = f"timeout after {args.timeout:g} s" if code is None else f"exit {code}"
        return {"status": f"{why}: {first_line((err.strip().splitlines() or [''])[-1])}", "cmd": " ".join(cmd)}
    try:
        doc = json.loads(next(l for l in out.splitlines() if l.startswith("{")))
    except (StopIteration, json.JSONDecodeError) as e:
        return {"status": f"no JSON on stdout ({e})", "cmd": " ".join(cmd)}
    rec = {"status": "ok", "cmd": " ".join(cmd), "wall_s": wall, "trace": doc.get("trace")}
    if doc.get("top_eigenvalues"):
        rec["eigenvalues"], rec["products"] = doc["top_eigenvalues"], doc.get("fv_products")
        rec["top_tol"] = doc.get("top_tol", (doc.get("implicit") or {}).get("top_tol"))
    return rec


def engine_caps(fisher_bin):
    """What this binary offers, from its --help: `bench --top K`, `report --only top`."""
    def help_of(sub):
        try:
            return subprocess.run([fisher_bin, sub, "--help"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"bench_top": "--top <K>" in help_of("bench"), "report_only": "--only <WHAT>" in help_of("report")}


def header_info(args):
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        pass
    try:
        where = os.path.dirname(os.path.realpath(args.fisher_bin))  # the binary's repository, else this one's
        desc = None
        for cwd in (where, REPO):
            desc = subprocess.run(["git", "-C", cwd, "describe", "--always", "--dirty", "--tags"], capture_output=True,
                                  text=True, timeout=30).stdout.strip() or None
            if desc:
                break
    except (OSError, subprocess.SubprocessError):
        desc = None
    _, _, code, out, err = run_measured([sys.executable, os.path.abspath(__file__), "--worker", "info"], 300)
    info = parse_result(out) or {"error": first_line(err.strip().splitlines()[-1] if err.strip() else f"exit {code}")}
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg_start": os.getloadavg(), "git_describe": desc,
            "fisher_bin": args.fisher_bin, "versions": info, "quick": args.quick, "repeat": args.repeat,
            "rounds": args.rounds, "engine_caps": args.caps,
            "eigsh_tol": EIGSH_TOL, "unset_env": ["OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"],
            "set_in_parent": {k: os.environ[k] for k in ["OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"] if k in os.environ}}


def fmt_s(v):
    if v is None:
        return "–"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def print_header(h):
    v = h["versions"]
    print(f"\n## fisher-engine vs peers (CPU){' — quick smoke sizes (N/8)' if h['quick'] else ''}\n")
    print(f"- machine: {h['cpu']}, {h['cores']} cores; load average at start {h['loadavg_start'][0]:.2f}, "
          f"at end {h.get('loadavg_end', (float('nan'),))[0]:.2f}")
    print(f"- engine: `{h['fisher_bin']}`, git describe `{h['git_describe']}`")
    if "error" in v:
        print(f"- versions: the info worker failed: {v['error']}")
    else:
        print(f"- python {v['python']}, torch {v['torch']} (BLAS {v.get('torch_blas')}, CPU capability "
              f"{v.get('torch_cpu_capability')}, {v.get('torch_threads')} threads), numpy {v['numpy']}, scipy {v['scipy']}, "
              f"nngeometry {v.get('nngeometry')}, backpack {v.get('backpack-for-pytorch')}, "
              f"curvlinops {v.get('curvlinops-for-pytorch')}")
        if v.get("blas") is None:
            print("- BLAS kernel: threadpoolctl missing (pip install threadpoolctl)")
        else:
            for b in v["blas"]:
                fp = b.get("filepath") or ""
                owner = "numpy" if "numpy" in fp else "scipy" if "scipy.libs" in fp or "/scipy/" in fp else "?"
                print(f"- BLAS ({owner}): {b['prefix']} {b['internal_api']} {b['version']}, kernel {b.get('architecture')}, "
                      f"{b['num_threads']} threads ({os.path.basename(b['filepath'] or '')})")
    if h["set_in_parent"]:
        print(f"- unset in every child (set here): {h['set_in_parent']}")
    print(f"- each time: best of {h['repeat']} after one warm-up (the engine: `fisher bench --repeat "
          f"{h['repeat']}`)" + (f", best of {h['rounds']} alternating rounds" if h["rounds"] > 1 else "")
          + f"; eigsh tol={EIGSH_TOL:g} (relative)")


def summarise(rows_out):
    """Adds best peer, ratio, target verdict to each row."""
    for r in rows_out:
        ok = {p["peer"]: p for p in r["peers"] if p.get("status") == "ok" and p.get("best_s")}
        best = min(ok.values(), key=lambda p: p["best_s"]) if ok else None
        eng = r["engine"].get("best_s") if r["engine"].get("status") == "ok" else None
        r["best_peer"] = best["peer"] if best else None
        r["best_peer_s"] = best["best_s"] if best else None
        r["ratio"] = eng / best["best_s"] if (eng and best) else None
        limit, refs, label = r["target"]
        cand = [ok[p] for p in (refs or ok.keys()) if p in ok]
        ref = min(cand, key=lambda p: p["best_s"]) if cand else None
        r["target_ref"] = ref["peer"] if ref else None
        r["target_ratio"] = eng / ref["best_s"] if (eng and ref) else None
        r["met"] = None if r["target_ratio"] is None else r["target_ratio"] <= limit


def print_tables(rows_out):
    print("\n| workload | fisher-engine (s) | best peer (name, s) | ratio ours/best peer | every peer's time (s) "
          "| target ratio | met? |")
    print("|---|---|---|---|---|---|---|")
    for r in rows_out:
        e = r["engine"]
        eng = fmt_s(e["best_s"]) if e.get("status") == "ok" else e.get("status", "?")
        best = f"{r['best_peer']} {fmt_s(r['best_peer_s'])}" if r["best_peer"] else "–"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "–"
        peers = "; ".join(f"{p['peer']} {fmt_s(p['best_s'])}" if p.get("status") == "ok" and p.get("best_s")
                          else f"{p['peer']}: {p.get('status')}" for p in r["peers"])
        limit, refs, label = r["target"]
        tgt = f"≤ {limit:g} vs {label}" + (f" ({r['target_ref']}: {r['target_ratio']:.2f})" if r["target_ratio"] else "")
        met = "–" if r["met"] is None else ("yes" if r["met"] else "no")
        print(f"| {r['workload']} | {eng} | {best} | {ratio} | {peers} | {tgt} | {met} |")

    print("\nDetails (peak RSS from os.wait4; tr F is each method's own, on the same model and data; the "
          "engine's from `fisher compute` on the peers' files):\n")
    print("| workload | method | best s | median s | warm-up s | peak RSS MiB | batch | tr F / check | status |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        e = r["engine"]
        chk = r.get("engine_check") or {}
        tr = chk.get("trace")
        tr_s = f"{tr:.6g}" if isinstance(tr, (int, float)) else \
            ("not checked" if not chk else "" if chk.get("status") == "ok" else chk.get("status"))
        rss = e.get("peak_rss_bytes")
        rss_s = f"{rss / 2**20:.0f}" if rss else (f"{e['rss_mib']:.0f}" if e.get("status") == "ok" else "–")
        if chk.get("products"):
            tr_s += ("; " if tr_s else "") + f"λ₁ {chk['eigenvalues'][0]:.6g}, {chk['products']} F·v products (fisher report)"
        print(f"| {r['workload']} | fisher-engine | {fmt_s(e.get('best_s'))} | {fmt_s(e.get('median_s'))} | – | "
              f"{rss_s} | all | {tr_s} | {e.get('status')} |")
        for p in r["peers"]:
            c = p.get("check") or {}
            tr = c.get("trace")
            cs = f"{tr:.6g}" if tr is not None else ""
            if "trace_curvlinops" in c:
                cs += f" (op.trace {c['trace_curvlinops']:.6g})"
            if "eigenvalues" in c:
                cs += f"λ₁ {c['eigenvalues'][0]:.6g}, {c['products']} F·v products"
            batch = p.get("batch") or "?"
            print(f"| {r['workload']} | {p['peer']} | {fmt_s(p.get('best_s'))} | {fmt_s(p.get('median_s'))} | "
                  f"{fmt_s(p.get('warmup_s'))} | {p.get('rss_mib', 0):.0f} | {batch} | {cs} | {p.get('status')} |")
    for r in rows_out:
        lines = []
        if r["engine"].get("eigenvalues"):
            lines.append(("fisher bench", r["engine"]["eigenvalues"]))
        if (r.get("engine_check") or {}).get("eigenvalues"):
            lines.append((f"fisher report --form implicit (top-tol {r['engine_check'].get('top_tol')})",
                          r["engine_check"]["eigenvalues"]))
        for p in r["peers"]:
            if (p.get("check") or {}).get("eigenvalues"):
                lines.append((f"{p['peer']} (eigsh tol {p['check']['tol']:g})", p["check"]["eigenvalues"]))
        if lines:
            print(f"\nTop-{TOP_K} eigenvalues, {r['workload']}:\n")
            for who, vals in lines:
                print(f"- {who}: " + ", ".join(f"{v:.6g}" for v in vals))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fisher-bin", default=os.path.join(REPO, "target", "release", "fisher"))
    ap.add_argument("--only", default="W1,W2,W3", help="workload groups (W1, W2, W3) or single rows (W1:full, "
                    "W2:full_true, W3:diag_empirical, W3:diag_true, W3:kfac_true, W3:kfac_mc, W3:top_true), "
                    "comma-separated")
    ap.add_argument("--peers", help="only these peers (comma-separated names, see the module docs)")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls (best of) after one warm-up")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the engine and the peers of each workload "
                    "this many times and keep each one's best round (a shared machine's load drifts)")
    ap.add_argument("--quick", action="store_true", help="N/8 everywhere: a smoke test")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per peer (and per engine call)")
    ap.add_argument("--batch", type=int, help="every peer's batch size (default: per peer, see the docs)")
    ap.add_argument("--json", metavar="OUT.json", help="write every raw number here")
    ap.add_argument("--workdir", help="where the problems' files go, kept (default: a temporary directory, "
                    "removed at the end)")
    ap.add_argument("--no-check", action="store_true", help="skip the engine's fisher compute/report cross-check")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-key", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "info":
        return worker_info()
    if args.worker:
        return worker(args.worker, args.worker_key, args.quick, args.workdir, args.repeat, args.batch)

    if not os.access(args.fisher_bin, os.X_OK):
        sys.exit(f"{args.fisher_bin} is not an executable (build it: cargo build --release, or pass --fisher-bin)")
    args.caps = engine_caps(args.fisher_bin)
    all_rows = workloads(args.quick, args.caps["bench_top"])
    names = {r["group"] for r in all_rows} | {f"{r['group']}:{r['key']}" for r in all_rows}
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    only = [o[:2].upper() + o[2:] for o in only]
    bad = [o for o in only if o not in names]
    if bad:
        sys.exit(f"--only: unknown {bad}; choose from {', '.join(sorted(names))}")
    rows = [r for r in all_rows if r["group"] in only or f"{r['group']}:{r['key']}" in only]
    keep = set(args.peers.split(",")) if args.peers else None
    workdir = args.workdir or tempfile.mkdtemp(prefix="fisher_compare_")
    os.makedirs(workdir, exist_ok=True)

    head = header_info(args)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(f"workdir {workdir}; machine {head['cpu']} × {head['cores']}; load {head['loadavg_start'][0]:.2f}")
    rows_out = []
    for row in rows:
        t0 = time.perf_counter()
        d = prepare(workdir, row)
        log(f"[{row['workload']}] problem ready in {time.perf_counter() - t0:.1f} s ({d})")
        rec = {k: row[k] for k in row if k != "peers"}
        rec["loadavg_before"] = os.getloadavg()
        engine_rounds, peer_rounds = [], {n: [] for n in row["peers"] if keep is None or n in keep}
        for rnd in range(args.rounds):
            tag = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
            log(f"[{row['workload']}] fisher bench{tag} ...")
            e = run_engine(row, args)
            log(f"  engine: {e.get('status')} {fmt_s(e.get('best_s'))} s")
            engine_rounds.append(e)
            for name in peer_rounds:
                log(f"[{row['workload']}] {name}{tag} ...")
                p = run_peer(name, row, args, workdir)
                log(f"  {name}: {p.get('status')} {fmt_s(p.get('best_s'))} s, {p['rss_mib']:.0f} MiB")
                peer_rounds[name].append(p)
        rec["engine"] = best_round(engine_rounds)
        rec["peers"] = [best_round(rs) for rs in peer_rounds.values()]
        if not args.no_check:
            log(f"[{row['workload']}] engine cross-check on the peers' files ...")
            rec["engine_check"] = engine_check(row, args, d)
        rows_out.append(rec)
    head["loadavg_end"] = os.getloadavg()

    summarise(rows_out)
    print_header(head)
    print_tables(rows_out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": head, "rows": rows_out, "workdir": workdir}, f, indent=1, default=str)
        print(f"\nraw numbers: {args.json}")
    if not args.workdir:  # a temporary directory of ours (--workdir DIR keeps the files)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
