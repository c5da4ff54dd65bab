"""Run by ``test_triton_interpreter.py`` under ``TRITON_INTERPRET=1``: the Triton kernels' gather path on
the CPU, against the CPU kernels. (The warp-shuffle path is inline PTX; it runs only in ``test_gpu.py``.)"""

import torch

import lightning_nf4 as L
from lightning_nf4.kernels import triton_kernels as tk

tk.DEQUANT_CONFIG = {"outputs": 256, "num_warps": 4}  # no timing: triton.testing needs a GPU
torch.manual_seed(0)
for double_quant in (True, False):
    # numel a multiple of the program's outputs (no masks) and not (masked tail)
    qs = [L.quantize_nf4(torch.randn(*s) * 0.02, 64, double_quant) for s in ((16, 64), (24, 96), (10, 70))]
    for q in qs:
        got = tk.dequantize_4bit(q.packed, q.absmax, q.code, 64, q.numel, torch.float32, *q.nested_args())
        assert torch.equal(got, q.dequantize(torch.float32).reshape(-1)), ("dequantize", q.shape, double_quant)
    group = qs[:2]
    nested = [q.nested for q in group] if double_quant else []
    flat = tk.dequantize_4bit_group(
        [q.packed for q in group], [q.absmax for q in group], group[0].code, 64, [q.numel for q in group], torch.float32,
        [n.absmax for n in nested], nested[0].code if nested else None, [n.offset for n in nested],
    )
    assert torch.equal(flat, torch.cat([q.dequantize(torch.float32).reshape(-1) for q in group])), ("group", double_quant)
    for n, k in ((8, 128), (6, 320)):  # 6 rows: a partial last program; 320: five blocks per row
        q = L.quantize_nf4(torch.randn(n, k) * 0.02, 64, double_quant)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(k).to(dtype)
            got = tk.gemv_4bit(x, q.packed, q.absmax, q.code, 64, n, k, *q.nested_args()).float()
            ref = q.dequantize(torch.float32) @ x.float()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    # codes at an odd address (a view into a larger buffer): the kernel reads them where they are
    q = L.quantize_nf4(torch.randn(8, 128) * 0.02, 64, double_quant)
    buffer = torch.zeros(q.packed.numel() + 1, dtype=torch.uint8)
    buffer[1:] = q.packed.reshape(-1)
    shifted = buffer[1:].view(q.packed.shape)
    x = torch.randn(128)
    got = tk.gemv_4bit(x, shifted, q.absmax, q.code, 64, 8, 128, *q.nested_args())
    torch.testing.assert_close(got, q.dequantize(torch.float32) @ x, atol=1e-5, rtol=1e-5)
print("interpreter kernels match")

# Every gemv launch candidate (rows, blocks per step, warps, stages, split-K) against dequantize + matvec,
# at rows of 2048 values (split-K parts of several steps) and of 320 (five blocks: split and steps shrink).
for n, k in ((6, 2048), (5, 320)):
    q = L.quantize_nf4(torch.randn(n, k) * 0.02, 64, True)
    x = torch.randn(k)
    ref = q.dequantize(torch.float32) @ x
    for setting in tk.GEMV_CANDIDATES:
        plan = tk.gemv_plan(q.packed, q.absmax, q.code, 64, n, k, *q.nested_args(), torch.float32, setting=setting)
        torch.testing.assert_close(plan(x), ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"gemv {setting} {n}x{k}: {m}")
    tk.GEMV_CONFIG = {"rows": 2, "blocks_per_step": 4, "num_warps": 4, "num_stages": 3, "split": 2}  # the op's own path, split
    torch.testing.assert_close(tk.gemv_4bit(x, q.packed, q.absmax, q.code, 64, n, k, *q.nested_args()), ref, atol=1e-5, rtol=1e-5)
    tk.GEMV_CONFIG = None

# NF4Linear's prepared 1-token launch (ops.prepared_gemv), with the Triton kernel serving the CPU here: it
# follows a reloaded weight and a moved one, and the plan refuses an input it was not prepared for.
from lightning_nf4.kernels import ops  # noqa: E402

ops._KERNELS[ops._gemv_4bit]["cpu"] = tk.gemv_4bit
layer = L.NF4Linear.from_linear(torch.nn.Linear(256, 24, bias=False), compute_dtype=torch.float32)
x = torch.randn(1, 1, 256)
with torch.no_grad():
    first = layer(x)
    assert torch.allclose(first.reshape(-1), layer.dequantize(torch.float32) @ x.reshape(-1), atol=1e-5), "prepared gemv"
    plan = ops.prepared_gemv(layer, layer.quant, torch.float32, 24, 256)
    assert isinstance(plan, tk.GemvLaunch), "a Triton device kernel gets a prepared launch"
    held = layer.quant  # the old layout stays alive: the plan must still notice the layer's new one
    layer.load_state_dict({"weight": torch.randn(24, 256)})  # new codes and scales: a new quant, a new plan
    again = layer(x)
    assert torch.allclose(again.reshape(-1), layer.dequantize(torch.float32) @ x.reshape(-1), atol=1e-5), "after reload"
    assert not torch.allclose(again, first), "the reloaded weight's output, not the old plan's"
    assert ops.prepared_gemv(layer, layer.quant, torch.float32, 24, 256) is not plan
    import weakref  # noqa: E402

    gone = weakref.ref(ops.prepared_gemv(layer, layer.quant, torch.float32, 24, 256))
    layer.to(torch.float64)  # _apply: a new quant for the same codes (what a device move does) ...
    assert gone() is None, "... and the old plan, which holds the old tensors, is dropped with the old quant"
    moved = layer(x)
    assert torch.equal(moved, again)
    try:
        plan(torch.randn(255))
    except ValueError as e:
        assert "must hold 256 values" in str(e) and "Reshape x" in str(e), str(e)
    else:
        raise AssertionError("a plan took an input of the wrong size")
print("interpreter prepared gemv ok")
