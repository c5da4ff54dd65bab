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
from torch import Tensor, nn

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
