"""Edges of ``lightning_nf4.export`` with ``modules_to_save`` the main tests leave open: a module trained in full
beside LoRA on a frozen NF4 base is exported with its trained values (adapter and merged), the frozen base
tensors stay out of the adapter, and PEFT reloads the adapter with the trained copy in ``modules_to_save`` and the
original weights in ``original_module``. Also a model whose ``modules_to_save`` PEFT itself wrapped
(``ModulesToSaveWrapper``: a frozen ``original_module`` and a trained ``modules_to_save.default`` copy)."""

import warnings

import pytest
import torch
from peft import PeftModel, inject_adapter_in_model
from safetensors.torch import load_file
from torch import nn

from lightning_nf4 import LoRACallback
from lightning_nf4.export import merged_state_dict, save_adapter
from lightning_nf4.layers.lora import lora_config
from lightning_nf4.plugins.convert import convert_linears

LORA = {"base_model.model.body.lora_A.weight", "base_model.model.body.lora_B.weight"}
HEAD = {"base_model.model.head.weight", "base_model.model.head.bias"}


class Tiny(nn.Module):
    """``body`` gets LoRA on NF4, ``head`` is trained in full, ``out`` stays a frozen float layer. (No name is a
    string suffix of another: PEFT picks ``modules_to_save`` by ``str.endswith``.)"""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 64)
        self.head = nn.Linear(64, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        return self.out(self.head(self.body(x)))


def _trained(peft_wrapped=False):
    """The float weights before training, the model after a pretend training step, and the trained head."""
    torch.manual_seed(0)
    model = Tiny()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    convert_linears(model, compute_dtype=torch.float32, skip_modules=("head", "out"))
    if peft_wrapped:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            inject_adapter_in_model(lora_config(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["body"], modules_to_save=["head"]), model)
        head = model.head.modules_to_save["default"]
    else:
        LoRACallback(r=2, alpha=4, dropout=0.0, target_modules=["body"], modules_to_save=["head"]).inject(model)
        head = model.head
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "body.lora_A.default.weight", "body.lora_B.default.weight", *(n for n, _ in model.named_parameters() if n.startswith("head.") and "original_module" not in n)
    }
    with torch.no_grad():
        head.weight.add_(1.0)
        head.bias.add_(1.0)
        model.body.lora_B["default"].weight.normal_()
    return original, model, head


def _reload_with_peft(folder, original):
    fresh = Tiny()
    fresh.load_state_dict(original)
    return PeftModel.from_pretrained(fresh, str(folder)).base_model.model


def test_the_trained_modules_to_save_are_exported_and_the_frozen_base_is_not(tmp_path):
    """``LoRACallback.save_export`` with ``modules_to_save=["head"]``: the adapter holds the LoRA matrices and the
    trained ``head`` (not the frozen NF4 ``body`` base or ``out``); PEFT reloads it onto the float model with the
    trained copy active and the original weights kept in ``original_module``; the merged model has the trained
    ``head``."""
    original, model, head = _trained()
    callback = LoRACallback(r=2, alpha=4, dropout=0.0, target_modules=["body"], modules_to_save=["head"])
    folders = callback.save_export(model, tmp_path / "export")
    tensors = load_file(str(folders["adapter"] / "adapter_model.safetensors"))
    assert set(tensors) == LORA | HEAD
    assert torch.equal(tensors["base_model.model.head.weight"], head.weight) and torch.equal(tensors["base_model.model.head.bias"], head.bias)
    reloaded = _reload_with_peft(folders["adapter"], original)
    assert torch.equal(reloaded.head.modules_to_save["default"].weight, head.weight)
    assert torch.equal(reloaded.head.original_module.weight, original["head.weight"])
    merged = load_file(str(folders["merged"] / "model.safetensors"))
    assert set(merged) == {f"{m}.{p}" for m in ("body", "head", "out") for p in ("weight", "bias")}
    assert torch.equal(merged["head.weight"], head.weight) and torch.equal(merged["out.weight"], original["out.weight"])


def test_without_modules_to_save_the_adapter_holds_only_lora():
    """``save_adapter`` without ``modules_to_save`` writes what its config describes, the LoRA matrices only, even
    when another parameter is trainable."""
    _, model, _ = _trained()
    from lightning_nf4.export import adapter_tensors

    assert set(adapter_tensors(model)) == LORA
    assert set(adapter_tensors(model, modules_to_save=("head",))) == LORA | HEAD


def test_a_peft_modules_to_save_wrapper_merges_to_its_trained_copy():
    """A ``head`` PEFT wrapped (frozen ``original_module``, trained ``modules_to_save.default``) is merged as
    ``head.weight`` / ``head.bias`` holding the trained copy, as PEFT's ``merge_and_unload`` gives; the frozen
    original neither replaces it nor appears under PEFT's wrapper names."""
    original, model, head = _trained(peft_wrapped=True)
    state = merged_state_dict(model)
    assert set(state) == {f"{m}.{p}" for m in ("body", "head", "out") for p in ("weight", "bias")}
    assert torch.equal(state["head.weight"], head.weight) and torch.equal(state["head.bias"], head.bias)


def test_a_peft_modules_to_save_wrapper_is_saved_as_peft_saves_it(tmp_path):
    """The adapter of a PEFT-wrapped ``head`` holds its trained copy under PEFT's on-disk name
    (``base_model.model.head.weight``, not the frozen ``original_module``), and PEFT reloads it."""
    original, model, head = _trained(peft_wrapped=True)
    folder = save_adapter(model, tmp_path / "adapter", r=2, lora_alpha=4, lora_dropout=0.0, modules_to_save=["head"])
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert set(tensors) == LORA | HEAD
    assert torch.equal(tensors["base_model.model.head.weight"], head.weight)
    reloaded = _reload_with_peft(folder, original)
    assert torch.equal(reloaded.head.modules_to_save["default"].weight, head.weight)


class TwoHeads(nn.Module):
    """``head`` is a string suffix of ``lm_head``: PEFT's modules_to_save matching cannot tell them apart."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 64)
        self.head = nn.Linear(64, 16)
        self.lm_head = nn.Linear(64, 8)

    def forward(self, x):
        h = self.body(x)
        return self.head(h).sum() + self.lm_head(h).sum()


def test_a_modules_to_save_name_that_is_another_modules_suffix_is_warned_at_injection(tmp_path):
    """``modules_to_save=["head"]`` beside an untrained ``lm_head``: the adapter it writes does not load in PEFT (which
    selects by string suffix), so injection warns, naming ``lm_head``, before any training; naming both does not warn."""
    torch.manual_seed(0)
    model = TwoHeads()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    callback = LoRACallback(r=2, alpha=4, dropout=0.0, target_modules=["body"], modules_to_save=["head"])
    with pytest.warns(UserWarning, match=r"also names \['lm_head'\] under PEFT's suffix matching"):
        callback.inject(model)
    folder = save_adapter(model, tmp_path / "adapter", r=2, lora_alpha=4, lora_dropout=0.0, modules_to_save=["head"])
    fresh = TwoHeads()
    fresh.load_state_dict(original)
    with pytest.raises(Exception):  # the failure the warning names
        PeftModel.from_pretrained(fresh, str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoRACallback(r=2, alpha=4, dropout=0.0, target_modules=["body"], modules_to_save=["head", "lm_head"]).inject(TwoHeads())
