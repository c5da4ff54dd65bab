"""``CausalLMModule``: a Hugging Face causal LM, loaded straight into NF4, as a LightningModule.

The model is built in ``configure_model`` on the training device, so the float weights never sit in
host memory all at once; ``NF4Precision`` then finds it already quantized and ``LoRACallback`` wraps it.
Held-out perplexity is printed before and after training, the number a QLoRA run is judged by.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only, rank_zero_warn
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torch.utils.data import DistributedSampler, SequentialSampler
from torchmetrics.aggregation import MeanMetric

from lightning_nf4.data.text import load_tokenizer
from lightning_nf4.format.quantized import float_dtype
from lightning_nf4.losses import causal_lm_loss

def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"``/``"torch.bfloat16"`` -> ``torch.bfloat16`` (configs hold strings)."""
    dtype = float_dtype(name)
    if dtype is None:
        raise ValueError(f"compute_dtype must be one of ['bfloat16', 'float16', 'float32'], got {name!r}.")
    return dtype


@rank_zero_only
def _say(message: str) -> None:
    print(message, flush=True)


class CausalLMModule(pl.LightningModule):
    """Causal-LM fine-tuning (QLoRA with ``NF4Precision`` + ``LoRACallback``) of a local or packaged HF model.

    Args:
        model_name_or_path: a local Hugging Face folder or ``packaged:<name>`` (e.g. ``packaged:smollm2-135m-instruct``).
        tokenizer_name_or_path: where the tokenizer is, when not beside the model (default: ``model_name_or_path``);
            the data modules use it too unless given their own.
        load_in_4bit, bnb_4bit_use_double_quant: the ``BitsAndBytesConfig`` the loader quantizes with.
        compute_dtype: dtype of the float parts and of the matmuls (``bfloat16``, ``float16`` or ``float32``).
        learning_rate, weight_decay: AdamW settings (over trainable parameters only).
        warmup_steps: linear learning-rate warmup over this many optimizer steps (0: none).
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        loss: ``"chunked"`` (default) computes the training and validation loss from the final hidden states
            with ``lightning_nf4.losses.causal_lm_loss``, never holding the ``[tokens x vocab]`` logits or their
            gradient whole (liger-kernel's fused kernel on CUDA when installed); ``"plain"`` asks the model for
            its logits and loss. Both give the same loss to bf16 rounding.
        loss_chunk_size: tokens per chunk of the chunked loss (default: one chunk's fp32 logits under 128 MiB).
        max_new_tokens, do_sample, temperature, top_p, repetition_penalty: generation settings.
        generation_prompts: prompts whose continuations are printed at the end of fit; with a data module that formats
            prompts (``InstructionDataModule``) they are instructions, put in its template as in training.
    """

    def __init__(
        self,
        model_name_or_path: str,
        load_in_4bit: bool = True,
        bnb_4bit_use_double_quant: bool = True,
        compute_dtype: str = "bfloat16",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        gradient_checkpointing: bool = False,
        loss: str = "chunked",
        loss_chunk_size: Optional[int] = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        generation_prompts: Optional[list[str]] = None,
        tokenizer_name_or_path: Optional[str] = None,
    ) -> None:
        super().__init__()
        if loss not in ("chunked", "plain"):
            raise ValueError(f"loss must be 'chunked' or 'plain', got {loss!r}.")
        if loss_chunk_size is not None and (isinstance(loss_chunk_size, bool) or not isinstance(loss_chunk_size, int) or loss_chunk_size <= 0):
            raise ValueError(f"loss_chunk_size must be a positive number of tokens or None, got {loss_chunk_size!r}.")
        self.save_hyperparameters()
        self.compute_dtype = parse_dtype(compute_dtype)
        self.model: Optional[nn.Module] = None
        self.tokenizer: Any = None
        self.val_nll = MeanMetric()  # token-weighted mean loss; perplexity = exp(mean)
        self.perplexity_before: Optional[float] = None
        self.perplexity_after: Optional[float] = None

    # -- model --------------------------------------------------------------------------------
    def quantization_config(self) -> Any:
        """The ``transformers.BitsAndBytesConfig`` asked of the loader (None: load in float). The loader quantizes,
        so the trainer's ``NF4Precision`` settings go into it (its later conversion finds nothing left to do):
        ``skip_modules`` as ``llm_int8_skip_modules``; a ``double_quant`` or ``blocksize`` it cannot honour is an error."""
        if not self.hparams.load_in_4bit:
            return None
        from transformers import BitsAndBytesConfig

        from lightning_nf4.plugins.precision import NF4Precision

        plugin = getattr(self._trainer, "precision_plugin", None)
        skip = None
        if isinstance(plugin, NF4Precision):
            if plugin.double_quant != self.hparams.bnb_4bit_use_double_quant:
                raise ValueError(
                    f"NF4Precision(double_quant={plugin.double_quant}) but model.bnb_4bit_use_double_quant="
                    f"{self.hparams.bnb_4bit_use_double_quant}: CausalLMModule's loader quantizes, with the model's setting. Set both alike."
                )
            if plugin.blocksize != 64:
                raise ValueError(f"NF4Precision(blocksize={plugin.blocksize}): CausalLMModule loads through BitsAndBytesConfig, "
                                 "whose 4-bit block size is 64. Leave blocksize at 64.")
            skip = list(plugin.skip_modules)
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self.compute_dtype,
            bnb_4bit_use_double_quant=self.hparams.bnb_4bit_use_double_quant, llm_int8_skip_modules=skip,
        )

    def build(self, device: torch.device | str = "cpu", progress: bool = True) -> None:
        """Load model and tokenizer onto ``device``; a second call does nothing."""
        if self.model is not None:
            return
        from lightning_nf4.loading import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            self.hparams.model_name_or_path, quantization_config=self.quantization_config(),
            device=device, dtype=self.compute_dtype, progress=progress,
        )
        self.model.train()  # the loader returns eval mode; Lightning keeps submodule modes as it finds them
        self.tokenizer = load_tokenizer(self.hparams.get("tokenizer_name_or_path") or self.hparams.model_name_or_path)
        if self.hparams.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.config.use_cache = False

    def configure_model(self) -> None:
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        from lightning_nf4.strategies.fsdp import NF4FSDPStrategy

        if trainer is not None and isinstance(trainer.strategy, NF4FSDPStrategy):
            device = torch.device("meta")  # the strategy fills each unit from the checkpoint on every rank, keeping its shard
        precision_dtype = getattr(trainer.precision_plugin, "compute_dtype", None) if trainer is not None else None
        if precision_dtype is not None and precision_dtype != self.compute_dtype:
            rank_zero_warn(f"model.compute_dtype is {self.compute_dtype} but NF4Precision computes in {precision_dtype}; set both alike.")
        self.build(device, progress=trainer is None or trainer.is_global_zero)
        self._check_context(getattr(trainer, "datamodule", None))

    def _check_context(self, datamodule: Any) -> None:
        """Sequences longer than the positions the model knows: learned position tables fail with a bare IndexError,
        rotary ones train on positions never seen. Said before any step runs."""
        config = getattr(self.model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        length = getattr(datamodule, "block_size", None) or getattr(datamodule, "max_length", None)
        if isinstance(limit, int) and isinstance(length, int) and length > limit:
            name = "block_size" if getattr(datamodule, "block_size", None) else "max_length"
            rank_zero_warn(
                f"data.{name}={length} is longer than the {limit} positions of {self.hparams.model_name_or_path} "
                f"(config.max_position_embeddings): lower data.{name} to {limit} or less, unless the model is meant to "
                "extend its context."
            )

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)

    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Mean loss over target tokens, and their count (labels -100 are ignored)."""
        labels = batch["labels"]
        loss = causal_lm_loss(self.model, batch["input_ids"], labels, batch.get("attention_mask"),
                              mode=self.hparams.loss, chunk_size=self.hparams.loss_chunk_size)
        return loss, (labels[:, 1:] != -100).sum()

    # -- steps --------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, tokens = self._loss(batch)
        if tokens > 0:
            self.val_nll.update(loss.float(), weight=tokens)

    def _log_epoch(self, prefix: str) -> None:
        if self.val_nll.update_count == 0:
            return
        mean = self.val_nll.compute()  # synced across ranks by torchmetrics
        self.val_nll.reset()
        self.log(f"{prefix}_loss", mean, prog_bar=True, sync_dist=True)
        self.log(f"{prefix}_perplexity", mean.exp(), prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Continuations of a batch of prompts (left-padded ids, or a list of strings)."""
        return self.generate(batch)

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[str] | dict[str, Tensor]) -> list[str]:
        """Decode only the new tokens, with this module's generation settings, in eval mode (LoRA dropout off) whatever
        mode the module is in; the mode is put back after."""
        if isinstance(prompts, (list, tuple)):
            prompts = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
        prompts = {k: v.to(self.device) for k, v in prompts.items()}
        hp = self.hparams
        sampling = dict(temperature=hp.temperature, top_p=hp.top_p) if hp.do_sample else dict(temperature=None, top_p=None, top_k=None)
        was_training = self.training
        self.eval()
        try:
            out = self.model.generate(
                input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], max_new_tokens=hp.max_new_tokens,
                do_sample=hp.do_sample, repetition_penalty=hp.repetition_penalty, pad_token_id=self.tokenizer.pad_token_id,
                use_cache=True, **sampling,
            )
        finally:
            self.train(was_training)
        return self.tokenizer.batch_decode(out[:, prompts["input_ids"].shape[1]:], skip_special_tokens=True)

    # -- perplexity before / after fit --------------------------------------------------------
    @torch.no_grad()
    def held_out_perplexity(self) -> Optional[tuple[float, int]]:
        """exp(mean token loss) over the whole validation set, and its token count (None without one).

        Every rank evaluates the full set (a loader that Lightning gave a DistributedSampler is read whole, in order),
        so the value is the same everywhere without syncing.
        """
        from lightning.pytorch.utilities.model_helpers import is_overridden

        trainer, datamodule = self.trainer, self.trainer.datamodule
        if datamodule is not None:  # a datamodule without validation data keeps Lightning's val_dataloader, which raises
            loader = datamodule.val_dataloader() if is_overridden("val_dataloader", datamodule) else None
        else:
            loader = trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            return None
        if isinstance(getattr(loader, "sampler", None), DistributedSampler):  # Lightning's, under DDP: this rank's share
            from lightning.pytorch.utilities.data import _update_dataloader

            loader = _update_dataloader(loader, SequentialSampler(loader.dataset))
        limit = trainer.limit_val_batches
        n_batches = len(loader) if not isinstance(limit, int) else min(limit, len(loader))
        if isinstance(limit, float):
            n_batches = max(1, int(n_batches * limit))
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        was_training = self.training
        self.eval()
        try:
            for index, batch in enumerate(loader):
                if index >= n_batches:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                with trainer.precision_plugin.val_step_context():
                    loss, tokens = self._loss(batch)
                if tokens > 0:
                    total += loss.double() * tokens
                    count += int(tokens)
        finally:
            self.train(was_training)
        return (math.exp(total.item() / count), count) if count else None

    def _report_perplexity(self, when: str) -> Optional[float]:
        result = self.held_out_perplexity()
        if result is None:
            _say(f"perplexity {when}: n/a (no validation data)")
            return None
        value, tokens = result
        _say(f"perplexity {when}: {value:.4f} (held-out, {tokens:,} tokens, step {self.global_step})")
        for logger in self.loggers:
            logger.log_metrics({f"perplexity_{when}": value}, step=self.global_step)
        return value

    def on_train_start(self) -> None:
        self.perplexity_before = self._report_perplexity("before")

    def on_train_end(self) -> None:
        # Here and not in on_fit_end: Lightning has not yet moved the model back to the CPU.
        self.perplexity_after = self._report_perplexity("after")
        if self.perplexity_before is not None and self.perplexity_after is not None:
            _say(f"perplexity change: {self.perplexity_before:.4f} -> {self.perplexity_after:.4f} "
                 f"({100 * (self.perplexity_after / self.perplexity_before - 1):+.1f}%)")
        prompts = list(self.hparams.generation_prompts or [])
        if prompts:
            datamodule = self.trainer.datamodule
            inputs = datamodule.generation_batch(prompts) if hasattr(datamodule, "generation_batch") else prompts
            with self.trainer.precision_plugin.predict_step_context():
                completions = self.generate(inputs)
            for prompt, completion in zip(prompts, completions):
                _say(f"generation: {prompt!r} -> {completion!r}")

    # -- optimizer ----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params or not any(isinstance(m, LoraLayer) for m in self.modules()):
            # without adapters the loader's float parts (embeddings, norms, lm_head) would train in full, silently
            raise RuntimeError("CausalLMModule trains LoRA adapters and the model has none: add lightning_nf4.LoRACallback to "
                               "trainer.callbacks (NF4 base weights are frozen).")
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        if warmup <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
