"""Loading models into NF4: transformers-style entry point, checkpoint streaming, packaged models."""

from lightning_nf4.loading.auto import AutoModelForCausalLM
from lightning_nf4.loading.checkpoint import CheckpointError
from lightning_nf4.loading.deferred import materialize
from lightning_nf4.loading.packaged import resolve_model_path

__all__ = ["AutoModelForCausalLM", "CheckpointError", "materialize", "resolve_model_path"]
