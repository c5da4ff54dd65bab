"""Run by ``test_cpu_paths.py`` in a subprocess: the C kernels read nothing past their tensors. Each tensor they
read ends just before an unreadable page (``tests.guarded``), so a read past the end kills this process (SIGSEGV).
Shapes with a partial last block and an odd number of codes, every output dtype, bf16 and fp32 inputs to the
gemv, and both the AVX-512 and the portable paths (where the machine has AVX-512)."""

import torch

import lightning_nf4 as L
from lightning_nf4.kernels import cpu
from tests.guarded import at_page_end, guarded

assert cpu.available(), "the C kernels are not built"
torch.manual_seed(0)
for simd in (None, False):  # detected (AVX-512 where there is one), then the portable code
    cpu.set_simd(simd)
    for double_quant in (True, False):
        for shape in ((10, 70), (7, 9), (3, 1000)):  # partial last blocks; 63 codes: a half byte at the end
            q = L.quantize_nf4(torch.randn(*shape) * 0.02, 64, double_quant)
            args = guarded(q)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                got = cpu.dequantize_4bit(args[0], args[1], args[2], 64, q.numel, dtype, *args[3:])
                assert torch.equal(got, q.dequantize(dtype).reshape(-1)), ("dequantize", shape, dtype, double_quant, simd)
            weight = at_page_end((torch.randn(*shape) * 0.02).to(torch.bfloat16))
            packed, absmax = cpu.quantize_4bit(weight, at_page_end(q.code), 64)
            assert torch.equal(packed.reshape(-1), L.quantize_nf4(weight, 64, False).packed.reshape(-1)), ("quantize", shape)
        for n, k in ((6, 128), (5, 192)):
            q = L.quantize_nf4(torch.randn(n, k) * 0.02, 64, double_quant)
            args = guarded(q)
            for xdtype in (torch.bfloat16, torch.float32):
                x = at_page_end(torch.randn(k).to(xdtype))
                got = cpu.gemv_4bit(x, args[0], args[1], args[2], 64, n, k, *args[3:]).float()
                torch.testing.assert_close(got, q.dequantize(torch.float32) @ x.float(), atol=2e-2, rtol=2e-2)
cpu.set_simd(None)
print("C kernels read within their tensors")
