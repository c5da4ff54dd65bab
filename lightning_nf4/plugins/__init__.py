"""Lightning plugins: precision (NF4 conversion + autocast), for the Trainer and for Fabric."""

from lightning_nf4.plugins.fabric import NF4FabricPrecision
from lightning_nf4.plugins.precision import NF4Precision, NF4PrecisionError

__all__ = ["NF4FabricPrecision", "NF4Precision", "NF4PrecisionError"]
