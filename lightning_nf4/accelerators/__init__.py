"""Lightning accelerators. Importing this registers "xpu" (``XPUAccelerator``) and the ``"ddp_xpu"`` family of
strategies (``XPUDDPStrategy``), and teaches Lightning's accelerator connector to pick them for XPU, so that
``Trainer(accelerator="xpu", devices=4, strategy="ddp")`` runs on Intel GPUs."""

from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry

from lightning_nf4.accelerators.xpu import XPUAccelerator, XPUUnavailableError, _patch_accelerator_connector
from lightning_nf4.strategies.fsdp import NF4FSDPStrategy, patch_fsdp_precision_check
from lightning_nf4.strategies.xpu_ddp import XPUDDPStrategy

XPUAccelerator.register_accelerators(AcceleratorRegistry)
XPUDDPStrategy.register_strategies(StrategyRegistry)
NF4FSDPStrategy.register_strategies(StrategyRegistry)  # "nf4_fsdp", "fsdp2": sharded QLoRA
_patch_accelerator_connector()
patch_fsdp_precision_check()

__all__ = ["XPUAccelerator", "XPUUnavailableError"]
