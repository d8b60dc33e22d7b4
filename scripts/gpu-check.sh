#!/usr/bin/env bash
# One prepared run for a machine with a real GPU (e.g. a lent H100/H200 session with PyTorch
# + CUDA in its image): machine info, build, adapters, the GPU tests, `fisher bench` on the
# GPU next to the CPU path, the PyTorch peers on CUDA (benches/peers_cuda.py), and a summary
# (SYRK GFLOP/s against the GPU's FP32 peak; the engine's network times against BackPACK's).
#
# Everything goes under $OUT (default /tmp): gpu-check.log (all it prints), build.log,
# tests-gpu.log, bench-gpu.json (reduce full+diag and network diag+kfac, true Fisher),
# bench-gpu-empirical.json (network diag, empirical), bench-gpu-mc.json (network kfac, one
# MC label), bench-gpu-top.json (top-10 eigenvalues, smaller N), peers-cuda.json.
#
# Order: build, adapters, GPU tests, benches (reduce + network true, empirical, MC), the
# CUDA peers, top-10 eigenvalues (last: the least needed), summary.
# Every stage runs under `timeout`, cut to what is left of $BUDGET seconds for the whole run
# (default 500; $RESERVE of them kept for the summary), and a stage that fails or times out is
# reported and the run goes on; the last lines list every stage's outcome. Give the run
# itself a limit above $BUDGET (e.g. 600 s).
#
# Knobs (environment): OUT, BUDGET, N (network samples, 65536), TOP_N (samples of the top-10
# stage, 8192), SHAPES (4096x2048,16384x8192), REPEAT (3), PYTHON (the interpreter with torch),
# CARGO_FLAGS (e.g. --offline), GPU_SMS / GPU_MAX_MHZ (override the peak's inputs),
# SKIP_TESTS=1, SKIP_PEERS=1, PEERS_DEVICE (cuda; cpu for a dry run).
#
# `scripts/gpu-check.sh --summary` prints only the summary of the files already in $OUT.
set -uo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.." || exit 1
OUT=${OUT:-/tmp}
mkdir -p "$OUT"

BUDGET=${BUDGET:-500}
RESERVE=${RESERVE:-25}
N=${N:-65536}
TOP_N=${TOP_N:-8192}
SHAPES=${SHAPES:-4096x2048,16384x8192}
REPEAT=${REPEAT:-3}
NET=784,512,512,10
fisher=./target/release/fisher
STAGES=()

# The summary: a Python snippet over the JSON files in $OUT (any python3; torch only as a
# fallback for the SM count).
summary() {
  local py=${PYTHON:-python3}
  command -v "$py" >/dev/null || py=python
  "$py" - "$OUT" <<'PYEOF'
import json, os, re, subprocess, sys

out = sys.argv[1]

def load(name):
    path = os.path.join(out, name)
    try:
        with open(path) as f:
            text = f.read()
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # fisher bench prints one JSON line; anything else is noise
            return json.loads(next(l for l in text.splitlines() if l.startswith("{")))
    except (OSError, StopIteration, json.JSONDecodeError) as e:
        print(f"  ({name}: {type(e).__name__}: {e})" if not isinstance(e, FileNotFoundError) else f"  ({name}: missing)")
        return None

benches = {k: load(f) for k, f in [("true", "bench-gpu.json"), ("empirical", "bench-gpu-empirical.json"),
                                   ("mc", "bench-gpu-mc.json"), ("top", "bench-gpu-top.json")]}
peers = load("peers-cuda.json")
# the top-10 file's diag result (at its smaller N) rides along: only its top rows count
results = [r for k, doc in benches.items() if doc for r in doc.get("results", [])
           if k != "top" or "/top" in r.get("workload", "")]

def result(workload, backend):
    return next((r for r in results if r.get("workload") == workload and r.get("backend") == backend), None)

# --- the GPU's FP32 peak: SMs × FP32 lanes per SM × 2 (FMA) × max SM clock
name, mhz, cc, sms, sms_from = None, None, None, None, None
def smi(fields):
    try:
        q = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30)
        if q.returncode == 0 and q.stdout.strip():
            return [p.strip() for p in q.stdout.strip().splitlines()[0].split(",")]
    except (OSError, subprocess.SubprocessError):
        pass
    return None

try:
    name, mhz = smi("name,clocks.max.sm")
    mhz = float(mhz)
except (TypeError, ValueError):
    name, mhz = None, None
cc = (smi("compute_cap") or [None])[0]
if os.environ.get("GPU_MAX_MHZ"):
    mhz = float(os.environ["GPU_MAX_MHZ"])
h = (peers or {}).get("header", {})
if os.environ.get("GPU_SMS"):
    sms, sms_from = int(os.environ["GPU_SMS"]), "GPU_SMS"
elif h.get("multi_processor_count"):  # nvidia-smi has no SM-count field; peers_cuda.py asked torch
    sms, sms_from = int(h["multi_processor_count"]), "torch (peers-cuda.json)"
else:
    try:
        q = subprocess.run([sys.executable, "-c", "import torch; p = torch.cuda.get_device_properties(0); "
                            "print(p.multi_processor_count, p.major, p.minor, p.name)"],
                           capture_output=True, text=True, timeout=120)
        if q.returncode == 0 and q.stdout.strip():
            f = q.stdout.split()
            sms, sms_from, cc = int(f[0]), "torch", cc or f"{f[1]}.{f[2]}"
            name = name or " ".join(f[3:])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
if sms is None and name:
    table = [("H200", 132), ("H100 PCIe", 114), ("H100", 132), ("A100", 108), ("L40S", 142), ("L4", 58)]
    hit = next((v for k, v in table if k.lower() in name.lower()), None)
    if hit:
        sms, sms_from = hit, "table by name"
cc = cc or h.get("capability")
lanes = 64 if cc in ("7.0", "7.5", "8.0") else 128  # V100/T4/A100: 64 FP32 lanes per SM; Hopper, Ada, GA10x: 128
peak = sms * lanes * 2 * mhz * 1e6 if (sms and mhz) else None
def adapter_name(a):
    return f"{a.get('name')} [{a.get('api')}, {a.get('device_type')}, {a.get('driver')}]" if isinstance(a, dict) else str(a)

adapters = {adapter_name(d.get("adapter")) for d in benches.values() if d}
gpu_name = name or h.get("device_name") or "?"
print(f"GPU: {gpu_name}; " + (f"{sms} SMs ({sms_from}) × {lanes} FP32 lanes × 2 × {mhz:.0f} MHz max SM clock = "
      f"FP32 peak {peak / 1e12:.1f} TFLOP/s" if peak else f"FP32 peak unknown (SMs {sms}, max SM clock {mhz} MHz)"))
print(f"engine adapter: {'; '.join(sorted(adapters)) or '?'}")

def pct(g):
    return f"{100 * g * 1e9 / peak:.1f} %" if (peak and g) else "–"

def x(v):
    return f"{v:.2f}" if v else "–"

def s(v):
    return "–" if v is None else (f"{v * 1e3:.2f} ms" if v < 1 else f"{v:.3f} s")

peer_rows = (peers or {}).get("rows", [])

def peer(workload, name):
    return next((r for r in peer_rows if r.get("workload") == workload and r.get("peer") == name), None)

# --- reductions
shapes = sorted({r["workload"].split("/")[-1] for r in results if r.get("workload", "").startswith("reduce/full/")},
                key=lambda t: [int(v) for v in t.split("x")])
if shapes:
    print("\nSYRK F = GᵀG/N, GEMM-equivalent 2·N·P² flops (best of the repeats):\n")
    print("| N×P | engine GPU | GFLOP/s | of FP32 peak | engine CPU GFLOP/s | GPU speedup | cuBLAS torch.mm GFLOP/s (of peak) | engine time / cuBLAS |")
    print("|---|---|---|---|---|---|---|---|")
    for shp in shapes:
        wl = f"reduce/full/{shp}"
        g, c = result(wl, "gpu"), result(wl, "cpu")
        p = peer(wl, "torch_mm")
        pg = p.get("gflops_best") if p and p.get("status") == "ok" else None
        gg = g.get("gflops_best") if g else None
        ratio = f"{g['best_s'] / p['best_s']:.2f}" if (g and pg) else "–"
        cublas = f"{pg:.0f} ({pct(pg)})" if pg else (p or {}).get("status", "not run")
        speedup = x((g or {}).get("gpu_speedup"))
        cg = c.get("gflops_best") if c else None
        gpu_t = s(g["best_s"]) if g else "no GPU result"
        gg_s = f"{gg:.0f}" if gg else "–"
        cg_s = f"{cg:.0f}" if cg else "–"
        print(f"| {shp} | {gpu_t} | {gg_s} | {pct(gg)} | {cg_s} | {speedup} | {cublas} | {ratio} |")
    for shp in shapes:
        g, c = result(f"reduce/diag/{shp}", "gpu"), result(f"reduce/diag/{shp}", "cpu")
        if g or c:
            bw = f"; {g['samples'] * g['params'] * 4 / g['best_s'] / 1e9:.0f} GB/s of G read" if g else ""
            print(f"diag {shp}: GPU {s(g and g['best_s'])}, CPU {s(c and c['best_s'])} (memory-bound{bw})")

# --- network forms against the peers
net = [r for r in results if r.get("workload", "").startswith("network/") and "/top" not in r["workload"]]
order = {"diag/empirical": 0, "diag/true": 1, "kfac/true": 2, "kfac/mc1": 3}
wls = sorted({r["workload"] for r in net}, key=lambda w: order.get("/".join(w.split("/")[1:3]), 9))
backpack = {"diag/empirical": "backpack_sum_grad_squared", "diag/true": "backpack_diag_ggn_exact",
            "kfac/true": "backpack_kflr", "kfac/mc1": "backpack_kfac_mc1"}
if wls:
    data = ((peers or {}).get("header", {}).get("network") or {}).get("data", "no peers run")
    act = ", ".join(sorted({str((d.get("network") or {}).get("activation")) for d in benches.values() if d and d.get("network")}))
    print(f"\nNetwork Fisher (MLP {', '.join(sorted({w.split('/')[-1] for w in wls}))}, {act}); peers' data: {data}\n")
    dev = (peers or {}).get("header", {}).get("device", "cuda")
    print(f"| workload | engine GPU | engine CPU | GPU speedup | BackPACK ({dev}) | engine GPU / BackPACK | other peers ({dev}) |")
    print("|---|---|---|---|---|---|---|")
    for wl in wls:
        g, c = result(wl, "gpu"), result(wl, "cpu")
        key = "/".join(wl.split("/")[1:3])
        b = peer(wl, backpack.get(key, ""))
        bs = b["best_s"] if b and b.get("status") == "ok" else None
        if g and bs:
            r = g["best_s"] / bs
            ratio = f"**{r:.2f}** (engine {1 / r:.1f}× faster)" if r < 1 else f"**{r:.2f}** (BackPACK {r:.1f}× faster)"
        else:
            ratio = "–"
        bcell = f"{backpack.get(key)} {s(bs)}" if bs else (f"{backpack.get(key)}: {b.get('status')}" if b else "not run")
        others = "; ".join(f"{p['peer']} {s(p['best_s'])}" if p.get("status") == "ok" else f"{p['peer']}: {p.get('status')}"
                           for p in peer_rows if p.get("workload") == wl and p.get("peer") != backpack.get(key))
        print(f"| {wl} | {s(g and g['best_s'])} | {s(c and c['best_s'])} | {x((g or {}).get('gpu_speedup'))} | "
              f"{bcell} | {ratio} | {others or '–'} |")

if wls and peers:
    print("\n(engine times include its host↔device transfers; the peers' inputs stay on the device)")

top = [r for r in results if "/top" in r.get("workload", "")]
for wl in sorted({r["workload"] for r in top}):
    g, c = result(wl, "gpu"), result(wl, "cpu")
    print(f"\n{wl}: GPU {s(g and g['best_s'])}, CPU {s(c and c['best_s'])}" +
          f", GPU speedup {x((g or {}).get('gpu_speedup'))} (CPU time / GPU time)")

checks = (peers or {}).get("engine_check") or []
if checks:
    print("\ntr F, engine (`fisher compute` on the peers' files) vs the peers:")
    for e in checks:
        ps = [p for p in peer_rows if p.get("workload") == e.get("workload") and (p.get("check") or {}).get("trace")]
        got = f"{e['trace']:.6g}" if e.get("status") == "ok" and e.get("trace") is not None else e.get("status")
        print(f"- {e.get('workload')} ({e.get('backend')}): engine {got}; " +
              ("; ".join(f"{p['peer']} {p['check']['trace']:.6g}" for p in ps) or "no peer trace"))
PYEOF
}

if [[ ${1:-} == --summary ]]; then
  summary
  exit $?
fi

log=$OUT/gpu-check.log
exec > >(tee "$log") 2>&1
# No stale results from an earlier run in the summary (a skipped stage writes nothing).
rm -f "$OUT"/bench-gpu*.json "$OUT"/peers-cuda.json "$OUT"/peers-cuda.json.tmp "$OUT"/build.log \
  "$OUT"/tests-build.log "$OUT"/tests-gpu.log

# run_stage NAME SECONDS OUTFILE CMD...: CMD under `timeout`, its limit cut to what is left of
# the budget (skipped below 10 s); stdout to OUTFILE (stderr too with MERGE=1), or to the log
# when OUTFILE is "-". Records the outcome in STAGES and returns CMD's status.
run_stage() {
  local name=$1 want=$2 out=$3
  shift 3
  local left=$((BUDGET - SECONDS - RESERVE)) t=$want rc t0 what
  if ((left < t)); then t=$left; fi
  echo
  echo "== $name  [at ${SECONDS}s; limit ${t}s]"
  if ((t < 10)); then
    echo "stage $name: SKIPPED (the ${BUDGET}s budget is spent)"
    STAGES+=("$name: skipped (budget spent)")
    return 124
  fi
  t0=$SECONDS
  if [[ $out == - ]]; then
    timeout -k 10 "$t" "$@"
  elif [[ ${MERGE:-0} == 1 ]]; then
    timeout -k 10 "$t" "$@" >"$out" 2>&1
  else
    timeout -k 10 "$t" "$@" >"$out"
  fi
  rc=$?
  case $rc in
    0) what=ok ;;
    124 | 137) what="TIMED OUT (limit ${t}s)" ;;
    *) what="FAILED (exit $rc)" ;;
  esac
  echo "stage $name: $what in $((SECONDS - t0))s"
  STAGES+=("$name: $what, $((SECONDS - t0))s")
  return "$rc"
}

# One line per result of a `fisher bench --json` file.
digest() {
  python3 - "$1" <<'PYEOF' || echo "  (no results in $1)"
import json, sys
doc = json.loads(next(l for l in open(sys.argv[1]) if l.startswith("{")))
a = doc.get("adapter") or {}
print(f"  adapter: {a.get('name')} [{a.get('api')}, {a.get('device_type')}]; peak RSS "
      f"{(doc.get('peak_rss_bytes') or 0) / 2**20:.0f} MiB; set-up {doc.get('setup_s')}")
if a.get("device_type") == "Cpu":
    print("  WARNING: a software adapter, not the GPU (FISHER_ADAPTER=<name> picks another; see `fisher devices`)")
for r in doc.get("results", []):
    print(f"  {r['workload']:<46} {r['backend']:<4} best {r['best_s']:.4g} s  median {r['median_s']:.4g} s  "
          f"{r['gflops_best']:.0f} GFLOP/s" + (f"  GPU speedup {r['gpu_speedup']:.2f}" if r.get("gpu_speedup") else ""))
PYEOF
}

echo "== machine  [$(date -u '+%Y-%m-%d %H:%M:%S UTC'); budget ${BUDGET}s; OUT=$OUT]"
echo "cores: $(nproc)"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv 2>/dev/null || true
nvidia-smi --query-gpu=compute_cap,driver_version --format=csv 2>/dev/null || true
git log -1 --format='commit %h %s' 2>/dev/null; git status --short 2>/dev/null | head -20

# shellcheck disable=SC2086  # CARGO_FLAGS is a list of flags
MERGE=1 run_stage build 300 "$OUT/build.log" cargo build --release ${CARGO_FLAGS:-}
tail -3 "$OUT/build.log"
if [[ ! -x $fisher ]]; then
  echo "no $fisher: nothing else can run"
  exit 1
fi

run_stage adapters 30 - "$fisher" devices

# The GPU tests: every test whose path contains "gpu" in the suite (tests/suite/gpu.rs, the
# backend_test! bodies' `::gpu` cases, the CLI tests on the GPU) and in the library's unit
# tests (graph::gpu); under FISHER_REQUIRE_GPU=1 a missing adapter fails instead of skipping.
if [[ ${SKIP_TESTS:-0} != 1 ]]; then
  # shellcheck disable=SC2086
  MERGE=1 run_stage "build tests" 240 "$OUT/tests-build.log" cargo test --release ${CARGO_FLAGS:-} --lib --test suite --no-run
  tail -3 "$OUT/tests-build.log"
  # shellcheck disable=SC2086
  MERGE=1 run_stage "tests (gpu)" 240 "$OUT/tests-gpu.log" \
    env FISHER_REQUIRE_GPU=1 cargo test --release ${CARGO_FLAGS:-} --lib --test suite -- gpu
  grep -E "^running [0-9]+ tests|^test result" "$OUT/tests-gpu.log"
  grep -E "FAILED|panicked|^failures:|^    [a-z0-9_:]+$|SKIPPED|error(\[E[0-9]+\])?:" "$OUT/tests-gpu.log" | head -40
fi

# shellcheck disable=SC2054  # gpu,cpu is one argument
bench=("$fisher" bench --backend gpu,cpu --json --repeat "$REPEAT" --network "$NET" --activation relu)
run_stage "bench: reduce full/diag + network diag/kfac, true, N=$N" 180 "$OUT/bench-gpu.json" \
  "${bench[@]}" --shapes "$SHAPES" --forms full,diag --samples "$N" --variant true --net-forms diag,kfac \
  && digest "$OUT/bench-gpu.json"
run_stage "bench: network diag, empirical, N=$N" 90 "$OUT/bench-gpu-empirical.json" \
  "${bench[@]}" --shapes none --samples "$N" --variant empirical --net-forms diag \
  && digest "$OUT/bench-gpu-empirical.json"
run_stage "bench: network kfac, mc (1 label), N=$N" 90 "$OUT/bench-gpu-mc.json" \
  "${bench[@]}" --shapes none --samples "$N" --variant mc --mc-samples 1 --net-forms kfac \
  && digest "$OUT/bench-gpu-mc.json"

if [[ ${SKIP_PEERS:-0} != 1 ]]; then
  PY=
  for c in ${PYTHON:-} python3 python; do
    if command -v "$c" >/dev/null && "$c" -c 'import torch' 2>/dev/null; then PY=$c; break; fi
  done
  if [[ -z $PY ]]; then
    echo; echo "== peers: no python with torch found (set PYTHON)"; STAGES+=("peers (CUDA): no python with torch")
  else
    "$PY" -c 'import torch, importlib.metadata as m
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
for p in ["backpack-for-pytorch", "nngeometry", "curvlinops-for-pytorch", "safetensors"]:
    try: print(" ", p, m.version(p))
    except m.PackageNotFoundError: print(" ", p, "not installed")' || true
    run_stage "peers (CUDA)" 240 - "$PY" benches/peers_cuda.py --device "${PEERS_DEVICE:-cuda}" --repeat "$REPEAT" --n "$N" \
      --shapes "$SHAPES" --json "$OUT/peers-cuda.json" --engine-check gpu --fisher-bin "$fisher" --peer-timeout 90
  fi
fi

# Last, as the least needed: top-10 eigenvalues (Lanczos; every F·v product recomputes the forward pass): a smaller N, one
# timed call after the warm-up; diag rides along (--net-forms takes no empty list).
run_stage "bench: top-10 eigenvalues, true, N=$TOP_N" 150 "$OUT/bench-gpu-top.json" \
  "$fisher" bench --backend gpu,cpu --json --repeat 1 --network "$NET" --activation relu --shapes none \
  --samples "$TOP_N" --variant true --net-forms diag --top 10 --top-tol 1e-3 \
  && digest "$OUT/bench-gpu-top.json"

echo
echo "== summary  [at ${SECONDS}s]"
OUT=$OUT PYTHON=${PY:-${PYTHON:-python3}} timeout -k 5 90 bash "$self" --summary || echo "(the summary failed)"
echo
echo "== stages"
for s in "${STAGES[@]}"; do echo "  $s"; done
echo "total ${SECONDS}s; files in $OUT: gpu-check.log build.log tests-build.log tests-gpu.log bench-gpu*.json peers-cuda.json"
