"""Reading transformers' ``BitsAndBytesConfig`` into the settings lightning-nf4 loads with."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_nf4.format.quantized import NF4FormatError, float_dtype
from lightning_nf4.plugins.convert import convertible_experts, convertible_kind, kept_by_transformers, kept_in_float_by_model

_DEFAULT_SKIP = ("lm_head",)


@dataclass(frozen=True)
class NF4LoadConfig:
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    skip_modules: tuple[str, ...] = _DEFAULT_SKIP
    blocksize: int = 64
    prequantized: bool = False  # the checkpoint already holds bitsandbytes 4-bit tensors
    listed_only: bool = False  # quantized by a list of its own (a pre-quantized checkpoint's): no defaults added

    def convert_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """``convert_linears``' arguments for ``model``: the layers to keep in float named one by one, chosen by
        transformers' own reading of ``llm_int8_skip_modules`` so that a saved config means the same to both."""
        return dict(blocksize=self.blocksize, double_quant=self.double_quant, compute_dtype=self.compute_dtype,
                    skip_modules=skipped_by_transformers(model, self.kept_float(model)))

    def kept_float(self, model: nn.Module) -> tuple[str, ...]:
        """``skip_modules``, the model's ``_keep_in_fp32_modules`` (as patterns, and the modules they keep by transformers'
        reading, where a ``name.weight`` entry keeps module ``name``: LongcatFlash's router, whose code reads its weight),
        and what transformers keeps in float by itself unless a pre-quantized checkpoint lists its own: the output
        embeddings and weights tied to others, whatever their names (BERT's ``cls.predictions.decoder``, XLNet's
        ``lm_loss``, BioGPT's ``output_projection``)."""
        defaults = [] if self.listed_only else _output_and_tied(model)
        fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
        return tuple(dict.fromkeys([*self.skip_modules, *defaults, *fp32, *kept_in_float_by_model(model)]))

    def kept_float_experts(self, model: nn.Module) -> tuple[str, ...]:
        """The stacked MoE expert weights kept in float: those whose experts module (or ``module.param`` path) the
        ``kept_float`` patterns name by transformers' reading, the one the linears follow (regexes included)."""
        patterns = self.kept_float(model)
        return tuple(dict.fromkeys(
            name for module_name, _, attr in convertible_experts(model, ())
            for name in (module_name, f"{module_name}.{attr}") if kept_by_transformers(name, patterns)
        ))

    def to_bnb_config(self, model: nn.Module) -> Any:
        """``model``'s ``config.quantization_config`` as transformers sets it on bnb-4bit models: a
        ``BitsAndBytesConfig`` (code reads ``.load_in_4bit``, ``.bnb_4bit_compute_dtype``), naming every module kept in
        float, so that transformers + bitsandbytes reads the same layers as quantized from the saved config."""
        from transformers import BitsAndBytesConfig  # its checks need no bitsandbytes

        return BitsAndBytesConfig.from_dict({
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": list(self.kept_float(model)),
        })


def _output_and_tied(model: nn.Module) -> list[str]:
    """transformers' ``get_keys_to_not_convert``: the output embeddings, tied weights and the last module."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:
        return []
    try:
        return sorted(get_keys_to_not_convert(model))
    except (AttributeError, TypeError):  # not a transformers model
        return []


def skipped_by_transformers(model: nn.Module, patterns: Sequence[str]) -> tuple[str, ...]:
    """The names of ``model``'s linears that transformers leaves unquantized for ``llm_int8_skip_modules=patterns``:
    it asks for each linear by its own name (a parent's name matching covers nothing by itself)."""
    return tuple(n for n, m in model.named_modules() if convertible_kind(m) and kept_by_transformers(n, patterns))


def _as_dict(config: Any) -> Optional[dict[str, Any]]:
    if config is None:
        return None
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"quantization_config must be a transformers.BitsAndBytesConfig or a dict, got {type(config).__name__}.")


def _dtype(value: Any) -> torch.dtype:
    if value is None:  # BitsAndBytesConfig's default, so that its dict means the same as the object
        return torch.float32
    dtype = float_dtype(value)
    if dtype is None:
        raise NF4FormatError(f"bnb_4bit_compute_dtype {value!r} is not supported; use bfloat16, float16 or float32.")
    return dtype


_NF4_CONFIG = "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4')"


def _check(settings: dict[str, Any], where: str, saved: bool = False) -> None:
    """Refuse what is not NF4; ``saved``: the checkpoint's own config, whose weights are already quantized so: the
    fix is its float original, not another request."""
    fix = (f"Load the model's float (unquantized) checkpoint with quantization_config={_NF4_CONFIG} instead." if saved
           else f"Use {_NF4_CONFIG}.")
    if settings.get("quant_method", "bitsandbytes") != "bitsandbytes":
        raise NF4FormatError(f"{where}: quant_method {settings['quant_method']!r} is not supported; lightning-nf4 reads bitsandbytes NF4. {fix}")
    if settings.get("load_in_8bit"):
        raise NF4FormatError(f"{where}: load_in_8bit (LLM.int8) is not supported. {fix}")
    if settings.get("load_in_4bit") and "bnb_4bit_quant_type" not in settings:  # a dict reads as BitsAndBytesConfig does
        raise NF4FormatError(
            f"{where} sets load_in_4bit without bnb_4bit_quant_type, which BitsAndBytesConfig (and so transformers) reads "
            f"as 'fp4'; only 'nf4' is supported. " + (fix if saved else "Add bnb_4bit_quant_type='nf4'.")
        )
    quant_type = settings.get("bnb_4bit_quant_type", "nf4")
    if settings.get("load_in_4bit") and quant_type != "nf4":
        raise NF4FormatError(f"{where}: bnb_4bit_quant_type={quant_type!r} is not supported; only 'nf4' is. {fix}")


def parse_quantization_config(requested: Any, saved: Any) -> Optional[NF4LoadConfig]:
    """What to load: ``requested`` (the caller's config) or ``saved`` (a pre-quantized checkpoint's)."""
    requested_dict, saved_dict = _as_dict(requested), _as_dict(saved)
    if requested_dict is not None:
        _check(requested_dict, "quantization_config")
    if saved_dict is not None and saved_dict.get("quant_method", "bitsandbytes") == "bitsandbytes":
        _check(saved_dict, "the checkpoint's quantization_config", saved=True)
        if saved_dict.get("load_in_4bit"):
            _warn_overridden(requested_dict, saved_dict)
            compute = {k: v for k, v in (requested_dict or {}).items() if k == "bnb_4bit_compute_dtype"}
            return _settings({**saved_dict, **compute}, prequantized=True)
    if requested_dict is None or not requested_dict.get("load_in_4bit"):
        return None
    return _settings(requested_dict, prequantized=False)


def _warn_overridden(requested: Optional[dict[str, Any]], saved: dict[str, Any]) -> None:
    """The codes are already quantized: the checkpoint's settings are the ones that hold (only the compute dtype is
    the caller's), as in transformers, which warns likewise."""
    if requested is None:
        return
    keys = ("bnb_4bit_use_double_quant", "bnb_4bit_quant_type", "llm_int8_skip_modules")
    differ = [k for k in keys if k in requested and requested[k] != saved.get(k) and not (k == "llm_int8_skip_modules" and requested[k] is None)]
    if differ:
        warnings.warn(
            f"The checkpoint is already quantized with {', '.join(f'{k}={saved.get(k)!r}' for k in differ)}; the "
            f"quantization_config's {', '.join(f'{k}={requested[k]!r}' for k in differ)} cannot change that and is ignored "
            "(only bnb_4bit_compute_dtype is taken from it).",
            stacklevel=4,
        )


def _settings(settings: dict[str, Any], prequantized: bool) -> NF4LoadConfig:
    storage = str(settings.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")
    if not prequantized and storage != "uint8":
        warnings.warn(
            f"bnb_4bit_quant_storage={storage!r} is ignored: lightning-nf4 keeps NF4 codes as uint8 (NF4FSDPStrategy shards "
            "them as bytes; the storage dtype is a bitsandbytes + FSDP1 workaround), and save_pretrained records uint8.",
            stacklevel=4,
        )
    skip = settings.get("llm_int8_skip_modules")
    # A pre-quantized checkpoint was quantized by its own list: transformers keeps lm_head in float only when the
    # list is left unset, and quantizes it when a list leaves it out. Quantizing here, lm_head always stays float.
    keep = list(skip) if prequantized and skip is not None else [*_DEFAULT_SKIP, *(skip or [])]
    return NF4LoadConfig(
        double_quant=bool(settings.get("bnb_4bit_use_double_quant", False)),
        compute_dtype=_dtype(settings.get("bnb_4bit_compute_dtype")),
        skip_modules=tuple(dict.fromkeys(keep)),
        prequantized=prequantized,
        listed_only=prequantized and skip is not None,
    )
