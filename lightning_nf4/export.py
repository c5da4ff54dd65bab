"""Standard artifacts from a QLoRA model: a PEFT adapter folder and a merged float model.

Each is written through ``lightning_nf4.publish``: into a temporary folder beside its place, then moved in by
a rename. ``save_export`` writes the two as one set with ``export.json`` written last (step, epoch and every
file), so a reader never takes a new adapter beside an old merged model; ``save_adapter``, ``save_merged``
and ``save_merged_sharded`` write one folder. The ``write_*`` functions fill a given folder, or with none
only take part in the gathers a sharded model needs on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_nf4.format.tensor import NF4Tensor
from lightning_nf4.layers.linear import NF4Linear
from lightning_nf4.layers.lora import NF4LoraLinear, bias_with_updates
from lightning_nf4.plugins.convert import is_param_wrapper, saving_experts_per_expert, within
from lightning_nf4.publish import publish


def find_hf_model(module: nn.Module) -> tuple[str, Optional[nn.Module]]:
    """The first Hugging Face ``PreTrainedModel`` inside ``module`` (itself included) and its prefix."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "", None
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            return (name + ".") if name else "", sub
    return "", None


PARTS = ("adapter", "merged")  # the folders of an export, under its save_dir or out_dir


def export_root(module: nn.Module) -> tuple[Optional[nn.Module], nn.Module]:
    """``(hf, root)``: the Hugging Face model inside ``module`` (or None) and the module whose parameter names the
    exports use. That is the HF model when there is one; else, inside a ``PeftModel``, the user's own model (PEFT's
    ``base_model.model``), since PEFT adds its ``base_model.model.`` prefix to the names itself; else ``module``."""
    hf = find_hf_model(module)[1]
    if hf is not None:
        return hf, hf
    from peft.tuners.tuners_utils import BaseTuner

    tuner = next((m for m in module.modules() if isinstance(m, BaseTuner)), None)
    return None, tuner.model if tuner is not None else module


def root_prefix(module: nn.Module) -> str:
    """``"<path>."`` of ``export_root``'s root inside ``module`` (``""`` when it is ``module``): what the exports strip."""
    root = export_root(module)[1]
    prefix = next(name for name, sub in module.named_modules() if sub is root)
    return prefix + "." if prefix else ""


def saved_buffers(module: nn.Module, modules_to_save: Sequence[str]) -> list[tuple[str, Tensor]]:
    """The buffers of the modules trained in full (a norm's running statistics), which PEFT saves with them."""
    return [(n, b) for n, b in module.named_buffers()
            if "." in n and ".lora_" not in n and within(n.rsplit(".", 1)[0], modules_to_save)]


def lora_layers(root: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in root.named_modules() if isinstance(m, LoraLayer)]


def _target_names(root: nn.Module) -> list[str]:
    """Shortest PEFT ``target_modules`` that select exactly the LoRA layers present."""
    targeted = {n for n, _ in lora_layers(root)}
    leaves = {n.rsplit(".", 1)[-1] for n in targeted}
    candidates = {n for n, m in root.named_modules() if n and n.rsplit(".", 1)[-1] in leaves and not _inside_lora(n, targeted)}
    return sorted(leaves) if candidates == targeted else sorted(targeted)


def _inside_lora(name: str, targeted: set[str]) -> bool:
    return any(name.startswith(t + ".") for t in targeted)


def adapter_tensors(root: nn.Module, adapter_name: str = "default", modules_to_save: tuple[str, ...] = (), bias: str = "none") -> dict[str, Tensor]:
    """The adapter in PEFT's on-disk naming (``base_model.model.<path>.lora_A.weight`` ...), with the biases a
    model's own ``LoraConfig(bias=...)`` trains."""
    out: dict[str, Tensor] = {"base_model.model." + name: _whole(value).contiguous().cpu() for name, value in _trained_biases(root, bias).items()}
    tag = f".{adapter_name}."
    wrapped = f".modules_to_save{tag}"  # a module PEFT wrapped (ModulesToSaveWrapper): its trained copy, saved by its own name
    for name, param in root.named_parameters():
        if ".lora_" in name and tag in name:
            key = name.replace(tag, ".")
            if key.endswith(".lora_magnitude_vector.weight"):  # DoRA's magnitude: PEFT saves it without ".weight"
                key = key.removesuffix(".weight")
            out["base_model.model." + key] = _whole(param).contiguous().cpu()
    if modules_to_save:
        for names, param in _trained_in_full(root):  # a tied module trained in full: under each of its names
            if ".modules_to_save." in names[0] and wrapped not in names[0]:
                continue  # another adapter's copy
            value = _whole(param).contiguous().cpu()
            for name in names:  # safetensors stores no shared memory: a copy per further name
                out["base_model.model." + name.replace(wrapped, ".")] = value if name == names[0] else value.clone()
        for name, buffer in saved_buffers(root, modules_to_save):
            if ".modules_to_save." in name and wrapped not in name:
                continue  # another adapter's copy
            out["base_model.model." + name.replace(wrapped, ".")] = buffer.detach().contiguous().cpu()
    return out


def _trained_biases(root: nn.Module, bias: str) -> dict[str, Tensor]:
    """The biases PEFT's ``bias="all"`` (every ``bias``) or ``"lora_only"`` (the LoRA layers' base layers') trains and
    saves, by the names PEFT gives them."""
    if bias == "all":
        return {n: t for n, t in root.state_dict(keep_vars=True).items()
                if (n == "bias" or n.endswith(".bias")) and ".lora_" not in n and ".modules_to_save." not in n}
    if bias == "lora_only":
        return {f"{n}.base_layer.bias": layer.get_base_layer().bias for n, layer in lora_layers(root)
                if layer.get_base_layer().bias is not None}
    return {}


def _trained_in_full(root: nn.Module) -> list[tuple[list[str], Tensor]]:
    """``(names, parameter)`` for each trainable tensor outside LoRA, with every name it has (a tied head: two)."""
    found: dict[int, tuple[list[str], Tensor]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        if param.requires_grad and ".lora_" not in name:
            found.setdefault(id(param), ([], param))[0].append(name)
    return list(found.values())


def _conv1d_targets(root: nn.Module) -> bool:
    """Whether LoRA sits on a ``Conv1D`` (GPT-2), NF4 or float: PEFT's ``fan_in_fan_out``, so that the adapter merges
    right into a float ``Conv1D`` base ([in, out]); PEFT turns it off itself for any ``nn.Linear`` target."""
    return any(getattr(layer.get_base_layer(), "stored_transposed", False) or getattr(layer, "fan_in_fan_out", False)
               for _, layer in lora_layers(root))


def _ties_saved(root: nn.Module) -> bool:
    """Whether a tensor trained in full is saved under two names (a tied embedding and head): PEFT must tie them."""
    return any(len(names) > 1 for names, _ in _trained_in_full(root))


def own_lora_config(root: nn.Module, adapter_name: str) -> Optional[LoraConfig]:
    """The ``LoraConfig`` PEFT recorded on the model it wrapped (``get_peft_model``, ``inject_adapter_in_model``)."""
    config = getattr(root, "peft_config", None)
    own = config.get(adapter_name) if isinstance(config, dict) else None
    return own if isinstance(own, LoraConfig) else None


_CARRIED = ("use_rslora", "rank_pattern", "alpha_pattern", "lora_bias")
# settings whose trained weights an adapter folder cannot hold, with PEFT's defaults
_UNEXPORTED = (("trainable_token_indices", None), ("layer_replication", None), ("target_parameters", None))


def unexported_settings(own: LoraConfig) -> list[str]:
    """``key=value`` for each setting of a model's own LoRA config that trains weights the adapter folder cannot hold
    (it holds LoRA weights, modules trained in full and trained biases only)."""
    return [f"{key}={getattr(own, key)!r}" for key, default in _UNEXPORTED if getattr(own, key, default) != default]


def _carried(own: Optional[LoraConfig]) -> dict[str, Any]:
    """What a model's own LoRA config sets beyond rank, alpha and targets that PEFT needs to load the adapter as
    trained: rsLoRA's scaling, per-layer ranks and alphas, trained biases (``bias``, ``lora_bias``), and an init
    that rewrites the base (OLoRA, PiSSA), which PEFT repeats on the float base as it loads."""
    if own is None:
        return {}
    out = {key: getattr(own, key) for key in _CARRIED if getattr(own, key, None)}
    if own.bias != "none":  # the biases it trains are in the folder; PEFT loads them only when the config says so
        out["bias"] = own.bias
    if isinstance(own.init_lora_weights, str):
        out["init_lora_weights"] = own.init_lora_weights
    return out


def _whole(param: Tensor) -> Tensor:
    """The parameter's full value; for an FSDP-sharded one, gathered (a collective: every rank must ask)."""
    full_tensor = getattr(param, "full_tensor", None)
    return (full_tensor() if full_tensor is not None else param).detach()


def write_adapter(
    module: nn.Module,
    folder: Optional[Path],
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    adapter_name: str = "default",
    modules_to_save: Optional[list[str]] = None,
) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` into ``folder``, loadable by ``PeftModel.from_pretrained``.
    The adapters are gathered first (a collective for a sharded model); with ``folder=None`` nothing is written."""
    hf, root = export_root(module)
    wrapped = [name for name, layer in root.named_modules() if is_param_wrapper(layer)]
    if wrapped:
        raise ValueError(
            f"{wrapped[0]} carries PEFT's target_parameters LoRA, which this adapter folder cannot describe. Write the adapter "
            "with PEFT's own model.save_pretrained(folder) (it loads on the float base with PeftModel.from_pretrained), and "
            "the merged float model with lightning_nf4.export.save_merged."
        )
    own = own_lora_config(root, adapter_name)
    tensors = adapter_tensors(root, adapter_name, tuple(modules_to_save or ()), own.bias if own is not None else "none")
    if folder is None:
        return
    if not any(".lora_" in k for k in tensors):
        raise RuntimeError("The model has no LoRA adapter to save; was LoRACallback set up on it?")
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=own.lora_dropout if own is not None else lora_dropout,
        target_modules=_target_names(root), modules_to_save=modules_to_save or None, task_type=_task_type(hf),
        ensure_weight_tying=_ties_saved(root), fan_in_fan_out=_conv1d_targets(root),
        use_dora=any(getattr(layer, "lora_magnitude_vector", None) for _, layer in lora_layers(root)),
        base_model_name_or_path=getattr(getattr(hf, "config", None), "_name_or_path", None) or None, **_carried(own),
    )
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_adapter(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    adapter_name: str = "default",
    modules_to_save: Optional[list[str]] = None,
    write: bool = True,
) -> Optional[Path]:
    """The PEFT adapter folder at ``path``, replaced as a whole. For a sharded model every rank calls it (the
    adapters are gathered) and only the one with ``write`` writes."""
    kwargs = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, adapter_name=adapter_name, modules_to_save=modules_to_save)
    if not write:
        write_adapter(module, None, **kwargs)
        return None
    return _publish_one(path, lambda folder: write_adapter(module, folder, **kwargs))


def _publish_one(path: str | os.PathLike, writer: Any) -> Path:
    path = Path(path)
    return publish(path.parent, {path.name: writer})[path.name]


def _task_type(hf: Optional[nn.Module]) -> Optional[str]:
    if hf is None:
        return None
    try:
        from transformers import GenerationMixin
    except ImportError:  # pragma: no cover
        return None
    return "CAUSAL_LM" if isinstance(hf, GenerationMixin) else None


def merged_state_dict(
    root: nn.Module, dtype: Optional[torch.dtype] = None, stop: Optional[Any] = None, held: Optional[torch.dtype] = None,
) -> dict[str, Tensor]:
    """Float state dict with every NF4 base dequantized and every LoRA delta merged into it, in ``dtype`` or else as
    the model holds its weights: what trained (kept in float32 for the optimizer) in ``held``, by default
    ``held_dtype(root)``. ``stop(child)``: submodules to leave out (the nested sharding units when one FSDP unit is
    merged at a time)."""
    out: dict[str, Tensor] = {}
    deltas: dict[str, Tensor] = {}  # PEFT's target_parameters updates, by the key of the parameter they add to
    held = held or (held_dtype(root) if dtype is None else None)  # with a dtype named, everything is written in it

    cast: dict[int, Tensor] = {}  # a tensor shared by two names (a tied head) stays one tensor when cast

    def written(tensor: Tensor, param: Tensor, whole: bool = False) -> Tensor:
        """``tensor`` (made from ``param``; ``whole``: its value) in the dtype the export writes it in."""
        target = dtype or (held if param.requires_grad and held is not None else param.dtype)
        if not tensor.is_floating_point() or tensor.dtype == target:
            return tensor
        if not whole:
            return tensor.to(target)
        if id(param) not in cast:
            cast[id(param)] = tensor.to(target)
        return cast[id(param)]

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, ModulesToSaveWrapper):  # PEFT's modules_to_save: the active trained copy, by the module's own name
            names = [] if getattr(module, "disable_adapters", False) else list(module.active_adapters)
            active = names[0] if names and names[0] in module.modules_to_save else None
            visit(module.modules_to_save[active] if active is not None else module.original_module, prefix)
            return
        if is_param_wrapper(module):  # PEFT's target_parameters LoRA (on stacked experts): updates added to the weights
            visit(_collect_param_deltas(module, prefix, deltas), prefix)
            return
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = _merged_weight(module, base)
            weight = base.float_layout(weight) if isinstance(base, NF4Linear) else weight
            out[prefix + "weight"] = weight.contiguous().to(dtype or _original_dtype(base))
            bias = _merged_bias(module)
            if bias is not None:
                out[prefix + "bias"] = written(bias, base.bias if base.bias is not None else bias)
            return
        if isinstance(module, NF4Linear):
            out[prefix + "weight"] = module.float_layout(module.dequantize(dtype)).contiguous()
            if module.bias is not None:
                out[prefix + "bias"] = written(module.bias.detach(), module.bias)
            return
        for name, param in module.named_parameters(recurse=False):
            delta = deltas.pop(prefix + name, None)
            if delta is not None:
                out[prefix + name] = _with_delta(param, delta, dtype)
                continue
            if isinstance(param, NF4Tensor):  # a stacked expert weight, in the dtype it was quantized from
                out[prefix + name] = param.quant.dequantize(dtype).contiguous()
                continue
            out[prefix + name] = written(_whole(param), param, whole=True)  # _whole: a table sharded by hand (vocab_parallel), gathered
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                out[prefix + name] = buf.detach()
        for name, child in module.named_children():
            if stop is None or not stop(child):
                visit(child, prefix + name + ".")

    visit(root, "")
    return out


def save_merged_sharded(module: nn.Module, path: str | os.PathLike, dtype: Optional[torch.dtype] = None, *, write: bool) -> Optional[Path]:
    """The merged float model of an FSDP2-sharded module at ``path`` (see ``write_merged_sharded``); every rank
    calls it, the one with ``write`` writes."""
    if not write:
        write_merged_sharded(module, None, dtype)
        return None
    return _publish_one(path, lambda folder: write_merged_sharded(module, folder, dtype))


def write_merged_sharded(module: nn.Module, folder: Optional[Path], dtype: Optional[torch.dtype] = None) -> None:
    """The merged float model of an FSDP2-sharded module, one sharding unit at a time: every rank gathers the
    unit (a collective), the writer (the rank given a ``folder``) merges it and writes it as one safetensors
    file, the unit is freed. No rank or host ever holds more than one unit in float. Writes a Hugging Face
    folder with a sharded index for transformers models."""
    import json

    from torch.distributed.fsdp import FSDPModule

    hf, root = export_root(module)
    prefix = root_prefix(module)  # the same names as ``write_merged``
    owners = [(n, m) for n, m in module.named_modules() if isinstance(m, FSDPModule)]
    tie = hf is not None and getattr(hf.config, "tie_word_embeddings", False)
    # LoRA on a tied head: the merged head is no longer the table, so both are written and the config says untied
    untie = tie and isinstance(hf.get_output_embeddings(), LoraLayer)
    tied = set(getattr(hf, "_tied_weights_keys", None) or []) if tie and not untie else set()
    write, tmp = folder is not None, folder
    weight_map: dict[str, str] = {}
    total = 0
    held = dtype or held_dtype(module)  # before the units are merged one at a time (a unit may hold no NF4 weight)
    written: Optional[torch.dtype] = None
    with ExitStack() as saving:  # the checkpoint's layout, looked up once for all units
        layout = saving.enter_context(checkpoint_layout(hf)) if write and hf is not None else None
        for index, (name, owner) in enumerate(owners):
            owner.unshard()
            try:
                with torch.no_grad():
                    local = merged_state_dict(owner, dtype, stop=lambda child: isinstance(child, FSDPModule), held=held)
                full_prefix = (name + "." if name else "")
                state = {}
                for key, value in local.items():
                    key = full_prefix + key
                    if key.startswith(prefix) and key[len(prefix):] not in tied:
                        # a copy: views of the gathered parameters die with reshard() below
                        state[key[len(prefix):]] = value.detach().to("cpu", copy=True).contiguous()
            finally:
                owner.reshard()
            if write and state:
                written = written or held or _written_dtype(state)
                if layout is not None:
                    state = layout(state)
                file = f"model-{index + 1:05d}-of-{len(owners):05d}.safetensors"
                save_file(_untie(state), str(tmp / file), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(state, file))
                total += sum(v.numel() * v.element_size() for v in state.values())
    if write:
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        if hf is not None:
            # architectures as save_pretrained records it, by the class FSDP2 wraps (loaders such as vLLM read it)
            with _float_config(hf.config, untie=untie, architectures=[unsharded_class(hf).__name__]):
                hf.config.save_pretrained(str(tmp))
            _record_dtype(tmp / "config.json", written)
            if getattr(hf, "generation_config", None) is not None:
                hf.generation_config.save_pretrained(str(tmp))


@contextmanager
def checkpoint_layout(hf: nn.Module) -> Iterator[Callable[[dict[str, Tensor]], dict[str, Tensor]]]:
    """While open, a function that puts a float state (whole weights, under the model's names) in the layout the
    architecture's checkpoints use, as ``save_pretrained`` writes it: transformers 5's conversions reversed (stacked
    experts back to one matrix per expert, renamed keys back). So an export written one sharding unit at a time has
    the keys of one written whole."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers before 5: keys as the model holds them
        yield lambda state: state
        return
    with saving_experts_per_expert(hf), _conversions_of_unsharded_class(hf):
        yield lambda state: dict(revert_weight_conversion(hf, state))


def unsharded_class(module: nn.Module) -> type:
    """The module's class, or for one FSDP2 sharded (which gives it a class of its own, ``FSDPLlamaForCausalLM``) the
    class it wraps."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


@contextmanager
def _conversions_of_unsharded_class(hf: nn.Module) -> Iterator[None]:
    """transformers looks an architecture's conversions up by the model's class, and takes the class FSDP2 gives a
    sharded model (``FSDPMixtralForCausalLM``) for custom code, which has none. While saving, the model carries those
    of the class it wraps (its own ``_weight_conversions``, from a load, come first)."""
    from torch.distributed.fsdp import FSDPModule

    if "_weight_conversions" in vars(hf) or not isinstance(hf, FSDPModule):
        yield
        return
    from transformers.conversion_mapping import get_model_conversion_mapping

    with torch.device("meta"):
        unsharded = unsharded_class(hf)(hf.config)  # no storage: only its class and module names are read
    # as save_pretrained reverses them for a model from_pretrained did not load (no prefix changes)
    hf._weight_conversions = [t for t in get_model_conversion_mapping(unsharded, add_legacy=False) if type(t).__name__ != "PrefixChange"]
    try:
        yield
    finally:
        del hf._weight_conversions


@contextmanager
def _float_config(config: Any, untie: bool = False, architectures: Optional[list[str]] = None) -> Iterator[None]:
    """The config as a merged (float) model's while it is saved, restored after: no ``quantization_config``;
    ``use_cache`` on (training turns it off); with ``untie``, ``tie_word_embeddings`` off as well (the merged head is
    no longer the embedding table); ``architectures`` when given. The dtype written is recorded after
    (``_record_dtype``)."""
    saved = {k: getattr(config, k) for k in ("quantization_config",) if hasattr(config, k)}
    for k in saved:
        delattr(config, k)
    changes: dict[str, Any] = {"tie_word_embeddings": False} if untie else {}
    if hasattr(config, "use_cache"):
        changes["use_cache"] = True
    if architectures is not None:
        changes["architectures"] = architectures
    before = {k: getattr(config, k, None) for k in changes}
    for k, v in changes.items():
        setattr(config, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(config, k, v)
        for k, v in before.items():
            setattr(config, k, v)


def _head_untied(hf: nn.Module, state: dict[str, Tensor]) -> bool:
    """Whether a model saved with tied embeddings has a merged head that differs from its table (LoRA on a tied
    ``lm_head``): its config must then say untied, or loaders tie the two again and drop the trained head."""
    if not getattr(hf.config, "tie_word_embeddings", False):
        return False
    head, table = hf.get_output_embeddings(), hf.get_input_embeddings()
    names = {id(m): n for n, m in hf.named_modules()}
    keys = [f"{names[id(m)]}.weight" if id(m) in names else None for m in (head, table)]
    if None in keys or not all(k in state for k in keys):
        return False
    return not torch.equal(state[keys[0]], state[keys[1]])


def _record_dtype(config_file: Path, dtype: Optional[torch.dtype]) -> None:
    """The dtype of the merged tensors (``merged_dtype``) in the saved config: ``save_pretrained`` records the model's
    own parameters' dtype, and transformers loads in the recorded one."""
    import json

    if dtype is None or not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def held_dtype(root: nn.Module) -> Optional[torch.dtype]:
    """The dtype the model holds its weights in: the one its NF4 weights were quantized from, else the most common
    among its frozen float weights (a float LoRA baseline). None without either."""
    counts: dict[torch.dtype, int] = {}
    for module in root.modules():
        for param in module.parameters(recurse=False):
            local = getattr(param, "_local_tensor", param)  # an FSDP2 shard
            if isinstance(local, NF4Tensor):
                return local.quant.dtype
            if not param.requires_grad and param.is_floating_point():
                counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
        if isinstance(module, NF4Linear) and module._quant is not None:
            return module._quant.dtype
    return max(counts, key=counts.__getitem__) if counts else None


def _written_dtype(state: dict[str, Tensor]) -> Optional[torch.dtype]:
    return next((v.dtype for v in state.values() if v.is_floating_point()), None)


def _original_dtype(base: nn.Module) -> torch.dtype:
    return base.quant.dtype if isinstance(base, NF4Linear) else base.weight.dtype


def _collect_param_deltas(wrapper: LoraLayer, prefix: str, deltas: dict[str, Tensor]) -> nn.Module:
    """The deltas of the active adapters of one or more nested ``ParamWrapper`` (one per targeted parameter), summed in
    float32 into ``deltas`` under their parameters' keys; returns the module they wrap."""
    layer: nn.Module = wrapper
    while is_param_wrapper(layer):
        key = prefix + layer.parameter_name
        for name in _unmerged(layer):
            if name in layer.lora_A:
                delta = layer.get_delta_weight(name).float()
                deltas[key] = deltas[key] + delta if key in deltas else delta
        layer = layer.base_layer
    return layer


def _with_delta(param: Tensor, delta: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """``param`` (dequantized, if NF4) plus ``delta`` in float32, then in ``dtype`` or the parameter's own (an NF4
    one's: the dtype it was quantized from)."""
    nf4 = isinstance(param, NF4Tensor)
    value = param.quant.dequantize(torch.float32) if nf4 else param.detach().float()
    return (value + delta.to(value.device)).to(dtype or (param.quant.dtype if nf4 else param.dtype)).contiguous()


def _merged_weight(layer: LoraLayer, base: nn.Module) -> Tensor:
    if isinstance(layer, NF4LoraLinear):
        return layer.merged_weight(torch.float32)
    # PEFT's own LoRA layer around a base NF4Precision quantized (a model that carried LoRA before the conversion).
    # Its delta follows its fan_in_fan_out (True on a Conv1D: [in, out]); an NF4 base dequantizes [out, in].
    nf4 = isinstance(base, NF4Linear)
    weight = base.dequantize(torch.float32) if nf4 else base.weight.detach().float()
    for name in _unmerged(layer):
        variant = getattr(layer, "lora_variant", {}).get(name)
        if variant is not None and not nf4:  # PEFT's DoRA on a float base: PEFT's own merge, on a copy
            weight = variant.merge_safe(layer, name, weight)
        elif name in layer.lora_A:
            delta = layer.get_delta_weight(name).float()
            weight = weight + (delta.t() if nf4 and getattr(layer, "fan_in_fan_out", False) else delta)
    return weight


def _unmerged(layer: LoraLayer) -> list[str]:
    """The active adapters whose update is not in the base yet (``merge_adapter`` put the others there)."""
    return [name for name in layer.active_adapters if name not in layer.merged_adapters]


def _merged_bias(layer: LoraLayer) -> Optional[Tensor]:
    """The base bias plus the ``lora_bias=True`` adapters' ``scaling * lora_B.bias``, as PEFT merges it."""
    if isinstance(layer, NF4LoraLinear):
        return layer.merged_bias(torch.float32)
    return bias_with_updates(layer, _unmerged(layer))


def write_merged(module: nn.Module, folder: Path, dtype: Optional[torch.dtype] = None) -> None:
    """A float model with adapters merged into ``folder``: a Hugging Face folder (``save_pretrained``) for HF
    models, else ``model.safetensors`` holding the module's state dict."""
    hf, root = export_root(module)
    held = dtype or held_dtype(root)
    with torch.no_grad():
        state = {k: v.contiguous().cpu() for k, v in merged_state_dict(root, dtype, held=held).items()}
    if hf is not None:
        written = held or _written_dtype(state)  # before save_pretrained, which may take tensors out of the dict
        with _float_config(hf.config, untie=_head_untied(hf, state)), saving_experts_per_expert(hf):
            hf.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
        _record_dtype(folder / "config.json", written)
    else:
        save_file(_untie(state), str(folder / "model.safetensors"), metadata={"format": "pt"})


def save_merged(module: nn.Module, path: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> Path:
    """The merged float model (``write_merged``) at ``path``, replaced as a whole."""
    return _publish_one(path, lambda folder: write_merged(module, folder, dtype))


def save_export(
    module: nn.Module,
    out_dir: str | os.PathLike,
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    adapter_name: str = "default",
    modules_to_save: Optional[list[str]] = None,
    merged: bool = True,
    dtype: Optional[torch.dtype] = None,
    tokenizer: Any = None,
    info: Optional[dict[str, Any]] = None,
    write: bool = True,
) -> Optional[dict[str, Path]]:
    """``out_dir/adapter`` and ``out_dir/merged`` as one set, with ``out_dir/export.json`` (``info``: step, epoch,
    source ...) written last: readers see the previous complete set or this one (``publish.read_export``).
    ``merged/`` is a complete model folder: the tokenizer, when given, is saved into it. A sharded model is
    merged one unit at a time; then every rank calls this and only the one with ``write`` writes."""
    from lightning_nf4.strategies.fsdp import has_sharded_parameters

    sharded = has_sharded_parameters(module)
    kwargs = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, adapter_name=adapter_name, modules_to_save=modules_to_save)

    def write_merged_folder(folder: Optional[Path]) -> None:
        if sharded:
            write_merged_sharded(module, folder, dtype)
        elif folder is not None:
            write_merged(module, folder, dtype)
        if folder is not None and tokenizer is not None:
            tokenizer.save_pretrained(str(folder))

    writers = {PARTS[0]: lambda folder: write_adapter(module, folder, **kwargs)}
    if merged:
        writers[PARTS[1]] = write_merged_folder
    if not write:  # another rank of a sharded model: the same gathers, in the same order, nothing written
        for writer in writers.values():
            writer(None)
        return None
    return publish(out_dir, writers, manifest=dict(info or {}))


def _untie(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses tensors that share memory; tied weights are stored once per key instead.
    seen: dict[Any, str] = {}
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if key in seen else v
        seen.setdefault(key, k)
    return out
