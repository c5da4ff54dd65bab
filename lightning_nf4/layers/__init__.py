"""Layers built on the NF4 format."""

from lightning_nf4.layers.linear import NF4Linear

__all__ = ["NF4Linear"]
