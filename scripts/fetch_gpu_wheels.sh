#!/usr/bin/env bash
# Download the wheels a GPU session carries to the device machine (it has no network): into
# .whl/ (git-ignored), for its Python 3.12 / x86-64 / manylinux. scripts/gpu_check.sh installs
# whatever is there with `pip install --no-index --no-deps --target /tmp/site`.
#
#   scripts/fetch_gpu_wheels.sh          diffusers + importlib_metadata + zipp (the peer benchmark)
#   scripts/fetch_gpu_wheels.sh --bnb    also bitsandbytes (--optimizer adamw8bit tests)
#
# What the machine already has (KINDS.md): torch 2.11, triton 3.6, transformers 5.17,
# huggingface_hub 1.33, safetensors 0.8, numpy, pillow, regex, requests, filelock, zipp — so
# diffusers 0.42.1's needs (huggingface-hub>=1.32, safetensors>=0.8) are met except
# importlib_metadata. zipp is carried too so the pair is consistent.
# Not carried: xformers. Its wheels are built against one torch release (0.0.35 for the torch
# 2.10/2.11 line) and weigh well over the 64 MiB a call may carry; ti-fast's own attention
# (SDPA / Triton) does not need it.
# The carry limit is 64 MiB for the whole tree: the script prints the total at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PKGS=(diffusers==0.42.1 importlib_metadata==8.7.1 zipp==3.23.0)
if [ "${1:-}" = "--bnb" ]; then
  PKGS+=(bitsandbytes==0.50.2)      # needs torch >= 2.3; one wheel for all CUDA versions (large)
fi
for p in "${PKGS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl "$p"
done
ls -la .whl
du -sh .whl
echo "carry with: run(command='bash scripts/gpu_check.sh', carry=['.whl'], timeout_s=540)"
