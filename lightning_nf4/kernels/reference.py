"""Plain-PyTorch kernels: correct on every device, and the fallback where no faster kernel exists."""

from __future__ import annotations

from functools import lru_cache

import torch

from lightning_nf4.format.codebooks import midpoints


def quantize_4bit(weight: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax scaling, nearest code (ties to the lower), two codes per byte, even one high."""
    flat = weight.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    absmax_full = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    scaled = flat[:full].view(-1, blocksize) * (1.0 / absmax_full.clamp(min=1e-38)).unsqueeze(1)
    scaled = scaled.reshape(-1)
    absmax = absmax_full
    if full < n:  # the partial last block is normalised by division, as bitsandbytes does
        tail_max = flat[full:].abs().amax()
        absmax = torch.cat([absmax_full, tail_max.view(1)])
        scaled = torch.cat([scaled, flat[full:] / tail_max.clamp(min=1e-38)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, midpoints(code)).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """``code[nibble] * absmax`` in fp32, then one rounding to ``dtype``; returns a flat tensor. Written as
    broadcasts and one table gather, so that under torch.compile the compiler fuses it into one kernel of its
    own (launched from compiled code, without a custom op's host cost: ``ops.COMPILED_DEQUANTIZE``)."""
    flat = packed.reshape(-1, 1)
    nibbles = torch.cat([flat >> 4, flat & 15], dim=1).reshape(-1)[:numel]
    blocks = -(-numel // blocksize)
    scale = absmax[:blocks].reshape(-1, 1).expand(blocks, blocksize).reshape(-1)[:numel]
    return (code[nibbles.long()] * scale).to(dtype)


_LUT_SIZE = 65536


@lru_cache(maxsize=8)
def _nearest_code_lut(code_key: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # bitsandbytes' CPU reference maps a normalised value to one of 65536 evenly spaced grid points
    # and takes the code nearest to that point. Reproducing the grid keeps nested codes bit-identical.
    code = torch.tensor(code_key, dtype=torch.float32, device="cpu")
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device="cpu")) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints(code), grid).to(torch.uint8).to(device)


def nearest_code_lut(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [65536]: the code nearest to each grid point of bitsandbytes' 8-bit rounding grid."""
    return _nearest_code_lut(tuple(code.tolist()), torch.device(device))


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of fp32 statistics with a 256-entry ascending code table."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.clamp(min=1e-38).unsqueeze(1)).reshape(-1)[:n].clamp(-1.0, 1.0)
    grid_index = (((scaled + 1.0) * 0.5) * (_LUT_SIZE - 1) + 0.5).long()
    q = nearest_code_lut(code, flat.device)[grid_index]
    # An all-zero block normalises to 0/0 in bitsandbytes, which lands on code 0; any code decodes to 0.
    zero_block = (absmax == 0).repeat_interleave(blocksize)[:n]
    return torch.where(zero_block, torch.zeros_like(q), q), absmax


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, offset: torch.Tensor
) -> torch.Tensor:
    """Rebuild fp32 statistics: ``code[q] * absmax[i // blocksize] + offset``, rounded twice as bitsandbytes
    does. The product is formed in float64 (exact for two fp32 values) and rounded to fp32 before the offset is
    added, so that no compiler can contract multiply and add into one FMA rounding."""
    n = q.numel()
    blocks = -(-n // blocksize)
    scale = absmax[:blocks].reshape(-1, 1).expand(blocks, blocksize).reshape(-1)[:n]
    product = (code[q.reshape(-1).long()].double() * scale.double()).float()
    return product + offset


def group_members(packed, absmax, numels, nested_absmax, nested_code, offsets):
    """Per weight of a ``dequantize_4bit_group`` call: ``(packed, absmax, numel, nested)``, where
    ``nested`` is ``(nested_absmax, nested_code, offset)``, or three Nones without double quantization."""
    for i, (p, a, n) in enumerate(zip(packed, absmax, numels)):
        yield p, a, n, ((nested_absmax[i], nested_code, offsets[i]) if nested_absmax else (None, None, None))
