"""PEFT LoRA layer for ``NF4Linear``, registered through PEFT's custom-module dispatch.

Without it PEFT would wrap an ``NF4Linear`` in its default ``lora.Linear``, whose merge adds a float
delta onto the packed uint8 codes. Here the base stays packed; merging dequantizes, adds and
re-quantizes (lossy, so it warns); ``merged_weight`` gives the float result without touching the base.
"""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Any, Optional

import torch
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn

from lightning_nf4.format import quantize_nf4
from lightning_nf4.layers.dora import NF4DoraVariant, dora_merge, dora_update
from lightning_nf4.layers.linear import NF4Linear


class NF4LoraLinear(nn.Module, LoraLayer):
    """``NF4Linear`` base plus LoRA adapters ``B @ A * scaling`` (PEFT's parameter names and layout)."""

    fuse_update: bool = True  # eager, under autocast: the update added by the matmul itself (_forward_fused); False: PEFT's mul + add
    fuse_update_compiled: bool = False  # the same under torch.compile, where inductor fuses PEFT's mul + add itself (see forward)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        with warnings.catch_warnings():  # PEFT's shape lookup does not know NF4Linear, whose in/out_features it then reads
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> Optional[NF4DoraVariant]:
        if getattr(config, "alora_invocation_tokens", None) is not None:
            raise ValueError("NF4LoraLinear supports LoRA and DoRA; aLoRA is not implemented for NF4 bases.")
        return NF4DoraVariant() if config.use_dora else None

    def olora_init(self, adapter_name: str) -> None:
        """OLoRA (``init_lora_weights="olora"``) as PEFT runs it on a bitsandbytes 4-bit base: the adapters take the
        rank-r part of the dequantized weight's QR decomposition, and the base is re-quantized from the rest."""
        base: NF4Linear = self.get_base_layer()
        weight = base.dequantize(torch.float32)
        q, r = torch.linalg.qr(weight)
        rank = self.r[adapter_name]
        self.lora_A[adapter_name].weight.data = r[:rank].contiguous()
        self.lora_B[adapter_name].weight.data = q[:, :rank].contiguous()
        residual = weight - self.scaling[adapter_name] * q[:, :rank] @ r[:rank]
        base._set_quant(quantize_nf4(residual.to(base.quant.dtype), base.blocksize, base.double_quant, name="OLoRA residual"))

    def get_delta_weight(self, adapter: str) -> Tensor:
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return (b.float() @ a.float()) * self.scaling[adapter]

    def merged_weight(self, dtype: torch.dtype = torch.float32, adapter_names: Optional[list[str]] = None) -> Tensor:
        """Dequantized base plus the deltas of ``adapter_names`` (default: the active adapters), in ``dtype``; a DoRA
        adapter also rescales the rows to its magnitudes. Adapters already merged into the base are in it already."""
        base = self.get_base_layer().dequantize(torch.float32)
        weight = base
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.merged_adapters:
                continue
            if name in self.lora_magnitude_vector:
                weight = dora_merge(self, name, base, weight, self.get_delta_weight(name))
            elif name in self.lora_A:
                weight = weight + self.get_delta_weight(name)
        return weight.to(dtype)

    def merged_bias(self, dtype: torch.dtype = torch.float32, adapter_names: Optional[list[str]] = None) -> Optional[Tensor]:
        """The base bias plus ``scaling * lora_B.bias`` of ``adapter_names`` (default: the active ones) trained with
        ``lora_bias=True``, as PEFT merges it; None for a base without bias."""
        names = [n for n in (adapter_names if adapter_names is not None else self.active_adapters) if n not in self.merged_adapters]
        merged = bias_with_updates(self, names)
        if merged is None and any(_has_lora_bias(self, n) for n in names):
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        return None if merged is None else merged.to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.lora_A]
        if not adapter_names:  # none of them on this layer: nothing changes here, as in PEFT
            return
        warnings.warn(
            "Merging LoRA into an NF4 base re-quantizes the weight and loses precision; to keep it, export a "
            "float merged model instead (lightning_nf4.export.save_merged).",
            UserWarning,
            stacklevel=2,
        )
        base: NF4Linear = self.get_base_layer()
        merged = self.merged_weight(torch.float32, adapter_names)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights; adapters {adapter_names} seem broken.")
        bias = self.merged_bias(torch.float32, adapter_names)
        base._set_quant(quantize_nf4(merged.to(base.quant.dtype), base.blocksize, base.double_quant, name="merged weight"))
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        raise RuntimeError(
            "An NF4 base cannot be unmerged exactly (merging re-quantized it); reload the base weights instead. To switch "
            "adapters or disable them later, keep them unmerged and export a float merged model (lightning_nf4.export.save_merged)."
        )

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disable_adapters and self.merged:  # PEFT unmerges here; an NF4 base cannot be
            raise RuntimeError(
                f"Adapters {self.merged_adapters} are merged into this NF4 base, so they cannot be switched off: the merge "
                "re-quantized the base and cannot be undone exactly. Reload the base weights, or keep adapters unmerged "
                "and export a float merged model (lightning_nf4.export.save_merged)."
            )
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:  # PEFT's mixed batch: each row through its own adapter ("__base__": none)
            self._check_forward_args(x, *args, adapter_names=adapter_names, **kwargs)
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        autocast = torch.is_autocast_enabled(x.device.type)
        names = [name for name in self.active_adapters if name in self.lora_A]
        # Compiled, the in-place addmm_ becomes an out-of-place addmm whose cuBLAS call needs the base output copied
        # into its result first (a device-to-device copy per projection); PEFT's form lets inductor fuse the add.
        fuse = self.fuse_update_compiled if torch.compiler.is_compiling() else self.fuse_update
        if autocast and fuse and all(self.lora_B[name].bias is None and name not in self.lora_magnitude_vector for name in names):
            return self._forward_fused(x, names, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            # Outside autocast the adapters run in their own dtype, and the update is cast to the output's.
            dropped = self.lora_dropout[name](x if autocast else x.to(lora_a.weight.dtype))
            update = lora_b(lora_a(dropped)) * self.scaling[name]
            if name in self.lora_magnitude_vector:
                result = result + dora_update(self, name, result, dropped, update)
            else:
                result = result + update.to(result.dtype)
        return result

    def _forward_fused(self, x: Tensor, names: list[str], *args: Any, **kwargs: Any) -> Tensor:
        """``base(x) + scaling * B(A(x))`` with the update added by the matmul itself: ``addmm_`` into the base
        output (``beta=1``), the scaling as the matmul's ``alpha`` rather than a pass over the ``[tokens, out]``
        update or over ``B``. That saves the multiply and the add passes, and their backward, per layer.
        The base sees ``x`` flattened to 2-D (in-place on a fresh 2-D tensor needs no view bookkeeping), and
        ``lora_B``'s module hooks do not run (PEFT's forward calls them)."""
        flat = x.reshape(-1, x.shape[-1])
        result = self.base_layer(flat, *args, **kwargs)
        for name in names:
            down = self.lora_A[name](self.lora_dropout[name](flat))
            up = self.lora_B[name].weight.to(result.dtype)
            result.addmm_(down.to(result.dtype), up.t(), alpha=self.scaling[name])
        return result.view(*x.shape[:-1], result.shape[-1])

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _has_lora_bias(layer: LoraLayer, name: str) -> bool:
    return name in layer.lora_B and getattr(layer.lora_B[name], "bias", None) is not None


def bias_with_updates(layer: LoraLayer, names: list[str]) -> Optional[Tensor]:
    """The base layer's bias in float32 plus ``scaling * lora_B.bias`` of those of ``names`` trained with
    ``lora_bias=True`` (PEFT's merge of the bias); None for a base without bias."""
    bias = getattr(layer.get_base_layer(), "bias", None)
    if bias is None:
        return None
    merged = bias.detach().float()
    for name in names:
        if _has_lora_bias(layer, name):
            merged = merged + layer.lora_B[name].bias.detach().float() * layer.scaling[name]
    return merged


def stable_seed(seed: int, *names: str) -> int:
    """A seed for one layer's adapter from a run's seed and names: the same in every process (``hash`` of a str
    is salted per process)."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32("/".join(names).encode())) % 2**63


def seeded_init(layer: LoraLayer) -> None:
    """PEFT's default init for each adapter of ``layer`` (A kaiming-uniform, B zero), drawn on the CPU from the
    layer's ``lora_init_seed`` (set by ``LoRACallback``) and the adapter's name: the same values whatever device,
    process or strategy materializes the layer, one at a time (a sharded model built on meta) or all at once."""
    for adapter in layer.lora_A:
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter]
        value = torch.empty(a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=torch.Generator().manual_seed(stable_seed(layer.lora_init_seed, adapter)))
        with torch.no_grad():
            a.copy_(value)
            b.weight.zero_()
            if b.bias is not None:
                b.bias.zero_()


def lora_config(**kwargs: Any) -> LoraConfig:
    """A ``LoraConfig`` that dispatches ``NF4Linear`` targets to ``NF4LoraLinear``.

    Register again before ``PeftModel.from_pretrained`` onto an NF4 model (PEFT's custom modules are
    not saved with the adapter config).
    """
    if kwargs.get("target_modules") == "all-linear":  # PEFT's "all-linear" looks for nn.Linear only, then says none were passed
        raise ValueError(
            "lora_config(target_modules='all-linear'): PEFT's 'all-linear' finds nn.Linear layers only, not NF4Linear. Name "
            "the modules (e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']), or let "
            "LoRACallback(target_modules='all-linear') choose them."
        )
    config = LoraConfig(**kwargs)
    register_nf4_lora(config)
    return config


def register_nf4_lora(config: LoraConfig) -> LoraConfig:
    config._register_custom_module({NF4Linear: NF4LoraLinear})
    return config
