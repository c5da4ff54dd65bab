"""DDP scaling of a QLoRA step at Llama-3-8B shape: tokens/s on N GPUs (batch 1 x 2048 per GPU).

    python benchmarks/ddp_scaling.py --devices 1 && python benchmarks/ddp_scaling.py --devices 2

Runs NF4Precision + LoRACallback under Lightning's DDP (NCCL), checks on the way that every rank ends
with identical adapters and that DDP skipped the packed NF4 weights, and prints one table row.
"""

from __future__ import annotations

import argparse
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
    """Times steps and, at the end, compares the ranks' adapters."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_start(self, trainer, pl_module):
        self.ignored = len(getattr(trainer.strategy.model, "parameters_to_ignore", []))
        self.nf4 = sum(1 for n, _ in pl_module.named_parameters() if n.endswith("base_layer.weight"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)

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
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    batch, seq = preset.pop("batch"), preset.pop("seq")
    steps = args.warmup + args.steps
    data = torch.randint(0, preset["vocab_size"], (steps * batch * args.devices, seq), generator=torch.Generator().manual_seed(0))
    probe = Probe()
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
        step = statistics.median(probe.times[args.warmup:])
        tokens = args.devices * batch * seq / step
        print(f"| {args.devices} x {torch.cuda.get_device_name()} | {step:.3f} | {tokens:.0f} | "
              f"{probe.identical} | {probe.ignored}/{probe.nf4} | {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
