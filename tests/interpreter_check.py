"""Run by ``test_triton_interpreter.py`` under ``TRITON_INTERPRET=1``: the Triton kernels' gather path on
the CPU, against the CPU kernels. (The warp-shuffle path is inline PTX; it runs only in ``test_gpu.py``.)"""

import torch

import lightning_nf4 as L
from lightning_nf4.kernels import triton_kernels as tk

tk.DEQUANT_CONFIG = {"outputs": 256, "num_warps": 4}  # no timing: triton.testing needs a GPU
torch.manual_seed(0)
for double_quant in (True, False):
    # numel a multiple of the program's outputs (no masks) and not (masked tail)
    qs = [L.quantize_nf4(torch.randn(*s) * 0.02, 64, double_quant) for s in ((16, 64), (24, 96), (10, 70))]
    for q in qs:
        got = tk.dequantize_4bit(q.packed, q.absmax, q.code, 64, q.numel, torch.float32, *q.nested_args())
        assert torch.equal(got, q.dequantize(torch.float32).reshape(-1)), ("dequantize", q.shape, double_quant)
    group = qs[:2]
    nested = [q.nested for q in group] if double_quant else []
    flat = tk.dequantize_4bit_group(
        [q.packed for q in group], [q.absmax for q in group], group[0].code, 64, [q.numel for q in group], torch.float32,
        [n.absmax for n in nested], nested[0].code if nested else None, [n.offset for n in nested],
    )
    assert torch.equal(flat, torch.cat([q.dequantize(torch.float32).reshape(-1) for q in group])), ("group", double_quant)
    for n, k in ((8, 128), (6, 320)):  # 6 rows: a partial last program; 320: five blocks per row
        q = L.quantize_nf4(torch.randn(n, k) * 0.02, 64, double_quant)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(k).to(dtype)
            got = tk.gemv_4bit(x, q.packed, q.absmax, q.code, 64, n, k, *q.nested_args()).float()
            ref = q.dequantize(torch.float32) @ x.float()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
print("interpreter kernels match")
