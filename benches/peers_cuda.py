#!/usr/bin/env python3
"""PyTorch peers of `fisher bench` on a CUDA GPU (cuBLAS, BackPACK, nngeometry, curvlinops), in one process.

The GPU counterpart of benches/compare.py (which times the same kinds of peers on the CPU, each
in its own process). Here every peer runs in this one process, so that CUDA is initialised
once: a peer that fails or is missing gets a row "unavailable: <reason>" / "failed: <reason>",
one that runs past --peer-timeout a row "timeout" (SIGALRM; a call stuck inside one CUDA
kernel is only interrupted when it returns), and the run goes on. The JSON (--json) is
rewritten after every row, so a run killed from outside keeps what it had.

Timing: one untimed warm-up call, then the best of --repeat timed calls (fewer when the
calls so far passed --peer-budget seconds), each between torch.cuda.synchronize() calls;
results stay on the device (no copy to the host inside the clock). Peak device memory per
peer: torch.cuda.max_memory_allocated (reset before each peer). TF32 is off
(torch.backends.cuda.matmul.allow_tf32 = False, float32 matmul precision "highest") except in
the row named *_tf32, which says so.

Workloads (named as `fisher bench --json` names them, so that a script can pair the rows):

  reduce/full/NxP            F = GᵀG/N, G float32 N×P on the device, for each of --shapes
                             (default 4096x2048,16384x8192); GFLOP/s with 2·N·P² flops.
      torch_mm               torch.mm(G.T, G).mul_(1/N)       (cuBLAS sgemm, both triangles)
      torch_matmul           torch.matmul(G.T, G).mul_(1/N)
      torch_mm_tf32          torch_mm with TF32 allowed — NOT float32 arithmetic; for scale only
                             (cuda only)
      G is seeded torch.randn with the column scales of fisher_engine::synthetic::gradient_like
      (10^(-1.5·j/(P-1))): the speed of a GEMM does not depend on the values, and rebuilding
      the engine's exact G (compare.gradient_like) takes minutes of numpy at 16384×8192.

  network/<form>/<variant>/784-512-512-10x<N>   MLP --widths, ReLU (--activation), N = --n
                             (default 65536), in batches of --batch (default 4096), the
                             Fisher of the mean log-likelihood (softmax), F = (1/N) Σᵢ …:
    diag/empirical   backpack_sum_grad_squared   SumGradSquared, CrossEntropyLoss(sum), Σ_batches / N
    diag/true        backpack_diag_ggn_exact     DiagGGNExact (GGN of the cross-entropy = true Fisher)
                     nngeometry_diag             FIM(PMatDiag, variant="classif_logits")
    kfac/true        backpack_kflr               KFLR, per batch [G, A]: A_tot = Σ_b (B_b/N) A_b,
                                                 G_tot = Σ_b G_b / N (G from the sum loss)
                     nngeometry_kfac             FIM(PMatKFAC, variant="classif_logits")
                     curvlinops_kfac             KFACLinearOperator(fisher_type="type-2"),
                                                 .compute_kronecker_factors() in the clock
    kfac/mc1         backpack_kfac_mc1           KFAC(mc_samples=1), accumulated as KFLR
                     curvlinops_kfac_mc          KFACLinearOperator(fisher_type="mc", mc_samples=1)

  The model and data (--data auto, the default) are fisher bench's own: bench::network_problem
  (train::init_mlp seed 0, train::classification_task seed 0 ^ 0x7A5C), rebuilt by
  benches/compare.py's init_mlp / classification_task (numpy; at N = 65536 about 10 s and
  ~5 GiB of host memory, outside every clock). Where compare.py cannot be imported (or with
  --data random) they are seeded random instead: nn.Linear's default init under
  torch.manual_seed(0), inputs torch.randn, labels uniform — the same shapes, so the times
  compare, but not the traces. The JSON header's "data" says which.

Every result is checked loosely outside the clock: shapes, finiteness, and tr F (diag: the
sum; KFAC: Σ_l tr A_l tr G_l with tr G_b for a bias kept apart — which equals the engine's
joint [W|b] factor). With --engine-check BACKEND (and --data auto), the model and data are
written to --workdir (model.safetensors, X.npy, y.npy) and `fisher compute --backend BACKEND`
computes the engine's tr F of diag/empirical, diag/true and kfac/true on them, for comparison.

Usage:
    python benches/peers_cuda.py [--device cuda|cpu] [--quick] [--repeat 3] [--batch 4096]
        [--n 65536] [--shapes 4096x2048,16384x8192] [--only reduce,network] [--peers a,b]
        [--json OUT.json] [--engine-check gpu] [--fisher-bin target/release/fisher]

--quick: shapes 1024x512,2048x1024, N = 2048, batch 512 (a smoke test; also on --device cpu).
"""

import argparse
import copy
import importlib.util
import json
import os
import platform
import signal
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


class PeerTimeout(Exception):
    pass


def load_compare():
    """benches/compare.py as a module (its top level imports only the standard library)."""
    path = os.path.join(HERE, "compare.py")
    spec = importlib.util.spec_from_file_location("fisher_compare", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def first_line(text):
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


def versions():
    import importlib.metadata as md

    out = {}
    for pkg in ["torch", "numpy", "backpack-for-pytorch", "nngeometry", "curvlinops-for-pytorch", "safetensors"]:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# --------------------------------------------------------------------------------------------
# timing


class Timer:
    def __init__(self, device, repeat, budget, timeout):
        import torch

        self.torch, self.device, self.repeat, self.budget, self.timeout = torch, device, repeat, budget, timeout
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def run(self, fn):
        """(out, warm-up s, [timed s]) — raises PeerTimeout past --peer-timeout."""
        def alarm(signum, frame):
            raise PeerTimeout(f"timeout after {self.timeout:g} s")

        old = signal.signal(signal.SIGALRM, alarm)
        signal.alarm(max(1, int(self.timeout)))
        self.warm, times = None, []
        self.times = times  # what was measured before a timeout
        try:
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            warm = self.warm = time.perf_counter() - t0
            spent = warm
            for i in range(self.repeat):
                if i > 0 and spent > self.budget:
                    break
                out = None  # let the allocator reuse the previous result's memory
                self.sync()
                t0 = time.perf_counter()
                out = fn()
                self.sync()
                times.append(time.perf_counter() - t0)
                spent += times[-1]
            return out, warm, times
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------------------------
# problems


def parse_shapes(text):
    shapes = []
    for s in text.split(","):
        s = s.strip().lower()
        if s and s != "none":
            n, p = s.split("x")
            shapes.append((int(n), int(p)))
    return shapes


def gradient_matrix(n, p, device, seed=0):
    """Seeded randn with gradient_like's column scales (10^(-1.5·j/(P-1)))."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    g = torch.randn(n, p, generator=gen, device=device, dtype=torch.float32)
    denom = max(p, 2) - 1
    g *= torch.pow(10.0, -1.5 * torch.arange(p, device=device, dtype=torch.float32) / denom)
    return g


def network_problem(widths, n, activation, mode, compare_mod):
    """(layers [(W, b) numpy float32], X numpy f32, y numpy int64, source description)."""
    import numpy as np

    if mode in ("auto", "engine"):
        try:
            cmp = compare_mod if compare_mod is not None else load_compare()
            layers = cmp.init_mlp(widths, 0)
            x, y = cmp.classification_task(n, widths[0], widths[-1], 0 ^ 0x7A5C)
            return layers, x, y, ("fisher bench's own (bench::network_problem, seed 0), rebuilt by "
                                  "benches/compare.py init_mlp/classification_task")
        except Exception as e:  # noqa: BLE001 — any failure falls back (or fails under --data engine)
            if mode == "engine":
                raise
            why = f"{type(e).__name__}: {first_line(e)}"
    else:
        why = "--data random"
    import torch

    torch.manual_seed(0)
    layers = []
    for i, o in zip(widths[:-1], widths[1:]):
        lin = torch.nn.Linear(i, o)
        layers.append((lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy()))
    gen = torch.Generator().manual_seed(0x7A5C)
    x = torch.randn(n, widths[0], generator=gen).numpy()
    y = torch.randint(0, widths[-1], (n,), generator=gen).numpy().astype(np.int64)
    return layers, x, y, f"seeded random (torch.manual_seed(0), randn inputs, uniform labels; not the engine's data: {why})"


def build_model(layers, activation):
    import torch

    act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid,
           "gelu": torch.nn.GELU, "identity": torch.nn.Identity}[activation]
    mods = []
    for l, (w, b) in enumerate(layers):
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        mods.append(lin)
        if l < len(layers) - 1:
            mods.append(act())
    return torch.nn.Sequential(*mods).eval()


def save_safetensors(path, tensors):
    """safetensors.numpy.save_file when installed, else the format written by hand (F32 only)."""
    import numpy as np

    try:
        from safetensors.numpy import save_file

        return save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, path)
    except ImportError:
        pass
    header, blobs, off = {}, [], 0
    for k, v in tensors.items():
        b = np.ascontiguousarray(v, dtype="<f4").tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


# --------------------------------------------------------------------------------------------
# peers


def kfac_trace(factors):
    return float(sum(float(a.double().trace()) * float(g.double().trace()) if a is not None
                     else float(g.double().trace()) for a, g in factors))


def fast_loader(x, y, b):
    """A DataLoader that hands out pre-cut device batches: nngeometry insists on
    isinstance(loader, DataLoader) and reads len(loader.sampler) and batch_size, and a plain
    DataLoader over a TensorDataset would index and stack every sample on each pass."""
    from torch.utils.data import DataLoader, TensorDataset

    class _Loader(DataLoader):
        def __init__(self):
            super().__init__(TensorDataset(x, y), batch_size=b, shuffle=False)
            self.batches = [(x[i:i + b].clone(), y[i:i + b].clone()) for i in range(0, x.shape[0], b)]

        def __iter__(self):
            return iter(self.batches)

        def __len__(self):
            return len(self.batches)

    return _Loader()


def reduce_peers(device):
    names = ["torch_mm", "torch_matmul"]
    if device.type == "cuda":
        names.append("torch_mm_tf32")
    return names


NETWORK_PEERS = [  # BackPACK first: a run cut short keeps the rows the summary pairs with the engine
    ("diag", "empirical", "backpack_sum_grad_squared"),
    ("diag", "true", "backpack_diag_ggn_exact"),
    ("kfac", "true", "backpack_kflr"),
    ("kfac", "mc1", "backpack_kfac_mc1"),
    ("diag", "true", "nngeometry_diag"),
    ("kfac", "true", "nngeometry_kfac"),
    ("kfac", "true", "curvlinops_kfac"),
    ("kfac", "mc1", "curvlinops_kfac_mc"),
]


def reduce_fn(name, g):
    import torch

    n = g.shape[0]
    inv_n = 1.0 / n

    def mm():
        return torch.mm(g.T, g).mul_(inv_n)

    def matmul():
        return torch.matmul(g.T, g).mul_(inv_n)

    def mm_tf32():
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return torch.mm(g.T, g).mul_(inv_n)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False

    fn = {"torch_mm": mm, "torch_matmul": matmul, "torch_mm_tf32": mm_tf32}[name]

    def check(f):
        p = g.shape[1]
        assert tuple(f.shape) == (p, p) and f.dtype == torch.float32, (tuple(f.shape), f.dtype)
        tr = float(torch.diagonal(f).double().sum())
        assert tr == tr and abs(tr) != float("inf"), tr
        return {"trace": tr}

    return fn, check


def network_fn(name, base_model, x, y, batch):
    """(fn, check) of a network peer; raises ImportError when its library is missing."""
    import torch

    n = x.shape[0]
    model = copy.deepcopy(base_model)
    P = sum(p.numel() for p in model.parameters())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    data = [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]

    def check_vec(vals):
        flat = torch.cat([v.reshape(-1) for v in vals])
        assert flat.numel() == P, (flat.numel(), P)
        assert bool(torch.isfinite(flat).all()) and bool((flat >= -1e-6).all()), "not finite or negative"
        return {"trace": float(flat.double().sum())}

    def check_kfac(factors):
        for a, g in factors:
            assert g.shape[0] == g.shape[1] and (a is None or a.shape[0] == a.shape[1])
            assert bool(torch.isfinite(g).all()) and (a is None or bool(torch.isfinite(a).all()))
        return {"trace": kfac_trace(factors), "factors": len(factors)}

    if name.startswith("backpack_"):
        from backpack import backpack, extend
        from backpack.extensions import KFAC, KFLR, DiagGGNExact, SumGradSquared

        model = extend(model)
        loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
        if name in ("backpack_kflr", "backpack_kfac_mc1"):
            ext, attr = (KFLR, "kflr") if name == "backpack_kflr" else (lambda: KFAC(mc_samples=1), "kfac")

            def fn():
                acc = None
                for xb, yb in data:
                    model.zero_grad()
                    loss = loss_fn(model(xb), yb)
                    with backpack(ext()):
                        loss.backward()
                    w = xb.shape[0] / n
                    cur = []
                    for mod in linears:
                        gw, aw = getattr(mod.weight, attr)  # [G, A]: G of the sum loss, A the batch mean of a aᵀ
                        (gb,) = getattr(mod.bias, attr)
                        cur += [[aw * w, gw / n], [None, gb / n]]
                    if acc is None:
                        acc = cur
                    else:
                        for (a, g), (ca, cg) in zip(acc, cur):
                            if a is not None:
                                a.add_(ca)
                            g.add_(cg)
                return acc

            return fn, check_kfac

        ext, attr = {"backpack_sum_grad_squared": (SumGradSquared, "sum_grad_squared"),
                     "backpack_diag_ggn_exact": (DiagGGNExact, "diag_ggn_exact")}[name]
        params = list(model.parameters())

        def fn():
            acc = [torch.zeros_like(p) for p in params]
            for xb, yb in data:
                model.zero_grad()
                loss = loss_fn(model(xb), yb)
                with backpack(ext()):
                    loss.backward()
                for a, p in zip(acc, params):
                    a.add_(getattr(p, attr))
            return [a / n for a in acc]

        return fn, check_vec

    if name.startswith("nngeometry_"):
        from nngeometry.metrics import FIM
        from nngeometry.object import PMatDiag, PMatKFAC

        rep = {"nngeometry_diag": PMatDiag, "nngeometry_kfac": PMatKFAC}[name]
        loader = fast_loader(x, y, batch)
        dev = str(x.device)

        def fn():
            return FIM(model=model, loader=loader, representation=rep, variant="classif_logits", device=dev)

        if name == "nngeometry_diag":
            return fn, lambda fim: check_vec([fim.get_diag()])
        return fn, lambda fim: check_kfac(list(fim.data.values()))

    if name.startswith("curvlinops_"):
        from curvlinops import KFACLinearOperator

        params = [p for p in model.parameters() if p.requires_grad]
        loss_fn = torch.nn.CrossEntropyLoss(reduction="mean")
        kw = dict(fisher_type="type-2") if name == "curvlinops_kfac" else dict(fisher_type="mc", mc_samples=1)

        def fn():
            op = KFACLinearOperator(model, loss_fn, params, data, check_deterministic=False, num_data=n,
                                    num_per_example_loss_terms=1, separate_weight_and_bias=False, **kw)
            op.compute_kronecker_factors()
            return op

        def check(op):
            factors = [(op._input_covariances.get(m), op._gradient_covariances[m]) for m in op._mapping]
            return check_kfac(factors)

        return fn, check
    raise ValueError(f"unknown peer {name}")


# --------------------------------------------------------------------------------------------
# engine cross-check


def engine_check(args, workdir, layers, x, y, net_tag):
    """fisher compute --backend B on the peers' model and data: its tr F per (form, variant)."""
    import numpy as np

    os.makedirs(workdir, exist_ok=True)
    model_path = os.path.join(workdir, "model.safetensors")
    tensors = {}
    for l, (w, b) in enumerate(layers):
        tensors[f"{2 * l}.weight"], tensors[f"{2 * l}.bias"] = w, b
    save_safetensors(model_path, tensors)
    np.save(os.path.join(workdir, "X.npy"), np.ascontiguousarray(x, dtype=np.float32))
    np.save(os.path.join(workdir, "y.npy"), np.asarray(y, dtype=np.int64))
    out = []
    for form, variant in [("diag", "empirical"), ("diag", "true"), ("kfac", "true")]:
        rec = {"workload": f"network/{form}/{variant}/{net_tag}", "backend": args.engine_check}
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [args.fisher_bin, "compute", "--weights", model_path, "--inputs", os.path.join(workdir, "X.npy"),
                   "--labels", os.path.join(workdir, "y.npy"), "--activation", args.activation,
                   "--variant", variant, "--form", form, "--backend", args.engine_check, "--json",
                   "--out", os.path.join(tmp, "F.safetensors"), "--force"]
            rec["cmd"] = " ".join(cmd)
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.engine_timeout)
                rec["wall_s"] = time.perf_counter() - t0
                if p.returncode != 0:
                    rec["status"] = f"failed: exit {p.returncode}: {first_line((p.stderr.strip().splitlines() or [''])[-1])}"
                else:
                    doc = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("{")))
                    rec.update(status="ok", trace=doc.get("trace"))
            except subprocess.TimeoutExpired:
                rec["status"] = f"timeout after {args.engine_timeout:g} s"
            except (OSError, StopIteration, json.JSONDecodeError) as e:
                rec["status"] = f"failed: {type(e).__name__}: {first_line(e)}"
        print(f"  engine check {rec['workload']} ({args.engine_check}): {rec.get('status')} "
              f"tr F {rec.get('trace')}", file=sys.stderr, flush=True)
        out.append(rec)
    return out


# --------------------------------------------------------------------------------------------
# report


def fmt_s(v):
    if v is None:
        return "–"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def print_table(doc):
    h = doc["header"]
    print(f"\n## PyTorch peers on {h['device_name']} ({h['device']})\n")
    print(f"- torch {h['versions'].get('torch')} (CUDA {h.get('cuda')}), backpack {h['versions'].get('backpack-for-pytorch')}, "
          f"nngeometry {h['versions'].get('nngeometry')}, curvlinops {h['versions'].get('curvlinops-for-pytorch')}; "
          f"SMs {h.get('multi_processor_count')}, TF32 off except *_tf32")
    if "network" in h:
        print(f"- network {h['network']['workload_tag']} {h['network']['activation']}, batches of {h['network']['batch']}; "
              f"data: {h['network']['data']} (built in {h['network']['build_s']:.1f} s)")
    sync = ("torch.cuda.synchronize() around each call; peak = torch.cuda.max_memory_allocated"
            if h["device"].startswith("cuda") else f"{h['cores']} CPU threads")
    print(f"- best of {h['repeat']} after one warm-up (fewer past {h['peer_budget']:g} s); {sync}\n")
    print("| workload | peer | best s | median s | warm-up s | GFLOP/s | peak MiB | tr F | status |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in doc["rows"]:
        gf = f"{r['gflops_best']:.0f}" if r.get("gflops_best") else "–"
        pk = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else "–"
        tr = (r.get("check") or {}).get("trace")
        tr_s = f"{tr:.6g}" if isinstance(tr, (int, float)) else ""
        print(f"| {r['workload']} | {r['peer']} | {fmt_s(r.get('best_s'))} | {fmt_s(r.get('median_s'))} | "
              f"{fmt_s(r.get('warmup_s'))} | {gf} | {pk} | {tr_s} | {r['status']}"
              + (f" ({r['note']})" if r.get("note") else "") + " |")
    if doc.get("engine_check"):
        print("\nEngine tr F on the same files (`fisher compute`):\n")
        for e in doc["engine_check"]:
            tr = e.get("trace")
            print(f"- {e['workload']} ({e['backend']}): " + (f"tr F {tr:.6g}, {e['wall_s']:.1f} s process"
                                                               if e.get("status") == "ok" else e.get("status", "?")))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test)")
    ap.add_argument("--quick", action="store_true", help="small sizes: shapes 1024x512,2048x1024, N 2048, batch 512")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls (best of) after one warm-up")
    ap.add_argument("--shapes", help="reduce shapes NxP,... (default 4096x2048,16384x8192; none to skip)")
    ap.add_argument("--widths", default="784,512,512,10")
    ap.add_argument("--activation", default="relu")
    ap.add_argument("--n", type=int, help="network samples (default 65536)")
    ap.add_argument("--batch", type=int, help="network batch size (default 4096)")
    ap.add_argument("--data", choices=["auto", "engine", "random"], default="auto",
                    help="network model and data: fisher bench's (rebuilt by compare.py; auto falls back to "
                         "random when that fails), or seeded random")
    ap.add_argument("--only", default="reduce,network", help="reduce, network or both")
    ap.add_argument("--peers", help="only these peers (comma-separated)")
    ap.add_argument("--peer-budget", type=float, default=30.0,
                    help="stop timing a peer once its calls took this many seconds (at least one timed call)")
    ap.add_argument("--peer-timeout", type=float, default=120.0, help="abandon a peer after this many seconds")
    ap.add_argument("--json", metavar="OUT.json", help="write every number here (rewritten after each row)")
    ap.add_argument("--engine-check", metavar="BACKEND",
                    help="also run `fisher compute --backend BACKEND` on the same model and data for tr F")
    ap.add_argument("--fisher-bin", default=os.path.join(REPO, "target", "release", "fisher"))
    ap.add_argument("--engine-timeout", type=float, default=120.0)
    ap.add_argument("--workdir", help="where --engine-check writes the model and data (default: a temporary directory)")
    args = ap.parse_args()

    import warnings

    warnings.simplefilter("ignore")
    t_import = time.perf_counter()
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("peers_cuda.py: --device cuda but torch.cuda.is_available() is False (try --device cpu)")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    shapes = parse_shapes(args.shapes if args.shapes else ("1024x512,2048x1024" if args.quick else "4096x2048,16384x8192"))
    n = args.n or (2048 if args.quick else 65536)
    batch = min(args.batch or (512 if args.quick else 4096), n)
    widths = [int(w) for w in args.widths.split(",")]
    only = {s.strip() for s in args.only.split(",")}
    keep = set(args.peers.split(",")) if args.peers else None

    cpu_name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu_name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu_name)
    except OSError:
        pass
    header = {"device": str(device), "device_name": cpu_name, "python": platform.python_version(),
              "versions": versions(), "repeat": args.repeat, "peer_budget": args.peer_budget,
              "peer_timeout": args.peer_timeout, "cores": os.cpu_count(), "quick": args.quick,
              "tf32": "off (allow_tf32=False, float32_matmul_precision=highest) except torch_mm_tf32",
              "timing": "inputs already on the device, results left there (fisher bench's timed calls include "
                        "the host-device transfers of its inputs and results)",
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        header.update(device_name=props.name, multi_processor_count=props.multi_processor_count,
                      capability=f"{props.major}.{props.minor}", total_memory_bytes=props.total_memory,
                      cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        torch.zeros(1, device=device)  # the context, outside every clock
        torch.cuda.synchronize()
    header["import_and_init_s"] = time.perf_counter() - t_import
    doc = {"header": header, "rows": []}
    timer = Timer(device, args.repeat, args.peer_budget, args.peer_timeout)

    if args.json and os.path.dirname(os.path.abspath(args.json)):
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)

    def save():
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1, default=str)
            os.replace(tmp, args.json)

    def run_peer(rec, make):
        """make() -> (fn, check); fills rec's times, status, check."""
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        print(f"[{rec['workload']}] {rec['peer']} ...", file=sys.stderr, flush=True)
        try:
            fn, check = make()
        except ImportError as e:
            rec["status"] = f"unavailable: {type(e).__name__}: {first_line(e)}"[:300]
            return
        except Exception as e:  # noqa: BLE001
            rec["status"] = f"failed in set-up: {type(e).__name__}: {first_line(e)}"[:300]
            return
        try:
            out, warm, times = timer.run(fn)
            rec.update(warmup_s=warm, times_s=times, best_s=min(times),
                       median_s=sorted(times)[len(times) // 2], status="ok")
            if device.type == "cuda":
                rec["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            rec["check"] = check(out)
            out = None
        except PeerTimeout as e:
            rec["warmup_s"] = timer.warm
            if timer.times:  # keep the calls measured before the alarm
                times = list(timer.times)
                rec.update(times_s=times, best_s=min(times), median_s=sorted(times)[len(times) // 2], status="ok",
                           note=f"{e}: {len(times)} of {args.repeat} timed calls")
            else:
                rec["status"] = str(e) + (f" (warm-up {timer.warm:.1f} s)" if timer.warm else " (in the warm-up)")
        except Exception as e:  # noqa: BLE001
            rec["status"] = f"failed: {type(e).__name__}: {first_line(e)}"[:300]
        finally:
            fn = check = None
        print(f"  {rec['peer']}: {rec['status']} {fmt_s(rec.get('best_s'))} s", file=sys.stderr, flush=True)

    if "reduce" in only:
        for (rn, rp) in shapes:
            g = gradient_matrix(rn, rp, device)
            for name in reduce_peers(device):
                if keep is not None and name not in keep:
                    continue
                rec = {"workload": f"reduce/full/{rn}x{rp}", "peer": name, "n": rn, "p": rp, "flop": 2 * rn * rp * rp,
                       "fp32": name != "torch_mm_tf32",
                       "data": "seeded torch.randn with gradient_like's column scales (not the engine's G)"}
                run_peer(rec, lambda: reduce_fn(name, g))
                if rec.get("best_s"):
                    rec["gflops_best"] = rec["flop"] / rec["best_s"] / 1e9
                doc["rows"].append(rec)
                save()
            del g

    if "network" in only:
        wanted = [(f, v, p) for f, v, p in NETWORK_PEERS if keep is None or p in keep]
        if wanted:
            t0 = time.perf_counter()
            cmp = None
            try:
                cmp = load_compare()
            except Exception:  # noqa: BLE001 — network_problem reports why
                pass
            layers, xn, yn, source = network_problem(widths, n, args.activation, args.data, cmp)
            build_s = time.perf_counter() - t0
            base = build_model(layers, args.activation).to(device)
            x = torch.from_numpy(xn).to(device)
            y = torch.from_numpy(yn).to(device)
            tag = f"{'-'.join(map(str, widths))}x{n}"
            header["network"] = {"widths": widths, "n": n, "batch": batch, "activation": args.activation,
                                 "params": sum(p.numel() for p in base.parameters()), "data": source,
                                 "engine_data": source.startswith("fisher bench"), "build_s": build_s,
                                 "workload_tag": tag}
            print(f"network {tag}: data {source} ({build_s:.1f} s)", file=sys.stderr, flush=True)
            for form, variant, name in wanted:
                rec = {"workload": f"network/{form}/{variant}/{tag}", "peer": name, "n": n, "batch": batch}
                run_peer(rec, lambda: network_fn(name, base, x, y, batch))
                doc["rows"].append(rec)
                save()
            if args.engine_check:
                if not header["network"]["engine_data"]:
                    doc["engine_check"] = [{"workload": f"network/*/{tag}", "backend": args.engine_check,
                                            "status": "skipped: the peers' data are not the engine's"}]
                else:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    wd = args.workdir or tempfile.mkdtemp(prefix="peers_cuda_")
                    doc["engine_check"] = engine_check(args, wd, layers, xn, yn, tag)
                    if not args.workdir:
                        import shutil

                        shutil.rmtree(wd, ignore_errors=True)
                save()

    print_table(doc)
    save()
    if args.json:
        print(f"\nraw numbers: {args.json}")


if __name__ == "__main__":
    main()
