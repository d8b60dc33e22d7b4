#!/usr/bin/env python3
"""ResNet-18 on CIFAR-size inputs: fisher-engine next to BackPACK and nngeometry, in one run.

The model is `torchvision.models.resnet18(num_classes=10)` (seeded initialisation, eval mode:
BatchNorm uses its running statistics, as in the ONNX export), the data N synthetic seeded
3×32×32 images with labels in 0..9, written once as X.npy / y.npy and read by every method.
Each method runs in its own process, so that its peak RSS is its own (`os.wait4` gives the
child's `ru_maxrss`); the table shows the process wall time, the time of the computation alone
(peers: after imports, model and data loading; the engine's binary reports no split), the
time per 1000 samples, and the peak RSS.

Peers (each a worker process, `torch.set_num_threads(2)`, OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE unset, see shared/NOTES.md):

- `backpack_diag_ggn_exact`: BackPACK DiagGGNExact, CrossEntropyLoss(reduction="sum"), / N;
- `backpack_diag_ggn_mc`: BackPACK DiagGGNMC(mc_samples=1);
- `backpack_kfac`: BackPACK KFAC(mc_samples=1) (BackPACK's KFAC is Monte Carlo only);
- `nngeometry_diag`: nngeometry FIM(variant="classif_logits") as PMatDiag (exact expectation);
- `nngeometry_kfac`: nngeometry FIM as PMatKFAC, over the Linear and Conv2d layers (PMatKFAC
  has no BatchNorm block).

BackPACK needs `extend(model, use_converter=True)` for the residual connections; where it
refuses (BatchNorm in some modes, unsupported modules) the row says "unsupported" with the
exception text instead of failing the run.

The engine (only with `--fisher-bin PATH`), on the ONNX file written by the binding export
`torch.onnx.export(model.eval(), (x,), "resnet18.onnx", dynamo=True, optimize=False)` with x the
N inputs:

- `fisher compute --model resnet18.onnx --inputs X.npy --labels y.npy --form diag --variant true`
  (and `--variant empirical`), `--form kfac`;
- `fisher report --model resnet18.onnx --inputs X.npy --labels y.npy --form implicit --top 10`.

Usage (needs torch, torchvision, numpy, onnx, onnxscript; backpack-for-pytorch, nngeometry):

    python3 benches/peers_resnet18.py [--n 10000] [--peer-n N] [--batch 128] [--fisher-bin PATH]
        [--methods m1,m2,...] [--workdir DIR] [--timeout S]

The peers are slow on ResNet-18 (11.2 M parameters): in a smoke run (--n 16 --batch 8, 2 cores,
a busy machine) BackPACK DiagGGNExact took 2.5 s per sample, DiagGGNMC 1.4 s, nngeometry
PMatDiag 8.8 s and PMatKFAC 2.5 s, and BackPACK KFAC refused AdaptiveAvgPool2d; hence the
peers' default N of 256 (`--peer-n`) against the engine's 10,000 (compare s / 1000 samples).

Run it with nothing else on the machine (see shared/NOTES.md: a concurrent build made the
peers 2–8× slower). Quick smoke test of the peers: `--n 16 --batch 8`.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

PEERS = ["backpack_diag_ggn_exact", "backpack_diag_ggn_mc", "backpack_kfac", "nngeometry_diag", "nngeometry_kfac"]
ENGINE = ["fisher_diag_true", "fisher_diag_empirical", "fisher_kfac", "fisher_report_implicit_top10"]


# --------------------------------------------------------------------------------------------
# set-up (parent)


def build_model():
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    return model.eval()


def prepare(workdir, n, export_onnx):
    """X.npy, y.npy, resnet18.pt (state dict) and, when asked, resnet18.onnx."""
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    np.save(os.path.join(workdir, "X.npy"), x.numpy().astype(np.float32))
    np.save(os.path.join(workdir, "y.npy"), y.numpy().astype(np.int64))
    model = build_model()
    with torch.no_grad():  # non-trivial running statistics, as a trained model has
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    torch.save(model.state_dict(), os.path.join(workdir, "resnet18.pt"))
    if export_onnx:
        torch.onnx.export(model.eval(), (x,), os.path.join(workdir, "resnet18.onnx"), dynamo=True, optimize=False)


def run_measured(cmd, env, timeout):
    """Runs cmd; returns (wall seconds, peak RSS MiB of that process, exit status, stdout, stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                status = -1
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = status
        out.seek(0)
        err.seek(0)
        code = -1 if status == -1 else os.waitstatus_to_exitcode(status)
        # ru_maxrss is in KiB on Linux
        return wall, usage.ru_maxrss / 1024.0, code, out.read().decode(errors="replace"), err.read().decode(errors="replace")


def peer_env():
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


# --------------------------------------------------------------------------------------------
# workers (child processes)


def worker(method, workdir, n, batch):
    import warnings

    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    model = build_model()
    model.load_state_dict(torch.load(os.path.join(workdir, "resnet18.pt")))
    model.eval()
    x = torch.from_numpy(np.load(os.path.join(workdir, "X.npy"), mmap_mode="r")[:n].copy())
    y = torch.from_numpy(np.load(os.path.join(workdir, "y.npy"))[:n].copy())
    result = {"method": method, "n": n}
    t0 = time.perf_counter()
    try:
        if method.startswith("backpack_"):
            from backpack import backpack, extend
            from backpack.extensions import KFAC, DiagGGNExact, DiagGGNMC

            ext, attr = {
                "backpack_diag_ggn_exact": (DiagGGNExact, "diag_ggn_exact"),
                "backpack_diag_ggn_mc": (lambda: DiagGGNMC(mc_samples=1), "diag_ggn_mc"),
                "backpack_kfac": (lambda: KFAC(mc_samples=1), "kfac"),
            }[method]
            model = extend(model, use_converter=True)
            loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
            acc = None
            for i in range(0, n, batch):
                model.zero_grad()
                loss = loss_fn(model(x[i : i + batch]), y[i : i + batch])
                with backpack(ext()):
                    loss.backward()
                vals = [getattr(p, attr) for p in model.parameters() if hasattr(p, attr)]
                if method == "backpack_kfac":  # lists of Kronecker factors per parameter
                    vals = [f for v in vals for f in v]
                acc = [v.detach().clone() for v in vals] if acc is None else [a + v for a, v in zip(acc, vals)]
            acc = [a / n for a in acc]
            result["output"] = f"{len(acc)} tensors, {sum(a.numel() for a in acc)} numbers"
        elif method.startswith("nngeometry_"):
            from nngeometry.layercollection import LayerCollection
            from nngeometry.metrics import FIM
            from nngeometry.object import PMatDiag, PMatKFAC

            loader = DataLoader(TensorDataset(x, y), batch_size=batch)
            if method == "nngeometry_diag":
                fim = FIM(model=model, loader=loader, representation=PMatDiag, variant="classif_logits", device="cpu")
                result["output"] = f"diag of {fim.get_diag().numel()} parameters"
            else:
                lc = LayerCollection()
                for name, mod in model.named_modules():
                    if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                        lc.add_layer(name, LayerCollection._module_to_layer(mod))
                fim = FIM(model=model, loader=loader, representation=PMatKFAC, variant="classif_logits",
                          device="cpu", layer_collection=lc)
                result["output"] = f"KFAC over {len(lc.layers)} Linear/Conv2d layers ({lc.numel()} parameters; BatchNorm left out)"
        else:
            raise ValueError(f"unknown method {method}")
        result["status"] = "ok"
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        result["status"] = f"unsupported: {type(e).__name__}: {msg}"[:240]
    result["compute_s"] = time.perf_counter() - t0
    result["self_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------------------------


def engine_cmd(method, fisher_bin, workdir):
    p = lambda f: os.path.join(workdir, f)
    data = ["--model", p("resnet18.onnx"), "--inputs", p("X.npy"), "--labels", p("y.npy")]
    if method == "fisher_report_implicit_top10":
        return [fisher_bin, "report", *data, "--form", "implicit", "--top", "10"]
    form, variant = {
        "fisher_diag_true": ("diag", "true"),
        "fisher_diag_empirical": ("diag", "empirical"),
        "fisher_kfac": ("kfac", "true"),
    }[method]
    return [fisher_bin, "compute", *data, "--form", form, "--variant", variant,
            "--out", p(f"{method}.safetensors"), "--force"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="samples for the engine")
    ap.add_argument("--peer-n", type=int, help="samples for the peers (default: min(--n, 256); they take "
                    "0.2–9 s per sample on 2 cores, see the module docs)")
    ap.add_argument("--batch", type=int, default=128, help="the peers' batch size")
    ap.add_argument("--fisher-bin", help="the fisher binary: adds the engine's rows")
    ap.add_argument("--methods", help="comma-separated subset of " + ",".join(PEERS + ENGINE))
    ap.add_argument("--workdir", help="where X.npy, y.npy, resnet18.{pt,onnx} go (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per method")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    peer_n = args.peer_n or min(args.n, 256)
    if args.worker:
        return worker(args.worker, args.workdir, peer_n, args.batch)

    methods = args.methods.split(",") if args.methods else PEERS + (ENGINE if args.fisher_bin else [])
    unknown = [m for m in methods if m not in PEERS + ENGINE]
    if unknown:
        sys.exit(f"unknown methods {unknown}")
    if any(m in ENGINE for m in methods) and not args.fisher_bin:
        sys.exit("the engine's methods need --fisher-bin PATH")
    workdir = args.workdir or tempfile.mkdtemp(prefix="peers_resnet18_")
    os.makedirs(workdir, exist_ok=True)
    import torch  # noqa: F401  (after the worker branch: the parent alone prepares)

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    prepare(workdir, max(args.n, peer_n), export_onnx=any(m in ENGINE for m in methods))
    print(f"data and model in {workdir} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

    rows = []
    for m in methods:
        if m in PEERS:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", m, "--workdir", workdir,
                   "--n", str(args.n), "--peer-n", str(peer_n), "--batch", str(args.batch)]
            env, n = peer_env(), peer_n
        else:
            cmd, env, n = engine_cmd(m, args.fisher_bin, workdir), dict(os.environ), args.n
        print(f"running {m} (N = {n}) ...", file=sys.stderr)
        wall, rss, code, out, err = run_measured(cmd, env, args.timeout)
        row = {"method": m, "n": n, "wall_s": wall, "rss_mib": rss, "compute_s": None, "status": "", "notes": ""}
        res = next((json.loads(l[7:]) for l in out.splitlines() if l.startswith("RESULT ")), None)
        if code == -1:
            row["status"] = f"timeout after {args.timeout:g} s"
        elif res is not None:
            row["compute_s"] = res["compute_s"]
            row["status"] = res["status"]
            row["notes"] = res.get("output", "")
        elif code != 0:
            tail = (err.strip().splitlines() or [""])[-1]
            row["status"] = f"exit {code}: {tail}"[:240]
        else:
            row["status"] = "ok"
        rows.append(row)

    print("\n| method | N | process wall s | compute s | s / 1000 samples | peak RSS MiB | status | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["compute_s"] if r["compute_s"] is not None else r["wall_s"]
        comp = f"{r['compute_s']:.2f}" if r["compute_s"] is not None else "–"
        print(f"| {r['method']} | {r['n']} | {r['wall_s']:.2f} | {comp} | {1000 * t / r['n']:.2f} | "
              f"{r['rss_mib']:.0f} | {r['status']} | {r['notes']} |")
    print(f"\ntorch {torch.__version__}, torch threads 2, batch {args.batch}; peak RSS per process (os.wait4 ru_maxrss)")


if __name__ == "__main__":
    main()
