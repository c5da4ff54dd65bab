"""NF4FSDPStrategy's set-up on one gloo rank, in its own process (tests/test_fsdp.py):

    python tests/fsdp_setup_worker.py refit        # the same model fit twice (found sharded by the strategy itself)
    python tests/fsdp_setup_worker.py user_sharded # configure_model calls fully_shard itself: a clear error

Prints the model's layer types and trainable parameter count after each fit.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nf4 import LoRACallback, NF4Precision  # noqa: E402
from lightning_nf4.strategies import NF4FSDPStrategy  # noqa: E402
from tests import isolated  # noqa: E402


class Model(pl.LightningModule):
    def __init__(self, user_sharded: bool) -> None:
        super().__init__()
        self.user_sharded = user_sharded

    def configure_model(self) -> None:
        if getattr(self, "net", None) is not None:
            return
        self.net = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
        if self.user_sharded:  # Lightning's ModelParallelStrategy idiom
            from torch.distributed.fsdp import fully_shard

            for layer in (self.net[0], self.net[2], self.net):
                fully_shard(layer)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def fit(model: Model) -> None:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 128)), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=NF4FSDPStrategy(), plugins=NF4Precision(compute_dtype=torch.float32),
                         max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LoRACallback(r=4, alpha=8, dropout=0.0, target_modules=["0", "2"])])
    trainer.fit(model, data)
    layers = [type(m).__name__ for m in model.net.modules() if "Linear" in type(m).__name__]
    print("fit:", layers, sum(p.numel() for p in model.parameters() if p.requires_grad), flush=True)


isolated.end_process_groups_at_exit()

if __name__ == "__main__":
    model = Model(user_sharded=sys.argv[1] == "user_sharded")
    fit(model)
    if sys.argv[1] == "refit":
        fit(model)
