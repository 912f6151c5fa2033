#!/usr/bin/env bash
# Does the generator teach? The whole measurement in one command (developer script; CI never runs it):
# generate a MIMIC-layout tree, train CLS on it with each training seed, then linear-probe the final
# checkpoints against `coordinator init` of the same sizes (one random arm per training seed: the
# runs' own step-0 weights, plus PROBE_EXTRA_RANDOM more).
#
#   scripts/probe_check.sh [WORKDIR]        (default /tmp/probe_check)
#
# Settings by environment (defaults in brackets): STUDIES [2000], TREE_SEED [1], SIZE [128] (image
# width the generator writes), STEPS [1000], TRAIN_SEEDS ["7 8"], BATCH [64], WARMUP [50],
# PROBE_EXTRA_RANDOM ["9"], PYTHON [/work/venv/ref/bin/python], BIN [target/release].
# Existing trees and finished runs in WORKDIR are reused, so a second call only re-probes.
# Needs release binaries: cargo build --release -p coordinator -p worker
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/probe_check}
STUDIES=${STUDIES:-2000} TREE_SEED=${TREE_SEED:-1} SIZE=${SIZE:-128} STEPS=${STEPS:-1000}
TRAIN_SEEDS=${TRAIN_SEEDS:-"7 8"} BATCH=${BATCH:-64} WARMUP=${WARMUP:-50}
PROBE_EXTRA_RANDOM=${PROBE_EXTRA_RANDOM:-"9"}
PYTHON=${PYTHON:-/work/venv/ref/bin/python} BIN=${BIN:-target/release}
mkdir -p "$W"
echo "commit $(git log -1 --format=%h); $(uptime)"
TREE="$W/tree-mimic-$STUDIES-s$TREE_SEED-$SIZE"
[ -d "$TREE/files" ] || "$BIN/coordinator" synth --out "$TREE" --studies "$STUDIES" --dataset mimic \
    --seed "$TREE_SEED" --size "$SIZE"
ckpts=() seeds=()
for s in $TRAIN_SEEDS; do
    RUN="$W/run-s$s-$STEPS"
    final=$(printf '%s/checkpoints/step-%06d' "$RUN" "$STEPS")
    if [ ! -f "$final/model.safetensors" ]; then
        rm -rf "$RUN"
        start=$(date +%s)
        "$BIN/coordinator" --workers 1 --device cpu --data "$TREE" --steps "$STEPS" --global-batch "$BATCH" \
            --warmup "$WARMUP" --seed "$s" --checkpoint-every "$STEPS" --run-dir "$RUN" 2>&1 | tail -n 2
        echo "trained seed $s: $STEPS steps in $(( $(date +%s) - start )) s; $(uptime)"
    fi
    ckpts+=(--checkpoint "$final") seeds+=("$s")
done
for s in $PROBE_EXTRA_RANDOM; do seeds+=("$s"); done
"$PYTHON" scripts/probe_check.py --tree "$TREE" "${ckpts[@]}" \
    --random-seeds "$(IFS=,; echo "${seeds[*]}")" --coordinator "$BIN/coordinator" --json "$W/probe.json"
