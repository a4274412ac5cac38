#!/usr/bin/env bash
# Compile-checks xfuser-rs with `--features cuda,nccl` on a machine without a CUDA toolkit or a
# GPU, with nvcc and the CUDA headers from PyPI wheels (docs/gpu.md says what this proves and
# what it does not). Not run by CI: CI has no nvcc, and the wheels are ~200 MB.
#
#   scripts/check_cuda_build.sh            # cargo check + clippy of the workspace, cuda,nccl
#   scripts/check_cuda_build.sh --build    # also try to link the xfuser binary
#
# Environment: NVCC_VENV (the virtualenv holding the wheels; default target-cuda/nvcc-venv),
# CARGO_TARGET_DIR (default target-cuda, apart from the CPU build's target/),
# CUDA_COMPUTE_CAP (the GPU generation the PTX kernels are built for; default 90, Hopper).
#
# The CUDA 12 nvcc wheel (nvidia-cuda-nvcc-cu12, 12.4 to 12.9) ships ptxas but not nvcc; the
# CUDA 13 wheels (nvidia-cuda-nvcc, nvidia-cuda-runtime, nvidia-cuda-cccl) have the whole
# compiler driver and headers, so those are used. cudarc 0.19.10 knows CUDA up to 13.4: its
# bindings are pinned to that API with CUDARC_CUDA_VERSION (13.5 only adds to it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NVCC_VENV:-$ROOT/target-cuda/nvcc-venv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-cuda}"
NICE=(nice -n 19)

if [ ! -x "$VENV/bin/python" ]; then
    "${NICE[@]}" python3 -m venv "$VENV"
fi
"${NICE[@]}" "$VENV/bin/pip" install --quiet \
    "nvidia-cuda-nvcc==13.5.37" "nvidia-cuda-runtime==13.5.37" "nvidia-cuda-crt==13.5.37" \
    "nvidia-nvvm==13.5.37" "nvidia-cuda-cccl==13.3.5.0.6"

CUDA="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
export PATH="$CUDA/bin:$PATH"
export CUDA_HOME="$CUDA" CUDA_PATH="$CUDA" CUDA_ROOT="$CUDA"
export NVCC="$CUDA/bin/nvcc"
export NVCC_CCBIN="${NVCC_CCBIN:-$(command -v g++)}"
export CUDARC_CUDA_VERSION=13040
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# candle-kernels compiles a few dozen .cu files; one at a time leaves the machine usable.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"

cd "$ROOT"
nvcc --version | tail -n 2
echo "== cargo check --features cuda,nccl"
time "${NICE[@]}" cargo check --features cuda,nccl --all-targets
echo "== cargo clippy --features cuda,nccl"
"${NICE[@]}" cargo clippy -p xfuser -p xfuser-mpi -p xfuser-pipelines --features xfuser/cuda,xfuser/nccl \
    --all-targets -- -D warnings
if [ "${1:-}" = "--build" ]; then
    echo "== cargo build --features cuda,nccl (links against libcuda, libnccl, libcublas: the"
    echo "   driver's libcuda is not on PyPI, so this links only where a driver is installed)"
    "${NICE[@]}" cargo build --release --features cuda,nccl
fi
