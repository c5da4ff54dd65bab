"""Reliability on misuse and interruption (issue 13): skipped modules under LoRA, exact resume, safe export
folders, complete merged folders, clear errors for bad input. Everything runs on CPU."""

import os

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_nf4 import LoRACallback, NF4Linear, NF4Precision
from tests.lightning_models import CausalLM, tiny_llama, token_loader


def trainer(tmp_path, **kw):
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=2, default_root_dir=str(tmp_path),
    )
    defaults.update(kw)
    return pl.Trainer(**defaults)


# -- skipped modules stay float, however they are wrapped ---------------------------------------------
def test_lora_on_a_skipped_module_trains_and_exports(tmp_path):
    """LoRA on ``lm_head`` (skipped by NF4Precision): Lightning's own convert_module runs after LoRACallback
    wrapped it and must leave ``lm_head.base_layer`` in float; its adapter trains and the merged export equals
    the trained model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = CausalLM(lr=1e-2)
    head = model.model.lm_head.weight.detach().clone()
    callback = LoRACallback(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"], save_dir=str(tmp_path / "out"))
    trainer(tmp_path, max_epochs=3, plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[callback]).fit(model, token_loader())

    lm_head = model.model.lm_head
    assert type(lm_head.base_layer) is nn.Linear and torch.equal(lm_head.base_layer.weight, head)
    assert isinstance(model.model.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    assert lm_head.lora_B["default"].weight.abs().sum() > 0  # the head's adapter trained
    ids = next(iter(token_loader(n=4)))[0]
    model.eval()
    with torch.no_grad():
        ours = model(ids).float()
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "merged")).eval()(input_ids=ids).logits
        via_peft = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out" / "adapter")).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=1e-4)
    assert (via_peft - ours).abs().mean() < 0.1 * ours.abs().mean()  # the float base: NF4 error only


def test_a_skipped_layer_stays_float_inside_any_wrapper():
    class Wrapper(nn.Module):  # e.g. a user's or a checkpointing wrapper: the layer's name changes
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    precision = NF4Precision(skip_modules=("1",))
    precision.convert_module(model)
    model[1] = Wrapper(model[1])  # now "1.inner", which no longer matches the pattern "1"
    precision.convert_module(model)
    assert isinstance(model[0], NF4Linear) and type(model[1].inner) is nn.Linear
