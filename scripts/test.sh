#!/usr/bin/env bash
# The project's test command (README, .ci/run): NVIDIA's NVRTC wheels for the kernel
# compile check (into .cache/, once), then every test of the workspace.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/nvidia-wheels.sh >/dev/null
# A whole-workspace run builds the coordinator and worker binaries (their packages'
# integration tests use them); the end-to-end tests then reuse them instead of building again.
if [ "$#" -eq 0 ]; then
    export CXRCLIP_E2E_BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/debug"
fi
cargo test --workspace "$@"
