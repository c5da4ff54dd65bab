"""A trained QLoRA module back from its checkpoint, without a Trainer.

``YourModule.load_from_checkpoint`` cannot do it: the NF4 layers and the adapters are built by ``NF4Precision``
and ``LoRACallback`` when a Trainer sets the model up, so the float module it builds has none of the checkpoint's
keys. ``load_from_checkpoint`` here builds the module as Lightning does (hyperparameters, ``configure_model``), then
converts and injects with the settings the checkpoint records, then loads the trained weights, checked.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, Optional, TypeVar, Union

import lightning.pytorch as pl
import torch

from lightning_nf4.callbacks.lora import _CKPT_KEY, LoRACallback, _raise_if_mismatch, check_scaling
from lightning_nf4.checkpoint_io import load_checkpoint
from lightning_nf4.devices import resolve_device
from lightning_nf4.plugins.precision import NF4Precision
from lightning_nf4.strategies.fsdp import read_deferred

ModuleT = TypeVar("ModuleT", bound=pl.LightningModule)


def load_from_checkpoint(
    module_class: type[ModuleT],
    checkpoint_path: Union[str, os.PathLike],
    *,
    map_location: Union[str, torch.device, None] = None,
    precision: Optional[NF4Precision] = None,
    lora: Optional[LoRACallback] = None,
    **kwargs: Any,
) -> ModuleT:
    """``module_class`` as trained: built from the checkpoint's hyperparameters (``kwargs`` override them, as in
    ``LightningModule.load_from_checkpoint``), its linears quantized and its adapters injected as the run that wrote
    the checkpoint did, and the trained weights loaded (adapter-only or full checkpoints alike); on ``map_location``
    (default: the CPU), in training mode as Lightning returns modules. The checkpoint is read weights-only and its
    records checked. ``precision`` and ``lora`` replace the recorded settings; checkpoints that record none (written
    by an older lightning-nf4) need ``lora`` (and ``precision`` if the run quantized)."""
    if lora is not None and not isinstance(lora, LoRACallback):
        raise TypeError(f"lora= takes a LoRACallback (lora=LoRACallback(r=..., alpha=..., target_modules=...)), got {type(lora).__name__}.")
    if precision is not None and not isinstance(precision, NF4Precision):
        raise TypeError(f"precision= takes an NF4Precision (precision=NF4Precision(...)), got {type(precision).__name__}.")
    checkpoint = load_checkpoint(checkpoint_path)
    meta = checkpoint.get(_CKPT_KEY)
    if meta is None:
        state = checkpoint.get("state_dict", {})
        if not any(".lora_" in key for key in state):
            raise ValueError(
                f"{str(checkpoint_path)!r} was not written with LoRACallback (it has no {_CKPT_KEY!r} record): load it with "
                f"{module_class.__name__}.load_from_checkpoint."
            )
        if lora is None:  # Lightning runs no callback hook for save_weights_only checkpoints: no record
            raise ValueError(
                f"{str(checkpoint_path)!r} holds LoRA weights but no LoRACallback record (a save_weights_only checkpoint: "
                "Lightning runs no callback hooks for those). Pass lora=LoRACallback(r=..., alpha=..., target_modules=...) "
                "and precision=NF4Precision(...) as in the run that wrote it (its alpha is not recorded)."
            )
        # the whole module's weights (one process, DDP), or the trained ones only (nf4_fsdp, whose checkpoints never
        # hold the base), loaded as the checkpoints of each kind are
        meta = {"adapter_only": not any(".base_layer." in key for key in state)}
    settings = meta.get("settings")
    if lora is None:
        if settings is None:
            raise ValueError(
                f"{str(checkpoint_path)!r} records no LoRACallback settings (written by an older lightning-nf4): pass "
                f"lora=LoRACallback(r={meta.get('r', '...')}, alpha={meta.get('alpha', '...')}, target_modules=...) and "
                "precision=NF4Precision(...) as in the run that wrote it."
            )
        lora = LoRACallback(r=meta["r"], alpha=meta["alpha"], **settings["lora"])
    else:
        check_scaling(meta, lora.r, lora.alpha, "lora", "pass LoRACallback(r={r}, alpha={alpha}) or leave lora out")
    if precision is None and settings is not None and settings["precision"] is not None:
        precision = NF4Precision(**settings["precision"])

    device = _device(map_location)
    module = _instantiate(module_class, checkpoint, kwargs)
    read_deferred(module, device)  # a model loaded with device="meta" (for nf4_fsdp) is read whole, as under DDP
    module.to(device)  # quantized where it will run
    if precision is not None:
        precision.convert_module(module)
    lora.inject(module)
    state = checkpoint["state_dict"]
    if meta.get("adapter_only"):
        lora._apply_state(module, state)
    else:
        result = module.load_state_dict(state, strict=False)
        _raise_if_mismatch("full checkpoint", result.missing_keys, result.unexpected_keys)
    return module.to(device)


def _device(map_location: Any) -> torch.device:
    """The one device the module is built on. Lightning's dict and callable forms remap each saved tensor's own
    location; the module here is quantized in place on one device, so they are refused with the fix."""
    if map_location is None:
        return torch.device("cpu")
    if isinstance(map_location, (str, torch.device, int)):
        return resolve_device(map_location)
    raise TypeError(
        f"map_location={map_location!r}: lightning_nf4.load_from_checkpoint builds the module on one device; pass that "
        "device (map_location='cuda:0', 'cpu', ...), not a dict or a function of each tensor's saved location."
    )


def _instantiate(module_class: type[ModuleT], checkpoint: dict[str, Any], kwargs: dict[str, Any]) -> ModuleT:
    """The module as ``load_from_checkpoint`` builds it, before any weight: the hyperparameters (filtered to the
    constructor's arguments), ``configure_model``, then ``on_load_checkpoint`` with the checkpoint, whose edits to
    its state dict count. A LightningCLI checkpoint names an instantiator: Lightning's own builder (its allow-list),
    given no state, builds that one."""
    hparams = {**checkpoint.get(module_class.CHECKPOINT_HYPER_PARAMS_KEY, {}), **kwargs}
    if "_instantiator" in hparams:
        from lightning.pytorch.core.saving import _load_state

        stateless = {**checkpoint, module_class.CHECKPOINT_HYPER_PARAMS_KEY: hparams, "state_dict": {}}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
            return _load_state(module_class, stateless, strict=False)  # type: ignore[return-value]
    from lightning.pytorch.utilities.model_helpers import is_overridden

    init = inspect.signature(module_class.__init__).parameters
    named = checkpoint.get(module_class.CHECKPOINT_HYPER_PARAMS_NAME)  # save_hyperparameters of one argument (a config)
    if named and named in init:
        hparams = {named: hparams}
    elif not any(p.kind is p.VAR_KEYWORD for p in init.values()):
        hparams = {k: v for k, v in hparams.items() if k in init}
    module = module_class(**hparams)
    if is_overridden("configure_model", module):
        module.configure_model()
    module.on_load_checkpoint(checkpoint)
    return module
