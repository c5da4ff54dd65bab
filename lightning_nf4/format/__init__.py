"""The NF4 data format: code tables, the quantized-weight object, and bitsandbytes' serialization."""

from lightning_nf4.format.bnb_state import from_bnb_tensors, is_bnb_quantized, to_bnb_tensors
from lightning_nf4.format.codebooks import NF4_CODE, code_table, dynamic_map
from lightning_nf4.format.quantized import NF4FormatError, NF4Weight, NestedStats, dequantize_nf4, quantize_nf4

__all__ = [
    "NF4_CODE", "NF4FormatError", "NF4Weight", "NestedStats", "code_table", "dequantize_nf4",
    "dynamic_map", "from_bnb_tensors", "is_bnb_quantized", "quantize_nf4", "to_bnb_tensors",
]
