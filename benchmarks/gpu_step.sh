#!/usr/bin/env bash
# One-GPU checks for the QLoRA step and kernels, in parts that each fit one device command (about 9 minutes):
#   bash benchmarks/gpu_step.sh memory    # step memory with the chunked loss, dequantize at the 8B shapes,
#                                         # a profile of the compiled step (8 layers), the CUDA tests of the loss and decode
#   bash benchmarks/gpu_step.sh decode    # greedy decode at 8B shape, eager and static-cache compiled (CUDA graphs)
#   bash benchmarks/gpu_step.sh compiled [ROUNDS] [CONFIGS]   # compiled step pairs (default 5 rounds of bf16-compiled,nf4-compiled)
#   bash benchmarks/gpu_step.sh moe-tests     # the MoE tests on the GPU
#   bash benchmarks/gpu_step.sh moe [ROUNDS]  # the Qwen3-30B-A3B-shape step (4 layers) against bf16 and bitsandbytes
#   bash benchmarks/gpu_step.sh moe-load      # MoE checkpoints streamed into NF4 on the GPU: tests, then 8 Qwen3-30B-A3B
#                                             # layers loaded three ways (peak host and GPU memory)
# liger-kernel is used when its wheel is carried in .whl/ (installed to /tmp/site). Outputs go to ${OUT:-.}.
set -uo pipefail
out="${OUT:-.}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site" TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}"
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
case "${1:-}" in
  memory)
    timeout 170 python3 benchmarks/lora_step.py --device cuda --configs bf16,nf4,nf4-chunked --steps 6 --warmup 2 2>&1 | tail -8 | tee "$out/lora_step_memory.md"
    timeout 80 python3 benchmarks/kernels.py --device cuda --dequant-shapes --out "$out/dequant_shapes.md" > /dev/null 2>&1; cat "$out/dequant_shapes.md"
    timeout 170 python3 benchmarks/profile_step.py --compiled --layers 8 --steps 3 > "$out/profile_compiled.txt" 2>&1; head -40 "$out/profile_compiled.txt"
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_losses.py tests/test_decode_compile.py -k "cuda" 2>&1 | tail -4 ;;
  decode)
    timeout 560 python3 benchmarks/generate.py --device cuda --preset llama3-8b --compiled --models bf16,lightning-nf4 --new-tokens 64 --repeats 3 \
      > "$out/generate_compiled.md" 2> "$out/generate_compiled.err"; cat "$out/generate_compiled.md"; tail -5 "$out/generate_compiled.err" ;;
  compiled)  # issue 12 goal 1: compiled bf16 LoRA against compiled QLoRA, alternating processes, 20 steps each
    rounds="${2:-5}"; configs="${3:-bf16-compiled,nf4-compiled}"
    timeout 570 python3 benchmarks/lora_step.py --device cuda --configs "$configs" --rounds "$rounds" --steps 20 --warmup 3 \
      > "$out/lora_step_compiled.md" 2> "$out/lora_step_compiled.err"; cat "$out/lora_step_compiled.md"; tail -5 "$out/lora_step_compiled.err" ;;
  moe-tests)  # the MoE tests on the GPU (NF4 experts quantized there, grouped and eager matmuls, compile)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_moe.py -k "not ddp" 2>&1 | tail -4 ;;
  moe)  # Qwen3-30B-A3B's layer shape (4 layers), NF4 experts against bf16 and bitsandbytes + PEFT (which leaves the
        # experts in bf16; its wheel from benchmarks/bnb_for_gpu.sh, carried), alternating processes
    rounds="${2:-5}"
    PYTHONPATH="$PYTHONPATH:$PWD/.whl/bnb_site" timeout 570 python3 benchmarks/lora_step.py --device cuda --preset qwen3-30b-a3b-4l \
      --configs bf16,nf4,bnb --rounds "$rounds" --steps 10 --warmup 3 > "$out/lora_step_moe.md" 2> "$out/lora_step_moe.err"
    cat "$out/lora_step_moe.md"; tail -5 "$out/lora_step_moe.err" ;;
  moe-load)
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_moe_loading.py 2>&1 | tail -4
    PYTHONPATH="$PYTHONPATH:$PWD/.whl/bnb_site" timeout 360 python3 benchmarks/load_memory.py --preset qwen3-30b-a3b-8l --device cuda \
      > "$out/load_memory_moe.md" 2> "$out/load_memory_moe.err"; cat "$out/load_memory_moe.md"; tail -5 "$out/load_memory_moe.err" ;;
  *) echo "usage: gpu_step.sh memory|decode|compiled|moe-tests|moe|moe-load [ROUNDS] [CONFIGS]"; exit 2 ;;
esac
