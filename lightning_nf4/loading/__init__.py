"""Loading models into NF4: transformers-style entry point, checkpoint streaming, packaged models."""

from lightning_nf4.loading.auto import AutoModelForCausalLM
from lightning_nf4.loading.checkpoint import CheckpointError
from lightning_nf4.loading.deferred import materialize
from lightning_nf4.loading.packaged import resolve_model_path
from lightning_nf4.loading.training import prepare_model_for_kbit_training

__all__ = ["AutoModelForCausalLM", "CheckpointError", "materialize", "prepare_model_for_kbit_training", "resolve_model_path"]
