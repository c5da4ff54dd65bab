"""The bitsandbytes state-dict layout of a 4-bit weight, both directions.

For a layer ``L`` bitsandbytes (and transformers' pre-quantized "bnb-4bit" checkpoints) store
``L.weight`` (packed uint8 ``[numel / 2, 1]``) and, under ``L.weight.``, ``absmax``, ``quant_map``,
``nested_absmax``, ``nested_quant_map`` and ``quant_state.bitsandbytes__nf4`` (UTF-8 JSON bytes).
"""

from __future__ import annotations

import json
import math
from typing import Optional

import torch
from torch import Tensor

from lightning_nf4.format.quantized import NestedStats, NF4FormatError, NF4Weight

QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"
QUANT_STATE_KEY = QUANT_STATE_PREFIX + "nf4"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def to_bnb_tensors(weight: NF4Weight) -> dict[str, Tensor]:
    """Suffix -> tensor; the suffix ``""`` is the packed weight itself, the others follow ``weight.``."""
    meta = {
        "quant_type": weight.quant_type,
        "blocksize": weight.blocksize,
        "dtype": _DTYPE_NAMES[weight.dtype],
        "shape": list(weight.shape),
    }
    out = {"": weight.packed, "absmax": weight.absmax, "quant_map": weight.code}
    if weight.nested is not None:
        out["nested_absmax"] = weight.nested.absmax
        out["nested_quant_map"] = weight.nested.code
        meta.update(
            nested_blocksize=weight.nested.blocksize,
            nested_dtype="float32",
            nested_offset=float(weight.nested.offset) if weight.nested.offset.device.type != "meta" else 0.0,
        )
    payload = json.dumps(meta).encode("utf-8")
    out[QUANT_STATE_KEY] = torch.tensor(list(payload), dtype=torch.uint8, device=weight.packed.device)
    return out


def is_bnb_quantized(tensors: dict[str, Tensor]) -> bool:
    return any(k.startswith(QUANT_STATE_PREFIX) for k in tensors)


def required_parts(state: Tensor) -> Optional[set[str]]:
    """The tensor suffixes a 4-bit weight with this quant-state blob needs beside its codes; None when the
    blob is unreadable (``from_bnb_tensors`` reports that, naming the layer, when the weight loads)."""
    try:
        meta = json.loads(bytes(state.reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return {"absmax", "quant_map"} | ({"nested_absmax", "nested_quant_map"} if "nested_offset" in meta else set())


def _decode_meta(raw: Tensor, name: str) -> dict:
    try:
        meta = json.loads(bytes(raw.detach().cpu().to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NF4FormatError(f"{name}.{QUANT_STATE_KEY} is corrupted (not UTF-8 JSON: {err}); re-export the checkpoint.") from err
    if not isinstance(meta, dict):
        raise NF4FormatError(f"{name}.{QUANT_STATE_KEY} is corrupted (JSON is not an object); re-export the checkpoint.")
    return meta


_NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")
_NESTED_TENSORS = ("nested_absmax", "nested_quant_map")
_FIX = "the checkpoint is corrupted or from an unknown writer; re-export it (or re-quantize the float model)."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_blocksize(value: object) -> bool:
    return _is_int(value) and 32 <= value <= 4096 and not value & (value - 1)


def _is_offset(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:
        return False


_FIELD_CHECKS = {
    "quant_type": (lambda v: isinstance(v, str), "a string ('nf4')"),
    "blocksize": (_is_blocksize, "a power-of-two integer between 32 and 4096"),
    "dtype": (lambda v: isinstance(v, str) and v in _DTYPES, f"one of {sorted(_DTYPES)}"),
    "shape": (lambda v: isinstance(v, list) and len(v) > 0 and all(_is_int(d) and d > 0 for d in v), "a non-empty list of positive integers"),
    "nested_blocksize": (_is_blocksize, "a power-of-two integer between 32 and 4096 (bitsandbytes writes 256)"),
    "nested_dtype": (lambda v: v == "float32", "'float32'"),
    "nested_offset": (_is_offset, "a finite number >= 0 (the mean of the original absmax)"),
}


def _check_fields(meta: dict, fields: tuple[str, ...], name: str) -> None:
    """Each of ``fields`` is present in the quant-state JSON and of the right type and range."""
    for field in fields:
        if field not in meta:
            raise NF4FormatError(f"{name}.{QUANT_STATE_KEY} lacks the field '{field}'; {_FIX}")
        valid, expected = _FIELD_CHECKS[field]
        if not valid(meta[field]):
            raise NF4FormatError(f"{name}.{QUANT_STATE_KEY}: field '{field}' is {meta[field]!r}, expected {expected}; {_FIX}")


def _is_nested(meta: dict, tensors: dict[str, Tensor], name: str) -> bool:
    """Whether the weight is double-quantized; the JSON, the absmax dtype and the nested tensors must agree."""
    absmax_dtype = tensors["absmax"].dtype
    if any(k in meta for k in _NESTED_FIELDS):
        _check_fields(meta, _NESTED_FIELDS, name)
        if absmax_dtype != torch.uint8:
            raise NF4FormatError(
                f"{name}.absmax is {absmax_dtype}, but {name}.{QUANT_STATE_KEY} says double-quantized, which stores "
                f"absmax as uint8 codes; {_FIX}"
            )
        return True
    if absmax_dtype == torch.uint8:
        raise NF4FormatError(
            f"{name}.absmax is uint8 (double-quantized scale codes), but {name}.{QUANT_STATE_KEY} lacks the nested "
            f"fields {list(_NESTED_FIELDS)} needed to decode them; {_FIX}"
        )
    stray = [f"{name}.{k}" for k in _NESTED_TENSORS if k in tensors]
    if stray:
        raise NF4FormatError(
            f"{name}: found {stray}, but {name}.{QUANT_STATE_KEY} has no nested fields and {name}.absmax is "
            f"{absmax_dtype}, so the weight is not double-quantized; the tensors come from different weights: {_FIX}"
        )
    if not absmax_dtype.is_floating_point:
        raise NF4FormatError(f"{name}.absmax is {absmax_dtype}; a weight without double quantization stores float scales. {_FIX}")
    return False


def _check_values(name: str, code: Tensor, absmax: Optional[Tensor], nested: Optional[NestedStats], expect) -> None:
    """The values a damaged file gets wrong without changing any size: the code tables are fixed (NF4's 16 levels,
    bitsandbytes' dynamic map for nested scales), and scales are finite and not negative. A flipped bit in the codes
    or inside a scale's range cannot be told from data; these can, at the cost of one pass over the scales."""
    if code.is_meta:
        return
    from lightning_nf4.format.codebooks import code_table, dynamic_map

    expect(torch.equal(code, code_table("nf4", code.device)), "quant_map is not NF4's table of 16 levels")
    if absmax is not None:
        expect(bool(torch.isfinite(absmax).all() and (absmax >= 0).all()), "absmax holds NaN, infinite or negative scales")
    if nested is not None:
        expect(torch.equal(nested.code, dynamic_map(nested.code.device)), "nested_quant_map is not bitsandbytes' dynamic map")
        expect(bool(torch.isfinite(nested.absmax).all() and (nested.absmax >= 0).all()), "nested_absmax holds NaN, infinite or negative scales")
        expect(bool(torch.isfinite(nested.offset)), "the nested offset is not finite")


def from_bnb_tensors(tensors: dict[str, Tensor], name: str = "weight") -> NF4Weight:
    """Rebuild an ``NF4Weight`` from the suffix dict of ``to_bnb_tensors`` (or of a bitsandbytes state dict)."""
    state_keys = [k for k in tensors if k.startswith(QUANT_STATE_PREFIX)]
    if not state_keys:
        raise NF4FormatError(f"{name}: missing key '{name}.{QUANT_STATE_KEY}'; this is not a bitsandbytes 4-bit weight.")
    if state_keys != [QUANT_STATE_KEY]:
        raise NF4FormatError(
            f"{name}: found {state_keys}; only NF4 ('{QUANT_STATE_KEY}') is supported. "
            "Re-quantize the float model with bnb_4bit_quant_type='nf4'."
        )
    meta = _decode_meta(tensors[QUANT_STATE_KEY], name)
    _check_fields(meta, ("quant_type", "blocksize", "dtype", "shape"), name)
    if meta["quant_type"] != "nf4":
        raise NF4FormatError(
            f"{name}.{QUANT_STATE_KEY}: field 'quant_type' is {meta['quant_type']!r}; only 'nf4' is supported. "
            "Re-quantize the float model with bnb_4bit_quant_type='nf4'."
        )

    def check_present(required: list[str]) -> None:
        absent = [f"{name}.{k}" if k else name for k in required if k not in tensors]
        if absent:
            raise NF4FormatError(f"Missing keys for the NF4 weight {name}: {absent}. The checkpoint is incomplete.")

    check_present(["", "absmax", "quant_map"])
    nested = _is_nested(meta, tensors, name)
    if nested:
        check_present(list(_NESTED_TENSORS))

    blocksize = meta["blocksize"]
    shape = torch.Size(meta["shape"])
    numel = math.prod(shape)
    num_blocks = -(-numel // blocksize)
    packed = tensors[""].detach()
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8: same bytes, other view
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.reshape(-1, 1)
    absmax = tensors["absmax"].detach().reshape(-1)
    code = tensors["quant_map"].detach().reshape(-1).float()

    def expect(cond: bool, what: str) -> None:
        if not cond:
            raise NF4FormatError(f"{name}: {what} (quant state says shape {tuple(shape)}, blocksize {blocksize}); the checkpoint is corrupted or truncated.")

    expect(packed.shape[0] == (numel + 1) // 2, f"packed weight has {packed.shape[0]} bytes, expected {(numel + 1) // 2}")
    expect(absmax.numel() == num_blocks, f"absmax has {absmax.numel()} entries, expected {num_blocks}")
    expect(code.numel() == 16, f"quant_map has {code.numel()} entries, expected 16")
    stats = None
    if nested:
        nested_blocksize = meta["nested_blocksize"]
        nested_absmax = tensors["nested_absmax"].detach().reshape(-1).float()
        nested_code = tensors["nested_quant_map"].detach().reshape(-1).float()
        num_nested = -(-num_blocks // nested_blocksize)
        expect(nested_absmax.numel() == num_nested, f"nested_absmax has {nested_absmax.numel()} entries, expected {num_nested}")
        expect(nested_code.numel() == 256, f"nested_quant_map has {nested_code.numel()} entries, expected 256")
        offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=absmax.device)
        stats = NestedStats(absmax=nested_absmax, code=nested_code, offset=offset, blocksize=nested_blocksize)
    else:
        absmax = absmax.float()
    _check_values(name, code, absmax if not nested else None, stats, expect)
    return NF4Weight(packed=packed, absmax=absmax, code=code, shape=shape, dtype=_DTYPES[meta["dtype"]], blocksize=blocksize, nested=stats)
