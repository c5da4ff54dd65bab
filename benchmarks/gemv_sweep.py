"""The 1-token gemv kernel's launch settings at the Llama-3-8B shapes and 8192x8192 (issue 12, goal 5).

For each shape (double quantization, blocksize 64, bf16 x): every setting of the sweep (rows per program, blocks
per loop step, warps, pipeline stages, split-K parts) is checked against dequantize + matvec, then timed as GPU
time per call from a CUDA graph that cycles through enough copies of the weight that L2 holds none (256 MiB of
codes). Each time is given as GB/s of the weight's bytes (codes and scales) and as % of a device copy moving the
same bytes (half read, half written), timed the same way; dense is ``F.linear`` on the bf16 weight. The package's
own choice (``triton_kernels._choose_gemv``, timed on first use) is shown beside the best.

    python benchmarks/gemv_sweep.py                     # CUDA
    python benchmarks/gemv_sweep.py --before            # and the kernel of commit 37018f5 beside it, same run
    python benchmarks/gemv_sweep.py --variant probe_loads  # kernels of gemv_kernel_NAME.py beside it (NAME[,NAME...]);
                                                          # a probe_* kernel is timed, not checked
    TRITON_INTERPRET=1 python benchmarks/gemv_sweep.py --device cpu --shapes 64x256 --quick   # plumbing check only
"""

from __future__ import annotations

import argparse
import importlib
import types

import torch
import torch.nn.functional as F

import lightning_nf4
from lightning_nf4.kernels import triton_kernels as tk
from one_token import graph_us  # this script's folder is on the path when it runs

SHAPES = ((8192, 8192), (4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))  # (out, in)
# (rows, blocks per step, warps, stages, split)
SWEEP = tuple(dict.fromkeys([  # about 20 settings: each shape compiles each once (about a second apiece)
    *tk.GEMV_CANDIDATES,
    (4, 32, 2, 1, 1), (2, 16, 1, 3, 1), (1, 16, 1, 3, 1), (4, 128, 8, 3, 1), (4, 64, 8, 3, 1), (2, 64, 8, 3, 1),
    (2, 32, 2, 3, 2), (1, 32, 2, 3, 4), (2, 32, 2, 3, 4), (4, 32, 2, 3, 8), (4, 64, 4, 3, 4),
]))
QUICK = tk.GEMV_CANDIDATES
# --before: the kernel of commit 37018f5 with its best settings of the last H200 sweep, tagged "before"
BEFORE = (("before", 4, 16, 4, 3, 1), ("before", 4, 16, 4, 4, 1), ("before", 4, 64, 8, 3, 1), ("before", 4, 16, 4, 3, 4))
# --variant NAME: a candidate kernel from benchmarks/gemv_kernel_NAME.py (same parameters), at these settings
VARIANT_SETTINGS = ((4, 32, 2, 3, 1), (4, 16, 1, 3, 1), (4, 32, 4, 3, 1), (2, 64, 4, 3, 1), (2, 32, 2, 3, 1), (1, 32, 2, 3, 1))


def _nbytes(q: lightning_nf4.NF4Weight) -> int:
    return q.nbytes


def _tagged_kernels(tag: str):
    module = importlib.import_module(f"gemv_kernel_{tag}")  # this script's folder is on the path when it runs
    return types.SimpleNamespace(gemv_kernel=module.gemv_kernel, gemv_split_sum_kernel=module.gemv_split_sum_kernel)


def _plan(setting, weight):
    if isinstance(setting[0], str):
        return tk.GemvLaunch(_tagged_kernels(setting[0]), *weight, setting[1:])
    return tk.gemv_plan(*weight, setting=setting)


def nf4_weights(n: int, k: int, device: torch.device, double_quant: bool = True) -> tuple[torch.Tensor, list]:
    """A random bf16 ``[n, k]`` weight (seed 0) and its NF4 form, followed on CUDA by other NF4 weights of that shape,
    enough that cycling through them reads 256 MiB: L2 holds none when one is read again, as in decoding."""
    torch.manual_seed(0)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    q0 = lightning_nf4.quantize_nf4(w, 64, double_quant)
    copies = max(1, -(-(256 << 20) // q0.nbytes)) if device.type == "cuda" else 1
    return w, [q0] + [lightning_nf4.quantize_nf4(torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02, 64, double_quant)
                      for _ in range(copies - 1)]


def dense_and_copy_us(w: torch.Tensor, x: torch.Tensor, nbytes: int, calls: int) -> tuple[float, float]:
    """GPU us per call, replayed from a CUDA graph with L2 cycled out, of ``F.linear(x, w)`` (over copies of ``w``)
    and of a device copy of ``nbytes`` bytes (half read, half written)."""
    n, k = w.shape
    dense = [w] + [torch.randn(n, k, device=w.device, dtype=w.dtype) for _ in range(max(1, -(-(256 << 20) // (2 * n * k))) - 1)]
    dense_us = graph_us([lambda d=d: F.linear(x, d) for d in dense], calls, replays=3)
    del dense  # before the copy's buffers
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=w.device)
    dst = [torch.empty_like(src) for _ in range(max(1, -(-(512 << 20) // nbytes)))]
    return dense_us, graph_us([lambda d=d: d.copy_(src) for d in dst], calls, replays=3)


def measure(n: int, k: int, device: torch.device, sweep, calls: int) -> dict:
    w, qs = nf4_weights(n, k, device)
    q0, copies = qs[0], len(qs)
    nbytes = _nbytes(q0)
    x = torch.randn(k, device=device, dtype=torch.bfloat16)
    ref = (q0.dequantize(torch.float32) @ x.float())
    scale = ref.abs().max().item()
    result: dict = {"shape": f"{n}x{k}", "bytes": nbytes, "copies": copies, "sweep": {}}
    args = lambda q: (q.packed, q.absmax, q.code, 64, n, k, *q.nested_args(), torch.bfloat16)  # noqa: E731
    timed = device.type == "cuda"
    if timed:
        result["dense_us"], result["copy_us"] = dense_and_copy_us(w, x, nbytes, calls)
        tk.gemv_4bit(x, *args(q0)[:-1])  # the package's own choice for this shape (timed here, once)
        result["choice"] = tk.gemv_launch_config(device, n, k, True, torch.bfloat16, 64)
    for setting in sweep:
        try:
            plans = [_plan(setting, args(q)) for q in qs]
            got = plans[0].triton_launch(x).float()
            err = (got - ref).abs().max().item() / max(scale, 1e-30)
            probe = isinstance(setting[0], str) and setting[0].startswith("probe_")  # times a part; no gemv result
            if not err <= 1e-2 and not probe:  # bf16 output of an fp32 sum: well inside 1e-2 of the largest output
                result["sweep"][setting] = f"wrong ({err:.1e})"
                continue
            result["sweep"][setting] = graph_us([lambda p=p: p.triton_launch(x) for p in plans], calls, replays=3) if timed else "ok"
        except Exception as e:  # noqa: BLE001 - a setting that does not compile is a row, not the end
            result["sweep"][setting] = f"n/a ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:50]})"
    return result


def _label(s) -> str:
    return "/".join(map(str, s))


def report(results: list[dict], sweep) -> list[str]:
    lines = ["settings: rows/blocks per step/warps/stages/split; GPU us per call from a CUDA graph, L2 cycled out",
             "", "| weight | MB read | dense us | copy us (same bytes) | package's choice | us | GB/s | % of copy | "
             "sweep best | us | GB/s | % of copy | best / dense | before's best | us | % of copy | best / before |",
             "|" + "---|" * 17]
    variants = ["", "Variants (benchmarks/gemv_kernel_NAME.py; a probe_* kernel computes no gemv: it times a part of one):",
                "", "| weight | variant | best setting | us | % of copy | variant / package's sweep best |", "|---|---|---|---|---|---|"]
    for r in results:
        mb = r["bytes"] / 1e6
        row = [r["shape"], f"{mb:.1f}"]
        if "copy_us" not in r:
            lines.append("| " + " | ".join(row + ["n/a (no GPU: checked only)"] + [""] * 14) + " |")
            continue
        copy = r["copy_us"]
        row += [f"{r['dense_us']:.1f}", f"{copy:.1f}"]
        times = {s: v for s, v in r["sweep"].items() if isinstance(v, float) and not isinstance(s[0], str)}
        before = {s: v for s, v in r["sweep"].items() if isinstance(v, float) and s[0] == "before"}
        tags = dict.fromkeys(s[0] for s in r["sweep"] if isinstance(s[0], str) and s[0] != "before")
        choice = r.get("choice")
        c = None if choice is None else tuple(choice[k] for k in ("rows", "blocks_per_step", "num_warps", "num_stages", "split"))
        if c in times:
            row += [_label(c), f"{times[c]:.1f}", f"{r['bytes'] / times[c] / 1e3:.0f}", f"{100 * copy / times[c]:.0f}%"]
        else:
            row += [str(choice), "", "", ""]
        if times:
            b = min(times, key=times.get)
            row += [_label(b), f"{times[b]:.1f}", f"{r['bytes'] / times[b] / 1e3:.0f}", f"{100 * copy / times[b]:.0f}%",
                    f"{times[b] / r['dense_us']:.2f}x"]
        else:
            row += ["n/a"] * 5
        if before:
            b0 = min(before, key=before.get)
            row += [_label(b0[1:]), f"{before[b0]:.1f}", f"{100 * copy / before[b0]:.0f}%",
                    f"{times[b] / before[b0]:.2f}x" if times else "n/a"]
        else:
            row += [""] * 4
        lines.append("| " + " | ".join(row) + " |")
        for tag in tags:
            mine = {s: v for s, v in r["sweep"].items() if isinstance(v, float) and s[0] == tag}
            if mine:
                v0 = min(mine, key=mine.get)
                variants.append(f"| {r['shape']} | {tag} | {_label(v0[1:])} | {mine[v0]:.1f} | {100 * copy / mine[v0]:.0f}% | "
                                + (f"{mine[v0] / times[b]:.2f}x |" if times else "n/a |"))
            else:
                variants.append(f"| {r['shape']} | {tag} | none ran | | | |")
    if len(variants) > 5:
        lines += variants
    lines += ["", "Sweep detail, % of copy (or why not):", ""]
    lines.append("| setting | " + " | ".join(r["shape"] for r in results) + " |")
    lines.append("|" + "---|" * (len(results) + 1))
    for s in sweep:
        cells = []
        for r in results:
            v = r["sweep"].get(s, "")
            cells.append(f"{100 * r['copy_us'] / v:.0f}% ({v:.1f})" if isinstance(v, float) else str(v))
        lines.append(f"| {_label(s)} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help="NxK[,NxK...] (default: the Llama-3-8B shapes and 8192x8192)")
    parser.add_argument("--quick", action="store_true", help="only the package's candidates")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--before", action="store_true", help="also the kernel of commit 37018f5 (benchmarks/gemv_kernel_before.py)")
    parser.add_argument("--variant", default=None,
                        help="also the kernels of benchmarks/gemv_kernel_NAME.py, NAME[,NAME...] (e.g. probe_loads)")
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = SHAPES if not args.shapes else tuple(tuple(int(v) for v in p.lower().split("x")) for p in args.shapes.split(","))
    sweep = (QUICK if args.quick else SWEEP) + (BEFORE if args.before else ())
    if args.variant:
        sweep += tuple((tag, *setting) for tag in args.variant.split(",") for setting in VARIANT_SETTINGS)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter: checks only)"
    print(f"{name}; torch {torch.__version__}; gemv sweep, {len(sweep)} settings", flush=True)
    results = []
    with torch.no_grad():
        for n, k in shapes:
            results.append(measure(n, k, device, sweep, args.calls))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(report(results[-1:], sweep)[4], flush=True)  # this shape's row, in case a timeout cuts the rest
    print("\n" + "\n".join(report(results, sweep)))


if __name__ == "__main__":
    main()
