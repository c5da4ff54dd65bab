"""Lightning plugins: precision (NF4 conversion + autocast)."""

from lightning_nf4.plugins.precision import NF4Precision, NF4PrecisionError

__all__ = ["NF4Precision", "NF4PrecisionError"]
