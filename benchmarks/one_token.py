"""One eager 1-token call of ``NF4Linear`` against ``F.linear`` on the same weight (issue 12, goal 5).

Calls run back to back and cycle through enough distinct weights that no cache holds them (256 MiB of NF4 codes
on a GPU), so the time per call is what decoding pays per linear: the host's Python and launch cost when that is
longer than the kernel, the kernel otherwise. On CUDA the same calls replayed from a CUDA graph give the GPU time
alone (what a CUDA-graphed decode pays).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

import lightning_nf4


def _copies(n: int, k: int, device: torch.device) -> int:
    """Distinct weights to cycle through: 256 MiB of NF4 codes on a GPU (more than its L2), one on the CPU."""
    return -(-(256 << 20) // (n * k // 2)) if device.type == "cuda" else 1


def per_call_us(fns: list[Callable[[], object]], device: torch.device, calls: int) -> float:
    """Microseconds per call of ``calls`` back-to-back calls cycling through ``fns`` (after one round of warm-up)."""
    for fn in fns:
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(calls):
        fns[i % len(fns)]()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e6


def graph_us(fns: list[Callable[[], object]], calls: int) -> float:
    """Microseconds per call of the same loop captured in one CUDA graph and replayed (GPU time only)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def compare(n: int, k: int, device: torch.device, dtype: torch.dtype = torch.bfloat16, calls: int = 0) -> list[str]:
    """Lines comparing one 1-token call (input ``[1, 1, k]``, as a decode step passes it) of ``NF4Linear`` (double
    quantization, blocksize 64) with ``F.linear`` on the float weight it was quantized from."""
    calls = calls or (400 if device.type == "cuda" else 20)
    torch.manual_seed(0)
    dense, nf4 = [], []
    for _ in range(_copies(n, k, device)):
        linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        dense.append(linear.weight.detach())
        nf4.append(lightning_nf4.NF4Linear.from_linear(linear, blocksize=64, double_quant=True, compute_dtype=dtype))
    x = torch.randn(1, 1, k, device=device, dtype=dtype)
    nf4_fns = [lambda m=m: m(x) for m in nf4]
    dense_fns = [lambda w=w: F.linear(x, w) for w in dense]
    with torch.no_grad():
        eager = per_call_us(nf4_fns, device, calls), per_call_us(dense_fns, device, calls)
        lines = [f"1-token call at {n}x{k} {str(dtype).removeprefix('torch.')}, eager, back to back over {len(nf4)} "
                 f"weight(s), {calls} calls: NF4Linear {eager[0]:.1f} us, F.linear {eager[1]:.1f} us "
                 f"({eager[0] / eager[1]:.2f}x dense)"]
        if device.type == "cuda":
            graphed = graph_us(nf4_fns, calls), graph_us(dense_fns, calls)
            lines.append(f"  the same calls replayed from a CUDA graph (GPU time): NF4Linear {graphed[0]:.1f} us, "
                         f"F.linear {graphed[1]:.1f} us ({graphed[0] / graphed[1]:.2f}x dense)")
    return lines
