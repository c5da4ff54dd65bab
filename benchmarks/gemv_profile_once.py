"""Each 1-token kernel once at one shape, for a hardware-counter profiler (Nsight Compute) to read:

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section SchedulerStats --section ComputeWorkloadAnalysis --section Occupancy -k regex:gemv \
        python benchmarks/gemv_profile_once.py --shape 8192x8192

The Triton gemv at ``--setting`` (rows/blocks per step/warps/stages/split; default: the H200 sweep's best at
8192x8192, so that no first-use timing launches are profiled), then the research tensor-core kernel (``gemv_mma.py``) at its
best setting; each is checked once against dequantize + matvec, then launched three times.
"""

from __future__ import annotations

import argparse

import torch

import lightning_nf4
from lightning_nf4.kernels import triton_kernels as tk
from gemv_mma import MMA_SETTINGS, MmaGemv  # this script's folder is on the path when it runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192x8192", help="NxK")
    parser.add_argument("--setting", default="4/16/1/3/1", help="the Triton gemv's launch setting")
    args = parser.parse_args()
    tk.GEMV_CONFIG = dict(zip(("rows", "blocks_per_step", "num_warps", "num_stages", "split"), map(int, args.setting.split("/"))))
    n, k = (int(v) for v in args.shape.lower().split("x"))
    torch.manual_seed(0)
    q = lightning_nf4.quantize_nf4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, 64, True)
    x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    triton_plan = tk.gemv_plan(q.packed, q.absmax, q.code, 64, n, k, *q.nested_args(), torch.bfloat16)
    mma = MmaGemv(q.packed, q.absmax, q.code, n, k, *q.nested_args(), MMA_SETTINGS[0])
    ref = q.dequantize(torch.float32) @ x.float()
    for name, fn in (("triton", triton_plan.triton_launch), ("mma", mma)):
        err = ((fn(x).float() - ref).abs().max() / ref.abs().max()).item()
        torch.cuda.synchronize()
        print(f"{name}: {args.shape}, error {err:.1e}", flush=True)
        for _ in range(3):
            fn(x)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
