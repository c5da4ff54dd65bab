"""Device kernels behind ``torch.ops.lightning_nf4.*`` (see ``ops``)."""

from lightning_nf4.kernels import ops

__all__ = ["ops"]
