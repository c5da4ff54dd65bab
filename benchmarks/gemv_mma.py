"""A tensor-core 1-token kernel (``gemv_kernel_mma.cu``, research) beside the package's Triton gemv (issue 12, goal 5).

The kernel looks each weight byte up in a per-lane shared-memory table of bf16 code pairs and lets ``mma.m16n8k16``
do the products (the .cu file says how); it is compiled at first use with NVRTC (``torch.cuda._compile_kernel``,
PyTorch >= 2.8). For each shape (double quantization, blocksize 64, bf16 x): each setting of the mma kernel is
checked against dequantize + matvec in fp32, then timed as GPU time per call from a CUDA graph that cycles through
enough copies of the weight that L2 holds none (256 MiB), beside the Triton kernel at the package's first-use
choice, dense ``F.linear`` and a copy of the same bytes, in one process. The last lines sum a Llama-3-8B decoder
layer (q, k, v, o, gate, up, down) for each kernel.

    python benchmarks/gemv_mma.py            # CUDA, sm_80 or newer
    python benchmarks/gemv_mma.py --probes   # and the kernel with its lookups, its mma or all its work taken out
"""

from __future__ import annotations

import argparse
import ctypes
import functools
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from lightning_nf4.kernels import triton_kernels as tk
from gemv_sweep import dense_and_copy_us, nf4_weights  # this script's folder is on the path when it runs
from one_token import graph_us

SOURCE = Path(__file__).with_name("gemv_kernel_mma.cu")
LUT_BYTES = 65536
# (warps per program, spans in flight per warp, programs per SM): the best first, then the others of the last run
MMA_SETTINGS = ((16, 1, 1), (16, 1, 2), (16, 2, 2), (8, 2, 4), (8, 4, 2), (16, 4, 1))
ROWS_PER_PROGRAM = 16


@functools.lru_cache(maxsize=None)
def compiled(device_index: int, blocks: int, warps: int, ring: int, ctas: int, nested: bool, nested_shift: int):
    """The kernel specialised for a row of ``blocks`` quantization blocks (constant loop bounds), per card."""
    with torch.cuda.device(device_index):
        kernel = torch.cuda._compile_kernel(
            SOURCE.read_text(), "nf4_gemv_mma",
            nvcc_options=[f"-DBLOCKS={blocks}", f"-DWARPS={warps}", f"-DNESTED={int(nested)}",
                          f"-DNESTED_SHIFT={nested_shift}", f"-DRING={ring}", f"-DCTAS={ctas}"])
        kernel.set_shared_memory_config(shared_bytes(warps, blocks))
    return kernel


def shared_bytes(warps: int, blocks: int) -> int:
    """The table, x (bf16) and 64 zero bytes, the nested codes, and per tile parity its scales and warps' row sums."""
    return LUT_BYTES + blocks * 64 * 2 + 64 + 256 * 4 + 2 * ROWS_PER_PROGRAM * (blocks + 2) * 4 + 2 * warps * ROWS_PER_PROGRAM * 4


class MmaGemv:
    """One weight's tensor-core gemv, prepared once; ``__call__(x)`` returns ``W @ x`` in bf16. The launch goes
    straight to the driver (``cuLaunchKernel``) with an argument array built once: only x's and the output's
    addresses change per call."""

    def __init__(self, packed: Tensor, absmax: Tensor, code: Tensor, out_features: int, in_features: int,
                 nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], offset: Optional[Tensor],
                 nested_blocksize: int, setting: tuple[int, int, int]) -> None:
        nested = nested_absmax is not None
        warps, ring, ctas = setting
        self.device = packed.device
        self.out_features, self.in_features, self.warps = out_features, in_features, warps
        self.kernel = compiled(packed.get_device(), in_features // 64, warps, ring, ctas, nested, nested_blocksize.bit_length() - 1)
        self.held = (packed, absmax, code, nested_absmax, nested_code, offset)  # keeps the addresses valid
        fixed = [t.data_ptr() if t is not None else absmax.data_ptr() for t in (packed, absmax, code, nested_absmax, nested_code, offset)]
        tiles = out_features // ROWS_PER_PROGRAM
        self.values = [ctypes.c_void_p(0)] + [ctypes.c_void_p(p) for p in fixed] + [ctypes.c_void_p(0), ctypes.c_int(tiles)]
        self.args = (ctypes.c_void_p * len(self.values))(*[ctypes.addressof(v) for v in self.values])
        self.grid = min(tiles, ctas * torch.cuda.get_device_properties(self.device).multi_processor_count)  # persistent
        self.shared = shared_bytes(warps, in_features // 64)
        self.libcuda = torch.cuda._utils._get_gpu_runtime_library()

    def __call__(self, x: Tensor) -> Tensor:
        if x.data_ptr() % 16:
            x = x.clone()
        out = torch.empty(self.out_features, dtype=torch.bfloat16, device=self.device)
        self.values[0].value, self.values[-2].value = x.data_ptr(), out.data_ptr()
        stream = torch.cuda.current_stream(self.device)
        err = self.libcuda.cuLaunchKernel(self.kernel.func, self.grid, 1, 1, self.warps * 32, 1, 1, self.shared,
                                          ctypes.c_void_p(stream.cuda_stream), self.args, None)
        if err:
            raise RuntimeError(f"nf4_gemv_mma: cuLaunchKernel failed with CUDA error {err}")
        return out


SHAPES = ((8192, 8192), (4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))  # (out, in)
LAYER = {(4096, 4096): 2, (1024, 4096): 2, (14336, 4096): 2, (4096, 14336): 1}  # q, o; k, v; gate, up; down
# --probes: the kernel with a part taken out (it computes no gemv; timed, not checked), at PROBE_SETTINGS
PROBE_SETTINGS = ((16, 1, 1), (16, 4, 1), (16, 1, 2))
LOOKUP = "    return *reinterpret_cast<const u32*>(table + __byte_perm(word, lane4, selector));"
PROBES = {
    "no lookups": (LOOKUP, "    return __byte_perm(word, lane4, selector);"),
    "no mma": ('    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"',
               '    asm("{.reg .b32 t; xor.b32 t, %4, %5; xor.b32 t, t, %6; xor.b32 t, t, %7; xor.b32 t, t, %8; xor.b32 t, t, %9; '
               'mov.b32 %0, t; mov.b32 %1, %1; mov.b32 %2, %2; mov.b32 %3, %3;}"'),
    "loads only": ("                for (int h = 0; h < 4; ++h) {  // x pairs",
                   "                d0 = __int_as_float(c0.x ^ c0.y ^ c0.z ^ c0.w), d2 = __int_as_float(c1.x ^ c1.y ^ c1.z ^ c1.w);\n"
                   "                for (int h = 0; h < 0; ++h) {  // x pairs"),
}


def _probe_kernel(name: str, blocks: int, warps: int, ring: int, ctas: int):
    old, new = PROBES[name]
    source = SOURCE.read_text()
    assert source.count(old) == 1, f"probe {name!r}: its anchor is not in the kernel source once"
    kernel = torch.cuda._compile_kernel(source.replace(old, new), "nf4_gemv_mma", nvcc_options=[
        f"-DBLOCKS={blocks}", f"-DWARPS={warps}", "-DNESTED=1", "-DNESTED_SHIFT=8", f"-DRING={ring}", f"-DCTAS={ctas}"])
    kernel.set_shared_memory_config(shared_bytes(warps, blocks))
    return kernel


def measure(n: int, k: int, calls: int, nested: bool = True, probes: bool = False) -> dict:
    device = torch.device("cuda")
    w, qs = nf4_weights(n, k, device, nested)
    q0 = qs[0]
    x = torch.randn(k, device=device, dtype=torch.bfloat16)
    ref = q0.dequantize(torch.float32) @ x.float()
    scale = ref.abs().max().item()
    row = {"shape": f"{n}x{k}", "nested": nested, "mma": {}}
    row["dense_us"], row["copy_us"] = dense_and_copy_us(w, x, q0.nbytes, calls)
    plans = [tk.gemv_plan(q.packed, q.absmax, q.code, 64, n, k, *q.nested_args(), torch.bfloat16) for q in qs]
    got = plans[0].triton_launch(x).float()
    row["triton_err"] = (got - ref).abs().max().item() / scale
    row["triton_us"] = graph_us([lambda p=p: p.triton_launch(x) for p in plans], calls, replays=3)
    row["choice"] = tk.gemv_launch_config(device, n, k, nested, torch.bfloat16, 64)
    for setting in MMA_SETTINGS:
        try:
            mplans = [MmaGemv(q.packed, q.absmax, q.code, n, k, *q.nested_args(), setting) for q in qs]
            got = mplans[0](x).float()
            torch.cuda.synchronize()
            err = (got - ref).abs().max().item() / scale
            if not err <= 1e-2:
                row["mma"][setting] = f"wrong ({err:.1e})"
                continue
            row["mma"][setting] = (graph_us([lambda p=p: p(x) for p in mplans], calls, replays=3), err)
        except Exception as e:  # noqa: BLE001 - a setting that fails is a row, not the end
            row["mma"][setting] = f"n/a ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]})"
    if probes and nested:
        for name, setting in [(nm, st) for nm in PROBES for st in PROBE_SETTINGS if nm == "loads only" or st == PROBE_SETTINGS[0]]:
            label = f"{name} {'/'.join(map(str, setting))}"
            try:
                mplans = [MmaGemv(q.packed, q.absmax, q.code, n, k, *q.nested_args(), setting) for q in qs]
                kernel = _probe_kernel(name, k // 64, *setting)
                for p in mplans:
                    p.kernel = kernel
                row["mma"][label] = (graph_us([lambda p=p: p(x) for p in mplans], calls, replays=3), float("nan"))
            except Exception as e:  # noqa: BLE001
                row["mma"][label] = f"n/a ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]})"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--shapes", default=None, help="NxK[,NxK...]")
    parser.add_argument("--probes", action="store_true", help="also the kernel with lookups, mma or all work taken out")
    args = parser.parse_args()
    shapes = SHAPES if not args.shapes else tuple(tuple(int(v) for v in p.lower().split("x")) for p in args.shapes.split(","))
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; tensor-core gemv beside the Triton gemv", flush=True)
    print("| weight | nested | dense us | copy us | Triton (choice) us | % of copy | err | "
          + " | ".join(f"mma {w}w/{u}r/{c}p us (% copy, err)" for w, u, c in MMA_SETTINGS) + " | best mma / Triton |")
    print("|" + "---|" * (8 + len(MMA_SETTINGS)))
    probe_rows = []
    best: dict = {}
    with torch.no_grad():
        for (n, k), nested in [(s, True) for s in shapes] + [(shapes[0], False)]:
            r = measure(n, k, args.calls, nested, args.probes)
            cells = []
            for setting in MMA_SETTINGS:
                v = r["mma"][setting]
                cells.append(f"{v[0]:.1f} ({100 * r['copy_us'] / v[0]:.0f}%, {v[1]:.1e})" if isinstance(v, tuple) else v)
            times = [r["mma"][st][0] for st in MMA_SETTINGS if isinstance(r["mma"][st], tuple)]
            probe_rows += [f"| {r['shape']} | {name} | " + (f"{v[0]:.1f} | {100 * r['copy_us'] / v[0]:.0f}% |" if isinstance(v, tuple) else f"{v} | |")
                           for name, v in r["mma"].items() if isinstance(name, str)]
            ratio = f"{min(times) / r['triton_us']:.2f}x" if times else "-"
            choice = "/".join(str(v) for v in r["choice"].values()) if r["choice"] else "?"
            print(f"| {r['shape']} | {nested} | {r['dense_us']:.1f} | {r['copy_us']:.1f} | {r['triton_us']:.1f} ({choice}) | "
                  f"{100 * r['copy_us'] / r['triton_us']:.0f}% | {r['triton_err']:.1e} | " + " | ".join(cells) + f" | {ratio} |", flush=True)
            if nested:
                best[(n, k)] = (r["dense_us"], r["triton_us"], min(times) if times else float("nan"))
            torch.cuda.empty_cache()
    if probe_rows:
        print("\nProbes at warps/ring/programs per SM (they compute no gemv)\n\n| weight | probe | us | % of copy |\n|---|---|---|---|")
        print("\n".join(probe_rows))
    if all(s in best for s in LAYER):
        sums = [sum(LAYER[s] * best[s][i] for s in LAYER) for i in range(3)]
        print(f"\nA Llama-3-8B decoder layer's 7 projections (us): dense {sums[0]:.1f}, Triton {sums[1]:.1f}, "
              f"mma {sums[2]:.1f}; 32 layers: {32 * sums[0] / 1e3:.2f}, {32 * sums[1] / 1e3:.2f}, {32 * sums[2] / 1e3:.2f} ms")


if __name__ == "__main__":
    main()
