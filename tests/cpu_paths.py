"""Helpers for tests that run every CPU code path: the C kernels (detected SIMD, i.e. AVX-512 where the CPU
has it, and the portable C) and the plain-PyTorch fallback; and the error bound of a 1-token gemv."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

from lightning_nf4.kernels import cpu

CPU_PATHS = ("c", "c-portable", "torch")
DISABLE = "LIGHTNING_NF4_DISABLE_CPU_KERNELS"


@contextmanager
def cpu_path(name: str) -> Iterator[None]:
    """Run the block on one CPU path: ``"c"`` (the C kernels with the SIMD the CPU has), ``"c-portable"``
    (the C kernels' scalar code, ``cpu.set_simd(False)``) or ``"torch"`` (the plain-PyTorch fallback, through
    the package's own switch: ``LIGHTNING_NF4_DISABLE_CPU_KERNELS=1`` as the C library is looked up)."""
    if name == "torch":
        previous = os.environ.get(DISABLE)
        os.environ[DISABLE] = "1"
        cpu._library.cache_clear()
        try:
            assert not cpu.available() and not cpu.supports(torch.float32)
            yield
        finally:
            if previous is None:
                os.environ.pop(DISABLE, None)
            else:
                os.environ[DISABLE] = previous
            cpu._library.cache_clear()
        return
    if name not in ("c", "c-portable"):
        raise ValueError(name)
    if not cpu.available():
        pytest.skip("the C kernels are not built (no C compiler at install time)")
    cpu.set_simd(None if name == "c" else False)
    try:
        yield
    finally:
        cpu.set_simd(None)


class CountingPool:
    """A real two-thread pool that counts the tasks ``cpu._run_blocks`` hands it: proof that a call split its
    blocks across threads (the calling thread takes the first share itself)."""

    def __init__(self) -> None:
        self.submitted = 0
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-nf4")

    def submit(self, fn, *args):
        self.submitted += 1
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


@contextmanager
def two_threads() -> Iterator[CountingPool]:
    """``torch.get_num_threads() == 2`` and a counting pool, whatever the machine, for the block."""
    monkeypatch = pytest.MonkeyPatch()
    pool = CountingPool()
    threads = torch.get_num_threads()
    monkeypatch.setattr(cpu, "_pool", lambda: pool)
    torch.set_num_threads(2)
    try:
        yield pool
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
        pool.shutdown()


_MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def _ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at ``magnitude`` (float64), at least the spacing of its smallest normal."""
    tiny = torch.finfo(dtype).tiny
    exponent = torch.floor(torch.log2(magnitude.clamp(min=tiny)))
    return torch.pow(2.0, exponent - _MANTISSA_BITS[dtype])


def assert_gemv_within_rounding(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """``out`` (a ``W @ x (+ bias)`` in ``out.dtype``) against the exact result in float64, with the bound the
    arithmetic allows and no more: an fp32 dot product of n terms, in any order and with ``W``'s scale applied
    per block or per element, is within ``(n + 2) * 2**-24 * sum|w x|`` of the exact one; the cast to the
    output dtype adds half an ulp; a bias added in the output dtype adds another half ulp of the sum.
    A gain error of 1.5% is several bf16 ulps, so it fails."""
    dtype = out.dtype
    w64, x64 = weight.detach().double(), x.detach().reshape(-1).double()
    exact = w64 @ x64
    n = x64.numel()
    acc = (n + 2) * 2.0**-24 * (w64.abs() @ x64.abs())
    tol = acc if dtype == torch.float32 else acc + 0.5 * _ulp(exact.abs() + acc, dtype)
    expected = exact
    if bias is not None:
        expected = exact + bias.to(dtype).double()
        tol = tol + 0.5 * _ulp(expected.abs() + tol, dtype)
    got = out.detach().reshape(-1).double()
    excess = (got - expected).abs() - tol
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"{dtype} gemv off by {float((got - expected).abs()[worst]):.3e} at row {worst} (allowed {float(tol[worst]):.3e}; "
        f"exact {float(expected[worst]):.6e}, got {float(got[worst]):.6e})"
    )
    assert math.isfinite(float(got.abs().max()))
