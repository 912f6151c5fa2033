#!/usr/bin/env bash
# Installs NVIDIA's NVRTC, CUDA headers and ptxas (the 13.0 series, matching cudarc's
# `cuda-13000` feature and the GPU machines' drivers) into .cache/nvidia under the workspace
# root, not system-wide. Idempotent and quiet: does nothing when they are already there.
# The kernels' tests (kernels/tests/nvrtc_compile.rs) find .cache/nvidia by themselves; for
# other programs, the environment printed at the end points at it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.cache/nvidia"
have() {
    compgen -G "$dest/nvidia/cu13/lib/libnvrtc.so*" >/dev/null || compgen -G "$dest/nvidia/cuda_nvrtc/lib/libnvrtc.so*" >/dev/null
}
if ! have || ! compgen -G "$dest/nvidia/*/include/cuda_bf16.h" >/dev/null || ! compgen -G "$dest/nvidia/*/bin/ptxas" >/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --target "$dest" --upgrade \
        'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-nvcc==13.0.*'
fi
lib="$(dirname "$(compgen -G "$dest/nvidia/*/lib/libnvrtc.so*" | head -n1)")"
inc="$(dirname "$(compgen -G "$dest/nvidia/*/include/cuda_bf16.h" | head -n1)")"
bin="$(dirname "$(compgen -G "$dest/nvidia/*/bin/ptxas" | head -n1)")"
echo "export LD_LIBRARY_PATH=$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} CXRCLIP_CUDA_INCLUDE=$inc PATH=$bin:\$PATH"
