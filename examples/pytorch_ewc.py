#!/usr/bin/env python3
"""From a trained PyTorch model to an EWC penalty and a last-layer Laplace approximation, with
the Fisher diagonal computed by `fisher compute` from the model exported to ONNX.

Steps (all seeded, a few seconds on a CPU):

1. train a small CNN with BatchNorm on synthetic 3×16×16 images (4 classes);
2. export it: torch.onnx.export(model.eval(), (x,), "model.onnx", dynamo=True, optimize=False)
   and save the inputs and labels with numpy (X.npy float32, y.npy int64);
3. run  fisher compute --model model.onnx --inputs X.npy --labels y.npy --variant true
        --form diag --out fisher.safetensors --force
   (the binary: $FISHER_BIN, else `fisher` on PATH, else `cargo run --release --` in this
   repository);
4. load the result with safetensors.torch.load_file: `diag.<name>` is the diagonal of the true
   Fisher F = (1/N) Σᵢ Jᵢᵀ (diag(pᵢ) − pᵢpᵢᵀ) Jᵢ for the parameter `<name>`, shaped like it;
5. check it against the same diagonal computed here with torch.func (float64), and print the
   largest relative difference per parameter tensor (max|Δ| / max|F|);
6. the EWC penalty Σ_name (F_name · (θ_name − θ*_name)²).sum() of a perturbed copy of the model
   (θ* = the trained parameters), and the loss λ/2 · penalty that one would add when training
   on a new task;
7. a last-layer diagonal Laplace approximation: posterior precision of `fc.weight`/`fc.bias`
   = N·F + prior precision, the predictive variance of each logit for a few new inputs, and the
   probit-approximated predictive probabilities next to the plain softmax.

Needs torch, onnx, onnxscript, numpy, safetensors. Usage:

    python3 examples/pytorch_ewc.py [--workdir pytorch_ewc_run] [--samples 256] [--epochs 4]
"""

import argparse
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.func import functional_call, jacrev, vmap

CLASSES = 4


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.fc(self.features(x))


def synthetic_data(n, gen):
    """Images = a class template (smooth random pattern) + noise."""
    templates = torch.nn.functional.interpolate(torch.randn(CLASSES, 3, 4, 4, generator=gen), size=(16, 16), mode="bilinear")
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    x = templates[y] + 0.8 * torch.randn(n, 3, 16, 16, generator=gen)
    return x.float(), y


def train(model, x, y, epochs, gen):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def fisher_command():
    if os.environ.get("FISHER_BIN"):
        return [os.environ["FISHER_BIN"]]
    if shutil.which("fisher"):
        return [shutil.which("fisher")]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return ["cargo", "run", "--quiet", "--release", "--manifest-path", os.path.join(repo, "Cargo.toml"), "--"]


def true_fisher_diag(model, x):
    """diag of (1/N) Σᵢ Jᵢᵀ (diag(pᵢ) − pᵢpᵢᵀ) Jᵢ per parameter, in float64 with torch.func."""
    m = SmallCNN().double()
    m.load_state_dict(model.state_dict())
    m.eval()
    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = {k: v.detach() for k, v in m.named_buffers()}
    x = x.double()

    def f(p, xi):
        return functional_call(m, (p, buffers), (xi.unsqueeze(0),)).squeeze(0)

    out = {}
    acc = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(0, len(x), 64):  # chunks: the Jacobian is N×C×P
        xb = x[i : i + 64]
        with torch.no_grad():
            p = torch.softmax(m(xb), 1)
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        jac = vmap(jacrev(f), in_dims=(None, 0))(params, xb)
        for k, j in jac.items():
            j = j.reshape(j.shape[0], j.shape[1], -1)
            acc[k] += torch.einsum("ick,icd,idk->k", j, h, j).reshape(params[k].shape)
    for k in params:
        out[k] = acc[k] / len(x)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="pytorch_ewc_run")
    ap.add_argument("--samples", type=int, default=256, help="samples the Fisher is computed on")
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    os.makedirs(args.workdir, exist_ok=True)
    path = lambda name: os.path.join(args.workdir, name)

    # 1. train
    x_train, y_train = synthetic_data(1024, gen)
    model = SmallCNN()
    t0 = time.perf_counter()
    acc = train(model, x_train, y_train, args.epochs, gen)
    print(f"trained SmallCNN ({sum(p.numel() for p in model.parameters())} parameters) in "
          f"{time.perf_counter() - t0:.1f} s, training accuracy {acc:.3f}")

    # 2. export and save the data the Fisher is computed on
    x, y = x_train[: args.samples], y_train[: args.samples]
    # The example input fixes the exported batch size; we pass the very inputs of the Fisher.
    torch.onnx.export(model.eval(), (x,), path("model.onnx"), dynamo=True, optimize=False)
    np.save(path("X.npy"), x.numpy().astype(np.float32))
    np.save(path("y.npy"), y.numpy().astype(np.int64))

    # 3. the Fisher diagonal
    cmd = fisher_command() + [
        "compute", "--model", path("model.onnx"), "--inputs", path("X.npy"), "--labels", path("y.npy"),
        "--variant", "true", "--form", "diag", "--out", path("fisher.safetensors"), "--force",
    ]
    print("$", " ".join(cmd))
    t0 = time.perf_counter()
    run = subprocess.run(cmd)
    if run.returncode != 0:
        sys.exit(f"fisher compute failed (exit status {run.returncode})")
    print(f"fisher compute: {time.perf_counter() - t0:.1f} s")

    # 4. load it
    fisher = load_file(path("fisher.safetensors"))
    missing = [k for k, _ in model.named_parameters() if f"diag.{k}" not in fisher]
    if missing:
        sys.exit(f"no diag.<name> for {missing}; the file has {sorted(fisher)}")
    F = {k: fisher[f"diag.{k}"].to(torch.float64) for k, _ in model.named_parameters()}
    for k, p in model.named_parameters():
        assert F[k].shape == p.shape, f"diag.{k} has shape {tuple(F[k].shape)}, the parameter {tuple(p.shape)}"

    # 5. agreement with torch.func
    ref = true_fisher_diag(model, x)
    print("\nagreement with torch.func (float64), max|Δ| / max|F| per parameter:")
    worst = 0.0
    for k in ref:
        r = ((F[k] - ref[k]).abs().max() / ref[k].abs().max()).item()
        worst = max(worst, r)
        print(f"  {k:28s} {tuple(ref[k].shape)!s:16s} {r:.2e}")
    print(f"  largest: {worst:.2e}" + ("  (float32 tool vs float64: fine)" if worst < 1e-4 else "  <-- LARGER THAN EXPECTED"))

    # 6. EWC
    theta_star = {k: p.detach().to(torch.float64).clone() for k, p in model.named_parameters()}
    perturbed = SmallCNN()
    perturbed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    penalty = sum((F[k] * (p.to(torch.float64) - theta_star[k]) ** 2).sum() for k, p in perturbed.named_parameters())
    lam = 100.0
    print(f"\nEWC: Σ F·(θ − θ*)² = {penalty.item():.6e} for θ = θ* + 0.01·N(0, 1); "
          f"λ/2 · penalty with λ = {lam:g}: {0.5 * lam * penalty.item():.6e}")

    # 7. last-layer Laplace
    n, prior = len(x), 1.0
    prec_w = n * F["fc.weight"] + prior
    prec_b = n * F["fc.bias"] + prior
    x_new, _ = synthetic_data(5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        phi = model.features(x_new).to(torch.float64)  # N×16
        mean = model.fc(model.features(x_new)).to(torch.float64)
    var = phi**2 @ (1.0 / prec_w).T + 1.0 / prec_b  # N×C: Var[w_c·φ + b_c] (diagonal posterior)
    probit = torch.softmax(mean / torch.sqrt(1.0 + math.pi / 8.0 * var), 1)
    print(f"\nlast-layer Laplace (posterior precision N·F + {prior:g}, N = {n}): logit variance, softmax → probit-approximated predictive")
    for i in range(len(x_new)):
        print(f"  input {i}: var {np.array2string(var[i].numpy(), precision=4)}  "
              f"p {np.array2string(torch.softmax(mean[i], 0).numpy(), precision=3)} → "
              f"{np.array2string(probit[i].numpy(), precision=3)}")


if __name__ == "__main__":
    main()
