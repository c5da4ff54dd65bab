"""``NF4FabricPrecision``: ``NF4Precision`` for Lightning Fabric, as Lightning pairs its own precision plugins.

Fabric calls ``convert_module`` in ``setup_module``, before it moves the model, and its backward and optimizer
step take other arguments than the Trainer's; so the NF4 conversion, autocast and init contexts are shared
(``NF4Conversion``), and the scaler, backward and step are Fabric's ``MixedPrecision``. The model's base stays
frozen; adapters come from PEFT (``get_peft_model`` before ``fabric.setup``), as with a Trainer and a model
the user wrapped first.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins.precision import MixedPrecision as FabricMixedPrecision
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.fabric.utilities.rank_zero import rank_zero_info
from lightning.fabric.utilities.types import Optimizable
from torch import Tensor, nn

from lightning_nf4.format.tensor import NF4Tensor
from lightning_nf4.plugins.convert import keep_trained_in, nf4_layers
from lightning_nf4.plugins.precision import NF4Conversion, NF4PrecisionError


class NF4FabricPrecision(NF4Conversion, FabricMixedPrecision):
    """QLoRA precision for ``lightning.Fabric(plugins=NF4FabricPrecision())``: NF4 base weights, computation in
    ``compute_dtype`` under autocast. Takes ``NF4Precision``'s arguments.

    Fabric tells a plugin nothing of its accelerator, so without ``device`` the model is quantized where its
    weights are (a model built under ``fabric.init_module()``), else on the GPU Fabric's ``accelerator="auto"``
    picks (CUDA, then XPU), else on the CPU; Fabric then moves it. Autocast follows the device type of the first
    inputs Fabric hands the model.
    """

    _input_checked = False
    _build_hint = "Build the model before fabric.setup (Fabric calls no configure_model),"

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantize as ``NF4Precision`` does, then keep what trains in float32 (adapters, biases, modules trained in
        full), as ``LoRACallback(adapter_dtype=torch.float32)`` does for the Trainer: a model built under
        ``fabric.init_module()`` starts in the compute dtype, where AdamW's small steps vanish (bf16) or the
        GradScaler refuses to unscale (fp16)."""
        module = super().convert_module(module)
        cast = keep_trained_in(module, torch.float32)
        if cast:
            rank_zero_info(f"NF4FabricPrecision: {cast} trainable tensors cast to float32.")
        self._replaced.update((id(layer.weight), layer.weight) for _, layer in nf4_layers(module))
        return module

    def optimizer_step(self, optimizer: Optimizable, **kwargs: Any) -> Any:
        checked = self.__dict__.setdefault("_optimizers_checked", set())
        if id(optimizer) not in checked:
            self._check_optimizer(optimizer)
            checked.add(id(optimizer))
        return super().optimizer_step(optimizer, **kwargs)

    def _check_optimizer(self, optimizer: Optimizable) -> None:
        """The Trainer's plugin refuses these in ``connect``; Fabric has no such hook, so the first step does."""
        # NF4 expert stacks are known by their type: a weak reference to one would stop torch swapping it on .to()
        held = [p for group in getattr(optimizer, "param_groups", []) for p in group["params"]
                if self._replaced.get(id(p)) is p or isinstance(p, NF4Tensor)]
        if held:
            raise NF4PrecisionError(
                f"The optimizer holds {len(held)} weights that NF4FabricPrecision quantized (the float weights it replaced, "
                "kept in memory by the optimizer alone, or the frozen NF4 codes). Create it over the trainable parameters "
                "only: torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)."
            )

    def _resolve_device(self, module: nn.Module) -> torch.device:
        if self._device_given:
            return torch.device(self.device)
        param = next(module.parameters(), None)
        if param is not None and param.device.type not in ("cpu", "meta"):
            return param.device
        for kind in ("cuda", "xpu"):
            backend = getattr(torch, kind, None)
            if backend is not None and backend.is_available():
                return torch.device(kind, backend.current_device())
        return torch.device("cpu")

    def convert_input(self, data: Any) -> Any:
        if not self._input_checked:
            self._follow_inputs(data)
        if self.compute_dtype == torch.float32:
            return data
        return super().convert_input(data)

    def _follow_inputs(self, data: Any) -> None:
        """Autocast (and a default GradScaler) on the device type Fabric runs the model on, which its first inputs
        show; a ``device`` given by name that Fabric does not run on is an error."""
        found: list[Tensor] = []
        apply_to_collection(data, Tensor, found.append)
        if not found or found[0].device.type == "meta":
            return
        kind = found[0].device.type
        if kind != self.device:
            if self._device_given:
                raise NF4PrecisionError(
                    f"Fabric runs this model on {kind}, but NF4FabricPrecision was given device={self.device!r}. Pass "
                    f"NF4FabricPrecision(device={kind!r}), or leave device unset to follow Fabric's accelerator."
                )
            self._bind_device(found[0].device)
        self._input_checked = True
