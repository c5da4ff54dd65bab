"""Lightning callbacks: LoRA injection, adapter-only checkpoints and exports; a trained module back from its checkpoint."""

from lightning_nf4.callbacks.lora import LoRACallback
from lightning_nf4.callbacks.restore import load_from_checkpoint

__all__ = ["LoRACallback", "load_from_checkpoint"]
