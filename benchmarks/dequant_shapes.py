"""Dequantize bandwidth at the Llama-3-8B weight shapes (``kernels.py --dequant-shapes``).

For each shape, with and without double quantization: the package's own launch setting (timed once per card
and size class by ``triton_kernels._choose``, read back with ``dequantize_launch_config``) against every
setting of a small sweep (outputs per program x warps), each as % of a device copy of the same bytes. A
"choice / best" above 1 says the per-card choice misses a faster setting. The kernel is flat over ``numel``,
so 14336x4096 and 4096x14336 run the same launches and differ only by noise.

Launch settings exist only for the Triton kernels: on CUDA, or on the CPU under ``TRITON_INTERPRET=1``
(correctness of the sweep's plumbing only; its times mean nothing). On a plain CPU the C kernel is timed alone.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Optional

import torch

import lightning_nf4
from lightning_nf4.kernels import ops
from lightning_nf4.kernels import triton_kernels as tk

SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (8192, 8192))  # (out, in)
SWEEP = tuple(itertools.product((2048, 4096, 8192, 16384), (4, 8)))  # (outputs per program, num_warps)

Timer = Callable[[Callable[[], Any]], float]  # median milliseconds of a call


def parse_shapes(text: Optional[str]) -> tuple[tuple[int, int], ...]:
    """``"4096x4096,1024x4096"`` -> ((4096, 4096), (1024, 4096)); None or "" -> SHAPES."""
    if not text:
        return SHAPES
    try:
        return tuple(tuple(int(v) for v in part.lower().split("x")) for part in text.split(","))  # type: ignore[misc]
    except ValueError:
        raise SystemExit(f"--dequant-shapes takes NxK[,NxK...] (e.g. 4096x4096,1024x4096); got {text!r}") from None


def has_launch_settings(device: torch.device) -> bool:
    """Whether dequantize runs the Triton kernel here (CUDA, or Triton's interpreter on the CPU)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _dequantizer(q: lightning_nf4.NF4Weight, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """One flat dequantize of ``q``: through the Triton host code where it has launch settings (so that
    ``DEQUANT_CONFIG`` applies), else through the registered device kernel (the CPU's C kernel)."""
    fn = tk.dequantize_4bit if has_launch_settings(q.device) else ops.dequantize_4bit
    args = (q.packed, q.absmax, q.code, q.blocksize, q.numel, dtype, *q.nested_args())
    return lambda: fn(*args)


def copy_ms(nbytes: int, device: torch.device, timer: Timer) -> float:
    """Median ms of ``dst.copy_(src)`` moving ``nbytes`` in all (half read, half written)."""
    src = torch.randint(0, 256, (max(nbytes // 2, 1),), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src))


def _with_setting(setting: Optional[tuple[int, int]], fn: Callable[[], Any]) -> Any:
    """``fn()`` with ``DEQUANT_CONFIG`` forced to ``setting`` (None: the package's own choice)."""
    saved = tk.DEQUANT_CONFIG
    tk.DEQUANT_CONFIG = None if setting is None else {"outputs": setting[0], "num_warps": setting[1]}
    try:
        return fn()
    finally:
        tk.DEQUANT_CONFIG = saved


def _short(e: BaseException) -> str:
    return f"n/a ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:60]})"


def _choice_label(q: lightning_nf4.NF4Weight, dtype: torch.dtype) -> str:
    """The launch setting the package used for ``q`` (after its first dequantize)."""
    if not has_launch_settings(q.device):
        return "C kernel"
    config = tk.dequantize_launch_config(q.device, q.numel, q.double_quant, dtype, q.blocksize)
    return "n/a (none recorded)" if config is None else f"{config['outputs']}/{config['num_warps']}"


def measure(n: int, k: int, double_quant: bool, dtype: torch.dtype, device: torch.device, timer: Timer) -> dict:
    """Times of one shape: the copy of the same bytes, the package's choice and each sweep setting."""
    torch.manual_seed(0)
    w = (torch.randn(n, k, device=device) * 0.02).to(dtype)
    q = lightning_nf4.quantize_nf4(w, blocksize=64, double_quant=double_quant)
    del w
    moved = q.numel * (0.5 + torch.empty((), dtype=dtype).element_size())  # codes read + output written
    result: dict = {"shape": f"{n}x{k}", "double_quant": double_quant, "bytes": moved,
                    "copy_ms": copy_ms(int(moved), device, timer), "sweep": {}}
    dequantize = _dequantizer(q, dtype)
    try:
        expected = _with_setting(None, dequantize)  # on CUDA the first call times the candidates (once per size class)
        result["choice_ms"] = _with_setting(None, lambda: timer(dequantize))
        result["choice"] = _choice_label(q, dtype)
    except Exception as e:  # noqa: BLE001 - reported in the table (e.g. no GPU to time the candidates on)
        result["choice_error"] = _short(e)
        expected = None
    if not has_launch_settings(device):
        return result
    if expected is None:  # the reference for the sweep's bit-exactness check
        expected = ops.dequantize_4bit(q.packed.cpu(), q.absmax.cpu(), q.code.cpu(), q.blocksize, q.numel, dtype,
                                       *[t.cpu() if isinstance(t, torch.Tensor) else t for t in q.nested_args()]).to(device)
    for setting in SWEEP:
        try:
            got = _with_setting(setting, dequantize)
            if not torch.equal(got, expected):
                result["sweep"][setting] = "wrong"
                continue
            result["sweep"][setting] = _with_setting(setting, lambda: timer(dequantize))
        except Exception as e:  # noqa: BLE001
            result["sweep"][setting] = _short(e)
    return result


def _pct(moved: float, ms: float, ref_gbs: Optional[float]) -> str:
    return "" if ref_gbs is None else f"{100 * moved / ms / 1e6 / ref_gbs:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)]


def report(results: list[dict], copy_1gib_gbs: Optional[float]) -> list[str]:
    """The main table (choice, best of the sweep, their ratio) and the sweep's detail (% of same-bytes copy)."""
    header = ["weight", "double quant", "MB moved", "copy GB/s (same bytes)", "package's choice (outputs/warps)",
              "ms", "GB/s", "% of copy", "% of 1 GiB copy", "sweep best", "ms", "% of copy", "choice / best"]
    rows, detail = [], []
    for r in results:
        moved, copy_gbs = r["bytes"], r["bytes"] / r["copy_ms"] / 1e6
        row = [r["shape"], str(r["double_quant"]), f"{moved / 1e6:.1f}", f"{copy_gbs:.0f}"]
        if "choice_error" in r:
            row += [r["choice_error"], "", "", "", ""]
        else:
            ms = r["choice_ms"]
            row += [r["choice"], f"{ms:.4f}", f"{moved / ms / 1e6:.0f}", _pct(moved, ms, copy_gbs), _pct(moved, ms, copy_1gib_gbs)]
        timed = {s: v for s, v in r["sweep"].items() if isinstance(v, float)}
        if timed:
            best = min(timed, key=timed.get)
            ratio = f"{r['choice_ms'] / timed[best]:.2f}x" if "choice_ms" in r else ""
            row += [f"{best[0]}/{best[1]}", f"{timed[best]:.4f}", _pct(moved, timed[best], copy_gbs), ratio]
        else:
            row += ["n/a (no launch settings: C kernel)" if not r["sweep"] else "n/a (no setting ran)", "", "", ""]
        rows.append(row)
        if r["sweep"]:
            detail.append([r["shape"], str(r["double_quant"])] + [
                _pct(moved, v, copy_gbs) if isinstance(v, float) else str(v) for v in (r["sweep"].get(s, "") for s in SWEEP)])
    out = _table(header, rows)
    if detail:
        out += ["", "Sweep detail: % of a copy of the same bytes per setting (outputs/warps); 'wrong' = output not bit-equal", ""]
        out += _table(["weight", "double quant"] + [f"{o}/{w}" for o, w in SWEEP], detail)
    return out


def run(shapes: tuple[tuple[int, int], ...], dtype: torch.dtype, device: torch.device, timer: Timer,
        copy_1gib_gbs: Optional[float]) -> list[str]:
    """Measure every shape with and without double quantization; the report's lines."""
    results = []
    with torch.no_grad():
        for (n, k), dq in itertools.product(shapes, (True, False)):
            results.append(measure(n, k, dq, dtype, device, timer))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return report(results, copy_1gib_gbs)
