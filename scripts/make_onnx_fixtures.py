#!/usr/bin/env python3
"""Writes the PyTorch → ONNX fixtures in tests/fixtures/onnx/<case>/ and their float64 references.

Every case directory holds

- `model.onnx` + `model.onnx.data`: exactly what
  `torch.onnx.export(model.eval(), (x,), path, dynamo=True, optimize=False)` writes for the
  float32 model (BatchNorm stays a node, the initializers keep the `named_parameters()` names).
  Two cases cover what that exporter never emits (see NOT_EMITTED and EXPORTS; the metadata key
  `onnx_export` says how each file was written): `torchscript_cnn` is written by the TorchScript
  exporter (`dynamo=False, do_constant_folding=False`: GlobalAveragePool, Flatten; a single
  file, no external data), `mlp_noops` is the dynamo export with an Identity and an inference
  Dropout node inserted by onnx.helper;
- `x.npy`: the inputs (float32, N × per-sample shape; int64 N×T tokens for `embed`);
- `y.npy`: int64 class labels (N,), or float32 N×k targets for the Gaussian case;
- `ref.safetensors`: float64 tensors computed from the same model in float64 (`model.double()`,
  eval mode) with torch.func (functional_call + vmap + jacrev):
    `logits` (N×C); `jacobian` (N×C×P, θ flat in named_parameters() order, each parameter
    row-major); `diag.true` (P) = diag of (1/N) Σᵢ Jᵢᵀ Hᵢ Jᵢ with Hᵢ = diag(p) − ppᵀ
    (categorical) or I (Gaussian); `diag.empirical` (P) = (1/N) Σᵢ gᵢ², gᵢ = ∇θ log p(yᵢ|xᵢ)
    (categorical: log_softmax at the label; Gaussian: −½‖y − μ‖²); `diag.true.<name>` and
    `diag.empirical.<name>` shaped like each parameter; for the Linear/Conv2d modules without
    groups `kfac.<module>.A` and `kfac.<module>.G` from curvlinops' KFACLinearOperator (the
    settings are in the metadata key `kfac`).
  Metadata (strings): parameter_names, parameter_shapes (JSON), likelihood, torch_version,
  onnx_export, onnx_op_types (the sorted node op types of the exported graph), onnx_features
  (attribute-level features such as `Conv[group>1]`), onnx_initializers (JSON: the
  initializer names in file order), cross_check (JSON: every independent route and its
  maximum relative difference), kfac (JSON: curvlinops settings and module list), seed,
  samples, classes.

Each exported graph is run in onnxruntime (when installed) and must reproduce the float64
logits to 1e-5 relative (metadata `onnxruntime_check`). The references are checked too: `diag.true` against (a) the expectation
of the squared score Σ_c p_c (∇θ log p_c)² computed by a plain torch.autograd.grad loop over
samples and classes (Gaussian: Σ_k (∇θ μ_k)²), (b) BackPACK DiagGGNExact where BackPACK
supports the model, (c) nngeometry FIM/PMatDiag where nngeometry supports it; `diag.empirical`
against (a) a torch.autograd.grad loop per sample and (b) BackPACK BatchGrad squared. Every
route that runs must agree to < 1e-6 relative (max |Δ| / max |ref| per parameter tensor),
or the script fails. Routes a peer does not support are recorded as "unsupported: <reason>".
Reruns write byte-identical files (seeded; ref.safetensors is written with a sorted header).

What the binding export (torch 2.15, onnxscript 0.7) was seen to write, which the importer
has to handle: opset 20; the input's batch dimension is static (N of the example x), and every
Reshape from a view/flatten gets a constant target [N, k] built by Concat of Constants
(allowzero 1); ReduceMean takes its axes from Reshape(Constant, [-1]); AdaptiveAvgPool2d(1)
becomes ReduceMean(axes [-1, -2], keepdims 1) and Flatten a Reshape; nn.Identity and eval
Dropout vanish; a Conv without bias gets a zero bias built by Shape(weight)[0:1] → Expand(
CastLike(0.0, x)); a Linear on a 3-D input becomes Transpose(weight) → MatMul → Add (2-D:
Gemm transB 1); Softplus(beta 1, threshold 20) becomes Where(Greater(x·β, 20), x,
Softplus(x·β)/β) with CastLike'd constants; LayerNorm stays LayerNormalization (axis −1,
stash_type 1) and GELU stays Gelu (approximate none/tanh); Embedding is Gather(weight, tokens);
initializers keep the named_parameters() names and order (a module's own parameters, like
ResMLP.scale, come first), followed by the BatchNorm running statistics (num_batches_tracked
is dropped). The TorchScript exporter names the input `input.1` and writes Softplus plainly.

Usage (needs torch, onnx, onnxscript, safetensors, numpy; optionally backpack-for-pytorch,
nngeometry, curvlinops-for-pytorch, onnxruntime, torchvision):

    python3 scripts/make_onnx_fixtures.py [--out tests/fixtures/onnx] [--cases mlp,cnn_bn,...]
"""

import argparse
import importlib.metadata
import re
import struct
import contextlib
import io
import copy
import json
import math
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vmap

import onnx
from safetensors.torch import load_file

EXPORT_CALL = "torch.onnx.export(model.eval(), (x,), path, dynamo=True, optimize=False)"
TOL = 1e-6

# Operators that some case must put into the exported graph (ONNX op types), and
# attribute-level features (see `onnx_features`).
REQUIRED_OPS = [
    "Gemm", "MatMul", "Add", "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
    "Flatten", "Reshape", "Transpose", "Concat", "Identity", "Dropout", "Relu", "LeakyRelu",
    "Tanh", "Sigmoid", "Gelu", "Erf", "Softplus", "Sub", "Mul", "Div", "BatchNormalization",
    "LayerNormalization", "Gather",
]
REQUIRED_FEATURES = [
    "Conv[stride>1]", "Conv[pads>0]", "Conv[dilation>1]", "Conv[group>1]", "Conv[depthwise]",
    "MaxPool[pads>0]", "MaxPool[ceil_mode]", "AveragePool[count_include_pad=0,pads>0]",
    "AveragePool[count_include_pad=1,pads>0]", "AveragePool[ceil_mode]", "Gelu[none]", "Gelu[tanh]",
]
# Operators the binding export command never emits, whatever the model: filled in from what
# the exporter was seen to do (see the module docs of each case). A required operator missing
# from every case and not explained here fails the script.
NOT_EMITTED = {
    "GlobalAveragePool": "AdaptiveAvgPool2d(1) is exported as ReduceMean(axes [-1, -2], keepdims 1) "
    "(covered by the TorchScript-exported case torchscript_cnn)",
    "Flatten": "nn.Flatten / torch.flatten are exported as Reshape to a constant [N, k] (batch baked in) "
    "(covered by torchscript_cnn)",
    "Identity": "nn.Identity is traced away (covered by the edited case mlp_noops)",
    "Dropout": "nn.Dropout in eval mode is traced away (covered by the edited case mlp_noops)",
}


def pkg_version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def error_text(e):
    """One line of an exception, without object addresses (so that reruns write the same bytes)."""
    msg = str(e).splitlines()[0] if str(e) else ""
    return re.sub(r" at 0x[0-9a-f]+", "", f"unsupported: {type(e).__name__}: {msg}")[:300]


def save_safetensors(tensors, path, metadata):
    """safetensors with a deterministic header (tensors and metadata sorted by name): the
    safetensors library writes the metadata in hash order, so reruns would differ byte-wise.
    Readable by safetensors.torch.load_file like any other file."""
    header, blobs, off = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.float64).contiguous()
        data = t.numpy().astype("<f8").tobytes()
        header[name] = {"dtype": "F64", "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


# --------------------------------------------------------------------------------------------
# The cases


class MLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 5))


class CnnBn(nn.Sequential):
    def __init__(self):
        super().__init__(
            nn.Conv2d(3, 6, 3, stride=1, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, dilation=2, padding=2, stride=2),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 10),
        )


class Convs(nn.Module):
    """4×11×11 → depthwise 3×3 → LeakyReLU → grouped 3×3 (groups 2) → LeakyReLU →
    MaxPool(2, ceil) 6×6 → AvgPool(3, s2, p1, count_include_pad, ceil) 4×4 (its last window
    hangs past the padding: PyTorch divides by the part inside input+padding) →
    AvgPool(3, s2, p1, not count_include_pad) 2×2 → mean over H, W → Linear → 5."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.act1 = nn.LeakyReLU(0.1)
        self.gconv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.act2 = nn.LeakyReLU(0.2)
        self.mpool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.apool_incl = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=True)
        self.apool_excl = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.act1(self.dw(x))
        h = self.act2(self.gconv(h))
        h = self.apool_excl(self.apool_incl(self.mpool(h)))
        return self.fc(h.mean((2, 3)))


class ResMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.ln1 = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 16)
        self.gelu = nn.GELU()
        self.drop = nn.Dropout(0.25)
        self.ln2 = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16)
        self.gelu_tanh = nn.GELU(approximate="tanh")
        self.scale = nn.Parameter(torch.zeros(16))
        self.ident = nn.Identity()
        self.softplus = nn.Softplus()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.drop(self.gelu(self.fc1(self.ln1(h))))  # residual Add, Dropout (eval)
        g = self.gelu_tanh(self.fc2(self.ln2(h)))
        h = h + 0.5 * g * self.scale  # Mul by a constant and a parameter vector (used directly: a
        # function of a parameter before it meets the data, e.g. torch.sigmoid(self.scale), is refused)
        h = torch.sigmoid(h) * torch.tanh(h) - 0.1  # Sigmoid, Tanh, Mul of tensors, Sub a constant
        h = self.softplus(self.ident(h)) / 2.0  # Div by a constant
        h = h * self.scale - h  # Mul by the parameter vector, Sub of tensors
        return self.head(h)


class Embed(nn.Module):
    """tokens N×7 → Embedding(11, 6) → Linear on N×7×6 (MatMul + Add) → Tanh →
    [mean over tokens (8)] ⧺ [transpose → N×8×7 → Linear(7, 2) → reshape N×16] → Linear → 3."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 8)
        self.mix = nn.Linear(7, 2)
        self.head = nn.Linear(24, 3)

    def forward(self, tokens):
        h = torch.tanh(self.proj(self.emb(tokens)))  # N×7×8
        a = h.mean(1)  # N×8
        b = self.mix(h.transpose(1, 2)).reshape(h.shape[0], 16)  # N×8×2 → N×16
        return self.head(torch.cat([a, b], dim=1))


class ErfGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 12)
        self.shift = nn.Parameter(torch.zeros(12))
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        h = (self.fc1(x) - self.shift) / 1.5
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        return self.fc2(h)


def resnet_small():
    from torchvision.models.resnet import BasicBlock

    class ResNetSmall(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)
            self.layer1 = nn.Sequential(BasicBlock(4, 4))
            down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
            self.layer2 = nn.Sequential(BasicBlock(4, 8, stride=2, downsample=down))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.layer2(self.layer1(x))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNetSmall()


class Gaussian(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


class TorchscriptCnn(nn.Sequential):
    """Exported with the TorchScript exporter instead (see EXPORTS): it writes the
    GlobalAveragePool and Flatten nodes that the dynamo exporter never emits."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(3, 5, 3, stride=2, padding=1),
            nn.BatchNorm2d(5),
            nn.Sigmoid(),
            nn.Conv2d(5, 6, 3, padding=1, bias=False),
            nn.Softplus(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 4),
        )


# name: (constructor, N, per-sample input, likelihood, classes or outputs)
CASES = {
    "mlp": (MLP, 8, (7,), "categorical", 5),
    "cnn_bn": (CnnBn, 6, (3, 12, 12), "categorical", 10),
    "convs": (Convs, 6, (4, 11, 11), "categorical", 5),
    "resmlp": (ResMLP, 8, (12,), "categorical", 4),
    "embed": (Embed, 6, ("tokens", 7, 11), "categorical", 3),
    "erf_gelu": (ErfGelu, 8, (5,), "categorical", 3),
    "resnet_small": (resnet_small, 4, (3, 8, 8), "categorical", 10),
    "gaussian": (Gaussian, 8, (4,), "gaussian", 3),
    "mlp_noops": (MLP, 6, (7,), "categorical", 5),
    "torchscript_cnn": (TorchscriptCnn, 5, (3, 9, 9), "categorical", 4),
}

# Cases not written by the binding export command alone, and how they are written instead.
EXPORTS = {
    "mlp_noops": EXPORT_CALL + "; then onnx.helper inserts an Identity after the first Gemm and a "
    "Dropout (ratio 0.25, training_mode false: a no-op at inference) after the Relu, because no "
    "exporter emits these for a model in eval mode; the reference is the unedited model's",
    "torchscript_cnn": "torch.onnx.export(model.eval(), (x,), path, dynamo=False, do_constant_folding=False) "
    "(the TorchScript exporter: it writes GlobalAveragePool and Flatten, which the dynamo exporter "
    "decomposes into ReduceMean and Reshape)",
}


def randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Random weights large enough that ReLUs and pools see both signs, and non-trivial
    BatchNorm/LayerNorm affine parameters and running statistics."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)):
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=gen))
                mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=gen))
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.copy_(0.5 * torch.randn(mod.running_mean.shape, generator=gen))
                    mod.running_var.copy_(0.5 + 1.5 * torch.rand(mod.running_var.shape, generator=gen))
                    mod.num_batches_tracked.fill_(10)
            elif isinstance(mod, (nn.Linear, nn.Conv2d)):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * (1.5 / math.sqrt(fan_in)))
                if mod.bias is not None:
                    mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=gen))
            elif isinstance(mod, nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen))
        for name, p in model.named_parameters(recurse=False):
            p.copy_(0.5 + torch.rand(p.shape, generator=gen))  # scale / shift vectors


# --------------------------------------------------------------------------------------------
# References


def flat_params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def per_sample_jacobian(model64, x64):
    """N×C×P Jacobian of the outputs w.r.t. θ (named_parameters order, row-major)."""
    params = flat_params(model64)
    buffers = {k: v.detach() for k, v in model64.named_buffers()}

    def f(p, xi):
        return functional_call(model64, (p, buffers), (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x64)
    n = x64.shape[0]
    blocks = [jac[k].reshape(n, jac[k].shape[1], -1) for k in params]
    return torch.cat(blocks, dim=2)


def empirical_grads_func(model64, x64, y, likelihood):
    """N×P per-sample ∇θ log p(yᵢ|xᵢ) with torch.func.grad (one route)."""
    params = flat_params(model64)
    buffers = {k: v.detach() for k, v in model64.named_buffers()}

    def logp(p, xi, yi):
        out = functional_call(model64, (p, buffers), (xi.unsqueeze(0),)).squeeze(0)
        if likelihood == "categorical":
            return torch.gather(torch.log_softmax(out, 0), 0, yi.reshape(1)).squeeze(0)
        return -0.5 * ((yi - out) ** 2).sum()

    g = vmap(torch.func.grad(logp), in_dims=(None, 0, 0))(params, x64, y)
    return torch.cat([g[k].reshape(x64.shape[0], -1) for k in params], dim=1)


def autograd_loop(model64, x64, y, likelihood):
    """The independent route: plain torch.autograd.grad, one sample (and one class) at a time.
    Returns (diag_true, diag_empirical), each P, with diag_true = (1/N) Σᵢ Σ_c p_c (∇ log p_c)²
    (categorical) or (1/N) Σᵢ Σ_k (∇ μ_k)² (Gaussian)."""
    params = list(model64.parameters())
    n = x64.shape[0]
    dt, de = 0, 0
    for i in range(n):
        out = model64(x64[i : i + 1])[0]
        if likelihood == "categorical":
            logp = torch.log_softmax(out, 0)
            prob = logp.exp().detach()
            for c in range(out.shape[0]):
                g = torch.autograd.grad(logp[c], params, retain_graph=True)
                g = torch.cat([t.reshape(-1) for t in g])
                dt = dt + prob[c] * g**2
                if c == int(y[i]):
                    de = de + g**2
        else:
            for k in range(out.shape[0]):
                g = torch.autograd.grad(out[k], params, retain_graph=True)
                dt = dt + torch.cat([t.reshape(-1) for t in g]) ** 2
            ll = -0.5 * ((y[i] - out) ** 2).sum()
            g = torch.autograd.grad(ll, params)
            de = de + torch.cat([t.reshape(-1) for t in g]) ** 2
    return dt / n, de / n


def rel_diff(a, b, names, shapes):
    """max over parameter tensors of max|a − b| / max|b| (b the reference). `a` is a flat P
    vector or a dict name → flat tensor covering some of the parameters.
    Returns (worst, number of parameters compared)."""
    worst, off, seen = 0.0, 0, 0
    for name, shape in zip(names, shapes):
        k = int(np.prod(shape)) if len(shape) else 1
        db = b[off : off + k]
        off += k
        if isinstance(a, dict):
            if name not in a:
                continue
            da = a[name]
        else:
            da = a[off - k : off]
        seen += k
        da = da.detach().double()
        scale = db.abs().max().item()
        diff = (da - db).abs().max().item()
        if scale == 0.0:
            r = 0.0 if diff == 0.0 else float("inf")
        else:
            r = diff / scale
        worst = max(worst, r)
    return worst, seen


def loss_fn(likelihood):
    return nn.CrossEntropyLoss(reduction="sum") if likelihood == "categorical" else nn.MSELoss(reduction="sum")


@contextlib.contextmanager
def default_f64():
    """The peers create some tensors with the default dtype (BackPACK's BatchNorm, nngeometry's
    classif_logits factor, which also adds torch.finfo().eps): run them with float64 as default."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def backpack_routes(model64, x64, y, likelihood):
    """BackPACK DiagGGNExact (→ diag.true) and BatchGrad² (→ diag.empirical), as flat P vectors,
    or the exception text where BackPACK refuses the model."""
    out = {}
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad, DiagGGNExact
    except Exception as e:  # pragma: no cover
        return {"diag.true": f"unsupported: import: {e}", "diag.empirical": f"unsupported: import: {e}"}
    n = x64.shape[0]
    # MSELoss(sum) = Σ‖y − μ‖²: its Hessian is 2I and its per-sample gradient is −2 Jᵀ(y − μ).
    ggn_scale = 1.0 / n if likelihood == "categorical" else 1.0 / (2 * n)
    grad_scale = 1.0 if likelihood == "categorical" else 0.5
    for key, ext in (("diag.true", DiagGGNExact), ("diag.empirical", BatchGrad)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = extend(copy.deepcopy(model64), use_converter=not isinstance(model64, nn.Sequential))
                lf = extend(loss_fn(likelihood))
                m.eval()
                m.zero_grad()
                loss = lf(m(x64), y)
                with backpack(ext()):
                    loss.backward()
            if key == "diag.true":
                v = torch.cat([p.diag_ggn_exact.reshape(-1) for p in m.parameters()]) * ggn_scale
            else:
                v = torch.cat([(grad_scale * p.grad_batch).reshape(n, -1) for p in m.parameters()], 1)
                v = (v**2).mean(0)
            out[key] = v
        except Exception as e:
            out[key] = error_text(e)
    return out


def nngeometry_route(model64, x64, y, likelihood, n_out):
    """nngeometry FIM with PMatDiag (→ diag.true) over the modules nngeometry supports
    (Linear, Conv2d without groups, BatchNorm, LayerNorm): a dict parameter name → flat
    diagonal, or the exception text. nngeometry 0.4 sizes a grouped Conv2d as if groups = 1
    and refuses Embedding; free parameters (not in a module) are not seen by it."""
    try:
        from nngeometry.layercollection import LayerCollection
        from nngeometry.metrics import FIM
        from nngeometry.object import PMatDiag
        from torch.utils.data import DataLoader, TensorDataset

        m = copy.deepcopy(model64).eval()
        lc = LayerCollection()
        for name, mod in m.named_modules():
            if type(mod).__name__ in LayerCollection._known_modules:
                if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                    continue
                lc.add_layer(name, LayerCollection._module_to_layer(mod))
        if not lc.layers:
            return "unsupported: no module nngeometry supports"
        loader = DataLoader(TensorDataset(x64, y), batch_size=x64.shape[0])
        variant = "classif_logits" if likelihood == "categorical" else "regression"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fim = FIM(model=m, loader=loader, representation=PMatDiag, variant=variant, device="cpu",
                      layer_collection=lc)
        v = fim.get_diag().detach().to(torch.float64)
        l2m, _ = lc.get_layerid_module_maps(m)
        out, off = {}, 0
        for name, p in lc.named_parameters(l2m):
            out[name] = v[off : off + p.numel()]
            off += p.numel()
        assert off == v.numel()
        # nngeometry's regression FIM is for ½‖y − μ‖²: Jᵀ J, as ours.
        return out
    except Exception as e:
        return error_text(e)


def kfac_factors(model64, x64, y, likelihood):
    """curvlinops KFACLinearOperator factors for every Linear / Conv2d (groups 1) module.
    Returns (tensors, settings) or ({}, {"unsupported": reason})."""
    mods = [
        (name, mod)
        for name, mod in model64.named_modules()
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)
    ]
    if not mods:
        return {}, {"modules": [], "note": "no Linear/Conv2d module with groups 1"}
    try:
        import curvlinops
        from curvlinops import KFACLinearOperator
    except Exception as e:
        return {}, {"unsupported": f"import: {e}"}
    params = [p for _, mod in mods for p in mod.parameters()]
    settings = {
        "library": f"curvlinops-for-pytorch {pkg_version('curvlinops-for-pytorch')}",
        "class": "KFACLinearOperator",
        "fisher_type": "type-2",
        "kfac_approx": "expand",
        "loss_func": "CrossEntropyLoss(reduction='sum')" if likelihood == "categorical" else "MSELoss(reduction='sum')",
        "separate_weight_and_bias": False,
        "data": "one batch: all N samples",
        "dtype": "float64",
        "modules": [name for name, _ in mods],
        "relation_to_ours": (
            "curvlinops (reduction sum, expand): A = Σ_{n,s} ããᵀ / (N·S), G = Σ_{n,s} Σ_c (L_c-weighted δ)(δ)ᵀ "
            "with S the weight-sharing positions (1 for a Linear on N×in, T for N×T×in, H_out·W_out for Conv2d) "
            "and ã = [a; 1] for modules with a bias (separate_weight_and_bias False). For a Linear on N×in: "
            "A equals ours; G = N·G_ours"
            + (" (categorical)" if likelihood == "categorical" else "; MSELoss(sum) has Hessian 2I, so G = 2N·G_ours (unit-variance Gaussian)")
        ),
    }
    try:
        kw = dict(
            fisher_type="type-2",
            kfac_approx="expand",
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            op = KFACLinearOperator(model64, loss_fn(likelihood), params, [(x64, y)], **kw)
            if hasattr(op, "compute_kronecker_factors"):
                op.compute_kronecker_factors()
        ins = getattr(op, "_input_covariances", None) or getattr(op, "input_covariances", None)
        grads = getattr(op, "_gradient_covariances", None) or getattr(op, "gradient_covariances", None)
        tensors = {}
        for name, _ in mods:
            tensors[f"kfac.{name}.A"] = ins[name].detach().to(torch.float64)
            tensors[f"kfac.{name}.G"] = grads[name].detach().to(torch.float64)
        return tensors, settings
    except Exception as e:
        settings["unsupported"] = error_text(e)
        return {}, settings


# --------------------------------------------------------------------------------------------
# ONNX inspection


def onnx_ops_and_features(path):
    m = onnx.load(path, load_external_data=False)
    ops, feats = set(), set()

    def attrs(node):
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def visit(graph):
        for node in graph.node:
            ops.add(node.op_type)
            a = attrs(node)
            for v in a.values():
                if isinstance(v, onnx.GraphProto):
                    visit(v)
            if node.op_type == "Conv":
                if any(s > 1 for s in a.get("strides", [])):
                    feats.add("Conv[stride>1]")
                if any(p > 0 for p in a.get("pads", [])):
                    feats.add("Conv[pads>0]")
                if any(d > 1 for d in a.get("dilations", [])):
                    feats.add("Conv[dilation>1]")
                if a.get("group", 1) > 1:
                    feats.add("Conv[group>1]")
                    w = next((i for i in m.graph.initializer if i.name == node.input[1]), None)
                    if w is not None and w.dims[1] == 1:
                        feats.add("Conv[depthwise]")
            if node.op_type in ("MaxPool", "AveragePool"):
                padded = any(p > 0 for p in a.get("pads", []))
                if padded and node.op_type == "MaxPool":
                    feats.add("MaxPool[pads>0]")
                if a.get("ceil_mode", 0):
                    feats.add(f"{node.op_type}[ceil_mode]")
                if node.op_type == "AveragePool" and padded:
                    feats.add(f"AveragePool[count_include_pad={a.get('count_include_pad', 0)},pads>0]")
            if node.op_type == "Gelu":
                appr = a.get("approximate", b"none")
                feats.add(f"Gelu[{appr.decode() if isinstance(appr, bytes) else appr}]")

    visit(m.graph)
    for fn in m.functions:
        for node in fn.node:
            ops.add(node.op_type)
    inits = [i.name for i in m.graph.initializer]
    return sorted(ops), sorted(feats), inits, m


def onnxruntime_check(path, x, logits64):
    """Runs the exported graph in onnxruntime (float32) and compares its outputs with the float64
    PyTorch logits: the graph must compute what PyTorch computes (pool divisors, ceil_mode, ...).
    Fails above 1e-5 relative; returns the figure, or a note when onnxruntime is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "not run: onnxruntime missing"
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    r = float(np.abs(out.astype(np.float64) - logits64.numpy()).max() / np.abs(logits64.numpy()).max())
    if not r < 1e-5:
        raise SystemExit(f"ONNXRUNTIME CHECK FAILED for {path}: max|Δ|/max|logits| = {r:.3e}")
    return f"onnxruntime {ort.__version__} (float32) vs the float64 logits: max|Δ|/max|logits| = {r:.3e}"


def insert_noops(path):
    """Identity after the first Gemm, Dropout (inference) after the first Relu; the initializers
    stay in model.onnx.data (only the graph is rewritten)."""
    from onnx import TensorProto, helper

    m = onnx.load(path, load_external_data=False)
    g = m.graph

    def splice(op_type, after, extra_inputs=(), extra_nodes=()):
        idx = next(i for i, n in enumerate(g.node) if n.op_type == after)
        src = g.node[idx].output[0]
        new = src + "_" + op_type.lower()
        for n in g.node:
            for j, inp in enumerate(n.input):
                if inp == src:
                    n.input[j] = new
        for o in g.output:
            if o.name == src:
                o.name = new
        node = helper.make_node(op_type, [src, *extra_inputs], [new], name=new)
        for k, extra in enumerate(extra_nodes):
            g.node.insert(idx + 1 + k, extra)
        g.node.insert(idx + 1 + len(extra_nodes), node)

    splice("Identity", "Gemm")
    ratio = helper.make_node("Constant", [], ["dropout_ratio"], value=helper.make_tensor("r", TensorProto.FLOAT, [], [0.25]))
    mode = helper.make_node("Constant", [], ["dropout_training_mode"], value=helper.make_tensor("t", TensorProto.BOOL, [], [False]))
    splice("Dropout", "Relu", ["dropout_ratio", "dropout_training_mode"], [ratio, mode])
    onnx.save(m, path)
    onnx.checker.check_model(path)


# --------------------------------------------------------------------------------------------


def make_case(name, out_dir, seed):
    ctor, n, shape, likelihood, n_out = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ctor()
    randomize(model, gen)
    model.eval()
    if shape[0] == "tokens":
        _, t, vocab = shape
        x = torch.randint(0, vocab, (n, t), generator=gen, dtype=torch.int64)
    else:
        x = torch.randn((n,) + tuple(shape), generator=gen, dtype=torch.float32)
    with torch.no_grad():
        logits32 = model(x)
    if likelihood == "categorical":
        y = torch.randint(0, n_out, (n,), generator=gen, dtype=torch.int64)
    else:
        y = (logits32 + 0.5 * torch.randn(logits32.shape, generator=gen)).to(torch.float32)

    # ---- export (binding command) ----
    case_dir = os.path.join(out_dir, name)
    os.makedirs(case_dir, exist_ok=True)
    path = os.path.join(case_dir, "model.onnx")
    for stale in (path, path + ".data"):
        if os.path.exists(stale):
            os.remove(stale)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if name == "torchscript_cnn":
            torch.onnx.export(model.eval(), (x,), path, dynamo=False, do_constant_folding=False)
        else:
            torch.onnx.export(model.eval(), (x,), path, dynamo=True, optimize=False)
    if name == "mlp_noops":
        insert_noops(path)
    ops, feats, inits, onnx_model = onnx_ops_and_features(path)
    np.save(os.path.join(case_dir, "x.npy"), x.numpy())
    np.save(os.path.join(case_dir, "y.npy"), y.numpy())

    # ---- float64 references ----
    model64 = copy.deepcopy(model).double().eval()
    x64 = x if x.dtype == torch.int64 else x.double()
    y64 = y if likelihood == "categorical" else y.double()
    names = [k for k, _ in model64.named_parameters()]
    shapes = [list(p.shape) for _, p in model64.named_parameters()]
    P = sum(int(np.prod(s)) for s in shapes)
    with torch.no_grad():
        logits = model64(x64)
    assert torch.allclose(logits.float(), logits32, rtol=1e-4, atol=1e-5), "f32 and f64 outputs disagree"
    ort_check = onnxruntime_check(path, x, logits)
    jac = per_sample_jacobian(model64, x64)  # N×C×P
    assert jac.shape == (n, n_out, P), jac.shape
    if likelihood == "categorical":
        p = torch.softmax(logits, 1)
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        diag_true = torch.einsum("ick,icd,idk->k", jac, h, jac) / n
        resid = F.one_hot(y, n_out).double() - p  # ∇_logits log p(y)
    else:
        diag_true = torch.einsum("ick,ick->k", jac, jac) / n
        resid = y64 - logits
    g_jac = torch.einsum("ick,ic->ik", jac, resid)  # Jᵢᵀ ∇_out log p
    g_func = empirical_grads_func(model64, x64, y64, likelihood)
    diag_emp = (g_func**2).mean(0)

    # ---- cross-checks ----
    checks = {
        "definition": "max over parameter tensors of max|route − ref| / max|ref|; ref = the stored tensor",
        "versions": f"backpack-for-pytorch {pkg_version('backpack-for-pytorch')}, nngeometry {pkg_version('nngeometry')}",
    }
    results = {}
    lt, le = autograd_loop(model64, x64, y64, likelihood)
    results["diag.true"] = {
        "torch.autograd.grad loop, " + ("Σ_c p_c (∇ log p_c)²" if likelihood == "categorical" else "Σ_k (∇ μ_k)²"): lt
    }
    results["diag.empirical"] = {
        "torch.autograd.grad loop per sample": le,
        "Jᵀ(∇_out log p) from the stored jacobian": (g_jac**2).mean(0),
    }
    with default_f64():
        bp = backpack_routes(model64, x64, y64, likelihood)
        ng = nngeometry_route(model64, x64, y64, likelihood, n_out)
    results["diag.true"]["BackPACK DiagGGNExact (loss sum, /N" + (")" if likelihood == "categorical" else "/2)")] = bp["diag.true"]
    results["diag.empirical"]["BackPACK BatchGrad squared, mean over samples"] = bp["diag.empirical"]
    results["diag.true"]["nngeometry FIM PMatDiag"] = ng
    failures = []
    for key, ref in (("diag.true", diag_true), ("diag.empirical", diag_emp)):
        checks[key] = {}
        for route, v in results[key].items():
            if isinstance(v, str):
                checks[key][route] = v
                continue
            r, seen = rel_diff(v, ref, names, shapes)
            checks[key][route] = f"{r:.3e}" + ("" if seen == ref.numel() else f" (on the {seen} of {ref.numel()} parameters it covers)")
            if not r < TOL:
                failures.append(f"{name}: {key} vs {route}: {r:.3e}")
    if failures:
        raise SystemExit("CROSS-CHECK FAILED:\n  " + "\n  ".join(failures))
    ran = sum(not isinstance(v, str) for key in results for v in results[key].values())

    kfac, kfac_settings = kfac_factors(model64, x64, y64, likelihood)

    # ---- write ----
    tensors = {
        "logits": logits,
        "jacobian": jac,
        "diag.true": diag_true,
        "diag.empirical": diag_emp,
    }
    off = 0
    for k, s in zip(names, shapes):
        cnt = int(np.prod(s)) if s else 1
        tensors[f"diag.true.{k}"] = diag_true[off : off + cnt].reshape(s)
        tensors[f"diag.empirical.{k}"] = diag_emp[off : off + cnt].reshape(s)
        off += cnt
    tensors.update(kfac)
    meta = {
        "parameter_names": json.dumps(names),
        "parameter_shapes": json.dumps(shapes),
        "likelihood": likelihood,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnx_export": EXPORTS.get(name, EXPORT_CALL),
        "onnx_opset": str(next((o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")), "?")),
        "onnx_op_types": json.dumps(ops),
        "onnx_features": json.dumps(feats),
        "onnx_initializers": json.dumps(inits),
        "cross_check": json.dumps(checks, ensure_ascii=False),
        "kfac": json.dumps(kfac_settings),
        "onnxruntime_check": ort_check,
        "seed": str(seed),
        "samples": str(n),
        "classes" if likelihood == "categorical" else "outputs": str(n_out),
        "input": "int64 tokens N×T" if x.dtype == torch.int64 else "float32 N×" + "×".join(map(str, shape)),
        "reference": "float64: model.double().eval(), torch.func functional_call + vmap + jacrev",
    }
    save_safetensors(tensors, os.path.join(case_dir, "ref.safetensors"), meta)
    back = load_file(os.path.join(case_dir, "ref.safetensors"))
    assert all(torch.equal(back[k], tensors[k].detach().double()) for k in tensors), "safetensors round trip"
    missing = [k for k in names if k not in inits]
    size = sum(os.path.getsize(os.path.join(case_dir, f)) for f in os.listdir(case_dir))
    print(f"{name:13s} N={n} C={n_out} P={P:5d} {size/1024:7.1f} KiB  routes checked: {ran}")
    print(f"    {ort_check}")
    for key in ("diag.true", "diag.empirical"):
        for route, v in checks[key].items():
            print(f"    {key:15s} {route}: {v}")
    if kfac_settings.get("unsupported"):
        print(f"    kfac: unsupported: {kfac_settings['unsupported']}")
    if missing:
        print(f"    NOTE: parameters not found as initializers: {missing}")
    return ops, feats, inits, names


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "onnx"))
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    names = [c for c in args.cases.split(",") if c]
    coverage = {}
    for i, name in enumerate(names):
        ops, feats, inits, params = make_case(name, args.out, seed=1000 + list(CASES).index(name))
        coverage[name] = set(ops) | set(feats)
    all_keys = sorted(set().union(*coverage.values()) | set(REQUIRED_OPS) | set(REQUIRED_FEATURES))
    print()
    print("| op / feature | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for k in all_keys:
        mark = "" if (k not in REQUIRED_OPS and k not in REQUIRED_FEATURES) else " (req)"
        print(f"| {k}{mark} | " + " | ".join("x" if k in coverage[c] else "" for c in names) + " |")
    if set(names) == set(CASES):
        missing = [k for k in REQUIRED_OPS + REQUIRED_FEATURES if not any(k in coverage[c] for c in names)]
        unexplained = [k for k in missing if k not in NOT_EMITTED]
        print()
        for k, why in NOT_EMITTED.items():
            print(f"never emitted by {EXPORT_CALL}: {k}: {why}")
        if unexplained:
            raise SystemExit(f"COVERAGE FAILED: no case covers {unexplained}")


if __name__ == "__main__":
    main()
