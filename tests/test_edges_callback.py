"""Edges of ``LoRACallback`` the main tests leave open: which layers get LoRA and which train in full, the
global RNG around injection, and adapter-only checkpoints that do not fit the model (loaded before or after
injection), called directly on a small model rather than through a whole fit."""

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from lightning_nf4 import LoRACallback, NF4Linear
from lightning_nf4.plugins.convert import convert_linears


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(64, 64), "o": nn.Linear(64, 64)}) for _ in range(2))
        self.head = nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, 32)


def _model(skip=("lm_head", "head")):
    torch.manual_seed(0)
    model = Tiny()
    convert_linears(model, compute_dtype=torch.float32, skip_modules=skip)
    return model


def _adapter_checkpoint(model):
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"lightning_nf4": {"adapter_only": True}, "state_dict": state}


def test_modules_to_save_train_in_full_and_get_no_adapter():
    """With ``target_modules="all-linear"`` and ``modules_to_save=["head"]``: every NF4 layer gets LoRA, the float
    ``head`` is trained in full (weight and bias) without an adapter, the float ``lm_head`` stays frozen, and
    the adapters are float32 whatever the model's dtype."""
    model = _model()
    model.head.to(torch.bfloat16)
    LoRACallback(r=2, alpha=4, dropout=0.0, modules_to_save=["head"]).inject(model)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {f"blocks.{i}.{k}" for i in range(2) for k in "qo"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert not any(n.startswith("lm_head") for n in trainable)
    assert all(".lora_" in n for n in trainable - {"head.weight", "head.bias"})
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)


def test_an_nf4_lm_head_gets_lora_under_all_linear():
    """``all-linear`` leaves a float ``lm_head`` alone (it is usually tied or trained in full) but an ``lm_head``
    that NF4Precision quantized can only be trained through an adapter, so it gets one."""
    nf4_head = _model(skip=("head",))
    assert isinstance(nf4_head.lm_head, NF4Linear)
    LoRACallback(r=2, alpha=4, dropout=0.0).inject(nf4_head)
    assert isinstance(nf4_head.lm_head, LoraLayer) and nf4_head.lm_head.lora_A["default"].weight.requires_grad
    float_head = _model()
    LoRACallback(r=2, alpha=4, dropout=0.0).inject(float_head)
    assert type(float_head.lm_head) is nn.Linear and not float_head.lm_head.weight.requires_grad


def test_injection_leaves_the_global_rng_alone_and_init_seed_fixes_the_adapters():
    """The adapters' random init draws from a forked generator: the run's own stream continues as if injection
    had not happened, and the same ``init_seed`` gives the same adapters whatever that stream's state."""
    first, second = _model(), _model()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    LoRACallback(r=2, alpha=4, dropout=0.0, init_seed=5).inject(first)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)
    LoRACallback(r=2, alpha=4, dropout=0.0, init_seed=5).inject(second)
    a1 = first.blocks[0]["q"].lora_A["default"].weight
    assert a1.abs().sum() > 0 and torch.equal(a1, second.blocks[0]["q"].lora_A["default"].weight)


def test_an_adapter_checkpoint_with_a_missing_or_stray_key_is_refused():
    """Lightning loads adapter-only checkpoints non-strictly; the callback then checks the keys itself: a
    trainable parameter absent from the checkpoint, or a checkpoint key the model does not have, is an error."""
    model = _model()
    callback = LoRACallback(r=2, alpha=4, dropout=0.0)
    callback.inject(model)
    checkpoint = _adapter_checkpoint(model)
    missing = dict(checkpoint, state_dict=dict(checkpoint["state_dict"]))
    dropped = sorted(missing["state_dict"])[0]
    del missing["state_dict"][dropped]
    with pytest.raises(RuntimeError, match=rf"missing \['{dropped}'\]"):
        callback.on_load_checkpoint(None, model, missing)
    stray = dict(checkpoint, state_dict=dict(checkpoint["state_dict"], **{"blocks.0.q.lora_A.other.weight": torch.zeros(2, 64)}))
    with pytest.raises(RuntimeError, match=r"unexpected \['blocks.0.q.lora_A.other.weight'\]"):
        callback.on_load_checkpoint(None, model, stray)
    other_rank = _model()
    LoRACallback(r=4, alpha=4, dropout=0.0).inject(other_rank)
    with pytest.raises(RuntimeError, match="was r different"):
        callback.on_load_checkpoint(None, other_rank, checkpoint)


def test_an_adapter_checkpoint_loaded_before_injection_is_applied_by_it():
    """A checkpoint read before the model has adapters (a model built in ``configure_model``) is kept and
    copied into the adapters when injection happens."""
    trained = _model()
    LoRACallback(r=2, alpha=4, dropout=0.0).inject(trained)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if p.requires_grad:
                p.normal_()
    checkpoint = _adapter_checkpoint(trained)
    fresh = _model()
    callback = LoRACallback(r=2, alpha=4, dropout=0.0)
    callback.on_load_checkpoint(None, fresh, checkpoint)
    callback.inject(fresh)
    got = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
    assert got.keys() == checkpoint["state_dict"].keys()
    for name, value in checkpoint["state_dict"].items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("dropout", [1.0, -0.1])
def test_dropout_outside_zero_to_one_is_refused(dropout):
    """Dropout 1.0 zeroes every adapter input (nothing trains); the callback refuses it and negatives."""
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
        LoRACallback(dropout=dropout)
