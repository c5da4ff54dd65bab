#!/usr/bin/env bash
# bitsandbytes for the GPU image, which has none and cannot download: PyPI's 0.50.2 wheel installed here into
# .whl/bnb_site with only its CPU and CUDA 13.0 libraries (the image's torch is cu130), 6 MB instead of 43.
# Then on the GPU (device tool: carry [".whl"]):
#   PYTHONPATH=$PWD:$PWD/.whl/bnb_site python3 benchmarks/generate.py --device cuda --preset llama3-8b --compiled \
#       --modes loop --peers --new-tokens 64 --repeats 5 --one-token none
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
pip download --no-deps bitsandbytes==0.50.2 -d "$tmp" >/dev/null
rm -rf .whl/bnb_site
pip install -q --no-deps --target .whl/bnb_site "$tmp"/bitsandbytes-0.50.2-*.whl
find .whl/bnb_site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete
rm -rf "$tmp"
du -sh .whl/bnb_site
