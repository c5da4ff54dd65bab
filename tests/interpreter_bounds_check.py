"""Run by ``test_triton_interpreter.py`` under ``TRITON_INTERPRET=1``: the gemv and dequantize kernels read nothing
past their tensors. Each tensor they read is copied so that its last byte sits just before a page that cannot be
read (``mprotect``), so a read past the end kills this process (SIGSEGV) instead of reading a neighbour silently.
The shapes leave a partial last program: the gemv's rows past N (clamped to the last row) and the dequantize's
masked tail."""

import ctypes
import mmap

import torch

import lightning_nf4 as L
from lightning_nf4.kernels import triton_kernels as tk

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_held = []  # the mappings outlive the tensors viewing them


def at_page_end(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose last byte is the last readable one: the next page is mapped unreadable."""
    nbytes = t.numel() * t.element_size()
    pages = -(-nbytes // PAGE) + 1
    region = mmap.mmap(-1, (pages + 1) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert _libc.mprotect(base + pages * PAGE, PAGE, 0) == 0, "mprotect failed"
    _held.append(region)
    view = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=pages * PAGE - nbytes)
    view.copy_(t.reshape(-1).view(torch.uint8))
    return view.view(t.dtype).view(t.shape)


def guarded(q):
    nested_absmax, nested_code, offset, nested_blocksize = q.nested_args()
    return (at_page_end(q.packed), at_page_end(q.absmax), at_page_end(q.code),
            None if nested_absmax is None else at_page_end(nested_absmax), nested_code, offset, nested_blocksize)


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
print("interpreter kernels read within their tensors")
