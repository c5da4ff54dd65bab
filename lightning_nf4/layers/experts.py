"""Stacked MoE expert weights in NF4: an experts module keeps its class and forward, its weights become ``NF4Tensor``.

transformers 5 stores a layer's experts as one ``[experts, out, in]`` parameter per projection and indexes or
grouped-matmuls it in its own forward (eager, ``batched_mm`` or ``grouped_mm``); ``NF4Tensor`` answers those ops.
What this module adds is the state dict: the weights save and load under bitsandbytes' keys (plain tensors, as
``NF4Linear`` does), so checkpoints stay loadable with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lightning_nf4.format import NF4FormatError, from_bnb_tensors, is_bnb_quantized, quantize_nf4, to_bnb_tensors
from lightning_nf4.format.bnb_state import QUANT_STATE_PREFIX
from lightning_nf4.format.quantized import NF4Weight
from lightning_nf4.format.tensor import NF4Tensor

BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # beside the codes and the quant state
_HOOKED = "_nf4_expert_state_hooks"


def quantize_expert_weight(
    module: nn.Module, attr: str, *, blocksize: int, double_quant: bool, compute_dtype: torch.dtype,
    device: Optional[torch.device] = None, name: str = "",
) -> None:
    """Replace ``module.<attr>`` (a float ``[experts, out, in]`` weight) by a frozen ``NF4Tensor`` parameter, quantized
    on ``device`` (default: where it is) exactly as bitsandbytes quantizes the whole tensor."""
    weight = getattr(module, attr)
    label = f"{name}.{attr}" if name else attr
    if weight.device.type == "meta":
        raise NF4FormatError(f"{label} is on the meta device; load the model's weights before quantizing its experts.")
    source = weight.detach().to(device) if device is not None else weight.detach()
    set_expert_weight(module, attr, quantize_nf4(source, blocksize, double_quant, name=label), compute_dtype)


def expert_placeholder(
    module: nn.Module, attr: str, *, blocksize: int, double_quant: bool, compute_dtype: torch.dtype,
) -> None:
    """Replace ``module.<attr>``, a float weight on ``meta``, by an ``NF4Tensor`` of its shape on ``meta``: what a loader
    fills later from a checkpoint (``loading.experts``), as it fills an ``NF4Linear`` built on ``meta``."""
    weight = getattr(module, attr)
    set_expert_weight(module, attr, quantize_nf4(torch.empty_like(weight, device="meta"), blocksize, double_quant), compute_dtype)


def set_expert_weight(module: nn.Module, attr: str, quant: NF4Weight, compute_dtype: torch.dtype) -> None:
    """``module.<attr>`` becomes the frozen NF4 weight ``quant``, saved and loaded under bitsandbytes' keys."""
    setattr(module, attr, nn.Parameter(NF4Tensor(quant, dtype=compute_dtype), requires_grad=False))
    _hook_state_dict(module)


def nf4_attrs(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters(recurse=False) if isinstance(p, NF4Tensor)]


def dequantize_experts(module: nn.Module, dtype: Optional[torch.dtype] = None) -> int:
    """Every NF4 expert weight of ``module`` (not its children) back to a float parameter, in ``dtype`` or the dtype
    it was quantized from; returns how many."""
    attrs = nf4_attrs(module)
    for attr in attrs:
        weight = getattr(module, attr)
        setattr(module, attr, nn.Parameter(weight.quant.dequantize(dtype).contiguous()))
    return len(attrs)


def _hook_state_dict(module: nn.Module) -> None:
    if getattr(module, _HOOKED, False):
        return
    module.register_state_dict_post_hook(_save_bnb_keys)
    module.register_load_state_dict_pre_hook(_load_bnb_keys)
    setattr(module, _HOOKED, True)


def _save_bnb_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for attr in nf4_attrs(module):
        key = prefix + attr
        if key not in state_dict:
            continue
        del state_dict[key]
        for suffix, tensor in to_bnb_tensors(getattr(module, attr).quant).items():
            state_dict[key + (f".{suffix}" if suffix else "")] = tensor.detach()


def _load_bnb_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
                   missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Read a weight saved under bitsandbytes' keys, as a float tensor, or as an ``NF4Tensor``, into this module's
    NF4 parameter in place (whatever holds the parameter keeps it); the bitsandbytes keys are taken out of
    ``state_dict`` so that nothing reports them unexpected."""
    for attr in nf4_attrs(module):
        key = prefix + attr
        if key not in state_dict:
            continue
        parts = {k[len(key) + 1:]: state_dict.pop(k) for k in list(state_dict) if k.startswith(key + ".") and _is_bnb_suffix(k[len(key) + 1:])}
        parts[""] = state_dict[key]
        param = getattr(module, attr)
        try:
            quant = _read(parts, key, param)
        except NF4FormatError as err:
            error_msgs.append(str(err))
        else:
            param.data = NF4Tensor(quant.to(param.device), dtype=param.dtype)
        state_dict[key] = param  # nn.Module's own load then copies the parameter onto itself


def _is_bnb_suffix(suffix: str) -> bool:
    return suffix in BNB_SUFFIXES or suffix.startswith(QUANT_STATE_PREFIX)


def _read(parts: dict[str, torch.Tensor], key: str, param: NF4Tensor) -> NF4Weight:
    value = parts[""]
    if isinstance(value, NF4Tensor):
        quant = value.quant
    elif is_bnb_quantized(parts):
        quant = from_bnb_tensors(parts, key)
    elif value.is_floating_point() and len(parts) == 1:
        quant = quantize_nf4(value.detach().to(param.device), param.quant.blocksize, param.quant.double_quant, name=key)
    else:
        raise NF4FormatError(
            f"{key} has dtype {value.dtype} but no '{key}.quant_state.bitsandbytes__nf4'; a packed NF4 weight needs its "
            "quant state (absmax, quant_map, ...) saved alongside."
        )
    if tuple(quant.shape) != tuple(param.shape):
        raise NF4FormatError(f"size mismatch for {key}: checkpoint has shape {tuple(quant.shape)}, this model has {tuple(param.shape)}.")
    return quant
