"""Where a QLoRA step's GPU time goes: torch.profiler over bf16 LoRA and lightning-nf4 steps, one GPU.

    python benchmarks/profile_step.py [--layers 32] [--steps 3] [--trace-dir traces]
    python benchmarks/profile_step.py --compiled      # bf16 LoRA and lightning-nf4, each decoder layer compiled

Same model, adapters, optimizer and autocast as ``lora_step.py`` (a plain loop, no Trainer). For each
setup it prints the wall time per step, the summed kernel time, and kernel time by class (matmul,
NF4 dequantize, attention, other), and the top kernels. ``lightning-nf4 (3 dequantizations)`` turns
off the reuse of the checkpoint recompute's weight in backward, to measure what that reuse gives;
``(LoRA update unfused)`` computes the LoRA update as PEFT does (mul + add) instead of one addmm.
``--compiled`` profiles the compiled setups instead (``compile_blocks`` after injection, as
``LoRACallback(compile=True)`` does) and lists dynamo's graph breaks and recompiles for each; ``(fused LoRA update)``
uses the eager path's ``addmm_`` update under compile too (``NF4LoraLinear.fuse_update_compiled``), to measure
what leaving it to inductor gives.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo as dynamo
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_step import PRESETS, TARGETS, _build_model  # noqa: E402

from lightning_nf4 import LoRACallback, NF4Precision  # noqa: E402
from lightning_nf4.kernels import ops  # noqa: E402
from lightning_nf4.layers import linear as nf4_linear  # noqa: E402

CLASSES = (("NF4 dequantize", ("dequantize_kernel", "dequantize_group_kernel")), ("NF4 gemv", ("gemv_kernel",)),
           ("attention", ("flash", "fmha", "attention", "sdpa")),
           ("matmul", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "sm90", "sm80")))


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((label for label, keys in CLASSES if any(k in low for k in keys)), "other")


def run(setup: str, preset: dict, batch: int, seq: int, steps: int, trace_dir: str | None, device: str) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = _build_model(preset, seq, device)
    if setup.startswith("lightning-nf4"):
        NF4Precision().convert_module(model)
    LoRACallback(r=16, alpha=32, dropout=0.0, target_modules=TARGETS).inject(model)
    compiled = "compiled" in setup
    if compiled:
        from lightning_nf4.plugins.compile import compile_blocks

        dynamo.reset()
        dynamo.utils.counters.clear()
        compile_blocks(model)
    model.train()
    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-4)
    ids = torch.randint(0, preset["vocab_size"], (batch, seq), device=device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - first
    for _ in range(2):
        step()
    sync()
    compile_stats = {}
    if compiled:
        counters = dynamo.utils.counters
        compile_stats = dict(graph_breaks=dict(counters["graph_break"]), recompiles=dict(counters.get("recompiles", {})),
                      frames=dict(counters["stats"]))
    stats_before = torch.cuda.memory_stats() if device == "cuda" else {}
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        walls.append(time.perf_counter() - t)
    stats_after = torch.cuda.memory_stats() if device == "cuda" else {}
    allocator = {k: (stats_after.get(k, 0) - stats_before.get(k, 0)) / steps for k in ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    if trace_dir:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(trace_dir) / (setup.split()[0] + ".json")))
    by_class: dict[str, float] = collections.defaultdict(float)
    by_kernel: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            us = event.device_time
            by_class[kernel_class(event.name)] += us
            by_kernel[event.name][0] += us
            by_kernel[event.name][1] += 1
    averages = prof.key_averages()
    cpu_ops = {e.key: (e.cpu_time_total / max(e.count, 1), e.count) for e in averages if "lightning_nf4" in e.key or "NF4" in e.key}
    cpu_self = sorted(((e.self_cpu_time_total / 1e3, e.count, e.key) for e in averages), reverse=True)[:15]
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(setup=setup, wall=statistics.median(walls), classes=dict(by_class), kernels=dict(by_kernel), cpu_ops=cpu_ops,
                cpu_self=cpu_self, allocator=allocator, first=first, dynamo=compile_stats,
                launches=sum(v[1] for v in by_kernel.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda", help="cpu only to try the script itself")
    parser.add_argument("--compiled", action="store_true", help="profile bf16 LoRA and lightning-nf4 with each decoder layer compiled")
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset], num_hidden_layers=args.layers)
    batch, seq = preset.pop("batch"), preset.pop("seq")
    results = []
    from lightning_nf4.layers.lora import NF4LoraLinear

    setups = ("bf16 LoRA, compiled", "lightning-nf4, compiled", "lightning-nf4, compiled (fused LoRA update)") if args.compiled else (
        "bf16 LoRA", "lightning-nf4", "lightning-nf4 (LoRA update unfused)", "lightning-nf4 (3 dequantizations)")
    for setup in setups:
        original = nf4_linear._recorded_by_checkpoint
        if "3 dequantizations" in setup:
            nf4_linear._recorded_by_checkpoint = lambda: False
        NF4LoraLinear.fuse_update = "unfused" not in setup
        NF4LoraLinear.fuse_update_compiled = "fused LoRA update" in setup
        ops.COMPILED_DEQUANTIZE = "op" if "dequantize op" in setup else "fused"
        try:
            results.append(run(setup, preset, batch, seq, args.steps, args.trace_dir, args.device))
        finally:
            nf4_linear._recorded_by_checkpoint = original
            NF4LoraLinear.fuse_update, NF4LoraLinear.fuse_update_compiled = True, False
            ops.COMPILED_DEQUANTIZE = "fused"
    print(f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}; {args.preset} shape with {args.layers} layers, batch {batch} x {seq}, "
          f"LoRA r=16 on {','.join(TARGETS)}; wall = median of {args.steps} steps; kernel times from one profiled step (ms)")
    labels = ["matmul", "attention", "NF4 dequantize", "NF4 gemv", "other"]
    print("| setup | wall step | vs bf16 | kernel sum | " + " | ".join(labels) + " | kernels launched |")
    print("|---" * (len(labels) + 5) + "|")
    base = results[0]["wall"]
    for r in results:
        cells = " | ".join(f"{r['classes'].get(label, 0.0) / 1e3:.1f}" for label in labels)
        print(f"| {r['setup']} | {r['wall'] * 1e3:.1f} | {r['wall'] / base:.3f} | {sum(r['classes'].values()) / 1e3:.1f} | {cells} | {r['launches']} |")
    for r in results:
        print(f"\n{r['setup']}: top kernels (ms total, count)")
        for name, (us, count) in sorted(r["kernels"].items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"  {us / 1e3:8.2f} {count:5d}  {name[:110]}")
        for key, (us, count) in sorted(r["cpu_ops"].items()):
            print(f"  CPU {key}: {us:.1f} us per call x {count}")
        print(f"  allocator events per step: {r['allocator']}")
        if r["dynamo"]:
            print(f"  first step (compile) {r['first']:.1f} s; graph breaks: {r['dynamo']['graph_breaks'] or 'none'}; "
                  f"recompiles: {r['dynamo']['recompiles'] or 'none'}; frames: {r['dynamo']['frames']}")
        print("  top CPU self time (ms, calls):")
        for ms, count, key in r["cpu_self"]:
            print(f"    {ms:8.2f} {count:6d}  {key[:100]}")


if __name__ == "__main__":
    main()
