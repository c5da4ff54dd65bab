"""A model built on ``meta`` that remembers its checkpoint, filled one part at a time on the device.

``AutoModelForCausalLM.from_pretrained(..., device="meta")`` returns such a model: no weight read, no memory
used. Whoever gives its modules storage (``NF4FSDPStrategy`` does it one sharding unit at a time, then shards
that unit before the next) reads their tensors from the checkpoint with ``DeferredCheckpoint.load_module``,
quantizing each linear weight on the device as it arrives. So no rank ever holds more than one unit whole,
and the host holds one checkpoint tensor at a time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_nf4.format.bnb_state import QUANT_STATE_KEY
from lightning_nf4.layers.linear import NF4Linear
from lightning_nf4.loading.checkpoint import CheckpointError, CheckpointIndex

_ATTRIBUTE = "_lightning_nf4_checkpoint"
_NF4_KEY = re.compile(r"^(?P<layer>.+)\.weight(?:\.(?P<suffix>.+))?$")
# Wrappers PEFT puts around a module: their tensors come from the wrapped module's checkpoint keys.
_WRAPPER_PARTS = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.[^.]+)(?=\.|$)")


@dataclass
class DeferredCheckpoint:
    """The checkpoint behind a meta-built model: for each model key, the checkpoint key(s) holding it."""

    index: CheckpointIndex
    dtype: torch.dtype
    tensors: dict[str, str] = field(default_factory=dict)  # parameter/buffer name -> checkpoint key
    layers: dict[str, dict[str, str]] = field(default_factory=dict)  # NF4 layer -> {suffix: checkpoint key}
    tied: dict[str, str] = field(default_factory=dict)  # a tied parameter's name -> the name it shares a tensor with

    def load_module(self, root: nn.Module, module: nn.Module, name: Optional[str] = None) -> None:
        """Fill ``module``'s own parameters and buffers (not its children's) from the checkpoint, on the
        device their storage is already on. ``root`` is the model the checkpoint belongs to."""
        name = _module_name(root, module) if name is None else name
        key = _WRAPPER_PARTS.sub("", name)
        if isinstance(module, NF4Linear):
            if key not in self.layers:
                raise CheckpointError(f"the checkpoint has no weight for the quantized layer {key!r}.")
            parts = {suffix: self.index.read(raw) for suffix, raw in self.layers[key].items()}
            device = module.weight.device
            if len(parts) == 1 and parts[""].is_floating_point():
                parts = {"": parts[""].to(device=device, dtype=self.dtype)}  # quantized on the device
            else:
                parts = {k: v.to(device) for k, v in parts.items()}
            module._load_weight(parts, f"{key}.weight")
            if module.bias is not None:
                self._copy(module.bias, f"{key}.bias")
            return
        prefix = f"{key}." if key else ""
        for attr, param in module._parameters.items():
            if param is not None:
                self._copy(param, prefix + attr)
        for attr, buf in module._buffers.items():
            if buf is not None and prefix + attr in self.tensors:  # non-persistent buffers (rotary tables) stay as built
                self._copy(buf, prefix + attr)

    def _copy(self, target: Tensor, key: str) -> None:
        raw = self.tensors.get(key) or self.tensors.get(self.tied.get(key, ""))
        if raw is None:
            raise CheckpointError(f"the checkpoint has no tensor for {key!r}; it belongs to another model or config.")
        value = self.index.read(raw)
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"size mismatch for {key}: checkpoint has {tuple(value.shape)}, the model built from its config has {tuple(target.shape)}.")
        with torch.no_grad():
            target.copy_(value)


def attach(model: nn.Module, index: CheckpointIndex, dtype: torch.dtype) -> DeferredCheckpoint:
    """Map ``model``'s keys (built on meta, linears already ``NF4Linear``) to ``index``'s, check that every
    weight is there now rather than mid-training, and remember the map on the model."""
    layers = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    known = (params - {f"{n}.weight" for n in layers}) | buffers
    deferred = DeferredCheckpoint(index, dtype)
    for raw in index.names():
        key = _model_key(raw, known, layers)
        match = _NF4_KEY.match(key)
        if match and match["layer"] in layers:
            deferred.layers.setdefault(match["layer"], {})[match["suffix"] or ""] = raw
        elif key in known:
            deferred.tensors[key] = raw
    tied = deferred.tied = _tied_names(model)
    nf4_weights = {f"{n}.weight" for n in layers}
    missing = sorted(n for n in params if n not in deferred.tensors and n not in tied and n not in nf4_weights)
    missing += sorted(n for n in layers if not _complete(index, deferred.layers.get(n, {})))
    if missing:
        raise CheckpointError(
            f"The checkpoint in {index.files[0].parent} lacks tensors: {missing[:8]}{'...' if len(missing) > 8 else ''}. "
            "It is incomplete or belongs to another model/config."
        )
    setattr(model, _ATTRIBUTE, deferred)
    return deferred


def deferred_checkpoint(model: Optional[nn.Module]) -> Optional[DeferredCheckpoint]:
    """The checkpoint a meta-built model is to be filled from, or None."""
    return getattr(model, _ATTRIBUTE, None) if model is not None else None


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Give a model from ``from_pretrained(..., device="meta")`` its weights on ``device``, all at once: for a
    single device. ``NF4FSDPStrategy`` does the same one sharding unit at a time."""
    deferred = deferred_checkpoint(model)
    if deferred is None:
        raise ValueError("materialize() needs a model from lightning_nf4's from_pretrained(..., device='meta').")
    device = torch.device(device)
    names = {id(m): n for n, m in model.named_modules()}
    moved: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for attr, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in moved:
                    moved[id(param)] = nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                module._parameters[attr] = moved[id(param)]
        if isinstance(module, NF4Linear):
            module._apply(lambda t: t, recurse=False)
    for module in model.modules():
        deferred.load_module(model, module, names[id(module)])
    delattr(model, _ATTRIBUTE)
    return model.to(device)


def _module_name(root: nn.Module, module: nn.Module) -> str:
    for name, sub in root.named_modules():
        if sub is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}.")


def _model_key(raw: str, known: set[str], layers: set[str]) -> str:
    """Checkpoints of the bare model (``layers.0...``) load into ``*ForCausalLM`` (``model.layers.0...``)."""
    def fits(candidate: str) -> bool:
        match = _NF4_KEY.match(candidate)
        return candidate in known or bool(match and match["layer"] in layers)

    return next((c for c in (raw, f"model.{raw}", raw.removeprefix("model.")) if fits(c)), raw)


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Parameters that share their tensor with an earlier name (an ``lm_head`` tied to the embeddings): the
    checkpoint may hold only the first."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def _complete(index: CheckpointIndex, parts: dict[str, str]) -> bool:
    if "" not in parts:
        return False
    state = next((raw for suffix, raw in parts.items() if suffix.startswith("quant_state.")), None)
    if state is None:
        return len(parts) == 1 or QUANT_STATE_KEY not in parts
    try:
        meta = json.loads(bytes(index.read(state).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return True  # the format layer reports the corruption, with the layer's name, when the layer loads
    needed = {"absmax", "quant_map"} | ({"nested_absmax", "nested_quant_map"} if "nested_offset" in meta else set())
    return needed <= parts.keys()
