#!/usr/bin/env bash
# Everything one GPU lease should check, in one command (device time is scarce): the GPU tests (kernels and
# Lightning flows), the kernel table, the 8B-shape step with peers, and bf16 LoRA against lightning-nf4 in three
# alternating rounds (the ratio's spread between processes). Outputs go to ${OUT:-.}. About 10 minutes of machine time.
#   bash benchmarks/gpu_all.sh            # on the GPU machine, from the repository root
set -uo pipefail
out="${OUT:-.}"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest -q -x tests/test_gpu.py 2>&1 | tail -3
# the Lightning flows on one GPU (its CLI test needs benchmarks/cli_deps_for_gpu.sh's .whl/cli_site, carried)
PYTHONPATH="$PWD:$PWD/.whl/cli_site:${PYTHONPATH:-}" timeout 200 python3 -m pytest -q tests/test_gpu_lightning.py 2>&1 | tail -3
timeout 150 python3 benchmarks/kernels.py --device cuda --out "$out/kernels.md" > /dev/null 2>&1; cat "$out/kernels.md"
timeout 330 python3 benchmarks/lora_step.py --device cuda --peers --steps 8 --warmup 3 2>&1 | tail -9 | tee "$out/lora_step.md"
timeout 330 python3 benchmarks/lora_step.py --device cuda --rounds 3 --steps 8 --warmup 3 2>&1 | tail -4 | tee "$out/lora_step_rounds.md"
