"""Every CPU code path against bitsandbytes, bit for bit: the C kernels with the SIMD the CPU has (AVX-512 here)
and their portable C, on one thread and on two (a tensor past the threading threshold), and the plain-PyTorch
fallback that serves when the C library was not built, double quantization included."""

import logging

import pytest
import torch
from torch import nn

import lightning_nf4 as L
from lightning_nf4 import NF4Linear
from lightning_nf4.kernels import cpu, ops
from tests.cpu_paths import CPU_PATHS, assert_gemv_within_rounding, cpu_path, two_threads
from tests.guarded import run_bounds_check

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
try:
    import bitsandbytes.functional as F
except ImportError:
    F = None
needs_bitsandbytes = pytest.mark.skipif(F is None, reason="needs bitsandbytes, the reference (pip install -e '.[test]')")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# odd numel with a partial last block (33 x 17), blocks of 32 (one AVX-512 step per block), tensors smaller
# than one block, a block larger than the tensor, and a 1-column weight
SMALL = [((33, 17), 32), ((3, 5), 64), ((100, 70), 64), ((64, 64), 128), ((256, 1000), 256), ((130, 48), 4096), ((7, 1), 32)]
# 17,721 blocks of 64, the last one partial: more than two threads' minimum share (2 x 8192 blocks)
LARGE = (1031, 1100)


def formula(packed: torch.Tensor, state, numel: int) -> torch.Tensor:
    """The format's definition on bitsandbytes' own state, written out here: ``code[nibble] * absmax`` in fp32,
    with ``absmax = nested_code[q] * nested_absmax[i // 256] + offset`` under double quantization."""
    absmax = state.absmax
    if state.nested:
        absmax = state.state2.code[absmax.long()] * state.state2.absmax.repeat_interleave(256)[: absmax.numel()] + state.offset
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:numel].long()
    return state.code[nibbles] * absmax.repeat_interleave(state.blocksize)[:numel]


def assert_state_equals_bitsandbytes(ours: L.NF4Weight, packed: torch.Tensor, state, where: str = "") -> None:
    assert torch.equal(ours.packed, packed), f"packed codes ({where})"
    assert torch.equal(ours.absmax, state.absmax), f"absmax ({where})"  # uint8 codes under double quantization
    assert ours.double_quant == bool(state.nested) and torch.equal(ours.code, state.code), where
    if state.nested:
        assert torch.equal(ours.nested.absmax, state.state2.absmax), f"nested absmax ({where})"
        assert torch.equal(ours.nested.offset, state.offset), f"offset ({where})"
        assert torch.equal(ours.nested.code, state.state2.code), where


def check_against_bitsandbytes(w: torch.Tensor, blocksize: int, double_quant: bool, paths=CPU_PATHS, counted=None) -> None:
    """Quantize ``w`` with bitsandbytes once; then on each CPU path quantize and dequantize it (to every dtype, one
    weight and a group of two) and compare all of it with bitsandbytes. ``counted``: a ``CountingPool`` whose
    count each C path must raise by the calls it splits across threads (one quantize, three dequantizes, two
    group members)."""
    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    exact = formula(packed, state, w.numel()).view(w.shape)
    # bitsandbytes' own CPU dequantize too, where it is right: 0.50.2's native kernel gives wrong values when a
    # block is longer than a row (64 x 64 in blocks of 128: 3,580 of 4,096 differ from the formula on its own
    # state), and an odd last dim takes its slow generic path
    theirs = F.dequantize_4bit(packed, state) if w.shape[-1] % 2 == 0 and blocksize <= w.shape[-1] else None
    for path in paths:
        before = counted.submitted if counted is not None else 0
        with cpu_path(path):
            ours = L.quantize_nf4(w, blocksize, double_quant)
            out = {dtype: ours.dequantize(dtype) for dtype in DTYPES}
            nested = [ours.nested, ours.nested] if double_quant else []
            group = ops.dequantize_4bit_group(
                [ours.packed, ours.packed], [ours.absmax, ours.absmax], ours.code, blocksize, [ours.numel] * 2, w.dtype,
                [n.absmax for n in nested], nested[0].code if nested else None, [n.offset for n in nested],
            )
        where = f"{path}, {tuple(w.shape)} {w.dtype}, blocksize {blocksize}, double_quant={double_quant}"
        assert_state_equals_bitsandbytes(ours, packed, state, where)
        for dtype, got in out.items():
            assert torch.equal(got, exact.to(dtype)), f"dequantize to {dtype} ({where})"
        if theirs is not None:
            assert torch.equal(out[w.dtype], theirs), f"bitsandbytes' dequantize ({where})"
        assert torch.equal(group, torch.cat([out[w.dtype].reshape(-1)] * 2)), f"group dequantize ({where})"
        if counted is not None:
            assert counted.submitted - before == (0 if path == "torch" else 6), f"calls split across threads ({where})"


@needs_bitsandbytes
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_each_cpu_path_is_bit_exact_with_bitsandbytes(dtype, double_quant):
    for shape, blocksize in SMALL:
        w = (torch.randn(shape) * 0.02).to(dtype)
        w.view(-1)[:: max(1, w.numel() // 3)] *= 40  # outliers: blocks of very different scales
        check_against_bitsandbytes(w, blocksize, double_quant)


@needs_bitsandbytes
@pytest.mark.parametrize("double_quant", [False, True])
def test_each_cpu_path_past_the_threading_threshold(double_quant):
    """A weight of 17,721 blocks: the C kernels split it across two threads (quantize and dequantize), and every
    byte still equals bitsandbytes'."""
    numel = LARGE[0] * LARGE[1]
    assert -(-numel // 64) >= 2 * cpu._MIN_BLOCKS_PER_TASK and numel % 64
    for dtype in DTYPES:
        w = (torch.randn(LARGE) * 0.02).to(dtype)
        with two_threads() as pool:
            check_against_bitsandbytes(w, 64, double_quant, counted=pool)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_each_cpu_path_one_token_gemv(path, dtype, double_quant):
    """``NF4Linear``'s 1-token path (the fused C gemv, or dequantize + matvec on the fallback) within rounding of
    the exact product, for a weight whose rows the C gemv splits across two threads (2,100 rows of 512)."""
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(512, 2100), double_quant=double_quant, compute_dtype=dtype)
    x = torch.randn(1, 1, 512).to(dtype)
    with two_threads() as pool, cpu_path(path), torch.no_grad():
        out = layer(x)
    assert out.shape == (1, 1, 2100) and out.dtype == dtype
    # the C gemv scales the codes in fp32; the fallback multiplies by the weight dequantized to the dtype
    assert_gemv_within_rounding(out, x, layer.dequantize(torch.float32 if path != "torch" else dtype), layer.bias)
    assert pool.submitted == (0 if path == "torch" else 1)


@pytest.mark.skipif(not cpu.available(), reason="the C kernels are not built")
def test_c_kernels_read_nothing_past_their_tensors():
    """Dequantize (every output dtype), quantize and the gemv with each tensor they read ending just before an
    unreadable page, AVX-512 and portable paths, partial last blocks and a half byte at the end: a read past a
    tensor's end kills the subprocess (``tests/cpu_bounds_check.py``) instead of passing."""
    run_bounds_check("cpu_bounds_check.py", "C kernels read within their tensors")
