"""Device-side debug helper: runs each Triton kernel alone, synchronously, over blocksizes and dtypes,
and times the nested vs plain dequantize kernels (no L2 flush). Prints the first failure."""

import sys

import torch
import triton.testing

import lightning_nf4 as L
from lightning_nf4.kernels import ops

for bs in (32, 64, 128, 256, 512, 1024, 4096):
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((64, 64), (100, 70), (33, 17)):
            w = (torch.randn(shape) * 0.02).to(dtype).cuda()
            try:
                q = L.quantize_nf4(w, bs, False)
                torch.cuda.synchronize()
            except Exception as err:  # noqa: BLE001
                print("QUANT FAIL", bs, dtype, shape, repr(err)[:200]); sys.exit(1)
            try:
                q.dequantize(dtype)
                torch.cuda.synchronize()
            except Exception as err:  # noqa: BLE001
                print("DEQUANT FAIL", bs, dtype, shape, repr(err)[:200]); sys.exit(1)
print("all kernels ran")
w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) * 0.02
for dq in (False, True):
    q = L.quantize_nf4(w, 64, dq)
    n = q.nested
    f = lambda: ops.dequantize_4bit(q.packed, q.absmax, q.code, 64, q.numel, torch.bfloat16, n.absmax if n else None, n.code if n else None, n.offset if n else None, 256)  # noqa: E731
    g = lambda: torch.ops.lightning_nf4.dequantize_4bit(q.packed, q.absmax, q.code, 64, q.numel, torch.bfloat16, n.absmax if n else None, n.code if n else None, n.offset if n else None, 256)  # noqa: E731
    from lightning_nf4.kernels import triton_kernels as tk
    h = lambda: tk.dequantize_4bit(q.packed, q.absmax, q.code, 64, q.numel, torch.bfloat16, n.absmax if n else None, n.code if n else None, n.offset if n else None, 256)  # noqa: E731
    print("double_quant", dq, "op ms", triton.testing.do_bench(f, return_mode="median"), "torch.ops ms", triton.testing.do_bench(g, return_mode="median"), "direct ms", triton.testing.do_bench(h, return_mode="median"))
    print(torch.profiler.profile.__name__)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            f()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6))
