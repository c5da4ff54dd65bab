"""Sweeps of the Triton kernels' launch settings on the GPU at hand (not a test).

Dequantize: checks each setting's output against the reference, times it with triton's do_bench (L2
flushed per rep) on an 8192x8192 NF4 weight, and shows what the autotuner picked. Gemv (1 token): each
setting on the Llama-3-8B shapes against dense bf16, then the per-call cost of ``NF4Linear`` eager
(back to back, CPU launch cost included) and replayed from a CUDA graph.

    python benchmarks/debug_triton.py [--gemv-only]
"""

import itertools
import sys

import torch
import triton.testing

import lightning_nf4 as L
from lightning_nf4.kernels import triton_kernels as tk

bench = lambda fn: triton.testing.do_bench(fn, return_mode="median")  # noqa: E731
print(torch.cuda.get_device_name())
if "--gemv-only" not in sys.argv:
    w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) * 0.02
    copy_src = torch.randn(2**29 // 2, device="cuda", dtype=torch.bfloat16)
    copy_dst = torch.empty_like(copy_src)
    copy_gbs = 2 * copy_src.numel() * 2 / bench(lambda: copy_dst.copy_(copy_src)) / 1e6
    print(f"copy {copy_gbs:.0f} GB/s")
    del copy_src, copy_dst
    for dq in (True, False):
        q = L.quantize_nf4(w, 64, dq)
        tk.DEQUANT_CONFIG = None
        ms = bench(lambda: q.dequantize(torch.bfloat16))
        picked = tk.dequantize_launch_config(w.device, w.numel(), dq)
        print(f"dq={dq} timed choice {picked}: {ms * 1e3:.1f} us {100 * w.numel() * 2.5 / ms / 1e6 / copy_gbs:.1f}% of copy")
        expected = q.dequantize(torch.float32).bfloat16()
        for outputs, warps in itertools.product((2048, 4096, 8192, 16384), (4, 8)):
            tk.DEQUANT_CONFIG = dict(outputs=outputs, num_warps=warps)
            ok = torch.equal(q.dequantize(torch.bfloat16), expected)
            ms = bench(lambda: q.dequantize(torch.bfloat16))
            print(f"dq={dq} outputs={outputs} warps={warps} ok={ok} {ms * 1e3:.1f} us {100 * w.numel() * 2.5 / ms / 1e6 / copy_gbs:.1f}% of copy")
        tk.DEQUANT_CONFIG = None
    del w


def per_call_us(fns, calls: int = 192) -> tuple[float, float]:
    """Microseconds per call back to back, cycling through ``fns`` (distinct weights, more bytes than L2
    holds): eager, and replayed from one CUDA graph of ``calls`` calls."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(calls):
        fns[i % len(fns)]()
    end.record()
    torch.cuda.synchronize()
    eager = start.elapsed_time(end) * 1e3 / calls
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fns[0]()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return eager, start.elapsed_time(end) * 1e3 / calls


SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192))  # (out, in): q/o, gate/up, down, the 8192 square
CONFIGS = ((4, 16, 4), (2, 16, 2), (2, 32, 4), (4, 32, 8), (8, 16, 4), (1, 16, 2))  # rows, blocks per step, warps
layers, dense_ms = {}, {}
torch.manual_seed(0)
for n, k in SHAPES:
    linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    layers[n, k] = (linear, L.NF4Linear.from_linear(linear, compute_dtype=torch.bfloat16), torch.randn(1, k, device="cuda", dtype=torch.bfloat16))
    dense_ms[n, k] = bench(lambda: torch.nn.functional.linear(layers[n, k][2], linear.weight))
default = tk.GEMV_CONFIG  # None: the package times its candidates per shape (benchmarks/gemv_sweep.py sweeps them all)
print("gemv settings (rows, blocks/step, warps) x shape (out x in): us (x dense bf16), L2 flushed")
print("dense: " + ", ".join(f"{n}x{k} {dense_ms[n, k] * 1e3:.1f} us" for n, k in SHAPES))
with torch.no_grad():
    for rows_, blocks, warps in CONFIGS:
        tk.GEMV_CONFIG = dict(rows=rows_, blocks_per_step=blocks, num_warps=warps, num_stages=3, split=1)
        cells = []
        for n, k in SHAPES:
            linear, layer, x = layers[n, k]
            expected = torch.nn.functional.linear(x.float(), layer.dequantize(torch.float32))
            ok = torch.allclose(layer(x).float(), expected, atol=2e-2, rtol=2e-2)
            ms = bench(lambda: layer(x))
            cells.append(f"{ms * 1e3:.1f} ({ms / dense_ms[n, k]:.2f}x){'' if ok else ' WRONG'}")
        print(f"{rows_}/{blocks}/{warps}: " + " | ".join(cells), flush=True)
    tk.GEMV_CONFIG = default
    print(f"per call with {default}: eager back to back / CUDA graph replay, us")
    for n, k in SHAPES:
        _, _, x = layers[n, k]
        copies = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(-(-(256 << 20) // (n * k // 2)))]
        nf4s = [L.NF4Linear.from_linear(c, compute_dtype=torch.bfloat16) for c in copies]
        nf4 = per_call_us([lambda m=m: m(x) for m in nf4s])
        dense = per_call_us([lambda c=c: torch.nn.functional.linear(x, c.weight) for c in copies])
        del copies, nf4s
        print(f"{n}x{k}: NF4Linear {nf4[0]:.1f} / {nf4[1]:.1f}; dense {dense[0]:.1f} / {dense[1]:.1f}; "
              f"graph ratio {nf4[1] / dense[1]:.2f}x", flush=True)
