"""lightning-nf4: QLoRA for any PyTorch Lightning model, in bitsandbytes' NF4 format."""

from lightning_nf4.format import NF4FormatError, NF4Weight, dequantize_nf4, quantize_nf4
from lightning_nf4.layers import NF4Linear

# Registers accelerator "xpu" and the "ddp_xpu" strategies with Lightning, so Trainer(accelerator="xpu")
# resolves after `import lightning_nf4`. This loads lightning.pytorch, which Trainer users load anyway.
import lightning_nf4.accelerators  # noqa: E402,F401

__version__ = "0.1.0"

__all__ = [
    "AutoModelForCausalLM", "LoRACallback", "NF4FabricPrecision", "NF4FormatError", "NF4Linear", "NF4Precision", "NF4Weight", "dequantize_model",
    "dequantize_nf4", "load_from_checkpoint", "quantize_nf4",
]


def __getattr__(name: str):
    # Lightning and PEFT load lazily: the format and kernels stay importable without their start-up cost.
    if name == "NF4Precision":
        from lightning_nf4.plugins import NF4Precision

        return NF4Precision
    if name == "NF4FabricPrecision":  # the same plugin for Lightning Fabric
        from lightning_nf4.plugins import NF4FabricPrecision

        return NF4FabricPrecision
    if name == "LoRACallback":
        from lightning_nf4.callbacks import LoRACallback

        return LoRACallback
    if name == "load_from_checkpoint":  # a trained module back without a Trainer
        from lightning_nf4.callbacks.restore import load_from_checkpoint

        return load_from_checkpoint
    if name == "dequantize_model":  # transformers' model.dequantize() for these models: float layers back, in place
        from lightning_nf4.plugins.convert import dequantize_linears

        return dequantize_linears
    if name == "AutoModelForCausalLM":  # transformers' name, loading straight into NF4
        from lightning_nf4.loading import AutoModelForCausalLM

        return AutoModelForCausalLM
    raise AttributeError(f"module 'lightning_nf4' has no attribute {name!r}")
