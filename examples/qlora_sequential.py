"""QLoRA on any LightningModule: two objects added to the Trainer, nothing changed in the model.

    python examples/qlora_sequential.py

Trains LoRA adapters on a frozen NF4 copy of a small MLP and a small random Llama, on CPU (or the
first GPU), and writes PEFT adapters and merged float models under ./outputs/.
"""

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nf4 import LoRACallback, NF4Precision


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=3e-3)


class TinyCausalLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=1e-2)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    y = torch.sin(x[:, :1]) + x[:, 1:2]
    trainer = pl.Trainer(max_epochs=20, plugins=NF4Precision(), logger=False, enable_checkpointing=False,
                         callbacks=[LoRACallback(r=8, alpha=16, save_dir="outputs/regressor")])
    trainer.fit(Regressor(), DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))

    ids = (torch.randint(0, 200, (64, 1)) + torch.arange(32)) % 256
    trainer = pl.Trainer(max_epochs=5, plugins=NF4Precision(), logger=False, enable_checkpointing=False,
                         callbacks=[LoRACallback(r=8, alpha=16, save_dir="outputs/tiny-llama")])
    trainer.fit(TinyCausalLM(), DataLoader(TensorDataset(ids), batch_size=8))
    print("adapters and merged models written under outputs/")


if __name__ == "__main__":
    main()
