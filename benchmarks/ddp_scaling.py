"""DDP scaling of a QLoRA step at Llama-3-8B shape: tokens/s on N GPUs (batch 1 x 2048 per GPU).

    python benchmarks/ddp_scaling.py --devices 1 && python benchmarks/ddp_scaling.py --devices 2

Runs NF4Precision + LoRACallback under Lightning's DDP (NCCL), checks on the way that every rank ends
with identical adapters and that DDP skipped the packed NF4 weights, and prints one table row.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_step import PRESETS, TARGETS, _build_model  # noqa: E402

from lightning_nf4 import LoRACallback, NF4Precision  # noqa: E402


class Probe(pl.Callback):
    """Times steps, profiles one (``profile_step``) and, at the end, compares the ranks' adapters."""

    def __init__(self, profile_step: int = -1, gc_freeze: bool = False) -> None:
        self.times: list[float] = []
        self.profile_step = profile_step
        self.kernels: dict[str, float] = {}
        self.gc_freeze = gc_freeze
        self.gc_pauses: list[float] = []  # seconds spent in each garbage collection while training
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif hasattr(self, "_gc_start"):
            self.gc_pauses.append(time.perf_counter() - self._gc_start)

    def on_train_start(self, trainer, pl_module):
        if self.gc_freeze:  # the model's objects are long-lived: keep the collector from scanning them
            gc.collect()
            gc.freeze()
        self.gc_pauses.clear()
        self.ignored = len(getattr(trainer.strategy.model, "parameters_to_ignore", []))
        self.nf4 = sum(1 for n, _ in pl_module.named_parameters() if n.endswith("base_layer.weight"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.profile_step:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CUDA])
            self._prof.__enter__()
        torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)
        if batch_idx == self.profile_step:
            self._prof.__exit__(None, None, None)
            for event in self._prof.events():
                if event.device_type == torch.autograd.DeviceType.CUDA:
                    label = "nccl" if "nccl" in event.name.lower() else "compute"
                    self.kernels[label] = self.kernels.get(label, 0.0) + event.device_time / 1e3

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().float().flatten() for p in pl_module.parameters() if p.requires_grad])
        checksums = trainer.strategy.all_gather(torch.stack([flat.sum(), flat.abs().sum()]))
        self.identical = bool((checksums == checksums[0]).all()) if checksums.dim() > 1 else True


class Module(pl.LightningModule):
    def __init__(self, preset: dict, seq: int) -> None:
        super().__init__()
        self.preset, self.seq = preset, seq
        self.model = None

    def configure_model(self) -> None:
        if self.model is None:  # built on this rank's GPU, same seed on every rank
            self.model = _build_model(self.preset, self.seq, "cuda")

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--static-graph", action="store_true", help="DDP(static_graph=True)")
    parser.add_argument("--bucket-mb", type=int, default=25, help="DDP gradient bucket size")
    parser.add_argument("--profile", action="store_true", help="profile one extra step: compute vs NCCL kernel time")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() the model's objects at train start")
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    batch, seq = preset.pop("batch"), preset.pop("seq")
    steps = args.warmup + args.steps + (1 if args.profile else 0)
    data = torch.randint(0, preset["vocab_size"], (steps * batch * args.devices, seq), generator=torch.Generator().manual_seed(0))
    probe = Probe(profile_step=args.warmup + args.steps if args.profile else -1, gc_freeze=args.gc_freeze)
    strategy: object = "auto"
    if args.devices > 1:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(static_graph=args.static_graph, bucket_cap_mb=args.bucket_mb)
    trainer = pl.Trainer(
        accelerator="cuda", devices=args.devices, strategy=strategy, max_steps=steps,
        plugins=NF4Precision(), callbacks=[LoRACallback(r=16, alpha=32, dropout=0.0, target_modules=TARGETS), probe],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    with torch.device("cpu"):
        module = Module(preset, seq)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=batch))
    if trainer.is_global_zero:
        timed = sorted(probe.times[args.warmup:args.warmup + args.steps])
        step = statistics.median(timed)
        tokens = args.devices * batch * seq / step
        kernels = ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(probe.kernels.items()))
        kernels += f"; gc: {len(probe.gc_pauses)} collections, {1e3 * sum(probe.gc_pauses) / len(probe.times):.1f} ms/step, longest {1e3 * max(probe.gc_pauses, default=0):.0f} ms"
        print(f"| {args.devices} x {torch.cuda.get_device_name()} | {step:.3f} | {timed[0]:.3f}-{timed[-1]:.3f} | {tokens:.0f} | "
              f"{probe.identical} | {probe.ignored}/{probe.nf4} | {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB | {kernels} |", flush=True)


if __name__ == "__main__":
    main()
