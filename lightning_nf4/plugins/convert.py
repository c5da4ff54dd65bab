"""Replacing a model's ``nn.Linear`` (and ``Conv1D``) layers by ``NF4Linear``, one layer at a time, and its
stacked MoE expert weights by ``NF4Tensor`` parameters."""

from __future__ import annotations

import ctypes
import fnmatch
import sys
import warnings
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_nf4.format.tensor import NF4Tensor
from lightning_nf4.layers.experts import dequantize_experts, nf4_attrs, quantize_expert_weight
from lightning_nf4.layers.linear import NF4Linear, is_conv1d


def matches(name: str, patterns: Sequence[str]) -> bool:
    """A module name matches a pattern if the pattern equals the name, its last component(s), or
    matches it as a glob or (when it starts with ``re:``) a regular expression."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def within(name: str, patterns: Sequence[str]) -> bool:
    """``name`` or one of the modules it sits in matches (``skip_modules=["head"]`` covers ``head.1``, as
    transformers' ``llm_int8_skip_modules`` and PEFT's ``modules_to_save`` name a parent for all it holds)."""
    parts = name.split(".")
    return any(matches(".".join(parts[:end]), patterns) for end in range(1, len(parts) + 1))


def _is_lora_part(name: str, module: nn.Module) -> bool:
    # PEFT's adapter matrices live under lora_A / lora_B (or other tuners' ModuleDicts).
    return any(part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "modules_to_save") for part in name.split("."))


_KEEP_FLOAT = "_nf4_keep_float"


def logical_name(name: str) -> str:
    """The name a layer had before a wrapper moved it: PEFT puts the original layer at ``<name>.base_layer``."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def convertible_kind(module: nn.Module) -> bool:
    """A layer NF4 replaces: exactly ``nn.Linear`` (subclasses compute otherwise) or transformers' ``Conv1D``."""
    return type(module) is nn.Linear or is_conv1d(module)


def convertible_linears(model: nn.Module, skip_modules: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The plain ``nn.Linear`` (and transformers' ``Conv1D``, GPT-2's transposed linear) layers that should become
    NF4 (not skipped, not LoRA, not converted).

    A skipped layer stays skipped however it is wrapped later: it matches by its name without PEFT's
    ``base_layer`` parts, and a layer once found skipped is marked so that no later conversion takes it
    (Lightning converts again after ``LoRACallback`` wrapped it)."""
    found = []
    owners: dict[int, set[int]] = {}  # parameter -> the modules that hold it (a tied head and its embedding: two)
    for _, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(id(module))
    for name, module in model.named_modules():
        if not convertible_kind(module) or _is_lora_part(name, module) or getattr(module, _KEEP_FLOAT, False):
            continue
        if within(name, skip_modules) or within(logical_name(name), skip_modules):
            setattr(module, _KEEP_FLOAT, True)
            continue
        if len(owners.get(id(module.weight), ())) > 1:  # tied to another module's parameter (an output head to its
            # embeddings): quantizing it would cut the tie, and the other module would train or export another tensor
            setattr(module, _KEEP_FLOAT, True)
            warnings.warn(
                f"{name} stays in float: its weight is tied to another module's (as transformers keeps tied heads in "
                f"float). Name it in skip_modules to silence this, or untie it to quantize it.", UserWarning, stacklevel=3,
            )
            continue
        found.append((name, module))
    return found


def convert_linears(
    model: nn.Module,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip_modules: Sequence[str] = ("lm_head",),
    device: Optional[torch.device] = None,
) -> int:
    """Quantize the convertible linears in place, each on ``device`` (default: where it is); returns how many.

    Layers are moved, quantized and freed one by one, so peak memory grows by one float layer only.
    Already-converted layers are left alone, so calling this twice is harmless.
    """
    count = 0
    uses = module_names(model)  # a layer shared by several parents is replaced under each of its names
    for name, linear in convertible_linears(model, skip_modules):
        if device is not None and linear.weight.device.type != "meta":
            linear.to(device)
        replace_module(model, uses[id(linear)], NF4Linear.from_linear(linear, blocksize, double_quant, compute_dtype, name=name))
        count += 1
    if count:
        release_freed_host_memory()
        call_layers_in_torch_transformers(model)
        mark_quantized(model)
    return count


def is_expert_weight(module: nn.Module, param: nn.Parameter) -> bool:
    """A float ``[experts, out, in]`` weight of an experts module (transformers 5 stacks MoE experts this way,
    ``gate_up_proj`` and ``down_proj`` of ``MixtralExperts``, ``Qwen3MoeExperts``...): one matrix per expert."""
    experts = getattr(module, "num_experts", None)
    return (
        isinstance(experts, int) and not isinstance(param, NF4Tensor) and param.dim() == 3
        and param.shape[0] == experts and param.is_floating_point()
    )


def convertible_experts(model: nn.Module, skip_modules: Sequence[str]) -> list[tuple[str, nn.Module, str]]:
    """``(module name, module, parameter name)`` of each stacked expert weight that should become NF4 (its module
    not skipped, by the same rule as linears)."""
    found = []
    for name, module in model.named_modules():
        if _is_lora_part(name, module) or getattr(module, _KEEP_FLOAT, False):
            continue
        params = [p for p, param in module.named_parameters(recurse=False) if is_expert_weight(module, param)]
        if params and (within(name, skip_modules) or within(logical_name(name), skip_modules)):
            setattr(module, _KEEP_FLOAT, True)
            continue
        # one stacked weight skipped by its path, as PEFT's target_parameters names it ("experts.down_proj")
        found += [(name, module, p) for p in params if not matches(logical_name(f"{name}.{p}" if name else p), skip_modules)]
    return found


def convert_experts(
    model: nn.Module,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip_modules: Sequence[str] = ("lm_head",),
    device: Optional[torch.device] = None,
) -> int:
    """Quantize the stacked expert weights in place, each to an ``NF4Tensor`` parameter on ``device`` (as
    bitsandbytes quantizes the whole ``[experts, out, in]`` tensor); returns how many. The experts module and its
    forward stay transformers' own: the weight's type answers the indexing and matmuls they do."""
    count = 0
    for name, module, attr in convertible_experts(model, skip_modules):
        quantize_expert_weight(module, attr, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype, device=device, name=name)
        count += 1
    if count:
        release_freed_host_memory()
        save_nf4_experts_stacked(model)
        mark_quantized(model)
    return count


def mark_quantized(model: nn.Module, quantized: bool = True) -> None:
    """``config._is_quantized`` on each transformers model holding NF4 weights, as transformers' quantizers set it
    (``quantized=False`` takes it off): some architectures read a linear's weight themselves unless it is set (Jamba's
    and Falcon-Mamba's ``dt_proj``, the packed codes here) and call the layer when it is."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(module, "base_model_prefix"):  # not a transformers model
            continue
        if quantized and any(holds_nf4(m) for m in module.modules()):
            config._is_quantized = True
        elif not quantized and "_is_quantized" in vars(config):
            del config._is_quantized


_SAVED_CONVERSIONS = "_nf4_weight_conversions_before"


def save_nf4_experts_stacked(model: nn.Module) -> None:
    """Let transformers' ``save_pretrained`` write NF4 expert weights as the model holds them, stacked.

    It writes a checkpoint in its original layout by reversing the conversions of ``model._weight_conversions`` (or
    of the architecture's defaults): the stacked experts split back into one matrix per expert. An NF4 expert's
    state dict is bitsandbytes' packed codes and scales, which no split can cut by expert, so the conversions that
    build NF4 expert weights are left out there; lightning-nf4's loader reads such stacked NF4 weights back as saved.
    ``restore_weight_conversions`` undoes this when the experts are float again."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # transformers before 5 has no conversions: its experts are linears
        return
    stacked = [name for name, _ in nf4_expert_weights(model)]
    for prefix, hf in model.named_modules():
        if not isinstance(hf, PreTrainedModel):
            continue
        names = [logical_name(n[len(prefix) + 1:] if prefix else n) for n in stacked if not prefix or n.startswith(prefix + ".")]
        if not names:
            continue
        if _SAVED_CONVERSIONS not in vars(hf):
            setattr(hf, _SAVED_CONVERSIONS, vars(hf).get("_weight_conversions"))
        conversions = getattr(hf, "_weight_conversions", None)
        if conversions is None:  # what save_pretrained reverses for a model that from_pretrained did not load
            conversions = [t for t in get_model_conversion_mapping(hf, add_legacy=False) if type(t).__name__ != "PrefixChange"]
        hf._weight_conversions = [t for t in conversions if not (isinstance(t, WeightConverter) and _builds_any(t, names))]


def restore_weight_conversions(model: nn.Module) -> None:
    """The conversions ``save_nf4_experts_stacked`` changed, back as they were (the experts are float again)."""
    for hf in model.modules():
        if _SAVED_CONVERSIONS in vars(hf):  # its own: PEFT's wrappers forward attribute reads to the model they wrap
            _put_back_conversions(hf)
            delattr(hf, _SAVED_CONVERSIONS)


@contextmanager
def saving_experts_per_expert(model: nn.Module) -> Iterator[None]:
    """While a float state dict of ``model`` is saved (the merged export): the conversions ``save_nf4_experts_stacked``
    left out are back, so its experts are written in the checkpoint's per-expert layout, as for any float model."""
    changed = [(hf, vars(hf).get("_weight_conversions")) for hf in model.modules() if _SAVED_CONVERSIONS in vars(hf)]
    for hf, _ in changed:
        _put_back_conversions(hf)
    try:
        yield
    finally:
        for hf, current in changed:
            hf._weight_conversions = current


def _put_back_conversions(hf: nn.Module) -> None:
    """``hf._weight_conversions`` as it was before ``save_nf4_experts_stacked`` (absent if it was)."""
    before = getattr(hf, _SAVED_CONVERSIONS)
    if before is None:
        vars(hf).pop("_weight_conversions", None)
    else:
        hf._weight_conversions = before


def keep_trained_in(module: nn.Module, dtype: torch.dtype) -> int:
    """What trains (adapters, biases, modules trained in full) in ``dtype``, float32 by default: AdamW's small steps
    vanish in bf16 weights. Returns how many tensors were cast; a module trained in full takes its float buffers along.
    An embedding trained so still hands the model rows in the dtype it held (autocast covers no lookups; a bf16
    model's LayerNorm on the CPU refuses float32 input), and those rows are what the float rows would give in it."""
    held: dict[int, torch.dtype] = {}
    for param in module.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            held[id(param)] = param.dtype
            param.data = param.data.to(dtype)  # the same Parameter: an optimizer made before keeps it
    for sub in module.modules():
        weight = sub._parameters.get("weight") if isinstance(sub, nn.Embedding) else None
        if weight is not None and id(weight) in held and not hasattr(sub, _ROWS_DTYPE):
            setattr(sub, _ROWS_DTYPE, held[id(weight)])
            sub.register_forward_hook(_rows_in_held_dtype)
        own = list(sub.parameters(recurse=False))
        if own and all(id(p) in held for p in own):  # a module trained in full: its float buffers (a norm's running
            # statistics) follow its parameters, as a CPU BatchNorm takes one dtype for both
            for name, buffer in sub.named_buffers(recurse=False):
                if buffer.is_floating_point() and buffer.dtype == held[id(own[0])]:
                    setattr(sub, name, buffer.to(dtype))
    return len(held)


_ROWS_DTYPE = "_nf4_rows_dtype"


def _rows_in_held_dtype(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    dtype = getattr(module, _ROWS_DTYPE)
    return output if output.dtype == dtype else output.to(dtype)


def is_param_wrapper(module: nn.Module) -> bool:
    """PEFT's ``target_parameters`` LoRA layer (``ParamWrapper``): it adds its update to a parameter, not an output."""
    from peft.tuners.lora import LoraLayer  # PEFT loads with the plugins, not with the format

    return isinstance(module, LoraLayer) and type(module).__name__ == "ParamWrapper"


def _builds_any(converter: Any, names: list[str]) -> bool:
    """Whether ``converter`` builds one of the parameters ``names`` (its reverse, which save_pretrained runs, takes it)."""
    try:
        reverse = converter.reverse_transform()
    except (AttributeError, NotImplementedError, ValueError):
        return False
    return any(reverse.rename_source_key(name)[1] is not None for name in names)


def kept_in_float_by_model(model: nn.Module) -> tuple[str, ...]:
    """The linears and experts modules that a transformers model inside ``model`` keeps in float32 by its
    ``_keep_in_fp32_modules`` (read by transformers' rule, and a ``name.weight`` entry as its module ``name``: a model
    whose code reads that weight itself, such as LongcatFlash's router, cannot take an NF4 layer there)."""
    names: list[str] = []
    for prefix, hf in model.named_modules():
        patterns = [*(getattr(hf, "_keep_in_fp32_modules", None) or ()), *(getattr(hf, "_keep_in_fp32_modules_strict", None) or ())]
        if not patterns or not all(isinstance(p, str) for p in patterns):
            continue
        patterns += [p.rsplit(".", 1)[0] for p in patterns if p.endswith((".weight", ".bias"))]
        for name, sub in hf.named_modules():
            quantizable = convertible_kind(sub) or any(is_expert_weight(sub, p) for p in sub.parameters(recurse=False))
            if name and quantizable and kept_by_transformers(logical_name(name), patterns):
                names.append(f"{prefix}.{name}" if prefix else name)
    return tuple(dict.fromkeys(names))


def kept_by_transformers(name: str, patterns: Sequence[str]) -> bool:
    """Whether transformers leaves module ``name`` unquantized for skip ``patterns`` (a module path from the start, a
    regular expression, or a suffix of the name: its ``should_convert_module``); with a transformers that lacks that
    rule, the patterns as ``within`` reads them."""
    patterns = list(patterns)
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        return within(name, patterns)
    return not should_convert_module(name, patterns)


def holds_nf4(module: nn.Module) -> bool:
    """An ``NF4Linear``, or a module with an NF4 parameter of its own (an experts module): frozen 4-bit weights."""
    return isinstance(module, NF4Linear) or bool(nf4_attrs(module))


def nf4_expert_weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The ``NF4Tensor`` parameters that are not an ``NF4Linear``'s weight: stacked expert weights."""
    return [
        (f"{name}.{attr}" if name else attr, getattr(module, attr))
        for name, module in model.named_modules() if not isinstance(module, NF4Linear)
        for attr in nf4_attrs(module)
    ]


def call_layers_in_torch_transformers(model: nn.Module) -> None:
    """Turn torch's fused fast path off while an ``nn.TransformerEncoder(Layer)`` holding NF4 or LoRA layers runs.
    In eval without grad that path reads ``linear1.weight`` and ``linear2.weight`` itself instead of calling the layers:
    packed NF4 codes (a dtype error) or the base weight without its adapter (a silently other model)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, (nn.TransformerEncoder, nn.TransformerEncoderLayer)) or getattr(module, "_nf4_no_fastpath", False):
            continue
        if any(isinstance(m, (NF4Linear, LoraLayer)) for m in module.modules()):
            module.register_forward_pre_hook(_fastpath_off)
            module.register_forward_hook(_fastpath_back, always_call=True)
            module._nf4_no_fastpath = True


def _fastpath_off(module: nn.Module, args: Any) -> None:
    module._nf4_fastpath_was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)


def _fastpath_back(module: nn.Module, args: Any, output: Any) -> None:
    torch.backends.mha.set_fastpath_enabled(getattr(module, "_nf4_fastpath_was", True))


def release_freed_host_memory() -> None:
    """Hand memory freed by the float weights back to the OS (glibc keeps it in its arenas otherwise),
    so that resident memory after conversion reflects the NF4 model."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def exclude_nf4_from_ddp_sync(module: nn.Module) -> None:
    """Keep the packed NF4 weights out of DDP's start-up broadcast: every rank quantizes the same float
    weights to the same bytes and they are frozen, so sending them (4.5 GB for an 8B model) buys nothing.
    Call again after anything renames layers (LoRA injection moves weights under ``base_layer``)."""
    present = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    keep = [n for n in getattr(module, "_ddp_params_and_buffers_to_ignore", []) if n in present]
    frozen = {f"{name}.weight" for name, _ in nf4_layers(module)} | {name for name, _ in nf4_expert_weights(module)}
    module._ddp_params_and_buffers_to_ignore = sorted(set(keep) | frozen)


def check_peft_layers(model: nn.Module, to_quantize: set[str]) -> None:
    """Refuse PEFT layers that cannot sit on an NF4 base (one already, or a linear in ``to_quantize``, by name): PEFT's
    own DoRA reads the base weight as a float matrix, and its ``target_parameters`` LoRA adds to the weight itself."""
    from peft.tuners.lora import LoraLayer  # PEFT loads with the plugins, not with the format

    from lightning_nf4.layers.lora import NF4LoraLinear

    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or isinstance(layer, NF4LoraLinear):
            continue
        on_nf4 = isinstance(layer.get_base_layer(), NF4Linear) or f"{name}.base_layer" in to_quantize
        if on_nf4 and any(getattr(layer, "use_dora", {}).values()):
            raise ValueError(
                f"{name} carries PEFT's DoRA on a base that NF4Precision quantizes; PEFT's DoRA cannot read NF4 weights. "
                "Add DoRA after the conversion (LoRACallback(use_dora=True) with a Trainer; with Fabric, wrap a model "
                "already in NF4 with a lightning_nf4.layers.lora.lora_config(use_dora=True)), or keep the layer in float "
                "(skip_modules=...)."
            )
        # on stacked expert weights it works: the NF4 weight's baddbmm adds the update to the dequantized experts
        if is_param_wrapper(layer) and f"{name}.base_layer" in to_quantize and convertible_kind(layer.get_base_layer()):
            raise ValueError(
                f"{name} carries PEFT's target_parameters LoRA on a linear that NF4Precision quantizes: its update would "
                "be added to the packed codes. Load the model in NF4 first (lightning_nf4's from_pretrained), then "
                "wrap it with PEFT; or target the layer with target_modules."
            )


def adopt_peft_linears(model: nn.Module) -> int:
    """PEFT's LoRA ``Linear`` layers whose base is now an ``NF4Linear`` become ``NF4LoraLinear``: what PEFT builds on an
    NF4 base (``lora_config``, ``LoRACallback``), as it builds ``Linear4bit`` on a bitsandbytes one. The same parameters
    and adapters, the NF4 layer's forward, and a merge that re-quantizes the base (PEFT's own added the update to the
    packed codes: a shape error). Returns how many; layers with a PEFT variant (aLoRA; DoRA is refused) stay as they are."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    from lightning_nf4.layers.lora import NF4LoraLinear

    adopted = 0
    for module in model.modules():
        if type(module) is PeftLinear and isinstance(module.get_base_layer(), NF4Linear) and not module.fan_in_fan_out:
            if not any(getattr(module, "lora_variant", {}).values()):
                module.__class__ = NF4LoraLinear
                adopted += 1
    return adopted


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each submodule, by ``id`` (a module shared by several parents has several)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def replace_module(model: nn.Module, names: Sequence[str], new: nn.Module) -> None:
    """``new`` in place of the submodule at each of ``names``."""
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def nf4_layers(model: nn.Module) -> list[tuple[str, NF4Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]


def dequantize_linears(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Every ``NF4Linear`` of ``model`` replaced, in place, by the float layer it stands for (``NF4Linear.to_float``),
    and every NF4 expert weight by a float parameter: the inverse of ``convert_linears`` and ``convert_experts``, as transformers' ``model.dequantize()`` is for bitsandbytes models (which
    these models are not, to transformers). A Hugging Face model's ``config.quantization_config`` goes with them.
    NF4 layers under LoRA are refused: their merged float model is an export."""
    from peft.tuners.lora import LoraLayer

    from lightning_nf4.format.quantized import float_dtype

    if dtype is not None:
        if float_dtype(dtype) is None:
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16 (or its name), got {dtype!r}.")
        dtype = float_dtype(dtype)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), NF4Linear)]
    if wrapped:
        raise ValueError(
            f"{wrapped[0]} carries LoRA on an NF4 layer: dequantizing under it would leave the adapter on another base. "
            "Write the merged float model (LoRACallback(save_dir=...) or lightning_nf4.export.save_merged), or remove the "
            "adapters first (PEFT's unload())."
        )
    uses = module_names(model)  # a layer shared under several names stays one (float) layer under each
    for name, layer in nf4_layers(model):
        if not name:
            raise ValueError("dequantize_linears: the model is itself an NF4Linear; use its to_float().")
        replace_module(model, uses[id(layer)], layer.to_float(dtype))
    for module in model.modules():  # stacked expert weights
        dequantize_experts(module, dtype)
    restore_weight_conversions(model)
    mark_quantized(model, False)
    config = getattr(model, "config", None)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return model
