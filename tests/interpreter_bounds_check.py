"""Run by ``test_triton_interpreter.py`` under ``TRITON_INTERPRET=1``: the gemv and dequantize kernels read nothing
past their tensors. Each tensor they read is copied so that its last byte sits just before a page that cannot be
read (``mprotect``), so a read past the end kills this process (SIGSEGV) instead of reading a neighbour silently.
The shapes leave a partial last program: the gemv's rows past N (clamped to the last row), the dequantize's
masked tail, and a group launch whose last member ends inside its last program."""

import torch

import lightning_nf4 as L
from lightning_nf4.kernels import triton_kernels as tk
from tests.guarded import at_page_end, guarded

torch.manual_seed(0)
tk.DEQUANT_CONFIG = {"outputs": 256, "num_warps": 4}  # no timing: triton.testing needs a GPU
for double_quant in (True, False):
    for rows in (2, 4):  # 6 rows: the last program of 4 has two rows past N, clamped to the last
        tk.GEMV_CONFIG = {"rows": rows, "blocks_per_step": 2, "num_warps": 1, "num_stages": 1, "split": 1}
        q = L.quantize_nf4(torch.randn(6, 128) * 0.02, 64, double_quant)
        packed, absmax, code, nested_absmax, nested_code, offset, nested_blocksize = guarded(q)
        x = at_page_end(torch.randn(128))
        got = tk.gemv_4bit(x, packed, absmax, code, 64, 6, 128, nested_absmax, nested_code, offset, nested_blocksize)
        torch.testing.assert_close(got, q.dequantize(torch.float32) @ x, atol=1e-5, rtol=1e-5)
    q = L.quantize_nf4(torch.randn(10, 70) * 0.02, 64, double_quant)  # 700 codes: a masked tail of 188
    packed, absmax, code, nested_absmax, nested_code, offset, nested_blocksize = guarded(q)
    got = tk.dequantize_4bit(packed, absmax, code, 64, q.numel, torch.float32, nested_absmax, nested_code, offset, nested_blocksize)
    assert torch.equal(got, q.dequantize(torch.float32).reshape(-1)), ("dequantize", double_quant)
# One group launch: members need 16-byte aligned tensors (so sizes that are multiples of 16 here, the copies ending
# at a page end) and numels that are multiples of 64; the second member ends inside its last program of 4096 outputs.
tk.DEQUANT_CONFIG = {"outputs": 4096, "num_warps": 4}
group = [L.quantize_nf4(torch.randn(*shape) * 0.02, 64, False) for shape in ((64, 128), (24, 128))]
members = [guarded(q) for q in group]
assert tk._groupable([m[0] for m in members], [m[1] for m in members], [], [q.numel for q in group]), "not one group launch"
flat = tk.dequantize_4bit_group([m[0] for m in members], [m[1] for m in members], members[0][2], 64, [q.numel for q in group],
                                torch.float32, [], None, [])
assert torch.equal(flat, torch.cat([q.dequantize(torch.float32).reshape(-1) for q in group])), "group"
print("interpreter kernels read within their tensors")
