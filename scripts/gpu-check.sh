#!/usr/bin/env bash
# The GPU check in one call, for a machine with an NVIDIA GPU and CUDA 13 but no Rust: runs
# the carried release binary's `gpu-check` (every CUDA op against the CPU backend, and a CLS
# training step), the kernel bench (fused against unfused, with measured ceilings), a short
# training run through coordinator and worker (--gpus 1: NCCL, a world of one), a fault drill
# (a rank failing mid-run, restarted from its checkpoint), with two GPUs visible a 2-rank NCCL
# run and drill too, and PyTorch's scaled_dot_product_attention at the
# bench's sizes when PyTorch is there; prints a summary table last. Budget: under 8 minutes.
#
#   scripts/gpu-check.sh [path/to/coordinator] [--quick]
#
# Build and carry the binary as README's "GPU" section says. Logs and JSON go to $OUT when it
# is set (the device tool's output folder), else to a temporary folder.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/target/release/coordinator"
quick=""
for a in "$@"; do
    case "$a" in
        --quick) quick="--quick" ;;
        *) bin="$a" ;;
    esac
done
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
tmp="$(mktemp -d)"
start=$(date +%s)
summary=()
note() { summary+=("$(printf '%-22s %-6s %5ss  %s' "$1" "$2" "$3" "$4")"); }

if [ ! -x "$bin" ]; then
    echo "gpu-check: no coordinator binary at $bin (cargo build --release -p coordinator, then carry target/release)"
    exit 2
fi

# --- libraries: the driver, NVRTC + headers, cuBLAS(Lt), NCCL ------------------------------
libdirs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu; do
    [ -d "$d" ] && libdirs+=("$d")
done
pyroots="$(python3 - 2>/dev/null <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("nvidia")
for p in (spec.submodule_search_locations or []) if spec else []:
    print(p)
PY
)"
for r in $pyroots "$root/.cache/nvidia/nvidia"; do
    for d in "$r"/*/lib; do [ -d "$d" ] && libdirs+=("$d"); done
done
find_lib() { # name -> first path
    local n="$1" d
    for d in "${libdirs[@]}"; do
        if [ -e "$d/$n" ]; then echo "$d/$n"; return 0; fi
    done
    ldconfig -p 2>/dev/null | awk -v n="$n" '$1 == n { print $NF; exit }'
}
report=()
for n in libcuda.so.1 libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13 libnccl.so.2; do
    p="$(find_lib "$n")"
    report+=("$(printf '%-18s %s' "$n" "${p:-MISSING}")")
done
# (cxrclip opens libnccl.so.2 itself, from these folders too: no link to make.)
LD_LIBRARY_PATH="$(IFS=:; echo "${libdirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
for inc in /usr/local/cuda/include $(for r in $pyroots; do echo "$r"/*/include; done); do
    if [ -f "$inc/cuda_bf16.h" ]; then export CXRCLIP_CUDA_INCLUDE="$inc"; break; fi
done
export CXRCLIP_KERNEL_CACHE="$tmp/kernels"
printf '%s\n' "${report[@]}"
echo "headers            ${CXRCLIP_CUDA_INCLUDE:-MISSING}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null | sed 's/^/gpu                /'

run_step() { # name timeout_s log command...
    local name="$1" limit="$2" log="$3"; shift 3
    local t0=$(date +%s)
    echo "=== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$log"
    local rc=${PIPESTATUS[0]}
    local dt=$(( $(date +%s) - t0 ))
    local last; last="$(grep -v '^\s*$' "$out/$log" | tail -n 1 | cut -c1-90)"
    if [ "$rc" = 0 ]; then note "$name" ok "$dt" "$last"; elif [ "$rc" = 124 ]; then note "$name" TIME "$dt" "stopped after ${limit}s"; else note "$name" FAIL "$dt" "$last"; fi
}

run_step "gpu-check" 160 gpu-check.log "$bin" gpu-check $quick
timeout 40 "$bin" gpu-check --quick --json >"$out/gpu-check.json" 2>/dev/null || true
run_step "bench kernels" 130 bench-kernels.log "$bin" bench kernels $quick
# The loss at the issue's scale (8,192 rows against 65,536 columns, D 512), fused one-block
# against OpenCLIP's materialised logits (2 GiB of them): time and peak device memory.
run_step "bench infonce 8k x 65k" 60 bench-infonce-65k.log "$bin" bench kernels --op infonce --local 8192 --global 65536 --dim 512 --variant both --json
run_step "bench train-step cuda" 40 train-step.log "$bin" bench train-step --device cuda --width 256 --layers 4 --steps 10
# Per-op device times (CUDA events) and the NVTX hook (CXRCLIP_NVTX=1 loads the library even
# without a profiler: its line "nvtx: op ranges through ..." shows it was found and called).
run_step "train-step ops cuda" 30 train-step-ops.log env CXRCLIP_NVTX=1 "$bin" bench train-step --device cuda --width 256 --layers 4 --steps 3 --warmup 1 --profile
# The runtime on a GPU: coordinator + worker processes (the coordinator binary in its worker
# role), NCCL, the device collectives and gradient sum, checkpoints.
train=(--synthetic 64 --synthetic-dir "$tmp/synth" --steps 10 --global-batch 16 --seed 7 --checkpoint-every 5)
run_step "train run --gpus 1" 60 train-run.log "$bin" --gpus 1 "${train[@]}" --run-dir "$tmp/run"
[ -f "$tmp/run/metrics.jsonl" ] && cp "$tmp/run/metrics.jsonl" "$out/train-run-metrics.jsonl"
# A rank failing mid-run (an injected fault at step 7, once): reported with its reason, the run
# restarts from the checkpoint of step 5 and ends; nothing hangs.
# With `hang` the rank stops for good while it heartbeats (its peers wait in NCCL): the step
# watchdog (--step-timeout 15) restarts the run.
drill() { # name gpus rank log [hang]
    local name="$1" g="$2" r="$3" log="$4" hang="${5:+,hang}" t0=$(date +%s)
    local want="rank $r failed: injected fault" what=failed
    [ -n "$hang" ] && want="a rank is stuck" what=hung
    echo "=== $name: CXRCLIP_FAULT=rank=$r,step=7$hang $bin --gpus $g ..."
    CXRCLIP_FAULT="rank=$r,step=7$hang,once=$tmp/fired-$g$hang" timeout 90 "$bin" --gpus "$g" "${train[@]}" \
        --step-timeout 15 --run-dir "$tmp/drill-$g$hang" 2>&1 | tee "$out/$log"
    local rc=${PIPESTATUS[0]} dt=$(( $(date +%s) - t0 ))
    if [ "$rc" = 124 ]; then
        note "$name" TIME "$dt" "hung: stopped after 90s"
    elif [ "$rc" = 0 ] && grep -q "$want" "$out/$log" && grep -q "restarting from step 5" "$out/$log"; then
        note "$name" ok "$dt" "rank $r $what at step 7, caught, restarted from step 5"
    else
        note "$name" FAIL "$dt" "$(grep -v '^\s*$' "$out/$log" | tail -n 1 | cut -c1-90)"
    fi
}
drill "fault drill --gpus 1" 1 0 drill-1.log
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${ngpu:-0}" -ge 2 ]; then
    run_step "train run --gpus 2" 60 train-run-2.log "$bin" --gpus 2 "${train[@]}" --run-dir "$tmp/run2"
    # Same global batch on 1 and 2 GPUs: the loss curves agree to bf16 noise.
    run_step "losses 1 vs 2 GPUs" 10 losses-1-2.log python3 - "$tmp/run/metrics.jsonl" "$tmp/run2/metrics.jsonl" <<'PY'
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(p) if '"loss"' in l] for p in sys.argv[1:3])
d = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print(f"{len(a)} vs {len(b)} steps, max relative difference {d:.2e}")
sys.exit(0 if len(a) == len(b) == 10 and d < 2e-2 else 1)
PY
    drill "fault drill --gpus 2" 2 1 drill-2.log
    drill "hang drill --gpus 2" 2 1 drill-2-hang.log hang
else
    note "train run --gpus 2" SKIP 0 "one GPU visible: the 2-rank NCCL run needs two"
fi

if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    run_step "torch sdpa" 40 torch-sdpa.log python3 - <<'PY'
import torch, torch.nn.functional as F
def bench(bh, t, causal):
    q, k, v = (torch.randn(1, bh, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(1, bh, t, 64, device="cuda", dtype=torch.bfloat16)
    def step():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        o.backward(g)
    for _ in range(3): step()
    ts = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); step(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort()
    print(f"torch sdpa fwd+bwd {bh}x{t}x64{' causal' if causal else ''}: {ts[len(ts)//2]:.3f} ms median")
bench(1536, 197, False)
bench(6144, 77, True)
PY
fi

echo
echo "=== summary ($(( $(date +%s) - start ))s; logs in $out)"
printf '%-22s %-6s %6s  %s\n' step result time "last line"
printf '%s\n' "${summary[@]}"
rm -rf "$tmp"
