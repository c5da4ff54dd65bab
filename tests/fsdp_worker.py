"""A QLoRA fit under NF4FSDPStrategy (FSDP2) or DDP on CPU (gloo); used by tests/test_fsdp.py.

    python tests/fsdp_worker.py OUT_DIR STRATEGY DEVICES BATCH_SIZE [EPOCHS] [RESUME_CKPT]

Each rank writes OUT_DIR/rank<r>.pt at the end of fit: its trainable weights gathered whole, what it
held between steps (the local shapes and bytes of every NF4 weight and float parameter), its frozen base
shards as they were before the first step, and its first loss.

With FSDP_WORKER_CHECKPOINT=<folder> the model is loaded from that Hugging Face folder with
``lightning_nf4.loading.AutoModelForCausalLM``: on ``meta`` (filled unit by unit on each rank) under
NF4FSDPStrategy, on the CPU otherwise.
"""

import os
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nf4 import LoRACallback, NF4Precision  # noqa: E402
from tests.ddp_worker import OrderedData  # noqa: E402  (the same global batches in every configuration)
from tests.lightning_models import CausalLM  # noqa: E402
from tests import isolated  # noqa: E402


def shardable_llama(tie: bool = False):
    """A Llama whose every projection splits into 2 row shards on whole NF4 scale groups (16384 elements)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def shardable_mixtral():
    """A Mixtral whose projections and stacked experts (4 of them) split into 2 row shards on whole scale groups."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=128, hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return MixtralForCausalLM(config)


def load_checkpoint_model(folder: str, deferred: bool, device: str = "cpu", nf4: bool = True):
    from transformers import BitsAndBytesConfig

    from lightning_nf4.loading import AutoModelForCausalLM

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config if nf4 else None, device="meta" if deferred else device,
                                                 dtype=torch.float32, progress=False)
    if deferred:
        assert all(p.is_meta for p in model.parameters())
    return model.train()


def local_parts(param):
    """A parameter's bytes on this rank: an NF4 weight's codes and scales, or a float tensor's values."""
    from torch.distributed.tensor import DTensor

    from lightning_nf4.format.tensor import NF4Tensor

    local = param.to_local() if isinstance(param, DTensor) else param
    if isinstance(local, NF4Tensor):
        q = local.quant
        return [q.packed.clone(), q.absmax.clone(), q.nested.absmax.clone(), q.nested.offset.clone()]
    return [local.detach().clone()]


class Dump(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.base = {}
        self.first_loss = None

    def on_train_start(self, trainer, pl_module):
        from lightning_nf4.layers import NF4Linear

        self.base = {n: local_parts(p) for n, p in pl_module.named_parameters() if not p.requires_grad}
        self.low_memory = sorted({m.low_memory_recompute for m in pl_module.modules() if isinstance(m, NF4Linear)})
        self.ddp_ignored = sorted(getattr(trainer.strategy.model, "parameters_to_ignore", []))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1 and trainer.current_epoch == 0:  # one whole step (forward, backward, optimizer) profiled
            self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profile.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from torch.distributed.tensor import DTensor

        from lightning_nf4.format.tensor import NF4Tensor

        if getattr(self, "profile", None) is not None:
            self.profile.__exit__(None, None, None)
            # FSDP2 names each all-gather after its unit: how often each unit was gathered in that step
            self.gathers = {e.key: e.count for e in self.profile.key_averages() if e.key.startswith("FSDP::all_gather (")}
            self.profile = None
        if batch_idx != 0 or trainer.current_epoch != 0:
            return
        self.first_loss = outputs["loss"].detach().clone()
        held = {}
        for name, p in pl_module.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if isinstance(local, NF4Tensor):
                q = local.quant
                held[name] = {"rows": local.shape[0], "bytes": q.nbytes, "full_rows": p.shape[0], "dtype": str(q.packed.dtype),
                              "packed": q.packed.numel(), "absmax": q.absmax.numel(), "nested": q.nested.absmax.numel()}
            else:
                held[name] = {"rows": local.shape[0], "bytes": local.numel() * local.element_size(), "full_rows": p.shape[0], "dtype": str(local.dtype),
                              "packed": local.numel()}
        self.held = held

    def on_fit_end(self, trainer, pl_module):
        from lightning_nf4.strategies.fsdp import full_trainable_state

        state = full_trainable_state(pl_module)
        torch.save({"trainable": state, "held": getattr(self, "held", {}), "strategy": type(trainer.strategy).__name__,
                    "base": self.base, "first_loss": self.first_loss, "gathers": getattr(self, "gathers", {}),
                    "low_memory_recompute": self.low_memory, "ddp_ignored": self.ddp_ignored},
                   self.out / f"rank{trainer.global_rank}.pt")


def run(out: Path, strategy: str, devices: int, batch_size: int, epochs: int = 2, resume: str = "") -> None:
    pl.seed_everything(0)
    accelerator = os.environ.get("FSDP_WORKER_ACCELERATOR", "cpu")  # "gpu": tests/test_gpu_fsdp.py
    folder = os.environ.get("FSDP_WORKER_CHECKPOINT")
    options = strategy.split("+")[1:]  # nf4_fsdp+u2: two layers per unit; +whole: adapters not sharded; +moe: a Mixtral; +tiedhead, +dora, +float: below
    strategy = strategy.split("+")[0]
    tied_head = "tiedhead" in options  # the head tied to the embeddings, with LoRA on it as well
    nf4 = "float" not in options  # +float: the bf16-LoRA baseline's layout, a float base (load_in_4bit False)
    if folder:
        base = load_checkpoint_model(folder, deferred=strategy.startswith("nf4_fsdp"), nf4=nf4)
    else:
        base = shardable_mixtral() if "moe" in options else shardable_llama(tie=tied_head)  # +moe: NF4 experts
    model = CausalLM(base, lr=1e-2)
    model.load_in_4bit = nf4
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo" if accelerator == "cpu" else None, timeout=timedelta(seconds=60))
    elif strategy.startswith("nf4_fsdp"):
        from lightning_nf4.strategies import NF4FSDPStrategy

        kind = NF4FSDPStrategy
        if "skew" in options:  # +skew: the ranks' adapters start apart; sharding must leave every rank rank 0's

            class SkewedStart(NF4FSDPStrategy):
                def shard(self, module):
                    with torch.no_grad():
                        for param in module.parameters():
                            if param.requires_grad:
                                param.add_(0.01 * self.global_rank)
                    return super().shard(module)

            kind = SkewedStart
        strategy = kind(timeout=timedelta(seconds=60), activation_checkpointing=strategy.endswith("_ac"),
                        layers_per_unit=2 if "u2" in options else 1, shard_adapters="whole" not in options)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"] if tied_head else "all-linear"
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, max_epochs=epochs, logger=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        plugins=NF4Precision(compute_dtype=torch.float32),
        callbacks=[LoRACallback(r=4, alpha=8, dropout=0.0, save_dir=str(out / "export"), export_merged=True, target_modules=targets,
                                use_dora="dora" in options), Dump(out), checkpoint],
    )
    trainer.fit(model, datamodule=OrderedData(batch_size), ckpt_path=resume or None)


isolated.end_process_groups_at_exit()


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    run(out_dir, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *(int(a) if i == 0 else a for i, a in enumerate(sys.argv[5:])))
