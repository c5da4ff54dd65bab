"""PEFT's ``prepare_model_for_kbit_training`` for models loaded here.

PEFT knows a 4-bit model by bitsandbytes' ``is_loaded_in_4bit`` flag. These models cannot carry it for good:
transformers then imports bitsandbytes to count parameters. Without it PEFT freezes and casts, but leaves gradient
checkpointing off, which QLoRA's memory relies on; here the flag is set for PEFT's call only.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None,
    **kwargs: Any,
) -> nn.Module:
    """``peft.prepare_model_for_kbit_training`` as it runs on a bitsandbytes 4-bit model: every weight frozen, float16
    and bfloat16 ones cast to float32 (the NF4 codes stay packed) and, by default, gradient checkpointing on, with the
    embeddings' output requiring grad when the checkpointing is reentrant."""
    from peft import prepare_model_for_kbit_training as prepare

    missing = object()
    own_flag = vars(model).get("is_loaded_in_4bit", missing)
    model.is_loaded_in_4bit = True
    try:
        return prepare(model, use_gradient_checkpointing=use_gradient_checkpointing,
                       gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
    finally:
        if own_flag is missing:
            del model.is_loaded_in_4bit
        else:
            model.is_loaded_in_4bit = own_flag
