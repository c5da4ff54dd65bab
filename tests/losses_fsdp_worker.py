"""CausalLMModule fit with one loss mode under NF4FSDPStrategy (FSDP2; gloo, or NCCL with
LOSSES_WORKER_ACCELERATOR=gpu) or one process; used by tests/test_losses.py and tests/test_gpu_fsdp.py.

    python tests/losses_fsdp_worker.py MODEL_DIR OUT_DIR LOSS STRATEGY DEVICES BATCH_SIZE [disagree]

With ``disagree``, rank 1 alone finds the model's logits unlike lm_head's (its check sees them shifted): the
ranks must still take one loss path together, the plain one.

STRATEGY: nf4_fsdp (lm_head in the FSDP root), nf4_fsdp_head_unit (lm_head sharded as a unit of its own, as
a user may do), nf4_fsdp_vocab (the strategy's default: a frozen lm_head and embeddings split by vocabulary
rows), or auto (one process). The model's lm_head is trained in full (modules_to_save) besides
LoRA, so the head weight's gradient goes through the loss too; with a ``_frozen_head`` suffix it stays frozen
(the usual QLoRA set-up), and the loss may let the gathered head go before backward. Each rank writes OUT_DIR/rank<r>.pt: the step losses, the perplexities the module
measured before and after fit, and the trainable weights gathered whole.
"""

import os
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nf4 import LoRACallback, NF4Precision  # noqa: E402
from lightning_nf4.models import CausalLMModule  # noqa: E402
from tests import isolated  # noqa: E402


def batches(n: int = 8, seq: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (n, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 3] = -100  # a masked prompt, as the instruction data has
    labels[0] = -100  # one sample with nothing to predict
    return [{"input_ids": ids[i], "labels": labels[i], "attention_mask": torch.ones(seq, dtype=torch.long)} for i in range(n)]


class Data(pl.LightningDataModule):
    """The same global batches in every configuration: rank r takes samples r, r + W, ..."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def _loader(self):
        data = batches()
        sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False)
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size, sampler=sampler)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return torch.utils.data.DataLoader(batches(), batch_size=4)  # every rank evaluates the whole set


class Record(pl.Callback):
    def __init__(self, out: Path, disagree: bool = False) -> None:
        self.out, self.losses, self.unsharded, self.resharded, self.released = out, [], 0, 0, 0
        self.disagree = disagree
        import lightning_nf4.losses as losses

        unshard = losses._unshard_for_loss

        def counting(model, head):  # observes that the loss gathered FSDP's units again after the forward
            self.resharded += losses._is_dtensor(head.weight)  # the head's unit had resharded it after the forward
            gathered = unshard(model, head)
            self.unsharded += len(gathered)
            return gathered

        losses._unshard_for_loss = counting

    def setup(self, trainer, pl_module, stage):
        import lightning_nf4.losses as losses

        if self.disagree and trainer.global_rank == 1:
            check = losses._head_matches

            def shifted(model, hidden, weight, bias, logits, *args, **kwargs):
                return check(model, hidden, weight, bias, logits + 1e3, *args, **kwargs)

            losses._head_matches = shifted

    def on_before_backward(self, trainer, pl_module, loss):
        import lightning_nf4.losses as losses

        self.released += losses._is_dtensor(pl_module.model.get_output_embeddings().weight)  # sharded again before backward

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_fit_end(self, trainer, pl_module):
        import lightning_nf4.losses as losses
        from lightning_nf4.strategies.fsdp import full_trainable_state

        state = full_trainable_state(pl_module)
        torch.save({"losses": self.losses, "before": pl_module.perplexity_before, "after": pl_module.perplexity_after,
                    "trainable": state, "unsharded": self.unsharded, "resharded": self.resharded,
                    "released": self.released, "fell_back": len(losses._logits_differ) > 0}, self.out / f"rank{trainer.global_rank}.pt")


def run(model_dir: str, out: Path, loss: str, strategy: str, devices: int, batch_size: int, disagree: bool = False) -> None:
    pl.seed_everything(0)
    frozen_head = strategy.endswith("_frozen_head")
    strategy = strategy.removesuffix("_frozen_head")
    by_vocabulary = strategy.endswith("_vocab")  # the strategy's default for a frozen head: split by vocabulary rows
    strategy = strategy.removesuffix("_vocab")
    module = CausalLMModule(model_dir, compute_dtype="float32", loss=loss, loss_chunk_size=16, learning_rate=1e-2, max_new_tokens=2)
    if strategy.startswith("nf4_fsdp"):
        from lightning_nf4.strategies import NF4FSDPStrategy

        # "Linear" outside the decoder layers is lm_head alone (the LoRA linears sit inside the layer units)
        units = ["LlamaDecoderLayer", "Linear"] if strategy.endswith("head_unit") else "auto"
        # the head as FSDP holds it, gathered again by the loss, unless "_vocab" asks for the default with a frozen
        # head: split by vocabulary rows, never gathered (tests/test_vocab_parallel.py covers that layout further)
        strategy = NF4FSDPStrategy(sharding_units=units, timeout=timedelta(seconds=120), vocab_parallel="auto" if by_vocabulary else False)
    trainer = pl.Trainer(
        accelerator=os.environ.get("LOSSES_WORKER_ACCELERATOR", "cpu"), devices=devices, strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
        plugins=NF4Precision(compute_dtype=torch.float32),
        callbacks=[LoRACallback(r=4, alpha=8, dropout=0.0, modules_to_save=None if frozen_head else ["lm_head"]), Record(out, disagree)],
    )
    trainer.fit(module, datamodule=Data(batch_size))


isolated.end_process_groups_at_exit()


if __name__ == "__main__":
    out_dir = Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    run(sys.argv[1], out_dir, sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7:] == ["disagree"])
