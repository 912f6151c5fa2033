#!/usr/bin/env bash
# The project's test command (README, .ci/run): NVIDIA's NVRTC wheels for the kernel
# compile check (into .cache/, once), then every test of the workspace.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/nvidia-wheels.sh >/dev/null
cargo test --workspace "$@"
