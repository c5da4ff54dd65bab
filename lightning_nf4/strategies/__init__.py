"""Lightning strategies: ``XPUDDPStrategy`` (DDP on Intel XPU over ``xccl``) and ``NF4FSDPStrategy``
(FSDP2-sharded QLoRA on CUDA, XPU or CPU)."""

from lightning_nf4.strategies.fsdp import NF4FSDPStrategy, NF4ShardingConfigError
from lightning_nf4.strategies.xpu_ddp import XCCLUnavailableError, XPUDDPStrategy

__all__ = ["NF4FSDPStrategy", "NF4ShardingConfigError", "XCCLUnavailableError", "XPUDDPStrategy"]
