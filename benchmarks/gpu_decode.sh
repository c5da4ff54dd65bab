#!/usr/bin/env bash
# The 1-token (decode) path on one GPU, one command, under 8 minutes (issue 12, goal 5):
#   1. one_token.py: eager 1-token NF4Linear against F.linear (host time, wall time, CUDA-graph GPU time) per shape;
#   2. generate.py: greedy decode at Llama-3-8B shape, eager and the compiled step in a loop (CUDA graphs), bf16 vs
#      lightning-nf4 (bitsandbytes beside when installed), 5 repeats interleaved;
#   3. gemv_sweep.py: the gemv kernel's launch settings at the 8B shapes and 8192x8192, % of copy bandwidth.
#      (--before: the kernel of commit 37018f5 beside it; --variant probe_loads: the loads alone, the memory floor of
#      results_h200_gemv_probes.md)
# Results go to ${OUT:-.}: one_token.txt, generate.md (+ .err), gemv_sweep.md (+ .err).
set -uo pipefail
out="${OUT:-.}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}"
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
git log -1 --format='code of %h' 2>/dev/null
timeout 110 python3 benchmarks/one_token.py --shapes 8192x8192,4096x4096,14336x4096 > "$out/one_token.txt" 2>&1; tail -30 "$out/one_token.txt"
echo "(one_token: $((SECONDS - start)) s)"
peers=""; python3 -c "import bitsandbytes" 2>/dev/null && peers="--peers"
timeout 250 python3 benchmarks/generate.py --device cuda --preset llama3-8b --compiled --modes eager,loop $peers \
  --new-tokens 64 --repeats 5 --one-token none > "$out/generate.md" 2> "$out/generate.err"
cat "$out/generate.md"; grep -E "Error|error" "$out/generate.err" | tail -5
echo "(generate: $((SECONDS - start)) s)"
left=$(( 460 - (SECONDS - start) )); [ "$left" -lt 30 ] && left=30
timeout "$left" python3 benchmarks/gemv_sweep.py --before --variant probe_loads > "$out/gemv_sweep.md" 2> "$out/gemv_sweep.err"
cat "$out/gemv_sweep.md"; tail -3 "$out/gemv_sweep.err"
echo "(whole script: $((SECONDS - start)) s)"
