#!/usr/bin/env bash
# Our CPU training step against PyTorch eager on the same cores, in one run, alternating
# (ours, torch) ROUNDS times so that both see the same machine; prints both and the ratio.
# Needs a Python with torch + transformers (PYTHON=path/to/python; developers only) and
# target/release/coordinator (cargo build --release -p coordinator).
#   scripts/bench_train_step_vs_torch.sh [ROUNDS] [extra bench flags...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds="${1:-3}"; shift || true
py="${PYTHON:-python3}"
size=(--image 64 --patch 8 --width 256 --layers 4 --heads 4 --batch 64 --steps 10)
threads="$(nproc)"
ours=(); theirs=()
for r in $(seq "$rounds"); do
    o=$(target/release/coordinator bench train-step --device cpu "${size[@]}" --json "$@")
    t=$("$py" scripts/bench_torch_train_step.py "${size[@]}" --threads "$threads" --json)
    ours+=("$(echo "$o" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["step_ms"])')")
    theirs+=("$(echo "$t" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["step_ms"])')")
    echo "round $r: ours ${ours[-1]} ms, torch ${theirs[-1]} ms" >&2
done
"$py" - "${ours[*]}" "${theirs[*]}" <<'PY'
import statistics, sys
o = [float(x) for x in sys.argv[1].split()]
t = [float(x) for x in sys.argv[2].split()]
mo, mt = statistics.median(o), statistics.median(t)
print(f"step ms (median of rounds): ours {mo:.1f}  torch {mt:.1f}  torch/ours {mt/mo:.2f}x")
print(f"images/s: ours {64e3/mo:.1f}  torch {64e3/mt:.1f}")
PY
