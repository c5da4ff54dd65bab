"""A model built on ``meta`` that remembers its checkpoint, filled one part at a time on the device.

``AutoModelForCausalLM.from_pretrained(..., device="meta")`` returns such a model: no weight read, no memory
used. Whoever gives its modules storage (``NF4FSDPStrategy`` does it one sharding unit at a time, then shards
that unit before the next) reads their tensors from the checkpoint with ``DeferredCheckpoint.load_module``,
quantizing each linear weight on the device as it arrives. So no rank ever holds more than one unit whole,
and the host holds one checkpoint tensor at a time.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_nf4.format.bnb_state import QUANT_STATE_KEY, required_parts
from lightning_nf4.format.tensor import NF4Tensor
from lightning_nf4.layers.group import persistent_buffers
from lightning_nf4.layers.linear import NF4Linear
from lightning_nf4.loading.checkpoint import CheckpointError, CheckpointIndex
from lightning_nf4.loading.experts import ExpertSources, Piece, check_expert, read_stacked, set_filled, stacked_for, stacked_part
from lightning_nf4.loading.keys import NF4_KEY, KeyMap, load_layer

_ATTRIBUTE = "_lightning_nf4_checkpoint"
# Wrappers PEFT puts around a module: their tensors come from the wrapped module's checkpoint keys.
_WRAPPER_PARTS = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.[^.]+)(?=\.|$)")


@dataclass
class DeferredCheckpoint:
    """The checkpoint behind a meta-built model: for each model key, the checkpoint key(s) holding it."""

    index: CheckpointIndex
    dtype: torch.dtype
    tensors: dict[str, str] = field(default_factory=dict)  # parameter/buffer name -> checkpoint key
    layers: dict[str, dict[str, str]] = field(default_factory=dict)  # NF4 layer -> {suffix: checkpoint key}
    tied: dict[str, list[str]] = field(default_factory=dict)  # a tied parameter's name -> the others sharing its tensor
    pieces: dict[str, dict[Piece, str]] = field(default_factory=dict)  # stacked expert weight -> its per-expert keys
    stacked: dict[str, dict[str, str]] = field(default_factory=dict)  # stacked NF4 expert weight held whole -> {suffix: key}

    def load_module(self, root: nn.Module, module: nn.Module, name: Optional[str] = None) -> None:
        """Fill ``module``'s own parameters and buffers (not its children's) from the checkpoint, on the
        device their storage is already on. ``root`` is the model the checkpoint belongs to."""
        name = _module_name(root, module) if name is None else name
        key = _WRAPPER_PARTS.sub("", name)
        if isinstance(module, NF4Linear):
            if key not in self.layers:
                raise CheckpointError(f"the checkpoint has no weight for the quantized layer {key!r}.")
            parts = {suffix: self.index.read(raw) for suffix, raw in self.layers[key].items()}
            load_layer(module, parts, key, module.weight.device, self.dtype)  # quantized on the device
            if module.bias is not None:
                self._copy(module.bias, f"{key}.bias")
            return
        prefix = f"{key}." if key else ""
        for attr, param in list(module._parameters.items()):
            if param is None:
                continue
            if prefix + attr in self.pieces:  # a stacked expert weight, from one checkpoint tensor per expert
                set_filled(module, attr, self._stacked(prefix + attr, param))
            elif isinstance(param, NF4Tensor):  # a stacked expert weight held whole by the checkpoint (float, or NF4 parts)
                if prefix + attr not in self.stacked:
                    raise CheckpointError(f"the checkpoint has no tensor for {prefix + attr!r}; it belongs to another model or config.")
                parts = {suffix: self.index.read(raw) for suffix, raw in self.stacked[prefix + attr].items()}
                set_filled(module, attr, read_stacked(parts, prefix + attr, param, param.device, self.dtype))
            else:
                self._copy(param, prefix + attr)
        for attr, buf in module._buffers.items():
            if buf is not None and prefix + attr in self.tensors:  # non-persistent buffers (rotary tables) stay as built
                self._copy(buf, prefix + attr)

    def _stacked(self, name: str, param: Tensor) -> Tensor:
        pieces = self.pieces[name]
        stack = stacked_for(next(iter(pieces)), param, param.device, self.dtype)
        for piece, raw in pieces.items():
            stack.add(piece, self.index.read(raw), raw)  # one expert's matrix on the host at a time
        return stack.result()

    def _copy(self, target: Tensor, key: str) -> None:
        raw = next((self.tensors[k] for k in (key, *self.tied.get(key, ())) if k in self.tensors), None)
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
    nf4_experts = {n for n, p in model.named_parameters() if isinstance(p, NF4Tensor) and n.rpartition(".")[0] not in layers}
    buffers = set(persistent_buffers(model))
    known = (params - {f"{n}.weight" for n in layers} - nf4_experts) | buffers
    deferred = DeferredCheckpoint(index, dtype)
    model_key = KeyMap(model, known | nf4_experts, layers)
    experts = ExpertSources(model, model_key.converters, params)
    for raw in index.names():
        key = model_key(raw)
        match = NF4_KEY.match(key)
        if match and match["layer"] in layers:
            deferred.layers.setdefault(match["layer"], {})[match["suffix"] or ""] = raw
        elif key in known:
            deferred.tensors[key] = raw
        elif (whole := stacked_part(key, nf4_experts)) is not None:
            deferred.stacked.setdefault(whole[0], {})[whole[1]] = raw
        elif (piece := experts.piece(key)) is not None:
            check_expert(piece, model.get_parameter(piece.target).shape, raw)
            deferred.pieces.setdefault(piece.target, {})[piece] = raw
    _untie_differing(model, deferred)
    tied = deferred.tied = _tied_names(model)
    nf4_weights = {f"{n}.weight" for n in layers}
    present = set(deferred.tensors) | {n for n, pieces in deferred.pieces.items() if _all_experts(pieces, model.get_parameter(n))}
    present |= {n for n, parts in deferred.stacked.items() if _complete(index, parts)}
    missing = sorted(n for n in params if n not in nf4_weights and not present.intersection((n, *tied.get(n, ()))))
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


def forget_checkpoint(model: nn.Module) -> None:
    """``model`` was filled: it no longer reads from its checkpoint."""
    vars(model).pop(_ATTRIBUTE, None)


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Give a model from ``from_pretrained(..., device="meta")`` its weights on ``device``, all at once: for a
    single device. ``NF4FSDPStrategy`` does the same one sharding unit at a time."""
    deferred = deferred_checkpoint(model)
    if deferred is None:
        raise ValueError("materialize() needs a model from lightning_nf4's from_pretrained(..., device='meta').")
    names = {id(m): n for n, m in model.named_modules()}
    allocate(list(model.modules()), torch.device(device))
    for module in model.modules():
        deferred.load_module(model, module, names[id(module)])
    forget_checkpoint(model)
    return model


def allocate(modules: Iterable[nn.Module], device: torch.device) -> None:
    """Storage on ``device`` for the modules' own parameters and buffers: empty for those on ``meta``, moved
    for the rest. Tied parameters stay one parameter; an ``NF4Linear``'s scales follow its packed weight."""
    moved: dict[int, nn.Parameter] = {}
    for module in modules:
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in moved and isinstance(param, NF4Tensor) and param.is_meta:  # a stacked expert placeholder
                moved[id(param)] = nn.Parameter(NF4Tensor(param.quant.to_empty(device), dtype=param.dtype), requires_grad=False)
            elif id(param) not in moved:
                value = torch.empty_like(param, device=device) if param.is_meta else param.to(device)
                moved[id(param)] = param if value is param else nn.Parameter(value, requires_grad=param.requires_grad)
            module._parameters[key] = moved[id(param)]
        for key, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[key] = torch.empty_like(buf, device=device) if buf.is_meta else buf.to(device)
        if isinstance(module, NF4Linear):
            module._apply(lambda t: t, recurse=False)


def _module_name(root: nn.Module, module: nn.Module) -> str:
    for name, sub in root.named_modules():
        if sub is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}.")


def _tied_names(model: nn.Module) -> dict[str, list[str]]:
    """For each parameter shared under several names (an ``lm_head`` tied to the embeddings), the other names:
    the checkpoint may hold the tensor under any one of them."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {n: [o for o in group if o != n] for group in names.values() if len(group) > 1 for n in group}


def _untie_differing(model: nn.Module, deferred: DeferredCheckpoint) -> None:
    """A pair the config ties whose checkpoint holds both names with different values stays untied, as transformers
    loads it (with its warning): the later name gets a parameter of its own, still on ``meta``."""
    first_names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = first_names.setdefault(id(param), name)
        if first == name or first not in deferred.tensors or name not in deferred.tensors:
            continue
        if deferred.index.same_values(deferred.tensors[first], deferred.tensors[name]):
            continue
        warnings.warn(
            f"The config ties {name} to {first}, but the checkpoint holds both with different values: they are loaded "
            "untied, as transformers does. Set tie_word_embeddings=False in the config to silence this warning.",
            stacklevel=4,
        )
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._parameters[attr] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        getattr(model, "all_tied_weights_keys", {}).pop(name, None)  # so that a later tie_weights() keeps them apart


def _all_experts(pieces: dict[Piece, str], param: Tensor) -> bool:
    """Whether ``pieces`` hold every expert's matrix of every projection of the stacked weight ``param``."""
    first = next(iter(pieces))
    return {(p.part, p.expert) for p in pieces} == {(part, e) for part in range(first.parts) for e in range(param.shape[0])}


def _complete(index: CheckpointIndex, parts: dict[str, str]) -> bool:
    if "" not in parts:
        return False
    state = next((raw for suffix, raw in parts.items() if suffix.startswith("quant_state.")), None)
    if state is None:
        return len(parts) == 1 or QUANT_STATE_KEY not in parts
    needed = required_parts(index.read(state))
    return needed is None or needed <= parts.keys()
