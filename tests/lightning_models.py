"""Small LightningModules used by the tests: a tiny random Llama and a plain nn.Sequential."""

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


class CausalLM(pl.LightningModule):
    def __init__(self, model=None, lr: float = 1e-2):
        super().__init__()
        self.model = model if model is not None else tiny_llama()
        self.lr = lr

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=self.lr)


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 1e-2):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam((p for p in self.parameters() if p.requires_grad), lr=self.lr)


def token_loader(n: int = 16, seq: int = 32, batch_size: int = 4, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    # a learnable pattern: each sequence counts up from a random start
    starts = torch.randint(0, 100, (n, 1), generator=g)
    ids = (starts + torch.arange(seq)) % 128
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=False)


def regression_loader(n: int = 64, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 32, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
