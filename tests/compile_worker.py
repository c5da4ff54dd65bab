"""A QLoRA fit with LoRACallback(compile=...) on CPU, one process, DDP or NF4FSDPStrategy (gloo); used by
tests/test_compile.py (and, in-process on one GPU, by tests/test_gpu_lightning.py).

    python tests/compile_worker.py OUT_DIR STRATEGY DEVICES BATCH_SIZE COMPILE [RESUME_CKPT]

Each rank writes OUT_DIR/rank<r>.pt at the end of fit: its trainable weights, the blocks that were compiled,
and torch.compile's counters (graphs built, graph breaks). Rank 0 exports the adapter and the merged model
to OUT_DIR/export, and checkpoints go to OUT_DIR/ckpt, one per epoch.
"""

import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nf4 import LoRACallback, NF4Precision  # noqa: E402
from lightning_nf4.plugins.compile import compiled_blocks  # noqa: E402
from tests.ddp_worker import OrderedData  # noqa: E402
from tests.lightning_models import CausalLM  # noqa: E402
from tests import isolated  # noqa: E402


class Dump(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module):
        self.wrapper = type(trainer.strategy.model).__name__

    def on_fit_end(self, trainer, pl_module):
        from torch._dynamo.utils import counters

        from torch.distributed.tensor import DTensor

        state = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save({
            "trainable": state, "compiled": [type(m).__name__ for m in compiled_blocks(pl_module)],
            "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "wrapper": self.wrapper,
        }, self.out / f"rank{trainer.global_rank}.pt")


def run(out: Path, strategy: str, devices: int, batch_size: int, compile: bool, resume: str = "",
        accelerator: str = "cpu", compute_dtype: torch.dtype = torch.float32) -> None:
    pl.seed_everything(0)
    model = CausalLM(lr=1e-2)
    precision = NF4Precision(compute_dtype=compute_dtype)
    if strategy in ("nf4_fsdp", "nf4_fsdp_whole"):  # _whole: the host-bound setting, adapters whole and offload on
        from lightning_nf4.strategies import NF4FSDPStrategy
        from tests.fsdp_worker import shardable_llama

        model = CausalLM(model=shardable_llama(), lr=1e-2)
        whole = strategy == "nf4_fsdp_whole"
        strategy = NF4FSDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60), shard_adapters=not whole)
        precision = NF4Precision(compute_dtype=torch.float32, offload_activations=whole)
    elif strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, max_epochs=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        plugins=precision,
        callbacks=[LoRACallback(r=4, alpha=8, dropout=0.0, save_dir=str(out / "export"), compile=compile), Dump(out), checkpoint],
    )
    trainer.fit(model, datamodule=OrderedData(batch_size), ckpt_path=resume or None)


isolated.end_process_groups_at_exit()


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    run(out_dir, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6] if len(sys.argv) > 6 else "")
