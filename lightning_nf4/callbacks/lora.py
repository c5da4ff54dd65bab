"""``LoRACallback``: inject PEFT LoRA adapters, freeze the base, keep checkpoints small, export.

Lightning runs callbacks' ``setup`` before ``precision.convert_module``; the callback asks
``NF4Precision`` to convert first, so LoRA wraps ``NF4Linear`` layers (never the reverse). For a model
built later, in ``configure_model``, injection waits for the conversion through a one-shot hook.
"""

from __future__ import annotations

import numbers
import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.callbacks import Callback
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from lightning_nf4 import export, publish
from lightning_nf4.callbacks.rng import RNGCheckpoint
from lightning_nf4.checkpoint_io import verify_archive
from lightning_nf4.format.quantized import float_dtype
from lightning_nf4.layers.group import persistent_buffers
from lightning_nf4.layers.linear import NF4Linear, is_conv1d
from lightning_nf4.layers.lora import lora_config, seeded_init, stable_seed
from lightning_nf4.plugins.compile import compile_blocks, compile_option
from lightning_nf4.plugins.convert import (
    call_layers_in_torch_transformers, check_peft_layers, exclude_nf4_from_ddp_sync, holds_nf4, keep_trained_in, matches,
    within,
)
from lightning_nf4.plugins.precision import NF4Precision
from lightning_nf4.strategies.fsdp import NF4FSDPStrategy, has_sharded_parameters

_CKPT_KEY = "lightning_nf4"


class LoRACallback(Callback):
    """Train LoRA adapters on a frozen (NF4 or float) base.

    Args:
        r, alpha, dropout: LoRA rank, scaling numerator (scaling = alpha / r) and dropout.
        target_modules: ``"all-linear"`` (every linear layer, NF4 or float, except a float output head named
            ``lm_head``, ``classifier`` or ``score``, as PEFT's ``"all-linear"``), or names, suffixes, globs and
            ``re:``-prefixed regular expressions.
        modules_to_save: modules trained in full (e.g. ``["lm_head"]``), saved with the adapter.
        adapter_dtype: dtype of the trained parameters: the LoRA matrices, DoRA magnitudes and ``modules_to_save``
            (float32 keeps optimizer updates precise), kept under any precision plugin.
        save_dir: where to export ``adapter/`` and ``merged/`` at the end of fit (rank 0 only).
        export_merged: also write the merged float model at the end of fit.
        full_checkpoint: store the whole model in Lightning checkpoints instead of trainable weights only.
        init_seed: seed for the adapters' random init (LoRA A), drawn from a forked RNG so the run's
            other randomness is untouched; the same seed gives the same adapters whatever the strategy.
        compile: compile each decoder layer in place (``block.compile()``) once LoRA is injected: True, or a
            dict of ``torch.compile`` options plus ``blocks`` (see ``lightning_nf4.plugins.compile``). Here
            because injection is the last change to the model's structure, for bf16 and NF4 bases alike.
        use_dora: DoRA (weight-decomposed LoRA; QDoRA on NF4 bases): a trained magnitude per output row on top of
            the LoRA update, as PEFT's ``use_dora``; each step also dequantizes every base weight once more for
            the row norms.
    """

    def __init__(
        self,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.05,
        target_modules: Union[str, Sequence[str]] = "all-linear",
        modules_to_save: Optional[Sequence[str]] = None,
        adapter_dtype: Union[torch.dtype, str] = torch.float32,
        save_dir: Optional[str] = None,
        export_merged: bool = True,
        merged_dtype: Optional[Union[torch.dtype, str]] = None,
        full_checkpoint: bool = False,
        adapter_name: str = "default",
        init_seed: Optional[int] = 0,
        compile: Union[bool, dict[str, Any]] = False,
        use_dora: bool = False,
    ) -> None:
        if not _is_number(r, integral=True) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}.")
        if not _is_number(alpha):
            raise ValueError(f"LoRA alpha must be a number (scaling = alpha / r), got {alpha!r}.")
        if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}.")
        if not (isinstance(target_modules, str) or _is_names(target_modules)) or not target_modules:
            raise ValueError(f"target_modules must be 'all-linear', a name or pattern, or a list of them; got {target_modules!r}.")
        if isinstance(modules_to_save, str):
            modules_to_save = [modules_to_save]
        if modules_to_save is not None and not _is_names(modules_to_save):
            raise ValueError(f"modules_to_save must be a list of module names or patterns; got {modules_to_save!r}.")
        _check_patterns("target_modules", [target_modules] if isinstance(target_modules, str) else target_modules)
        _check_patterns("modules_to_save", modules_to_save or [])
        if float_dtype(adapter_dtype) is None:
            raise ValueError(f"adapter_dtype must be float32, bfloat16 or float16, got {adapter_dtype!r}.")
        adapter_dtype = float_dtype(adapter_dtype)
        if merged_dtype is not None and float_dtype(merged_dtype) is None:
            raise ValueError(f"merged_dtype must be float32, bfloat16 or float16 (None: the dtype the weights were quantized from), got {merged_dtype!r}.")
        merged_dtype = float_dtype(merged_dtype) if merged_dtype is not None else None
        self.r, self.alpha, self.dropout = int(r), alpha, dropout
        self.target_modules = target_modules
        self.modules_to_save = list(modules_to_save or [])
        self.adapter_dtype = adapter_dtype
        self.save_dir = save_dir
        self.export_merged = export_merged
        self.merged_dtype = merged_dtype
        self.full_checkpoint = full_checkpoint
        self.adapter_name = adapter_name
        self.init_seed = init_seed
        self.compile = compile_option(compile)
        if not isinstance(use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {use_dora!r}.")
        self.use_dora = use_dora
        self._pending_state: Optional[dict[str, torch.Tensor]] = None
        self._saved_modules = list(self.modules_to_save)  # and the modules tied to them, once injected
        self._held_state: Optional[dict[str, torch.Tensor]] = None  # a full checkpoint, until the model is injected
        self._hold_hook: Any = None
        self._restore_hook: Any = None  # checks what Lightning restores into an injected model (_watch_restore)
        self._rng = RNGCheckpoint()  # exact resume with dropout and shuffling
        self._last_epoch: Optional[int] = None  # of this fit's last training step, for export.json

    # -- setup ------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.adapter_dtype == torch.float16 and getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "LoRACallback(adapter_dtype=torch.float16) under fp16 mixed precision: the GradScaler cannot unscale fp16 "
                "gradients (torch refuses at the first step). Keep the adapters in float32 (the default)."
            )
        _refuse_weight_averaging(trainer)
        if self.full_checkpoint and isinstance(trainer.strategy, NF4FSDPStrategy):
            raise ValueError(
                "LoRACallback(full_checkpoint=True) under nf4_fsdp: the strategy's checkpoints hold the trainable weights "
                "and buffers, consolidated, not the sharded NF4 base (rebuilt from the model's own weights on resume). "
                "Leave full_checkpoint=False; the exports (save_dir) write the whole merged model."
            )
        if stage == "fit" and self.save_dir is not None and trainer.is_global_zero:
            publish.check_writable(self.save_dir, "LoRACallback save_dir", export.PARTS)  # before training, not after it
            publish.recover(self.save_dir)  # finish or clear what a killed run's export left there
        if stage == "fit" and type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher":
            rank_zero_warn(
                "LoRACallback under a spawned or forked strategy (ddp_spawn, ddp_fork): the adapters train in the worker "
                "processes, and Lightning's copy back cannot fit them into the float model of the launching process, which "
                "keeps no LoRA after fit. Use the exports (save_dir) or a checkpoint, or strategy='ddp'."
            )
        if not self.full_checkpoint:
            pl_module.strict_loading = False  # base weights are absent from adapter-only checkpoints; checked in on_load_checkpoint
        precision = trainer.precision_plugin
        nf4 = isinstance(precision, NF4Precision)
        if self._injected(pl_module):
            self._check_existing_adapters(pl_module, precision.pending_conversion(pl_module) if nf4 else set())
            if nf4:  # before Lightning restores a checkpoint's NF4 keys
                precision.convert_module(pl_module)
            self.inject(pl_module)  # injected already (its own PEFT adapters, an earlier fit): compiles if asked
        elif any(_is_linear(m) for m in pl_module.modules()):
            if nf4:
                # checked before quantizing: a module to train in full must not lose its float weights to a failed setup
                self._check_modules_to_save(pl_module, precision.pending_conversion(pl_module))
                precision.convert_module(pl_module)  # LoRA wraps NF4Linear layers, never the reverse
            self.inject(pl_module)
        else:  # built in configure_model (NF4 or float base): inject right after the precision plugin's conversion
            if self.full_checkpoint:
                self._hold_full_state(pl_module)
            _after_conversion(precision, self.inject)
            return
        self._watch_restore(pl_module)
        _after_conversion(precision, self._after_setup_conversion)

    def _hold_full_state(self, pl_module: pl.LightningModule) -> None:
        """Lightning restores a checkpoint after ``configure_model`` but before the conversion and injection (single
        device and DDP): a full checkpoint's NF4 and LoRA keys would meet the float model. Its state is held back
        here, and loaded strictly once the model is converted and injected (``_load_held_state``)."""
        pl_module.strict_loading = False

        def take(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
            if not prefix and not self._injected(module):
                self._held_state = dict(state_dict)
                state_dict.clear()

        self._hold_hook = pl_module.register_load_state_dict_pre_hook(take)

    def _load_held_state(self, module: nn.Module) -> None:
        hook, self._hold_hook = self._hold_hook, None
        if hook is None:
            return
        hook.remove()
        module.strict_loading = True
        state, self._held_state = self._held_state, None
        if state is None:
            return
        fix = "Use the NF4Precision and LoRACallback settings (r, target_modules, modules_to_save) of the run that wrote it."
        try:
            result = module.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shapes that differ (another r, block size or layout)
            raise RuntimeError(f"The full checkpoint does not fit this model. {fix}\n{err}") from err
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(
                f"The full checkpoint does not fit this model: missing {result.missing_keys[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}. {fix}"
            )

    def _check_existing_adapters(self, module: nn.Module, to_quantize: set[str]) -> None:
        """A model that carries LoRA already (PEFT's ``get_peft_model`` in ``__init__``, or an earlier fit) is trained
        as it is, and its exports must describe it: its config's ``r`` and ``lora_alpha`` are this callback's, the
        adapter trained and run is the callback's ``adapter_name``, and nothing trains that the adapter folder cannot
        hold. PEFT's own DoRA or ``target_parameters`` cannot sit on a base about to be quantized (``to_quantize``):
        they would read or add to packed codes."""
        check_peft_layers(module, to_quantize)
        own = export.own_lora_config(export.export_root(module)[1], self.adapter_name)
        if own is not None:
            unexported = export.unexported_settings(own)
            if unexported:
                raise ValueError(
                    f"The model's own LoraConfig sets {', '.join(unexported)}: the exported adapter holds LoRA weights and "
                    "modules trained in full (and biases) only, so it would load as another model. Leave those at PEFT's defaults "
                    "(train an embedding in full with modules_to_save), or let LoRACallback inject the adapters itself."
                )
            if (own.r, own.lora_alpha) != (self.r, self.alpha):
                raise ValueError(
                    f"The model carries LoRA adapter {self.adapter_name!r} with r={own.r}, lora_alpha={own.lora_alpha}, but "
                    f"LoRACallback has r={self.r}, alpha={self.alpha}: its checkpoints would record another scaling. Give "
                    f"LoRACallback(r={own.r}, alpha={own.lora_alpha}), or let LoRACallback inject the adapters itself."
                )
        for name, layer in module.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            self._check_active(name, layer)
            if own is None and self.adapter_name in getattr(layer, "r", {}):
                r, alpha = layer.r[self.adapter_name], layer.lora_alpha[self.adapter_name]
                if (r, alpha) != (self.r, self.alpha):
                    raise ValueError(
                        f"{name} already carries LoRA adapter {self.adapter_name!r} with r={r}, lora_alpha={alpha}, but "
                        f"LoRACallback has r={self.r}, alpha={self.alpha}: its exports would describe another adapter. "
                        f"Give LoRACallback(r={r}, alpha={alpha}), or let LoRACallback inject the adapters itself."
                    )

    def _check_active(self, name: str, layer: LoraLayer) -> None:
        active = list(getattr(layer, "active_adapters", []))
        if active and active != [self.adapter_name]:
            raise ValueError(
                f"{name} runs LoRA adapter(s) {active}, but LoRACallback trains and exports {self.adapter_name!r}: the "
                "adapter folder would hold another adapter than the merged model. Train one adapter at a time: "
                f"model.set_adapter(...) and LoRACallback(adapter_name=...) naming it."
            )

    @staticmethod
    def _injected(module: nn.Module) -> bool:
        return any(isinstance(m, LoraLayer) for m in module.modules())

    def _check_modules_to_save(self, module: nn.Module, to_quantize: Sequence[str] = ()) -> None:
        """Each ``modules_to_save`` entry names a module, and none holds frozen NF4 weights (those cannot be
        trained in full; NF4Precision must leave such a module in float), now or after quantizing ``to_quantize``."""
        named = [(n, m) for n, m in module.named_modules() if n and ".lora_" not in n]
        trained: list[str] = []
        for pattern in self.modules_to_save:
            found = [(n, m) for n, m in named if matches(n, [pattern])]
            if not found:
                raise ValueError(
                    f"modules_to_save entry {pattern!r} matched no module of {type(module).__name__}. "
                    f"Modules found: {[n for n, _ in named][:8]}"
                )
            inside = [(".".join(filter(None, (n, c))), sub) for n, m in found for c, sub in m.named_modules()]
            nf4 = [full for full, sub in inside if holds_nf4(sub) or full in to_quantize]
            if nf4:
                raise ValueError(
                    f"modules_to_save entry {pattern!r} names the NF4 layer {nf4[0]!r}, whose packed 4-bit weights are "
                    f"frozen and cannot be trained in full. Keep it in float by adding it to NF4Precision's skip_modules, "
                    f"e.g. NF4Precision(skip_modules=('lm_head', {pattern!r})), or train it through LoRA (target_modules) instead."
                )
            trained.extend(n for n, _ in found)
        names = [n for n, _ in named]
        for pattern in self.modules_to_save:
            _check_peft_part_suffix(pattern, self.adapter_name)
            _warn_peft_suffix_match(pattern, trained, names)

    def _targets(self, module: nn.Module) -> list[str]:
        self._check_modules_to_save(module)
        skip = set(self.modules_to_save)
        names, uncalled = [], []
        every = self.target_modules == "all-linear"
        patterns = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)
        read_directly = {id(m.out_proj) for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
        for name, sub in module.named_modules():
            if not _is_linear(sub) or ".lora_" in name or within(name, list(skip)):
                continue
            if id(sub) in read_directly:  # nn.MultiheadAttention reads out_proj.weight, never calling the layer
                if not every and matches(name, patterns):
                    uncalled.append(name)
                continue
            if every:
                if not matches(name, ["lm_head", "classifier", "score"]) or isinstance(sub, NF4Linear):
                    names.append(name)
            elif matches(name, patterns):
                names.append(name)
        if uncalled:
            raise ValueError(
                f"target_modules names {uncalled[:4]}, the out_proj of nn.MultiheadAttention, which reads its weight directly "
                "and never calls the layer: LoRA there would never apply. Leave it out (\"all-linear\" does), or train it "
                "in full with modules_to_save."
            )
        if not names:
            linears = [n for n, m in module.named_modules() if _is_linear(m)]
            hint = ""
            if isinstance(self.target_modules, str) and not self.target_modules.startswith("re:"):
                try:  # PEFT reads a single string as a regular expression; here that needs the 're:' prefix
                    as_regex = [n for n in linears if re.fullmatch(self.target_modules, n)]
                except re.error:
                    as_regex = []
                if as_regex:
                    hint = f" As a regular expression (PEFT's reading of a string) it matches {as_regex[:3]}: write 're:{self.target_modules}'."
            raise ValueError(
                f"target_modules={self.target_modules!r} matched no linear layer of {type(module).__name__} (a string is a "
                f"layer name, name suffix or glob; 're:' starts a regular expression).{hint} Linear layers found: {linears[:8]}"
            )
        _warn_shared(module, names)
        others = [(n, type(m).__name__) for n, m in module.named_modules() if isinstance(m, _OTHER_LORA_KINDS) and ".lora_" not in n
                  and self.target_modules != "all-linear"
                  and matches(n, [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules))]
        if others:
            raise ValueError(
                f"target_modules={self.target_modules!r} also names {others[:4]}: LoRACallback puts LoRA on linear layers "
                "only (nn.Linear, NF4Linear, transformers' Conv1D). Train those in full with modules_to_save, or narrow "
                "target_modules to the linear layers."
            )
        return names

    def inject(self, module: nn.Module) -> None:
        """Wrap the target layers with LoRA, freeze all else, cast adapters; idempotent."""
        if self._injected(module):
            self._saved_modules = list(dict.fromkeys([*self.modules_to_save, *_wrapped_to_save(module)]))
            call_layers_in_torch_transformers(module)
            if self.compile is not None:
                compile_blocks(module, **self.compile)
            return
        config = lora_config(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=self._targets(module), use_dora=self.use_dora,
        )
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[], enabled=self.init_seed is not None):
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            if self.init_seed is not None:
                torch.manual_seed(self.init_seed)
            inject_adapter_in_model(config, module, adapter_name=self.adapter_name)
        call_layers_in_torch_transformers(module)  # their fast path would read the wrapped layers' base weights
        prefix = export.root_prefix(module)  # the adapter's names start at the model it exports
        if self.init_seed is not None:  # each layer's init from its own seed: the same wherever it is materialized
            for name, layer in module.named_modules():
                if isinstance(layer, LoraLayer):
                    layer.lora_init_seed = stable_seed(self.init_seed, name.removeprefix(prefix))
                    seeded_init(layer)  # nothing to draw on meta: the strategy materializing it draws
        names: dict[int, list[str]] = {}  # every name of each tensor: a tied lm_head is listed under the embeddings only
        for name, param in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        self._saved_modules = list(self.modules_to_save)
        for name, param in module.named_parameters():
            owners = [n.rsplit(".", 1)[0] for n in names[id(param)]]
            is_lora = ".lora_" in name
            saved = [o for o in owners if within(o, self.modules_to_save)]
            param.requires_grad_(is_lora or bool(saved))
            if saved and len(saved) < len(owners):  # tied to a module not named: both train as one tensor
                partners = [o.removeprefix(prefix) for o in owners if o not in saved]
                self._saved_modules += [p for p in partners if p not in self._saved_modules]
                rank_zero_warn(
                    f"modules_to_save: {saved[0]}'s weight is tied to {partners}; the shared tensor trains, and the "
                    f"adapter saves it under both names with PEFT's ensure_weight_tying."
                )
        self._cast_trained(module)
        _warn_running_stats(module, self._saved_modules)
        exclude_nf4_from_ddp_sync(module)  # LoRA moved the NF4 weights under base_layer
        trainable, total = _count(module)
        rank_zero_info(f"LoRACallback: trainable parameters {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%).")
        if self._pending_state is not None:
            self._apply_state(module, self._pending_state)
            self._pending_state = None
        self._load_held_state(module)
        if self.compile is not None:
            compile_blocks(module, **self.compile)

    def _cast_trained(self, module: nn.Module) -> nn.Module:
        """The trained parameters (LoRA, DoRA magnitudes, ``modules_to_save``) in ``adapter_dtype``, whatever dtype the
        model was built in (``configure_model`` and ``trainer.init_module()`` build in the compute dtype) or a precision
        plugin cast it to later (``precision="bf16-true"``): AdamW's small steps vanish in bf16 weights."""
        keep_trained_in(module, self.adapter_dtype)
        return module

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.setdefault(_CKPT_KEY, {})
        meta["rng"] = self._rng.save(trainer)  # a collective: every rank's generator states
        pending = _accumulated_unapplied(trainer)
        if pending:
            rank_zero_warn(
                f"LoRACallback: a checkpoint is saved at step {trainer.global_step} with {pending} of "
                f"{trainer.accumulate_grad_batches} batches' gradients accumulated and not yet applied. Lightning saves no "
                "gradients, so a run resumed from it takes its next step on the remaining batches only, not as the "
                "uninterrupted run does. For an exact resume, save at optimizer steps: a val_check_interval that is a "
                "multiple of accumulate_grad_batches."
            )
        meta.update({"r": self.r, "alpha": self.alpha, "settings": self._settings(trainer.precision_plugin)})
        if self.full_checkpoint:
            return
        # every persistent buffer too: training changes some (a norm's running statistics, a user's step counter)
        trainable = _trained_keys(pl_module)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        meta.update({"adapter_only": True, "keys": sorted(trainable)})

    def _settings(self, precision: Any) -> dict[str, Any]:
        """What rebuilds the trained module without a Trainer (``lightning_nf4.load_from_checkpoint``), in plain types."""
        lora = {
            "target_modules": self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules),
            "dropout": self.dropout, "modules_to_save": list(self.modules_to_save), "use_dora": self.use_dora,
            "adapter_dtype": str(self.adapter_dtype).removeprefix("torch."), "adapter_name": self.adapter_name,
        }
        nf4 = None
        if isinstance(precision, NF4Precision):
            nf4 = {"compute_dtype": str(precision.compute_dtype).removeprefix("torch."), "blocksize": precision.blocksize,
                   "double_quant": precision.double_quant, "skip_modules": list(precision.skip_modules)}
        return {"lora": lora, "precision": nf4}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        path = getattr(trainer, "ckpt_path", None)
        if path is not None and zipfile.is_zipfile(path):  # Lightning's torch.load checks no checksum
            verify_archive(path)
        meta = checkpoint.get(_CKPT_KEY, {})
        check_scaling(meta, self.r, self.alpha, "LoRACallback", "give LoRACallback(r={r}, alpha={alpha}) as the run that wrote it")
        if "rng" in meta and trainer.state.fn == "fit":
            self._rng.load(trainer, meta["rng"])
        if not meta.get("adapter_only"):
            return
        state = checkpoint["state_dict"]
        if self._injected(pl_module):
            # Lightning already loaded it non-strictly; make sure nothing was silently dropped.
            self._apply_state(pl_module, state)
        else:
            self._pending_state = dict(state)
            self._held_state = None  # under full_checkpoint, an earlier run's adapter-only state: applied as the pending one

    def _watch_restore(self, pl_module: pl.LightningModule) -> None:
        """Until the precision plugin converts the model, check what Lightning restores into the injected model (it
        loads non-strictly, for adapter-only checkpoints). A whole-model checkpoint (``save_weights_only``, whose
        callbacks' hooks and so its adapter-only tag Lightning skips) has no other check; under ``full_checkpoint`` it
        must hold every key."""
        if self._restore_hook is not None:
            return
        full = self.full_checkpoint

        def check(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
            if prefix:
                return
            trained = _trained_keys(module)
            if set(state) <= trained:  # an adapter-only state: checked in on_load_checkpoint
                if full:  # (an earlier run's) Lightning loads strictly here: the frozen rest is this model's own
                    state.update({k: v for k, v in module.state_dict().items() if k not in trained})
                return
            if full:  # named here; a strategy restoring after setup gets Lightning's strict load instead
                expected = set(module.state_dict())
                _raise_if_mismatch("full checkpoint", sorted(expected - set(state)), sorted(set(state) - expected))
                return
            params = dict(module.named_parameters())
            missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
            unexpected = sorted(k for k in state if ".lora_" in k and k not in params)
            _raise_if_mismatch("checkpoint", missing, unexpected)

        self._restore_hook = pl_module.register_load_state_dict_pre_hook(check)

    def _after_setup_conversion(self, module: nn.Module) -> None:
        """After the precision plugin's conversion: restores are over, and a plugin that cast the model (``bf16-true``)
        cast the trained parameters too."""
        hook, self._restore_hook = self._restore_hook, None
        if hook is not None:
            hook.remove()
        self._cast_trained(module)

    def _apply_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = {**dict(module.named_parameters()), **persistent_buffers(module)}
        trainable = {n for n, p in params.items() if p.requires_grad}
        # a trained weight this callback freezes (modules_to_save, use_dora given then, not now) is as foreign as an unknown one
        foreign = {k for k in state if k not in params or (isinstance(params[k], nn.Parameter) and not params[k].requires_grad)}
        _raise_if_mismatch("adapter checkpoint", sorted(trainable - state.keys()), sorted(foreign))
        with torch.no_grad():
            for name, value in state.items():
                if params[name].shape != value.shape:
                    raise RuntimeError(f"size mismatch for {name}: checkpoint {tuple(value.shape)}, model {tuple(params[name].shape)}; was r different?")
                if hasattr(params[name], "device_mesh"):  # an FSDP-sharded parameter: each rank keeps its rows
                    from lightning_nf4.strategies.fsdp import copy_full_into

                    copy_full_into(params[name], value, name)
                else:
                    params[name].copy_(value)

    # -- export -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rng.on_fit_start(trainer)
        self._last_epoch = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._rng.on_train_batch_start(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._rng.hold_during_validation(trainer)  # what a checkpoint saved now holds, and the next batch must find
        self._last_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rng.on_train_epoch_start(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._rng.resume_after_validation(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rng.on_fit_end()
        if self.save_dir is None:
            return
        if trainer.fast_dev_run:  # Lightning's smoke test writes nothing (no checkpoints, no logs): no export either
            rank_zero_info(f"LoRACallback: fast_dev_run, so nothing is exported to {self.save_dir}.")
            return
        sharded = has_sharded_parameters(pl_module)  # then every rank gathers and rank 0 writes
        if not sharded and not trainer.is_global_zero:
            return
        written = self.save_export(
            pl_module, self.save_dir, tokenizer=_tokenizer(trainer, pl_module), write=trainer.is_global_zero,
            info={"step": trainer.global_step, "epoch": self._trained_epoch(trainer), "source": "fit"},
        )
        if written:
            rank_zero_info(f"LoRACallback: {' and '.join(written)} written to {self.save_dir} ({publish.MANIFEST} lists them)")
        if sharded:
            trainer.strategy.barrier()

    def _trained_epoch(self, trainer: pl.Trainer) -> int:
        """The epoch of the last training step, as a checkpoint saved then records it: at fit's end Lightning counts
        the epoch it stopped in (by ``max_steps`` too) as completed, one ahead."""
        if self._last_epoch is not None:
            return self._last_epoch
        return max(trainer.current_epoch - 1, 0)

    def save_export(
        self, pl_module: nn.Module, out_dir: Union[str, Path], *, tokenizer: Any = None, merged: Optional[bool] = None,
        info: Optional[dict[str, Any]] = None, write: bool = True,
    ) -> Optional[dict[str, Path]]:
        """``adapter/`` and ``merged/`` (by default when ``export_merged``) in ``out_dir`` as one set, with
        ``export.json`` written last; ``merged/`` gets the tokenizer when one is given."""
        return export.save_export(
            pl_module, out_dir, r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, adapter_name=self.adapter_name,
            modules_to_save=self._saved_modules or None, merged=self.export_merged if merged is None else merged,
            dtype=self.merged_dtype, tokenizer=tokenizer, info=info, write=write,
        )

    def save_adapter(self, pl_module: nn.Module, path: Union[str, Path]) -> Path:
        """PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        return export.save_adapter(
            pl_module, path, r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            adapter_name=self.adapter_name, modules_to_save=self._saved_modules or None,
        )

    def save_merged(self, pl_module: nn.Module, path: Union[str, Path]) -> Path:
        """Dequantized, merged float model (HF folder for transformers models, safetensors otherwise)."""
        return export.save_merged(pl_module, path, self.merged_dtype)


def _tokenizer(trainer: pl.Trainer, pl_module: nn.Module) -> Any:
    """The tokenizer that belongs in ``merged/`` (the module's, else the datamodule's), if there is one."""
    for owner in (pl_module, getattr(trainer, "datamodule", None)):
        tokenizer = getattr(owner, "tokenizer", None)
        if callable(getattr(tokenizer, "save_pretrained", None)):
            return tokenizer
    return None


def _after_conversion(precision: Any, hook: Any) -> None:
    """Run ``hook(module)`` once, right after the next ``precision.convert_module``, for any precision plugin.
    Lightning calls ``convert_module`` after ``configure_model`` and before ``configure_optimizers`` and the DDP
    wrap on every strategy: the one moment a model built in ``configure_model`` exists and its trainable
    parameters are not yet fixed. NF4Precision has a hook list for it; other plugins get a one-shot wrapper."""
    if isinstance(precision, NF4Precision):
        precision.add_post_convert_hook(hook)
        return
    vars(precision).pop("convert_module", None)  # a wrapper left by a fit that stopped before converting
    convert = precision.convert_module

    def convert_then_hook(module: nn.Module) -> nn.Module:
        del precision.convert_module  # back to the plugin's own method
        # A plugin that casts the whole model ("bf16-true") rounds the trained weights too: a checkpoint Lightning
        # restored just before, or the adapters of an earlier fit. Their values from before the cast are put back.
        injected = any(isinstance(m, LoraLayer) for m in module.modules())  # else nothing is trained yet: all is cast
        trained = {name: p.data for name, p in module.named_parameters() if injected and p.requires_grad and p.is_floating_point()}
        module = convert(module)
        for name, param in module.named_parameters():
            if name in trained and param.data is not trained[name]:
                param.data = trained[name]
        hook(module)
        return module

    precision.convert_module = convert_then_hook


def _refuse_weight_averaging(trainer: pl.Trainer) -> None:
    """Lightning's ``WeightAveraging`` (``EMAWeightAveraging``) averages every parameter: NF4 codes are bytes, and the
    float average truncated back into them changes the frozen base. It also swaps whole-model states into
    adapter-only checkpoints, and copies the model before this callback converts it. Refused before anything runs."""
    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:  # Lightning before 2.6 has none
        return
    averaging = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, WeightAveraging)]
    if averaging:
        raise ValueError(
            f"{averaging[0]} averages every parameter of the model, the frozen NF4 codes included (bytes: the average "
            "changes them), and puts the whole averaged model into the adapter-only checkpoints; it does not work with "
            "LoRACallback. Remove it from the callbacks (an average of the adapters alone is not built in)."
        )


def _wrapped_to_save(module: nn.Module) -> list[str]:
    """The modules PEFT's own ``modules_to_save`` wrapped (by their names under the exported model): trained in full,
    so the adapter must hold them."""
    prefix = export.root_prefix(module)
    return [n.removeprefix(prefix) for n, m in module.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def _accumulated_unapplied(trainer: pl.Trainer) -> int:
    """How many batches' gradients a checkpoint saved now leaves out: those accumulated since the last optimizer step,
    when it is saved inside an accumulation window (by a validation there); 0 at a step."""
    if trainer.accumulate_grad_batches == 1 or trainer.state.fn != "fit":
        return 0
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return 0 if progress.is_last_batch else progress.current.ready % trainer.accumulate_grad_batches


def check_scaling(meta: dict[str, Any], r: int, alpha: float, holder: str, fix: str) -> None:
    """The checkpoint's recorded ``r`` and ``alpha`` against those of the adapters about to take its weights: the
    scaling is alpha / r, so another pair is another model of the same shapes. ``fix`` may name the recorded
    ``{r}`` and ``{alpha}``."""
    if "alpha" in meta and (meta["r"], meta["alpha"]) != (r, alpha):
        raise ValueError(
            f"The checkpoint's adapters were trained with r={meta['r']}, alpha={meta['alpha']}, but {holder} has r={r}, "
            f"alpha={alpha}; {fix.format(r=meta['r'], alpha=meta['alpha'])}."
        )


def _trained_keys(module: nn.Module) -> set[str]:
    """What an adapter-only checkpoint holds: the trained parameters and every persistent buffer."""
    return {n for n, p in module.named_parameters() if p.requires_grad} | set(persistent_buffers(module))


def _raise_if_mismatch(what: str, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise RuntimeError(
            f"The {what} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}. Use the same "
            "LoRACallback settings (r, target_modules, modules_to_save, use_dora, full_checkpoint) as the run that wrote it."
        )


def _warn_shared(module: nn.Module, targets: list[str]) -> None:
    """PEFT wraps a layer that several parents share under its first name only: the other uses call the bare base
    layer (so does PEFT on the float model, which keeps the exports faithful); said, since it is rarely what is meant."""
    names: dict[int, list[str]] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        names.setdefault(id(sub), []).append(name)
    shared = [names[id(module.get_submodule(t))] for t in targets if len(names[id(module.get_submodule(t))]) > 1]
    if shared:
        rank_zero_warn(
            f"LoRACallback: {shared[0][0]!r} is the same layer as {shared[0][1:]}; as in PEFT, LoRA applies where it is "
            f"called as {shared[0][0]!r} only, and the other names call the base layer alone."
        )


def _warn_running_stats(module: nn.Module, modules_to_save: Sequence[str]) -> None:
    """Frozen norms with running statistics still update them in training mode: checkpoints keep them (every
    persistent buffer), but a PEFT adapter holds only what it trains, so the exported adapter would not reproduce
    the trained model."""
    norms = [n for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
             and ".lora_" not in n and not within(n, modules_to_save)]
    if norms:
        rank_zero_warn(
            f"LoRACallback: {norms[:4]} keep running statistics, which training updates though their weights are frozen; "
            "the PEFT adapter export does not hold them. Add them to modules_to_save to export them, or keep them in eval mode."
        )


def _is_number(value: object, integral: bool = False) -> bool:
    return isinstance(value, numbers.Integral if integral else numbers.Real) and not isinstance(value, bool)


def _is_names(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(v, str) and v for v in value)


def _check_patterns(argument: str, patterns: Sequence[str]) -> None:
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"{argument}: {pattern!r} is not a valid regular expression ({err}).") from err


def _count(module: nn.Module) -> tuple[int, int]:
    """Trainable and total parameters, each tensor once (a tied embedding / lm_head is one tensor); an NF4 weight
    counts as the float weight it stands for."""
    trainable = total = 0
    seen: set[int] = set()
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = sub.in_features * sub.out_features if (isinstance(sub, NF4Linear) and name == "weight") else p.numel()
            total += n
            trainable += n if p.requires_grad else 0
    return trainable, total


_OTHER_LORA_KINDS = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)  # PEFT wraps these; this callback does not


def _is_linear(module: nn.Module) -> bool:
    """A layer LoRA can target: ``nn.Linear``, ``NF4Linear`` or transformers' ``Conv1D`` (GPT-2)."""
    return isinstance(module, (nn.Linear, NF4Linear)) or is_conv1d(module)


_PEFT_PARTS = ("base_layer", "lora_dropout", "lora_A", "lora_B", "lora_magnitude_vector")


def _check_peft_part_suffix(pattern: str, adapter_name: str) -> None:
    """PEFT selects ``modules_to_save`` by a plain string suffix of every module name when it loads an adapter,
    its own LoRA parts included: ``"out"`` also selects each ``lora_dropout``, which PEFT cannot wrap (a TypeError
    from ``PeftModel.from_pretrained``, and from ``get_peft_model`` with the same config). Refused before training."""
    if pattern.startswith("re:") or any(c in pattern for c in "*?["):
        return
    parts = [*_PEFT_PARTS, *(f"{part}.{adapter_name}" for part in _PEFT_PARTS[1:])]
    clashes = [part for part in parts if part.endswith(pattern)]
    if clashes:
        raise ValueError(
            f"modules_to_save entry {pattern!r} is also a suffix of PEFT's own LoRA module names {clashes[:3]}; PEFT "
            f"matches modules_to_save by suffix and could not load the adapter. Give a longer name, with its parent "
            f"(e.g. 'net.{pattern}')."
        )


def _warn_peft_suffix_match(pattern: str, trained: list[str], names: list[str]) -> None:
    """PEFT picks ``modules_to_save`` by a plain string suffix when it loads an adapter: ``"head"`` also selects
    ``lm_head``, which this run neither trains nor saves, and ``PeftModel.from_pretrained`` then fails. Said at
    injection, before any training, so the run can be set up again."""
    if pattern.startswith("re:") or any(c in pattern for c in "*?["):
        return
    others = [n for n in names if n.endswith(pattern) and n not in trained and not any(n.startswith(t + ".") for t in trained)]
    if others:
        rank_zero_warn(
            f"modules_to_save entry {pattern!r} also names {others[:4]} under PEFT's suffix matching, which this run does "
            f"not train: PeftModel.from_pretrained will fail to load the adapter written at the end (a missing key). "
            f"Train those too (add them to modules_to_save), or pick modules whose names end differently."
        )
