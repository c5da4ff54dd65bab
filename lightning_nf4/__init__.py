"""lightning-nf4: QLoRA for any PyTorch Lightning model, in bitsandbytes' NF4 format."""

from lightning_nf4.format import NF4FormatError, NF4Weight, dequantize_nf4, quantize_nf4
from lightning_nf4.layers import NF4Linear

__version__ = "0.1.0"

__all__ = ["NF4FormatError", "NF4Linear", "NF4Weight", "dequantize_nf4", "quantize_nf4"]
