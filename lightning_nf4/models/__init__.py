"""LightningModules built on the NF4 loader."""

from lightning_nf4.models.causal_lm import CausalLMModule

__all__ = ["CausalLMModule"]
