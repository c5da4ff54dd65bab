"""A two-rank DDP QLoRA run on CPU (gloo) with LoRA dropout and per-rank random streams; used by
tests/test_reliability.py to check that resuming restores every rank's generator states.

    python tests/resume_worker.py OUT_DIR MAX_STEPS [CKPT_PATH | save:EVERY_N_STEPS]

Rank 0 writes its trainable weights to OUT_DIR/trainable.pt at the end of fit.
"""

import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nf4 import LoRACallback, NF4Precision  # noqa: E402
from lightning_nf4.data.resumable import ResumableDataLoader  # noqa: E402
from tests.lightning_models import CausalLM, token_loader  # noqa: E402
from tests import isolated  # noqa: E402


class PerRankStreams(pl.Callback):
    """Each rank draws its own dropout masks (as with seed_everything(workers=...) per rank): restoring one rank's
    states on both would change the result."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(100 + trainer.global_rank + (1000 if resumed else 0))


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        dataset = token_loader(n=24).dataset
        sampler = DistributedSampler(dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, seed=5)
        return ResumableDataLoader(dataset, batch_size=2, sampler=sampler, generator=torch.Generator().manual_seed(0))


def main(out: Path, max_steps: int, extra: str) -> None:
    callbacks = [LoRACallback(r=4, alpha=8), PerRankStreams()]  # default dropout 0.05
    if extra.startswith("save:"):
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_train_steps=int(extra[5:])))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_steps=max_steps, max_epochs=-1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=extra.startswith("save:"), use_distributed_sampler=False,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60), start_method="popen"),
        plugins=NF4Precision(compute_dtype=torch.float32), callbacks=callbacks, default_root_dir=str(out),
    )
    model = CausalLM(lr=1e-2)
    trainer.fit(model, datamodule=Data(), ckpt_path=None if not resumed else extra, weights_only=True if resumed else None)
    if trainer.global_rank == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, out / "trainable.pt")


isolated.end_process_groups_at_exit()


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = sys.argv[3] if len(sys.argv) > 3 else ""
    resumed = bool(extra) and not extra.startswith("save:")
    main(out_dir, int(sys.argv[2]), extra)
