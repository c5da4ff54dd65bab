"""Lightning strategies: ``XPUDDPStrategy`` (DDP on Intel XPU over ``xccl``)."""

from lightning_nf4.strategies.xpu_ddp import XCCLUnavailableError, XPUDDPStrategy

__all__ = ["XCCLUnavailableError", "XPUDDPStrategy"]
