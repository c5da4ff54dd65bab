"""Lightning callbacks: LoRA injection, adapter-only checkpoints and exports."""

from lightning_nf4.callbacks.lora import LoRACallback

__all__ = ["LoRACallback"]
