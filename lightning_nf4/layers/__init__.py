"""Layers built on the NF4 format."""

from lightning_nf4.layers.group import DequantGroup, group_nf4_layers
from lightning_nf4.layers.linear import NF4Linear

__all__ = ["DequantGroup", "NF4Linear", "group_nf4_layers"]
