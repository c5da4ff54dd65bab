"""``AutoModelForCausalLM.from_pretrained``: transformers' call, loading straight into NF4.

The model skeleton is built with its parameters on the ``meta`` device (no memory), its linears are
swapped for ``NF4Linear`` placeholders, and the checkpoint is then read one tensor at a time: each
linear weight is moved to the target device, quantized there and dropped. Peak host memory stays near
the NF4 model plus one float tensor. Pre-quantized bitsandbytes checkpoints load as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lightning_nf4.devices import resolve_device
from lightning_nf4.format.bnb_state import QUANT_STATE_KEY, required_parts
from lightning_nf4.layers.linear import NF4Linear
from lightning_nf4.loading.checkpoint import (
    CheckpointError, CheckpointIndex, checkpoint_files, count_tensors, first_float_dtype, iter_tensors,
)
from lightning_nf4.loading.config import NF4LoadConfig, parse_quantization_config
from lightning_nf4.loading.deferred import attach
from lightning_nf4.loading.keys import NF4_KEY, KeyMap, load_layer
from lightning_nf4.loading.packaged import resolve_model_path
from lightning_nf4.kernels import ops
from lightning_nf4.layers.group import group_nf4_layers, persistent_buffers
from lightning_nf4.format.tensor import NF4Tensor
from lightning_nf4.layers.experts import expert_placeholder
from lightning_nf4.loading.experts import ExpertSources, StackedWeight, read_stacked, set_filled, stacked_for, stacked_part
from lightning_nf4.plugins.convert import (
    convert_linears, convertible_experts, mark_quantized, nf4_expert_weights, nf4_layers, release_freed_host_memory,
    save_nf4_experts_stacked,
)

class AutoModelForCausalLM:
    """Drop-in for ``transformers.AutoModelForCausalLM`` whose 4-bit path needs no bitsandbytes."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, Path],
        *,
        quantization_config: Any = None,
        device: Union[str, torch.device, None] = None,
        dtype: Union[torch.dtype, str, None] = None,
        gguf_file: Optional[str] = None,
        progress: bool = True,
        device_map: Any = None,
        torch_dtype: Union[torch.dtype, str, None] = None,
        config: Any = None,
        subfolder: str = "",
        use_safetensors: Optional[bool] = None,
        variant: Optional[str] = None,
        output_loading_info: bool = False,
        low_cpu_mem_usage: Optional[bool] = None,
        generation_config: Any = None,
        weights_only: bool = True,
        **kwargs: Any,
    ) -> Union[nn.Module, tuple[nn.Module, dict[str, list]]]:
        """Load ``pretrained_model_name_or_path`` (a local folder or ``packaged:<name>``) onto ``device``.

        ``quantization_config``: a ``transformers.BitsAndBytesConfig`` (or its dict) with
        ``load_in_4bit=True, bnb_4bit_quant_type="nf4"``; None loads in float unless the checkpoint
        itself is a bitsandbytes 4-bit one. ``dtype`` is the dtype of everything left in float and the one
        weights are quantized from (``"auto"``: the checkpoint's, or torch's default dtype where neither config nor
        weights name one, as for GGUF; a string names a torch dtype; transformers' older ``torch_dtype`` is the same
        argument); left out, transformers' default: ``"auto"`` from transformers 5 on, float32 before. ``device_map`` takes one device
        (``"cuda:0"``, ``0``, ``{"": 0}``) as ``device`` does; a map spreading the model over devices is refused.

        As in transformers: ``config`` (a config object or folder) replaces the folder's ``config.json``;
        ``subfolder`` is where config and weights are; ``use_safetensors`` True/False reads only safetensors/``.bin``;
        ``variant`` reads ``model.<variant>.safetensors`` (or its shards);
        ``output_loading_info`` returns ``(model, info)`` with the checkpoint keys the model did not use; other keyword
        arguments override config attributes (``num_hidden_layers=...``, ``attn_implementation=...``,
        ``trust_remote_code``, ``revision``), and one that is none of these is an error. ``low_cpu_mem_usage`` is
        accepted and changes nothing: loading is always tensor by tensor. ``generation_config`` replaces the folder's.
        ``weights_only`` must stay True: ``.bin`` files are always read weights-only, safetensors hold tensors only.

        ``device="meta"`` reads no weight: the model comes back on ``meta``, remembering its checkpoint, and
        ``NF4FSDPStrategy`` fills it one sharding unit at a time on each rank, keeping only that rank's
        shard (``lightning_nf4.loading.materialize(model, device)`` fills it whole, for one device).
        """
        # Lightning calls configure_model under ``torch.device(root_device)``; the loader reads into host memory and
        # places every tensor itself, so a default device set by the caller must not reach its factory calls.
        if torch_dtype is not None:
            if dtype is not None:
                raise ValueError("Pass dtype or torch_dtype (its older name), not both.")
            dtype = torch_dtype
        if not weights_only:
            raise ValueError(
                "weights_only=False: lightning-nf4 reads .bin checkpoints weights-only, always (a pickle can run code). "
                "Convert such a checkpoint once to safetensors with transformers (save_pretrained), then load that."
            )
        device = _one_device(device, device_map)
        source = _Source(resolve_model_path(str(pretrained_model_name_or_path)) / subfolder, use_safetensors, variant, config, kwargs)
        with torch.device("cpu"):
            model, unexpected = cls._load(source, quantization_config, device, dtype, gguf_file, progress)
        if generation_config is not None:
            model.generation_config = generation_config
        if output_loading_info:
            return model, {"missing_keys": [], "unexpected_keys": unexpected, "mismatched_keys": [], "error_msgs": []}
        return model

    @classmethod
    def _load(
        cls, source: "_Source", quantization_config: Any, device: Union[str, torch.device, None],
        dtype: Union[torch.dtype, str, None], gguf_file: Optional[str], progress: bool,
    ) -> tuple[nn.Module, list[str]]:
        import transformers

        path = source.path
        target = resolve_device(device)
        if gguf_file is not None and target.type == "meta":
            raise ValueError(
                "device='meta' defers reading safetensors/.bin checkpoints; a GGUF file is dequantized whole by "
                "transformers as it loads. Load it on a device, or convert it once with save_pretrained()."
            )
        config, model_kwargs = source.config(gguf_file)
        saved = getattr(config, "quantization_config", None)
        nf4 = parse_quantization_config(quantization_config, saved)
        files = checkpoint_files(path, source.use_safetensors, source.variant) if gguf_file is None else []
        # where neither the config nor the checkpoint names a dtype (GGUF), transformers falls back to torch's default
        dtype = _float_dtype(_default_dtype() if dtype is None else dtype, config, files) or torch.get_default_dtype()

        if gguf_file is not None:  # transformers dequantizes GGUF on load; we quantize afterwards
            # dequantize=True: plain weights, no GGUF quantizer left on the model (it would refuse save_pretrained)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), gguf_file=gguf_file, config=config, dtype=dtype, quantization_config=transformers.GgufConfig(dequantize=True), **model_kwargs)
            if nf4 is not None:
                convert_linears(model, **nf4.convert_kwargs(model), device=target)
                _refuse_rescaled_in_place(model)
            return _finish(model.to(target), nf4), []

        with _parameters_on_meta():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, **model_kwargs)
        _read_generation_config(model, path)
        if nf4 is not None:
            convert_linears(model, **nf4.convert_kwargs(model))  # NF4Linear placeholders on meta
            _expert_placeholders(model, nf4)
            _refuse_rescaled_in_place(model)
        if target.type == "meta":  # nothing read yet: filled part by part where it gets storage (deferred.py)
            attach(model, CheckpointIndex(files), dtype)
            if nf4 is not None:
                model.config.quantization_config = nf4.to_bnb_config(model)
            return model.eval(), []
        unexpected = _stream_into(model, files, target, dtype, progress, prequantized=nf4 is not None and nf4.prequantized)
        return _finish(model, nf4), unexpected


class _Source:
    """Where a model comes from: its folder, its config (the folder's, or the caller's), transformers' keyword arguments."""

    # read by the config or the model constructor, never config attributes
    _MODEL_KWARGS = ("trust_remote_code", "attn_implementation")
    # where transformers would download from; meaningless beside a config object and a local folder
    _HUB_KWARGS = ("revision", "cache_dir", "force_download", "local_files_only", "token", "proxies")
    # transformers' loading arguments this loader does not take, and what to do instead
    _UNSUPPORTED = {
        **dict.fromkeys(("max_memory", "offload_folder", "offload_buffers", "offload_state_dict"),
                        "it places parts of a model spread over devices or disk; lightning-nf4 loads the NF4 model onto one "
                        "device (device='cuda:0'), or device='meta' for strategy='nf4_fsdp' to shard it"),
        **dict.fromkeys(("tp_plan", "tp_size", "device_mesh", "distributed_config"),
                        "tensor parallelism is not built; shard with strategy='nf4_fsdp' (FSDP2) instead"),
        **dict.fromkeys(("adapter_name", "adapter_kwargs"),
                        "load the base here, then the adapter: register_nf4_lora(LoraConfig.from_pretrained(folder)) and "
                        "peft.PeftModel.from_pretrained(model, folder, config=...)"),
        "key_mapping": "renaming checkpoint keys by pattern is not built; rename them once with safetensors and save_pretrained",
        "state_dict": "the weights are read from the folder; save the state dict there with save_pretrained first",
        "ignore_mismatched_sizes": "a tensor of another shape is an error here; fix the config or the checkpoint",
        "use_kernels": "the NF4 layers use lightning-nf4's own kernels; leave it out",
    }

    def __init__(
        self, path: Path, use_safetensors: Optional[bool], variant: Optional[str], config: Any, kwargs: dict[str, Any],
    ) -> None:
        self.path, self.use_safetensors, self.variant, self._config, self._kwargs = path, use_safetensors, variant, config, kwargs

    def config(self, gguf_file: Optional[str]) -> tuple[Any, dict[str, Any]]:
        """The config to build from and the keyword arguments for the model's constructor; an argument neither
        the config nor the constructor takes is refused, as transformers refuses it."""
        import copy

        import transformers

        model_kwargs = {k: self._kwargs[k] for k in self._MODEL_KWARGS if k in self._kwargs}
        if isinstance(self._config, transformers.PretrainedConfig):
            config, unused = copy.deepcopy(self._config), {k: v for k, v in self._kwargs.items() if k not in self._HUB_KWARGS}
        else:
            where = str(self._config) if self._config is not None else str(self.path)
            gguf = {"gguf_file": gguf_file} if gguf_file is not None else {}
            config, unused = transformers.AutoConfig.from_pretrained(where, return_unused_kwargs=True, **gguf, **self._kwargs)
        unused = {k: v for k, v in unused.items() if k not in model_kwargs and k != "gguf_file"}
        unsupported = sorted(k for k in unused if k in self._UNSUPPORTED)
        if unsupported:
            raise TypeError(
                "from_pretrained(): lightning-nf4's loader does not take transformers' "
                + "; ".join(f"{k}= ({self._UNSUPPORTED[k]})" for k in unsupported) + "."
            )
        if unused:
            raise TypeError(
                f"from_pretrained() got unexpected keyword arguments {sorted(unused)}: neither config attributes of "
                f"{type(config).__name__} nor loading arguments. Check the spelling (e.g. quantization_config)."
            )
        return config, model_kwargs


# Layers a transformers model rescales in place by itself (RWKV halves them every ``rescale_every`` blocks when it
# turns to eval, and doubles them back for training): arithmetic on their packed codes would fail or corrupt them.
_RESCALED_IN_PLACE = ("attention.output", "feed_forward.value")


def _expert_placeholders(model: nn.Module, nf4: NF4LoadConfig) -> None:
    """Stacked MoE expert weights become NF4 placeholders on ``meta``, filled as their pieces stream in
    (``loading.experts``): the experts NF4Precision would quantize, kept in float by the same rules."""
    for name, module, attr in convertible_experts(model, nf4.kept_float_experts(model)):
        expert_placeholder(module, attr, blocksize=nf4.blocksize, double_quant=nf4.double_quant, compute_dtype=nf4.compute_dtype)
    save_nf4_experts_stacked(model)
    mark_quantized(model)


def _refuse_rescaled_in_place(model: nn.Module) -> None:
    if not getattr(model.config, "rescale_every", 0) or not hasattr(model, "rwkv"):
        return
    rescaled = [n for n, _ in nf4_layers(model) if n.endswith(_RESCALED_IN_PLACE)]
    if rescaled:
        raise ValueError(
            f"RWKV rescales {rescaled[0]} and the like in place (config.rescale_every={model.config.rescale_every}), which "
            "NF4 codes cannot take. Load with rescale_every=0 (no rescaling: only float16 needs it), or keep them in float "
            "with BitsAndBytesConfig(..., llm_int8_skip_modules=['attention.output', 'feed_forward.value'])."
        )


def _one_device(device: Union[str, torch.device, None], device_map: Any) -> Union[str, torch.device, None]:
    """transformers' ``device_map`` when it names one device (``"cuda:0"``, ``0``, ``{"": 0}``); ``"auto"`` and maps
    that spread layers over devices are refused: one model, one device here (NF4FSDPStrategy shards across devices)."""
    if device_map is None:
        return device
    one = device_map
    if isinstance(device_map, dict) and device_map and len({str(v) for v in device_map.values()}) == 1:
        one = next(iter(device_map.values()))  # {"": 0}, or every module on one device (infer_auto_device_map on one GPU)
    if isinstance(one, (dict, list)) or one in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(
            f"device_map={device_map!r} spreads the model over devices, which lightning-nf4's loader does not do. Pass "
            "one device (device='cuda:0'), or device='meta' and train with strategy='nf4_fsdp' to shard across devices."
        )
    if isinstance(one, int):  # an index on this machine's accelerator, as transformers reads it
        accelerator = torch.accelerator.current_accelerator()
        one = f"{accelerator.type if accelerator is not None else 'cuda'}:{one}"
    if device is not None and torch.device(device) != torch.device(one):
        raise ValueError(f"device={device!r} and device_map={device_map!r} name different devices; pass one of them.")
    return one


def _default_dtype() -> Union[torch.dtype, str]:
    """transformers' own default: ``"auto"`` from transformers 5 on (the checkpoint's dtype), before it the default
    dtype of torch (float32)."""
    import transformers

    return "auto" if int(transformers.__version__.split(".")[0]) >= 5 else torch.get_default_dtype()


def _float_dtype(dtype: Union[torch.dtype, str, None], config: Any, files: Sequence[Path] = ()) -> Optional[torch.dtype]:
    """``dtype`` as a torch dtype: ``"auto"`` is the checkpoint's own (its config's ``dtype``, else the dtype of its
    first float tensor, as transformers reads it), a string a torch name."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if saved is not None and saved != "auto":
            return _float_dtype(saved, None)
        return first_float_dtype(files) if files else None
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype; pass e.g. torch.bfloat16, 'float16' or 'auto'.")
    return value


def _read_generation_config(model: nn.Module, path: Path) -> None:
    """The folder's ``generation_config.json`` (an instruct model's end-of-turn token, sampling defaults): the
    skeleton built from ``config.json`` alone would not stop at the end of a turn."""
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))


def _finish(model: nn.Module, nf4: Optional[NF4LoadConfig]) -> nn.Module:
    if nf4 is not None:
        model.config.quantization_config = nf4.to_bnb_config(model)
        layers = nf4_layers(model)
        experts = [w.quant for _, w in nf4_expert_weights(model)]
        packed = sum(layer.memory_bytes for _, layer in layers) + sum(q.nbytes for q in experts)
        floats = sum(layer.in_features * layer.out_features * layer.quant.dtype.itemsize for _, layer in layers)
        floats += sum(q.numel * q.dtype.itemsize for q in experts)
        stacked = f" and {len(experts)} stacked expert weights" if experts else ""
        rank_zero_info(f"lightning-nf4: {len(layers)} linear layers{stacked} in NF4: {floats / 2**20:.1f} MiB in float -> {packed / 2**20:.1f} MiB.")
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


def _stream_into(model: nn.Module, files: list[Path], device: torch.device, dtype: torch.dtype, progress: bool, prequantized: bool) -> list[str]:
    """Read ``files`` into ``model`` tensor by tensor; returns the checkpoint keys the model does not use."""
    from tqdm.auto import tqdm

    layers = dict(nf4_layers(model))
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = persistent_buffers(model)
    pending: dict[str, dict[str, Tensor]] = {}
    unexpected: list[str] = []
    model_key = KeyMap(model, set(params) | set(buffers) | {f"{n}.weight" for n in layers}, layers)

    experts = ExpertSources(model, model_key.converters, params)
    stacks: dict[str, StackedWeight] = {}  # stacked expert weights whose pieces are still arriving
    nf4_experts = {n for n, p in params.items() if isinstance(p, NF4Tensor)}  # placeholders
    stacked: dict[str, dict[str, Tensor]] = {}  # stacked NF4 expert weights held whole: their parts so far

    bar = tqdm(total=count_tensors(files), desc="Loading (NF4)" if layers else "Loading", unit="tensor", disable=not progress)
    for raw_key, tensor in iter_tensors(files):
        bar.update(1)
        key = model_key(raw_key)
        match = NF4_KEY.match(key)
        if match and match["layer"] in layers:
            parts = pending.setdefault(match["layer"], {})
            parts[match["suffix"] or ""] = tensor
            if _complete(parts, prequantized):
                load_layer(layers[match["layer"]], pending.pop(match["layer"]), match["layer"], device, dtype)
        elif (whole := stacked_part(key, nf4_experts)) is not None:  # a stacked expert weight held whole (or its NF4 parts)
            name, suffix = whole
            parts = stacked.setdefault(name, {})
            parts[suffix] = tensor
            if _complete(parts, prequantized):
                _fill(model, name, read_stacked(stacked.pop(name), name, params[name], device, dtype))
        elif key in params:
            _assign(model, key, tensor, device, dtype, parameter=True, expected=params[key].shape)
        elif key in buffers:
            _assign(model, key, tensor, device, dtype, parameter=False, expected=buffers[key].shape)
        elif (piece := experts.piece(key)) is not None:  # one expert's matrix of a stacked weight
            if piece.target not in stacks:
                stacks[piece.target] = stacked_for(piece, params[piece.target], device, dtype)
            stack = stacks[piece.target]
            stack.add(piece, tensor, raw_key)
            if not stack.missing:
                _fill(model, piece.target, stacks.pop(piece.target).result())
        else:
            unexpected.append(raw_key)
    bar.close()
    for name in [n for n, parts in pending.items() if set(parts) == {""} and parts[""].is_floating_point()]:
        load_layer(layers[name], pending.pop(name), name, device, dtype)  # a float weight in a pre-quantized checkpoint
    for name in [n for n, parts in stacked.items() if set(parts) == {""} and parts[""].is_floating_point()]:
        _fill(model, name, read_stacked(stacked.pop(name), name, params[name], device, dtype))

    if not prequantized:  # a lone weight that is not float: neither a weight to quantize nor codes (they come with a quant state)
        odd = {f"{n}.weight": str(p[""].dtype).removeprefix("torch.") for n, p in pending.items() if set(p) == {""}}
        if odd:
            raise CheckpointError(
                f"The checkpoint in {files[0].parent} stores weights of layers to quantize as integers: {dict(list(odd.items())[:4])}. "
                "A weight to quantize must be float (bf16, fp16, fp32); packed NF4 codes come with their quant state and a "
                "quantization_config in config.json. The file is damaged or was written for another model or tool."
            )
    _tie_as_loaded(model)
    incomplete = [key for name, parts in pending.items() for key in _missing_parts(f"{name}.weight", parts)]
    incomplete += [key for name, parts in stacked.items() for key in _missing_parts(name, parts)]
    incomplete += [f"{name} ({len(stack.missing)} of its {stack.parts * stack.shape[0]} expert matrices)" for name, stack in stacks.items()]
    missing = [n for n, p in model.named_parameters()
               if p.device.type == "meta" and n.removesuffix(".weight") not in pending and n not in stacks and n not in stacked]
    missing += incomplete
    if missing:
        unused = f" It also holds tensors this model does not use, e.g. {unexpected[:4]}." if unexpected else ""
        raise CheckpointError(
            f"The checkpoint in {files[0].parent} lacks tensors: {missing[:8]}{'...' if len(missing) > 8 else ''}. "
            f"It is incomplete or belongs to another model/config.{unused}"
        )
    if unexpected:
        rank_zero_info(f"lightning-nf4: ignored {len(unexpected)} checkpoint tensors the model does not use, e.g. {unexpected[:3]}")
    model.to(device)  # buffers built on the CPU with the skeleton
    return unexpected


def _fill(model: nn.Module, name: str, value: Any) -> None:
    owner_name, _, attr = name.rpartition(".")
    set_filled(model.get_submodule(owner_name) if owner_name else model, attr, value)


def _tie_as_loaded(model: nn.Module) -> None:
    """transformers' tying after a load (5.x): a pair the config ties but whose checkpoint holds both, different,
    stays untied (with transformers' warning); a pair whose checkpoint holds only the tied copy (``lm_head.weight``)
    ties to that one. Older transformers tie unconditionally."""
    tie = getattr(model, "tie_weights", None)
    if tie is None:
        return
    if "missing_keys" in inspect.signature(tie).parameters and hasattr(model, "all_tied_weights_keys"):
        tie(missing_keys={n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta}, recompute_mapping=False)
    else:
        tie()


def _missing_parts(weight: str, parts: dict[str, Tensor]) -> list[str]:
    """The keys a quantized weight still lacks: its codes, its quant state, or what the quant state names."""
    if "" not in parts:
        return [weight]
    state = next((k for k in parts if k.startswith("quant_state.")), None)
    if state is None:
        return [f"{weight}.{QUANT_STATE_KEY}"]
    return [f"{weight}.{part}" for part in sorted((required_parts(parts[state]) or set()) - parts.keys())]


def _complete(parts: dict[str, Tensor], prequantized: bool) -> bool:
    if "" not in parts:
        return False
    if QUANT_STATE_KEY not in parts and not any(k.startswith("quant_state.") for k in parts):
        # a float weight: quantize it now. In a pre-quantized checkpoint it may be codes stored as bf16/fp32
        # (bnb_4bit_quant_storage) whose quant state comes later: wait; a float weight left alone is loaded at the end.
        return parts[""].is_floating_point() and not prequantized
    needed = required_parts(parts[next(k for k in parts if k.startswith("quant_state."))])
    return needed is None or needed <= parts.keys()


def _assign(model: nn.Module, key: str, tensor: Tensor, device: torch.device, dtype: torch.dtype, *, parameter: bool, expected: torch.Size) -> None:
    if tuple(tensor.shape) != tuple(expected):
        packed = tensor.dtype == torch.uint8 and tensor.dim() == 2 and tensor.shape[1] == 1 and len(expected) == 2
        hint = (" It holds packed 4-bit codes: the checkpoint is bitsandbytes-quantized but its config.json has no "
                "quantization_config; pass quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4').") if packed else ""
        raise CheckpointError(f"size mismatch for {key}: checkpoint has {tuple(tensor.shape)}, the model built from its config has {tuple(expected)}.{hint}")
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
