#!/usr/bin/env bash
# Sharded QLoRA checks for one multi-GPU lease (device time is scarce), in parts that each fit one command:
#   bash benchmarks/gpu_fsdp.sh tests [K] # the 2-GPU tests (tests/test_gpu_fsdp.py; its CLI tests need
#                                         # benchmarks/cli_deps_for_gpu.sh's .whl/cli_site, put on PYTHONPATH here);
#                                         # K selects tests (pytest -k) when the whole file would pass one call's
#                                         # limit: "not cli and not chunked_loss", then "cli or chunked_loss"
#   bash benchmarks/gpu_fsdp.sh 70b       # 70B shape: 4 GPUs (if present) and 2 GPUs, peak memory and speed
#   bash benchmarks/gpu_fsdp.sh 8b [ROUNDS] [SPECS]   # 8B shape on 2 GPUs: sharded against DDP, eager and compiled
#                                                     (on 4 GPUs two configurations run at once, each on its own pair)
#   bash benchmarks/gpu_fsdp.sh hostprof [SPECS]      # one round with rank 0's timed steps under cProfile (.pstats to $OUT)
# Outputs (logs, summary.json per part) go to ${OUT:-.}.
set -uo pipefail
out="${OUT:-.}"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
case "${1:-}" in
  tests)
    # about 8-9 minutes on 2 x H200 in all: four two-rank loss runs, the CLI's sharded and DDP fits, a resume, besides the runs compared
    CUDA_VISIBLE_DEVICES=0,1 PYTHONPATH="$PWD:$PWD/.whl/cli_site:${PYTHONPATH:-}" timeout 590 python3 -m pytest -q -rf \
        tests/test_gpu_fsdp.py -k "${2:-}" -p no:cacheprovider --durations=8 2>&1 | tail -25 | tee "$out/tests.txt" ;;
  70b)
    specs="70b:nf4_fsdp:2"
    [ "$gpus" -ge 4 ] && specs="70b:nf4_fsdp:4,$specs"
    timeout 560 python3 benchmarks/fsdp_scaling.py --specs "$specs" --rounds 1 --steps 4 --warmup 2 --out /tmp/fsdp70 2>&1 | grep -v "^\s*$" | tail -30 | tee "$out/70b.txt"
    cp /tmp/fsdp70/summary.json "$out/70b_summary.json" 2>/dev/null ;;
  8b)
    rounds="${2:-2}"
    specs="${3:-8b:nf4_fsdp:2,8b:ddp:2,8b:nf4_fsdp+compile:2,8b:ddp+compile:2}"
    # 4 GPUs: two configurations at once (GPUs 0-1 and 2-3), their order rotating each round; one profiled round
    lanes=1; [ "$gpus" -ge 4 ] && lanes=2
    timeout 570 python3 benchmarks/fsdp_scaling.py --specs "$specs" --rounds "$rounds" --steps 6 --warmup 2 --lanes "$lanes" --profile-rounds 1 --out /tmp/fsdp8 2>&1 | grep -v "^\s*$" | tail -60 | tee "$out/8b.txt"
    cp /tmp/fsdp8/summary.json "$out/8b_summary.json" 2>/dev/null ;;
  hostprof)
    # one round, cProfile of each rank's timed steps (Python-level host time; the step is host-bound), stats to $OUT
    specs="${2:-8b:ddp:2,8b:nf4_fsdp+whole:2}"
    lanes=1; [ "$gpus" -ge 4 ] && lanes=2
    timeout 570 python3 benchmarks/fsdp_scaling.py --specs "$specs" --rounds 1 --steps 4 --warmup 2 --lanes "$lanes" --profile-rounds 0 --host-profile --out /tmp/fsdphp 2>&1 | grep -v "^\s*$" | tail -30 | tee "$out/hostprof.txt"
    for f in /tmp/fsdphp/round0/*rank0.pstats; do n=$(basename "$f"); cp "$f" "$out/${n//+/-}"; done ;;  # '+' may not travel
  *) echo "usage: gpu_fsdp.sh tests|70b|8b|hostprof [ROUNDS|SPECS] [SPECS]"; exit 2 ;;
esac
