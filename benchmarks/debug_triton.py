"""Sweep of the Triton dequantize kernel's launch settings on the GPU at hand (not a test).

Checks each setting's output against the default one, then times it with triton's do_bench (L2
flushed per rep) on an 8192x8192 NF4 weight, double-quantized and not, and prints the fastest.

    python benchmarks/debug_triton.py [--gemv-only]

Also sweeps the 1-token gemv launch settings (rows per program, elements per step, warps).
"""

import itertools
import sys

import torch
import triton.testing

import lightning_nf4 as L
from lightning_nf4.kernels import triton_kernels as tk

w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) * 0.02
copy_src = torch.randn(2**29 // 2, device="cuda", dtype=torch.bfloat16)
copy_dst = torch.empty_like(copy_src)
copy_ms = triton.testing.do_bench(lambda: copy_dst.copy_(copy_src), return_mode="median")
copy_gbs = 2 * copy_src.numel() * 2 / copy_ms / 1e6
print(f"{torch.cuda.get_device_name()}: copy {copy_gbs:.0f} GB/s")
default = dict(tk.DEQUANT_CONFIG)
rows = []
for dq in (() if "--gemv-only" in sys.argv else (True, False)):
    q = L.quantize_nf4(w, 64, dq)
    expected = q.dequantize(torch.bfloat16)
    for outputs, warps in itertools.product((2048, 4096, 8192, 16384), (4, 8)):
        tk.DEQUANT_CONFIG.update(outputs=outputs, num_warps=warps)
        got = q.dequantize(torch.bfloat16)
        ok = torch.equal(got, expected)
        ms = triton.testing.do_bench(lambda: q.dequantize(torch.bfloat16), return_mode="median")
        gbs = w.numel() * 2.5 / ms / 1e6
        rows.append((dq, outputs, warps, ok, ms, gbs / copy_gbs))
        print(f"dq={dq} outputs={outputs} warps={warps} ok={ok} {ms * 1e3:.1f} us {100 * gbs / copy_gbs:.1f}% of copy")
    tk.DEQUANT_CONFIG.update(default)
for dq in sorted({r[0] for r in rows}):
    best = min((r for r in rows if r[0] == dq and r[3]), key=lambda r: r[4])
    print(f"best dq={dq}: outputs={best[1]} warps={best[2]}: {best[4] * 1e3:.1f} us ({100 * best[5]:.1f}%)")


# 1-token gemv straight from NF4 (NF4Linear without autograd), against dense bf16
linear = torch.nn.Linear(8192, 8192, bias=False, device="cuda", dtype=torch.bfloat16)
layer = L.NF4Linear.from_linear(linear, compute_dtype=torch.bfloat16)
x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
dense_ms = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, linear.weight), return_mode="median")
with torch.no_grad():
    expected = torch.nn.functional.linear(x.float(), layer.dequantize(torch.float32))
    results = []
    for rows_, elems, warps in itertools.product((4, 16), (512, 1024), (4,)):  # each setting compiles anew: keep it small
        tk.GEMV_CONFIG.update(rows=rows_, elements_per_step=elems, num_warps=warps)
        ok = torch.allclose(layer(x).float(), expected, atol=2e-2, rtol=2e-2)
        ms = triton.testing.do_bench(lambda: layer(x), return_mode="median")
        results.append((ms, rows_, elems, warps, ok))
    results.sort()
    for ms, rows_, elems, warps, ok in results[:6]:
        print(f"gemv rows={rows_} elements/step={elems} warps={warps} ok={ok}: {ms * 1e3:.1f} us ({ms / dense_ms:.2f}x dense {dense_ms * 1e3:.1f} us)")
