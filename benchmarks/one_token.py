"""One eager 1-token call of ``NF4Linear`` against ``F.linear`` on the same weight (issue 12, goal 5).

Calls run back to back and cycle through enough distinct weights that no cache holds them (256 MiB of NF4 codes
on a GPU), so the time per call is what decoding pays per linear: the host's Python and launch cost when that is
longer than the kernel, the kernel otherwise. On CUDA the same calls replayed from a CUDA graph give the GPU time
alone (what a CUDA-graphed decode pays).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import lightning_nf4
import lightning_nf4.kernels.ops


def _copies(n: int, k: int, device: torch.device) -> int:
    """Distinct weights to cycle through: 256 MiB of NF4 codes on a GPU (more than its L2), one on the CPU."""
    return -(-(256 << 20) // (n * k // 2)) if device.type == "cuda" else 1


def per_call_us(fns: list[Callable[[], object]], device: torch.device, calls: int) -> float:
    """Microseconds per call of ``calls`` back-to-back calls cycling through ``fns`` (after one round of warm-up)."""
    return host_and_wall_us(fns, device, calls)[1]


def host_and_wall_us(fns: list[Callable[[], object]], device: torch.device, calls: int) -> tuple[float, float]:
    """(host, wall) microseconds per call of ``calls`` back-to-back calls cycling through ``fns``: host is the time
    to issue them (the GPU's queue holds more than ``calls`` launches, so the host never waits for it), wall the
    time until the GPU has finished them too. On the CPU both are the same."""
    for fn in fns:
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(calls):
        fns[i % len(fns)]()
    issued = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    done = time.perf_counter()
    return (issued - start) / calls * 1e6, (done - start) / calls * 1e6


def graph_us(fns: list[Callable[[], object]], calls: int, replays: int = 1) -> float:
    """Microseconds per call of the same loop captured in one CUDA graph and replayed (GPU time only); with several
    ``replays``, the median replay."""
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
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def compare(n: int, k: int, device: torch.device, dtype: torch.dtype = torch.bfloat16, calls: int = 0, rounds: int = 1) -> list[str]:
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
        pairs = [(host_and_wall_us(nf4_fns, device, calls), host_and_wall_us(dense_fns, device, calls)) for _ in range(rounds)]
        (nf4_host, nf4_wall), (dense_host, dense_wall) = [
            tuple(statistics.median(p[side][i] for p in pairs) for i in (0, 1)) for side in (0, 1)]
        wall_ratios = [p[0][1] / p[1][1] for p in pairs]
        lines = [f"1-token call at {n}x{k} {str(dtype).removeprefix('torch.')}, eager, back to back over {len(nf4)} "
                 f"weight(s), {calls} calls, median of {rounds} alternating rounds: NF4Linear {nf4_wall:.1f} us, F.linear "
                 f"{dense_wall:.1f} us ({nf4_wall / dense_wall:.2f}x dense; rounds {min(wall_ratios):.2f}-{max(wall_ratios):.2f}x)",
                 f"  host time to issue them: NF4Linear {nf4_host:.1f} us, F.linear {dense_host:.1f} us "
                 f"({nf4_host / dense_host:.2f}x dense)"]
        if device.type == "cuda":
            from lightning_nf4.kernels import triton_kernels as tk

            saved = tk.FAST_LAUNCH
            tk.FAST_LAUNCH = False
            try:
                slow_host, slow_wall = host_and_wall_us(nf4_fns, device, calls)
            finally:
                tk.FAST_LAUNCH = saved
            lines.append(f"  NF4Linear through Triton's own launch (FAST_LAUNCH off): host {slow_host:.1f} us, wall {slow_wall:.1f} us")
            graphed = graph_us(nf4_fns, calls), graph_us(dense_fns, calls)
            lines.append(f"  the same calls replayed from a CUDA graph (GPU time): NF4Linear {graphed[0]:.1f} us, "
                         f"F.linear {graphed[1]:.1f} us ({graphed[0] / graphed[1]:.2f}x dense)")
            config = tk.gemv_launch_config(device, n, k, True, dtype, 64)
            lines.append(f"  gemv setting chosen for {n}x{k}: {config}; direct launch in use: "
                         f"{bool(getattr(lightning_nf4.kernels.ops.prepared_gemv(nf4[0], nf4[0].quant, dtype, n, k), 'fast', False))}")
    return lines


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="8192x8192,4096x4096,14336x4096,4096x14336,1024x4096")
    parser.add_argument("--calls", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5, help="alternating NF4Linear / F.linear rounds (median and range)")
    args = parser.parse_args()
    device = torch.device(args.device)
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        print("\n".join(compare(n, k, device, calls=args.calls, rounds=args.rounds)), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
