"""Host time per call of each layer of the NF4 dequantize and gemv paths (not a test).

A small weight (256 x 4096) keeps the GPU work to a few microseconds, so the time per call over a
loop of back-to-back calls is the host's: Python, the dispatcher and the Triton launcher.

    python benchmarks/launch_overhead.py
"""

import time

import torch

import lightning_nf4 as L
from lightning_nf4.kernels import ops, triton_kernels as tk


def per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    torch.manual_seed(0)
    n, k = 256, 4096
    linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = L.NF4Linear.from_linear(linear, compute_dtype=torch.bfloat16)
    q = layer.quant
    packed = q.packed.view(-1)
    args = (packed, q.absmax, q.code, q.blocksize, q.numel, torch.bfloat16, *q.nested_args())
    x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    gemv_args = (x1.view(-1), packed, q.absmax, q.code, q.blocksize, n, k, *q.nested_args())
    kernels = tk._kernels()
    out = torch.empty(q.numel, dtype=torch.bfloat16, device="cuda")
    raw = (packed, q.absmax, q.code, q.nested.absmax, q.nested.code, q.nested.offset, out, q.numel, 64, 256)
    meta = dict(NESTED=True, HALF=32, OUTPUTS=4096, SHUFFLE=True, EVEN=True, num_warps=4, enable_fp_fusion=False)
    gout = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    graw = (x1.view(-1).view(torch.int32), packed, q.absmax, q.code, q.nested.absmax, q.nested.code, q.nested.offset, gout, n, 256)
    gmeta = dict(NESTED=True, X_PAIRS=1, BLOCKSIZE=64, BLOCKS_PER_ROW=k // 64, BLOCKS_PER_STEP=16, ROWS=4, SHUFFLE=True, EVEN=True, num_warps=4)
    rows = [
        ("torch.empty (the output)", lambda: torch.empty(q.numel, dtype=torch.bfloat16, device="cuda")),
        ("dense F.linear, 1 token", lambda: torch.nn.functional.linear(x1, linear.weight)),
        ("dequantize: Triton's kernel[grid](...) launch", lambda: kernels.dequantize_kernel[(q.numel // 4096,)](*raw, **meta)),
        ("dequantize: triton_kernels.dequantize_4bit", lambda: tk.dequantize_4bit(*args)),
        ("dequantize: through the custom op (dispatcher)", lambda: ops._dequantize_4bit(*args)),
        ("dequantize: ops.dequantize_4bit (eager direct)", lambda: ops.dequantize_4bit(*args)),
        ("dequantize: NF4Weight.dequantize", lambda: q.dequantize(torch.bfloat16)),
        ("gemv: Triton's kernel[grid](...) launch", lambda: kernels.gemv_kernel[(n // 4,)](*graw, **gmeta)),
        ("gemv: triton_kernels.gemv_4bit", lambda: tk.gemv_4bit(*gemv_args)),
        ("gemv: through the custom op (dispatcher)", lambda: ops._gemv_4bit(*gemv_args)),
        ("gemv: ops.gemv_4bit (eager direct)", lambda: ops.gemv_4bit(*gemv_args)),
        ("gemv: NF4Linear forward, 1 token, no grad", lambda: layer(x1)),
    ]
    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rows.append(("NF4Linear forward, 16 tokens, grad on", lambda: layer(x)))
    rows.append(("dense F.linear forward, 16 tokens, grad on", lambda: torch.nn.functional.linear(x, linear.weight)))
    rows.append(("NF4Linear forward + backward, 16 tokens", lambda: layer(x).sum().backward()))
    rows.append(("dense F.linear forward + backward, 16 tokens", lambda: torch.nn.functional.linear(x, linear.weight).sum().backward()))
    print(f"{torch.cuda.get_device_name()}: host time per call, {n}x{k} weight (us)")
    with torch.no_grad():
        for label, fn in rows[:-4]:
            print(f"  {per_call_us(fn):7.1f}  {label}", flush=True)
    for label, fn in rows[-4:]:
        print(f"  {per_call_us(fn):7.1f}  {label}", flush=True)


if __name__ == "__main__":
    main()
