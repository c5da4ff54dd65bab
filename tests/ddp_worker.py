"""A QLoRA fit run under a DDP strategy on CPU (gloo); used by tests/test_ddp.py.

    python tests/ddp_worker.py OUT_DIR STRATEGY DEVICES BATCH_SIZE [fail_on_rank]

Each rank writes its trainable weights to OUT_DIR/rank<r>.pt at the end of fit; with save_dir the
adapter is exported once, by rank 0.
"""

import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nf4 import LoRACallback, NF4Precision  # noqa: E402
from tests.lightning_models import CausalLM, token_loader  # noqa: E402
from tests import isolated  # noqa: E402


class DumpTrainable(pl.Callback):
    def __init__(self, out: Path, fail_on_rank: int) -> None:
        self.out, self.fail_on_rank = out, fail_on_rank

    def on_train_start(self, trainer, pl_module):
        self.ignored = sorted(getattr(trainer.strategy.model, "parameters_to_ignore", []))  # what the DDP wrapper skips
        self.wrapper = type(trainer.strategy.model).__name__

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.fail_on_rank and batch_idx == 1:
            raise RuntimeError(f"injected failure on rank {trainer.global_rank}")

    def on_fit_end(self, trainer, pl_module):
        state = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save({"trainable": state, "ddp_ignored": self.ignored, "wrapper": self.wrapper}, self.out / f"rank{trainer.global_rank}.pt")


class RecordingLoRA(LoRACallback):
    """Notes which rank exports, to check that artifacts are written once."""

    def __init__(self, out: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out = out

    def save_export(self, pl_module, out_dir, **kwargs):
        with open(self.out / "exporters.txt", "a") as f:
            f.write(f"{pl_module.global_rank}\n")
        return super().save_export(pl_module, out_dir, **kwargs)


class OrderedData(pl.LightningDataModule):
    """The same global batches in every configuration: rank r takes samples r, r + W, r + 2W, ...
    (Lightning's own distributed sampler would shuffle the training set)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        dataset = token_loader(n=16).dataset
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


def run(out: Path, strategy: str, devices: int, batch_size: int, fail_on_rank: int = -1) -> None:
    pl.seed_everything(0)
    model = CausalLM(lr=1e-2)
    if strategy.startswith("ddp"):
        from lightning.pytorch.strategies import DDPStrategy

        start_method = "spawn" if strategy == "ddp_spawn" else "popen"
        strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60), start_method=start_method)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        plugins=NF4Precision(compute_dtype=torch.float32),
        callbacks=[
            RecordingLoRA(out, r=4, alpha=8, dropout=0.0, save_dir=str(out / "export"), export_merged=False),
            DumpTrainable(out, fail_on_rank),
        ],
    )
    trainer.fit(model, datamodule=OrderedData(batch_size))


isolated.end_process_groups_at_exit()


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    run(out_dir, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else -1)
