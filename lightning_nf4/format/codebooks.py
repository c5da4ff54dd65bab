"""Code tables of the bitsandbytes 4-bit and 8-bit formats.

The values are the exact fp32 numbers bitsandbytes stores in ``quant_map`` / ``nested_quant_map``, so
that packed codes mean the same thing in both libraries.
"""

from __future__ import annotations

from functools import lru_cache

import torch

# NormalFloat4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], exact zero included.
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

QUANT_TYPES = ("nf4",)


@lru_cache(maxsize=None)
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32, device="cpu")  # cached: never on an ambient (meta) device
    raise ValueError(f"Unknown 4-bit quant_type {quant_type!r}; expected one of {QUANT_TYPES}.")


def code_table(quant_type: str = "nf4", device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry fp32 code table for ``quant_type`` (a fresh tensor, safe to store in a state dict)."""
    return _code_cpu(quant_type).to(device=device, copy=True)


@lru_cache(maxsize=None)
def _signed_dynamic_map_cpu() -> torch.Tensor:
    # 8-bit "dynamic" map (Dettmers 2015): one sign bit, a unary exponent (decades 1e-6 .. 1e0) and a
    # linear fraction whose resolution doubles with each decade; plus exact 0 and 1. 127 magnitudes,
    # mirrored for negatives, in ascending order. Arithmetic is fp32 as in bitsandbytes, for equal bits.
    values: list[float] = [0.0, 1.0]
    for decade in range(7):
        steps = 2**decade
        edges = torch.linspace(0.1, 1.0, steps + 1, dtype=torch.float32, device="cpu")
        centres = (edges[:-1] + edges[1:]) / 2.0
        magnitudes = ((10 ** (decade - 6)) * centres).tolist()
        values.extend(magnitudes)
        values.extend(-m for m in magnitudes)
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32, device="cpu")


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 ascending fp32 values), used for double quantization."""
    return _signed_dynamic_map_cpu().to(device=device, copy=True)


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """Decision thresholds of an ascending code table: a value equal to a threshold rounds down."""
    return (code[:-1] + code[1:]) / 2
