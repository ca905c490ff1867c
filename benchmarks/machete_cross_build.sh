#!/usr/bin/env bash
# Machete for the GPU machine, built on this CPU machine (its nvcc; the GPU machine's call time is
# scarcer): torch 2.11.0+cu130's headers and libraries (the GPU machine's torch) and the cuBLAS /
# cuSPARSE / cuSOLVER headers torch's ATen/cuda includes, from the package registry, then
# `python -m llmopt.kernels.machete build` against them. About 9 minutes on 2 cores (2026-12-07: 524 s).
# Then call the device with carry [".device-serve", ".cache/machete-h100/llmopt_machete.so"] and
# `export LLMOPT_MACHETE_LIBRARY=$PWD/.cache/machete-h100/llmopt_machete.so`.
set -euo pipefail
out=${1:-.cache/machete-h100}
work=${2:-/tmp/machete-cross}
pip=.venv/bin/pip
mkdir -p "$work"
if [ ! -f "$work/torch/version.py" ]; then
  $pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    "torch==2.11.0" -d "$work/wheels"
  unzip -q -o "$work"/wheels/torch-2.11.0-*.whl 'torch/include/*' 'torch/lib/*' 'torch/version.py' \
    'torch/utils/cpp_extension.py' -d "$work"
fi
if [ ! -f "$work/nvidia/cu13/include/cusparse.h" ]; then
  $pip download -q --no-deps "nvidia-cusolver>=12,<13" "nvidia-cusparse>=12.6,<13" "nvidia-cublas>=13,<14" \
    -d "$work/wheels"
  for w in "$work"/wheels/nvidia_*.whl; do unzip -q -o "$w" '*/include/*' -d "$work"; done
fi
.venv/bin/python -m llmopt.kernels.machete build "$out" --torch-dir "$work/torch" \
  --include "$work/nvidia/cu13/include" --jobs 2
