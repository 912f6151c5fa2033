#!/usr/bin/env bash
# Peak resident memory of a training run against the global batch, with and without
# `--micro-batch` (gradient caching), from the `rss_mb` of metrics.jsonl (the rank-0 worker's
# VmHWM after its last step). One CPU worker, so the local batch is the global batch; the
# default small CLIP (image 64, patch 8, width 128, 2 layers); one loader thread, so that the
# host batches held ahead of the step stay few.
#
#   cargo build --release -p coordinator
#   scripts/bench_micro_batch.sh [MICRO] [STEPS] "[BATCHES]" "[ONE_PASS_BATCHES]"
#
# defaults: MICRO 16, STEPS 2, BATCHES "64 256 1024 4096", ONE_PASS_BATCHES the same (leave out
# those that do not fit the machine's memory). Prints one line per run: global batch, micro-batch,
# peak MiB, median step seconds, the first step's loss.
set -euo pipefail
micro=${1:-16}
steps=${2:-2}
batches=${3:-"64 256 1024 4096"}
one_pass=${4:-$batches}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/release/coordinator
work=${BENCH_DIR:-/tmp/cxrclip-bench-micro}
mkdir -p "$work"
# 6,000 studies: more than 4,096 training pairs (80% of the patients train).
common=(--workers 1 --device cpu --synthetic 6000 --synthetic-size 64 --synthetic-dir "$work/synthetic-6000"
  --loader-threads 1 --steps "$steps" --checkpoint-every 0 --seed 7)

run() { # global batch, micro-batch ("" for one pass)
  local g=$1 m=$2 dir="$work/run-g$1-m${2:-none}"
  local extra=()
  [[ -n $m ]] && extra=(--micro-batch "$m")
  "$bin" "${common[@]}" --global-batch "$g" --run-dir "$dir" "${extra[@]}" >/dev/null 2>"$dir.log" || {
    echo "g=$g micro=${m:-none}: failed, see $dir.log" >&2
    return 0
  }
  python3 - "$dir/metrics.jsonl" "$g" "${m:-none}" <<'EOF'
import json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
print(f"global {sys.argv[2]:>5}  micro {sys.argv[3]:>4}  peak {max(l['rss_mb'] for l in lines):8.1f} MiB  "
      f"step {statistics.median(l['step_seconds'] for l in lines):7.2f} s  loss1 {lines[0]['loss']:.7f}")
EOF
}

for g in $batches; do
  run "$g" "$micro"
  if [[ " $one_pass " == *" $g "* ]]; then run "$g" ""; fi
done
