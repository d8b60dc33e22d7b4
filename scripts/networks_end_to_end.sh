#!/usr/bin/env bash
# The end-to-end network runs through the file path, with wall time and peak memory:
#   full for a 64-32-10 tanh MLP on 1,797 samples,
#   diag and kfac for a 784-512-512-10 relu MLP on 4,096 samples (variant: true, the default).
# The models and data are seeded synthetic ones written first with --save-model/--save-data,
# so nothing has to be prepared; the runs then read them back like any PyTorch export.
#
# Usage: scripts/networks_end_to_end.sh [WORKDIR] [BACKENDS...]   (default: a temp dir, gpu cpu)
# Environment: FISHER (the binary; default target/release/fisher), EXTRA (more flags, e.g. --verify).
# Needs GNU time (/usr/bin/time; `apt-get install time`). Prints one line per run:
#   backend form model wall_s max_rss_MiB
set -euo pipefail
FISHER=${FISHER:-target/release/fisher}
WORK=${1:-$(mktemp -d)}
shift || true
BACKENDS=("$@")
[ ${#BACKENDS[@]} -eq 0 ] && BACKENDS=(gpu cpu)
[ -x /usr/bin/time ] || { echo "needs GNU time at /usr/bin/time (apt-get install time)" >&2; exit 2; }
mkdir -p "$WORK"

"$FISHER" compute --synthetic-model 64,32,10 --synthetic-samples 1797 --activation tanh \
  --save-model "$WORK/small.safetensors" --save-data "$WORK/small" --quiet
"$FISHER" compute --synthetic-model 784,512,512,10 --synthetic-samples 4096 --activation relu \
  --save-model "$WORK/big.safetensors" --save-data "$WORK/big" --quiet

run() { # backend form model activation
  local backend=$1 form=$2 model=$3 activation=$4 log="$WORK/$1-$2-$3.time"
  /usr/bin/time -v -o "$log" "$FISHER" compute --weights "$WORK/$model.safetensors" --activation "$activation" \
    --inputs "$WORK/$model/inputs.npy" --labels "$WORK/$model/labels.npy" --form "$form" \
    --backend "$backend" --out "$WORK/$backend-$form-$model.safetensors" --json ${EXTRA:-} \
    > "$WORK/$backend-$form-$model.json"
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,t,":"); s=0; for(i=1;i<=n;i++) s=s*60+t[i]; print s}' "$log")
  rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.1f", $2/1024}' "$log")
  printf '%-4s %-5s %-5s wall %7.2f s  max RSS %7.1f MiB\n' "$backend" "$form" "$model" "$wall" "$rss"
}

for backend in "${BACKENDS[@]}"; do
  run "$backend" full small tanh
  run "$backend" diag big relu
  run "$backend" kfac big relu
done
echo "outputs, JSON summaries and /usr/bin/time -v logs in $WORK"
