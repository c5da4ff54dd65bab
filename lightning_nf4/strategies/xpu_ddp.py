"""``XPUDDPStrategy``: Lightning's DDP for Intel GPUs on native ``torch.xpu``.

Lightning's ``DDPStrategy`` does three things that are wrong or silent on XPU:

* ``_setup_model`` wraps the model inside ``torch.cuda.stream(torch.cuda.Stream())`` whenever there are
  device ids, which fails on an XPU-only build;
* the process-group backend comes from ``torch.distributed.Backend.default_device_backend_map``, which
  maps "xpu" to "xccl" only from PyTorch 2.8 on (earlier versions fall back to gloo without a word);
* DDP communication hooks are registered only for CUDA.

This subclass fixes those three for ``xpu`` root devices and leaves every other device type to Lightning.
``Trainer(accelerator="xpu", strategy="ddp")`` gets it through the connector patch in
``lightning_nf4.accelerators.xpu``; it is also registered by name (``"ddp_xpu"``, ``"ddp_spawn_xpu"``, ...).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook
from lightning.pytorch.strategies import DDPStrategy
from torch.nn import Module
from torch.nn.parallel.distributed import DistributedDataParallel

from lightning_nf4.devices import major_minor

_XCCL_MIN_TORCH = (2, 8)

# name -> start method, mirroring Lightning's own "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook".
_XPU_DDP_NAMES = {"ddp_xpu": "popen", "ddp_spawn_xpu": "spawn", "ddp_fork_xpu": "fork", "ddp_notebook_xpu": "fork"}


class XCCLUnavailableError(MisconfigurationException):
    """DDP on XPU needs the ``xccl`` process-group backend and this PyTorch does not have it."""


def check_xccl() -> None:
    """Raise ``XCCLUnavailableError`` saying why, unless ``torch.distributed`` can make an ``xccl`` group."""
    version = torch.__version__
    if major_minor(torch.__version__) < _XCCL_MIN_TORCH:
        raise XCCLUnavailableError(
            f"DDP on XPU uses the 'xccl' process-group backend, which PyTorch has from 2.8 on; this is torch {version}. "
            "Install torch>=2.8 from PyTorch's XPU index, or on an old IPEX stack pass "
            "XPUDDPStrategy(process_group_backend='ccl') with oneccl_bindings_for_pytorch installed."
        )
    available = torch.distributed.is_available() and getattr(torch.distributed, "is_xccl_available", lambda: False)()
    if not available:
        raise XCCLUnavailableError(
            f"DDP on XPU uses the 'xccl' process-group backend, but torch {version} was built without it "
            "(torch.distributed.is_xccl_available() is False). Install PyTorch's XPU wheel "
            "(pip install torch --index-url https://download.pytorch.org/whl/xpu)."
        )


def xccl_backend(device: torch.device) -> Optional[str]:
    """``"xccl"`` for an XPU device (checked to be usable), None for any other: the caller's default applies."""
    if device.type != "xpu":
        return None
    check_xccl()
    return "xccl"


class XPUDDPStrategy(DDPStrategy):
    """DDP that works on Intel XPU: ``xccl`` backend, no CUDA streams, comm hooks registered.

    Takes the same arguments as ``DDPStrategy``. On a non-XPU root device it behaves exactly like it.
    """

    strategy_name = "ddp_xpu"

    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or xccl_backend(self.root_device) or super()._get_process_group_backend()

    def _setup_model(self, model: Module) -> DistributedDataParallel:
        if self.root_device.type == "cuda":
            return super()._setup_model(model)
        # Lightning builds DDP inside a fresh CUDA stream; PyTorch's DDP needs none, and on XPU there is no CUDA.
        return DistributedDataParallel(module=model, device_ids=self.determine_ddp_device_ids(), **self._ddp_kwargs)

    def _register_ddp_hooks(self) -> None:
        if self.root_device.type != "xpu":
            super()._register_ddp_hooks()
            return
        assert isinstance(self.model, DistributedDataParallel)
        _register_ddp_comm_hook(
            model=self.model,
            ddp_comm_state=self._ddp_comm_state,
            ddp_comm_hook=self._ddp_comm_hook,
            ddp_comm_wrapper=self._ddp_comm_wrapper,
        )

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, start_method in _XPU_DDP_NAMES.items():
            entry: Optional[dict] = dict.get(strategy_registry, name)  # the registry's own get() instantiates
            if entry is not None and _qualname(entry["strategy"]) != _qualname(cls):
                continue  # someone else's strategy holds the name: leave it
            strategy_registry.register(
                name, cls, description=f"DDP on Intel XPU (xccl) with start method '{start_method}'",
                override=True, start_method=start_method,
            )


def _qualname(obj: type) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"
