"""NF4 kernel benchmark: lightning-nf4 vs bitsandbytes vs torchao, side by side.

Measures, on one weight matrix drawn from N(0, 0.02):
  * quantize and dequantize time (median ms), dequantize bandwidth in GB/s counting 0.5 byte read
    plus ``itemsize`` bytes written per weight (scales ignored), and the relative error
    ||deq - w|| / ||w||; on CUDA also that bandwidth as % of a device-to-device copy
    (``dst.copy_(src)`` of 1 GiB, read + write bytes) measured in the same run;
  * on CUDA (or with ``--matmul``): a ``--tokens`` x K matmul and a 1-token matvec against W.T with
    the dense weight, lightning-nf4 (dequantize, then ``F.linear``) and ``bitsandbytes.matmul_4bit``;
    on CUDA the matvec also replayed from a CUDA graph (GPU time without the host's launch cost).

Timing: CUDA uses ``torch.cuda.Event`` pairs, one per rep, after warm-up, with L2 flushed (a
256 MiB buffer zeroed) before every rep, as ``triton.testing.do_bench`` does; CPU uses
``time.perf_counter`` after warm-up. Both report the median. Inputs are random and not rotated
(the L2 flush makes rotation unnecessary on GPU). A peer that is missing or fails shows "n/a (reason)".

    python benchmarks/kernels.py                      # cuda if available, else cpu
    python benchmarks/kernels.py --device cpu --threads 2 --out cpu.md
    python benchmarks/kernels.py --device cuda --shape 8192x8192 --out h100.md
    python benchmarks/kernels.py --device cuda --dequant-shapes      # only: dequantize at the Llama-3-8B shapes,
                                                                     # per-card launch choice vs a sweep (dequant_shapes.py)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import lightning_nf4

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Row = list[str]
Peer = tuple[str, Optional[str], Callable[..., Any], Callable[..., Any]]  # name, unavailable-reason, two callables


def reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"


def quiet_import(fn: Callable[[], Any]) -> tuple[Any, Optional[str]]:
    """Run an import thunk with its chatter silenced; return (result, None) or (None, reason)."""
    logging.disable(logging.WARNING)  # torch's log handlers hold the real stderr; redirecting misses them
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return fn(), None
    except Exception as e:  # noqa: BLE001 - any failure means "peer unavailable"
        return None, reason(e)
    finally:
        logging.disable(logging.NOTSET)


def _import_bnb() -> Any:
    import bitsandbytes.functional  # binds the package name too

    return bitsandbytes


def _import_torchao() -> tuple[Any, Callable[[torch.Tensor], Any]]:
    import torchao

    try:  # torchao >= 0.1x moved NF4 from torchao.dtypes.nf4tensor to torchao.quantization
        from torchao.quantization import to_nf4
    except ImportError:
        from torchao.dtypes.nf4tensor import to_nf4  # type: ignore[no-redef]
    return torchao, to_nf4


BNB, BNB_ERR = quiet_import(_import_bnb)
AO, AO_ERR = quiet_import(_import_torchao)


def fail(e: BaseException) -> str:
    return f"n/a ({reason(e)})"


class Timer:
    def __init__(self, device: torch.device, reps: int, warmup: int) -> None:
        self.device, self.reps, self.warmup = device, reps, warmup
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds of ``fn()``."""
        for _ in range(self.warmup):
            fn()
        if self.flush is None:
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.reps)]
        torch.cuda.synchronize(self.device)
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in events)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} torch threads)"


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Device-to-device copy GB/s of a 1 GiB random tensor, counting read + write."""
    src = torch.randn(512 << 20, dtype=torch.bfloat16, device=device)  # 512 Mi bf16 = 1 GiB
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.nbytes / ms / 1e6


def peers(dtype: torch.dtype) -> list[Peer]:
    """(name, unavailable-reason, quantize(w) -> q, dequantize(q) -> tensor) for every library."""
    rows: list[Peer] = []
    for dq in (True, False):
        rows.append((f"lightning-nf4 (double_quant={dq})", None,
                     lambda w, dq=dq: lightning_nf4.quantize_nf4(w, blocksize=64, double_quant=dq),
                     lambda q: q.dequantize(dtype)))
    for dq in (True, False):
        rows.append((f"bitsandbytes (compress_statistics={dq})", BNB_ERR,
                     lambda w, dq=dq: BNB.functional.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4"),
                     lambda q: BNB.functional.dequantize_4bit(q[0], q[1])))
    # torchao always double-quantizes (scaler_block_size=256) and dequantizes to the input dtype.
    rows.append(("torchao to_nf4 (double quant)", AO_ERR,
                 lambda w: AO[1](w, block_size=64, scaler_block_size=256),
                 lambda q: q.get_original_weight()))
    return rows


def table(header: Row, rows: list[Row]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)]


def bench_quant(w: torch.Tensor, timer: Timer, copy_gbs: Optional[float]) -> list[str]:
    dtype, n = w.dtype, w.numel()
    bytes_moved = n * (0.5 + w.element_size())
    header = ["library", "quantize ms", "dequantize ms", "dequant GB/s"] + (["% of copy BW"] if copy_gbs else []) + ["rel. error"]
    rows: list[Row] = []
    for name, err, quant, dequant in peers(dtype):
        row = [name] + ["n/a"] * (len(header) - 1)
        rows.append(row)
        if err is not None:
            row[1] = f"n/a ({err})"
            continue
        try:
            q = quant(w)
            row[1] = f"{timer(lambda: quant(w)):.3f}"
        except Exception as e:  # noqa: BLE001
            row[1] = fail(e)
            continue
        try:
            deq = dequant(q)
            rel = ((deq.float() - w.float()).norm() / w.float().norm()).item()
            ms = timer(lambda: dequant(q))
            gbs = bytes_moved / ms / 1e6
            row[2:] = [f"{ms:.3f}", f"{gbs:.1f}"] + ([f"{100 * gbs / copy_gbs:.1f}%"] if copy_gbs else []) + [f"{rel:.5f}"]
        except Exception as e:  # noqa: BLE001
            row[2] = fail(e)
    return table(header, rows)


def _nf4_layer(w: torch.Tensor) -> torch.nn.Module:
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    return lightning_nf4.NF4Linear.from_linear(linear, blocksize=64, double_quant=True, compute_dtype=w.dtype)


def _no_grad(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(x)


def _graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured once in a CUDA graph; the returned callable replays it. Timing the replay gives the
    GPU time of the call without the host's launch cost (as decoding under CUDA graphs runs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_matmul(w: torch.Tensor, tokens: int, timer: Timer) -> list[str]:
    torch.manual_seed(1)
    K = w.shape[1]
    xs = {f"{tokens}-token matmul": torch.randn(tokens, K, device=w.device).to(w.dtype),
          "1-token matvec": torch.randn(1, K, device=w.device).to(w.dtype)}
    impls: list[Peer] = [  # (name, unavailable-reason, prepare() -> q, call(q, x) -> y); the first is the baseline
        ("dense " + str(w.dtype).removeprefix("torch."), None, lambda: None, lambda _, x: F.linear(x, w)),
        # NF4Linear as a model calls it, without autograd: 1 token reads NF4 directly (gemv),
        # more tokens dequantize then matmul
        ("lightning-nf4 NF4Linear", None, lambda: _nf4_layer(w),
         lambda layer, x: _no_grad(layer, x)),
        ("bitsandbytes matmul_4bit", BNB_ERR,
         lambda: BNB.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"),
         lambda q, x: BNB.matmul_4bit(x, q[0].t(), quant_state=q[1])),
    ]
    if w.device.type == "cuda":  # the matvec again, replayed from a CUDA graph: GPU time without launch cost
        xs["1-token matvec, CUDA graph"] = xs["1-token matvec"]
    header = ["implementation"] + [f"{k} ms (x dense)" for k in xs]
    rows: list[Row] = []
    base: dict[str, float] = {}
    for name, err, prepare, call in impls:
        row = [name] + ["n/a"] * len(xs)
        rows.append(row)
        if err is not None:
            row[1] = f"n/a ({err})"
            continue
        try:
            q = prepare()
        except Exception as e:  # noqa: BLE001
            row[1] = fail(e)
            continue
        for i, (label, x) in enumerate(xs.items(), start=1):
            try:
                fn = lambda: call(q, x)  # noqa: E731
                ms = timer(_graphed(fn) if "CUDA graph" in label else fn)
                if name == impls[0][0]:
                    base[label] = ms
                row[i] = f"{ms:.3f} ({ms / base[label]:.2f}x)" if label in base else f"{ms:.3f}"
            except Exception as e:  # noqa: BLE001
                row[i] = fail(e)
    return table(header, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default=None, help="NxK weight shape (default 4096x4096 on cpu, 8192x8192 on cuda)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on cpu")
    p.add_argument("--reps", type=int, default=None, help="timed reps (default 5 on cpu, 50 on cuda)")
    p.add_argument("--tokens", type=int, default=4096, help="rows of x in the matmul benchmark")
    p.add_argument("--matmul", action="store_true", help="run the matmul rows on cpu too (always on for cuda)")
    p.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    p.add_argument("--dequant-shapes", nargs="?", const="", default=None, metavar="NxK[,NxK...]",
                   help="instead of the default tables: dequantize at each shape (default: the Llama-3-8B ones and "
                        "8192x8192), the package's per-card launch choice against a sweep of launch settings")
    a = p.parse_args()

    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    n, k = (int(s) for s in (a.shape or ("8192x8192" if device.type == "cuda" else "4096x4096")).lower().split("x"))
    reps = a.reps or (50 if device.type == "cuda" else 5)
    timer = Timer(device, reps=max(reps, 5), warmup=10 if device.type == "cuda" else 2)
    dtype = DTYPES[a.dtype]

    versions = [f"torch {torch.__version__}", f"lightning-nf4 {lightning_nf4.__version__}",
                f"bitsandbytes {BNB.__version__}" if BNB else f"bitsandbytes n/a ({BNB_ERR})",
                f"torchao {AO[0].__version__}" if AO else f"torchao n/a ({AO_ERR})"]
    if device.type == "cuda":
        triton, _ = quiet_import(lambda: __import__("triton"))
        versions.insert(1, f"triton {triton.__version__}" if triton else "triton n/a")
    out = [f"Device: {device_name(device)}", "Versions: " + ", ".join(versions),
           f"Weight: {n}x{k} {a.dtype} ~ N(0, 0.02), blocksize 64; median of {timer.reps} reps after {timer.warmup} warm-up"
           + ", inputs not rotated" + (", L2 flushed before each rep" if device.type == "cuda" else "")]
    copy_gbs = None
    if device.type == "cuda":
        copy_gbs = copy_bandwidth(device, timer)
        out.append(f"Device-to-device copy bandwidth (1 GiB, read+write): {copy_gbs:.0f} GB/s")
    if a.dequant_shapes is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import dequant_shapes

        shapes = dequant_shapes.parse_shapes(a.dequant_shapes)
        out[2] = (f"Weights: {', '.join(f'{n}x{k}' for n, k in shapes)} {a.dtype} ~ N(0, 0.02), blocksize 64; median of "
                  f"{timer.reps} reps after {timer.warmup} warm-up" + (", L2 flushed before each rep" if device.type == "cuda" else ""))
        out += ["", f"NF4 dequantize ({a.dtype} out; bytes moved: 0.5 B read + {torch.empty((), dtype=dtype).element_size()} B "
                "written per weight; '% of copy': of a dst.copy_(src) moving the same bytes)", ""]
        out += dequant_shapes.run(shapes, dtype, device, timer, copy_gbs)
        print("\n".join(out))
        if a.out:
            with open(a.out, "w") as f:
                f.write("\n".join(out) + "\n")
        return
    torch.manual_seed(0)
    w = (torch.randn(n, k, device=device) * 0.02).to(dtype)
    with torch.no_grad():
        out += ["", f"NF4 quantize / dequantize ({a.dtype} out; GB/s counts 0.5 B read + {w.element_size()} B written per weight)", ""]
        out += bench_quant(w, timer, copy_gbs)
        if device.type == "cuda" or a.matmul:
            out += ["", f"x @ W.T with W {n}x{k} (ms, ratio to dense in parentheses)", ""]
            out += bench_matmul(w, a.tokens, timer)
    print("\n".join(out))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
