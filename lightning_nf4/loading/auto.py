"""``AutoModelForCausalLM.from_pretrained``: transformers' call, loading straight into NF4.

The model skeleton is built with its parameters on the ``meta`` device (no memory), its linears are
swapped for ``NF4Linear`` placeholders, and the checkpoint is then read one tensor at a time: each
linear weight is moved to the target device, quantized there and dropped. Peak host memory stays near
the NF4 model plus one float tensor. Pre-quantized bitsandbytes checkpoints load as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lightning_nf4.format.bnb_state import QUANT_STATE_KEY, required_parts
from lightning_nf4.layers.linear import NF4Linear
from lightning_nf4.loading.checkpoint import CheckpointError, CheckpointIndex, checkpoint_files, count_tensors, iter_tensors
from lightning_nf4.loading.config import NF4LoadConfig, parse_quantization_config
from lightning_nf4.loading.deferred import attach
from lightning_nf4.loading.devices import resolve_device
from lightning_nf4.loading.keys import NF4_KEY, load_layer, model_key
from lightning_nf4.loading.packaged import resolve_model_path
from lightning_nf4.kernels import ops
from lightning_nf4.layers.group import group_nf4_layers
from lightning_nf4.plugins.convert import convert_linears, nf4_layers, release_freed_host_memory

class AutoModelForCausalLM:
    """Drop-in for ``transformers.AutoModelForCausalLM`` whose 4-bit path needs no bitsandbytes."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, Path],
        *,
        quantization_config: Any = None,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        gguf_file: Optional[str] = None,
        progress: bool = True,
        **config_kwargs: Any,
    ) -> nn.Module:
        """Load ``pretrained_model_name_or_path`` (a local folder or ``packaged:<name>``) onto ``device``.

        ``quantization_config``: a ``transformers.BitsAndBytesConfig`` (or its dict) with
        ``load_in_4bit=True, bnb_4bit_quant_type="nf4"``; None loads in float unless the checkpoint
        itself is a bitsandbytes 4-bit one. ``dtype`` is the dtype of everything left in float
        (default: the quantization compute dtype, else bfloat16).

        ``device="meta"`` reads no weight: the model comes back on ``meta``, remembering its checkpoint, and
        ``NF4FSDPStrategy`` fills it one sharding unit at a time on each rank, keeping only that rank's
        shard (``lightning_nf4.loading.materialize(model, device)`` fills it whole, for one device).
        """
        # Lightning calls configure_model under ``torch.device(root_device)``; the loader reads into host memory and
        # places every tensor itself, so a default device set by the caller must not reach its factory calls.
        with torch.device("cpu"):
            return cls._load(pretrained_model_name_or_path, quantization_config, device, dtype, gguf_file, progress, config_kwargs)

    @classmethod
    def _load(
        cls, pretrained_model_name_or_path: Union[str, Path], quantization_config: Any, device: Union[str, torch.device, None],
        dtype: Optional[torch.dtype], gguf_file: Optional[str], progress: bool, config_kwargs: dict[str, Any],
    ) -> nn.Module:
        import transformers

        path = resolve_model_path(str(pretrained_model_name_or_path))
        target = resolve_device(device)
        if gguf_file is not None and target.type == "meta":
            raise ValueError(
                "device='meta' defers reading safetensors/.bin checkpoints; a GGUF file is dequantized whole by "
                "transformers as it loads. Load it on a device, or convert it once with save_pretrained()."
            )
        config = transformers.AutoConfig.from_pretrained(str(path), gguf_file=gguf_file, **config_kwargs)
        saved = getattr(config, "quantization_config", None)
        nf4 = parse_quantization_config(quantization_config, saved)
        dtype = dtype or (nf4.compute_dtype if nf4 else torch.bfloat16)

        if gguf_file is not None:  # transformers dequantizes GGUF on load; we quantize afterwards
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), gguf_file=gguf_file, dtype=dtype)
            if nf4 is not None:
                convert_linears(model, **nf4.convert_kwargs(), device=target)
            return _finish(model.to(target), nf4)

        with _parameters_on_meta():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        if nf4 is not None:
            convert_linears(model, **nf4.convert_kwargs())  # NF4Linear placeholders on meta
        files = checkpoint_files(path)
        if target.type == "meta":  # nothing read yet: filled part by part where it gets storage (deferred.py)
            attach(model, CheckpointIndex(files), dtype)
            if nf4 is not None:
                model.config.quantization_config = nf4.to_bnb_dict()
            return model.eval()
        _stream_into(model, files, target, dtype, progress, prequantized=nf4 is not None and nf4.prequantized)
        return _finish(model, nf4)


def _finish(model: nn.Module, nf4: Optional[NF4LoadConfig]) -> nn.Module:
    if nf4 is not None:
        model.config.quantization_config = nf4.to_bnb_dict()
        layers = nf4_layers(model)
        packed = sum(layer.memory_bytes for _, layer in layers)
        floats = sum(layer.in_features * layer.out_features * layer.quant.dtype.itemsize for _, layer in layers)
        rank_zero_info(f"lightning-nf4: {len(layers)} linear layers in NF4: {floats / 2**20:.1f} MiB in float -> {packed / 2**20:.1f} MiB.")
        if layers and ops.launches_kernels(layers[0][1].weight.device.type):
            group_nf4_layers(model)  # one dequantize launch per decoder layer
    release_freed_host_memory()
    return model.eval()


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters go to ``meta`` as they are registered; buffers (rotary tables, ...) stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _stream_into(model: nn.Module, files: list[Path], device: torch.device, dtype: torch.dtype, progress: bool, prequantized: bool) -> None:
    from tqdm.auto import tqdm

    layers = dict(nf4_layers(model))
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {n: b for n, b in model.named_buffers(remove_duplicate=False)}
    pending: dict[str, dict[str, Tensor]] = {}
    unexpected: list[str] = []
    known = set(params) | set(buffers) | {f"{n}.weight" for n in layers}

    bar = tqdm(total=count_tensors(files), desc="Loading (NF4)" if layers else "Loading", unit="tensor", disable=not progress)
    for raw_key, tensor in iter_tensors(files):
        bar.update(1)
        key = model_key(raw_key, known, layers)
        match = NF4_KEY.match(key)
        if match and match["layer"] in layers:
            parts = pending.setdefault(match["layer"], {})
            parts[match["suffix"] or ""] = tensor
            if _complete(parts):
                load_layer(layers[match["layer"]], pending.pop(match["layer"]), match["layer"], device, dtype)
        elif key in params:
            _assign(model, key, tensor, device, dtype, parameter=True, expected=params[key].shape)
        elif key in buffers:
            _assign(model, key, tensor, device, dtype, parameter=False, expected=buffers[key].shape)
        else:
            unexpected.append(raw_key)
    bar.close()

    if hasattr(model, "tie_weights"):
        model.tie_weights()
    incomplete = {name: sorted(parts) for name, parts in pending.items()}
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if incomplete or missing:
        raise CheckpointError(
            f"The checkpoint in {files[0].parent} lacks tensors: {missing[:8]}{'...' if len(missing) > 8 else ''}"
            f"{f' and the rest of the quantized layers {list(incomplete)[:4]}' if incomplete else ''}. "
            "It is incomplete or belongs to another model/config."
        )
    if unexpected:
        rank_zero_info(f"lightning-nf4: ignored {len(unexpected)} checkpoint tensors the model does not use, e.g. {unexpected[:3]}")
    model.to(device)  # buffers built on the CPU with the skeleton


def _complete(parts: dict[str, Tensor]) -> bool:
    if "" not in parts:
        return False
    if QUANT_STATE_KEY not in parts and not any(k.startswith("quant_state.") for k in parts):
        return parts[""].is_floating_point()  # a float weight: quantize it now
    needed = required_parts(parts[next(k for k in parts if k.startswith("quant_state."))])
    return needed is None or needed <= parts.keys()


def _assign(model: nn.Module, key: str, tensor: Tensor, device: torch.device, dtype: torch.dtype, *, parameter: bool, expected: torch.Size) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(f"size mismatch for {key}: checkpoint has {tuple(tensor.shape)}, the model built from its config has {tuple(expected)}.")
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    # copy=True: safetensors hands out views of its memory-mapped file; keeping one would keep the whole
    # shard mapped (and counted in resident memory) for the life of the model.
    value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None, copy=True)
    if parameter:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
        if isinstance(owner, NF4Linear):
            return
    else:
        owner._buffers[attr] = value
