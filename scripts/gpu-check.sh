#!/usr/bin/env bash
# One prepared run for a machine with a real GPU (e.g. a lent H100/H200 session): build,
# list adapters, run the whole test suite with the GPU required, then time the main kernels
# on the hardware adapter next to the CPU path. Everything it prints goes to $OUT/gpu-check.log
# when OUT is set. Budget: ~2 min build on 16 cores + ~3 min of runs.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${OUT:-/tmp}/gpu-check.log
exec > >(tee "$log") 2>&1

echo "== machine"; nproc; (nvidia-smi -L 2>/dev/null || true)
echo "== build"; time cargo build --release --all-targets 2>&1 | tail -3
fisher=./target/release/fisher
echo "== adapters"; $fisher devices
# Prefer the hardware adapter when several are listed (FISHER_ADAPTER picks by name).
echo "== tests on the GPU"; FISHER_REQUIRE_GPU=1 timeout 300 cargo test --release 2>&1 | grep -E "test result|FAILED|panicked" || true
echo "== reductions, GPU vs CPU (GEMM-equivalent flops 2·N·P²)"
for shape in 8192,2048 16384,4096; do
  for b in gpu cpu; do $fisher reduce --synthetic $shape --form full --backend $b --json 2>/dev/null | tail -1; done
done
echo "== network diag/kfac, 784-512-512-10 on 4096 samples"
for b in gpu cpu; do
  for f in diag kfac; do
    /usr/bin/time -f "%e s, %M KB peak" $fisher compute --synthetic-model 784,512,512,10 --synthetic-samples 4096 \
      --activation relu --variant true --form $f --backend $b --json 2>&1 | tail -2
  done
done
