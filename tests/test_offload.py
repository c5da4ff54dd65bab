"""``NF4Precision(offload_activations=True)``: what stays on the device, and that a training step runs with the
hooks in place. The copies themselves need an accelerator: ``tests/test_gpu.py`` checks them (same gradients,
less device memory between forward and backward)."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_nf4 import LoRACallback, NF4Precision
from lightning_nf4.format import quantize_nf4
from lightning_nf4.format.tensor import NF4Tensor
from lightning_nf4.layers.offload import ActivationOffload, offload_activations
from lightning_nf4.plugins.precision import NF4PrecisionError
from tests.lightning_models import CausalLM, token_loader


def test_model_state_and_host_tensors_stay_where_they_are():
    hooks = ActivationOffload(min_bytes=0)
    weight = nn.Parameter(torch.randn(64, 64))
    nf4 = NF4Tensor(quantize_nf4(torch.randn(128, 64)))
    for kept in (weight, weight.t(), weight[:8], nf4, torch.randn(1024, 1024)):
        assert hooks.keeps(kept)
        assert hooks.pack(kept) is kept
        assert ActivationOffload.unpack(kept) is kept
    assert hooks.offloaded_bytes == 0


def test_only_activations_of_this_step_would_move():
    """Device-independent part of the rule: what autograd saves that was made by a differentiable op of the step
    moves; frozen weights, their shards and casts, parameters and their views, and small tensors do not."""
    hooks = ActivationOffload(min_bytes=1 << 16)
    trained = nn.Parameter(torch.randn(256, 256))
    frozen = torch.randn(512, 512)  # e.g. a frozen head's local shard, or its autocast copy
    hidden = torch.randn(256, 256, requires_grad=True) * 2  # an activation: made by this step's graph
    assert hooks.is_activation(hidden)
    assert not hooks.is_activation(hidden[:4])  # 4 KiB: under min_bytes
    assert not hooks.is_activation(hidden.t())  # not contiguous
    for kept in (trained, trained.t(), frozen, frozen.to(torch.bfloat16), frozen.t()):
        assert not hooks.is_activation(kept)
    assert hooks.keeps(hidden)  # on the CPU already: nothing to move


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="min_bytes"):
        ActivationOffload(min_bytes=-1)
    with pytest.raises(NF4PrecisionError, match="offload_activations must be True or False"):
        NF4Precision(offload_activations="yes")


class _SeesHooks(CausalLM):
    """Records which saved-tensor hooks are innermost while its training step runs."""

    def training_step(self, batch, batch_idx):
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.seen = None if top is None else getattr(top[0], "__self__", None)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("offload", [False, True])
def test_the_plugin_puts_the_hooks_around_the_training_step(offload):
    """With the switch on, the step runs under ``ActivationOffload``'s hooks (HF checkpointing and the NF4 layers'
    own hooks nest inside them), trains, and ends with the same adapters as without (on the CPU nothing moves)."""
    results = {}
    for on in sorted({False, offload}):
        torch.manual_seed(0)
        module = _SeesHooks()
        module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, plugins=NF4Precision(offload_activations=on),
            callbacks=[LoRACallback(r=4, alpha=8, dropout=0.0, target_modules="all-linear")],
        )
        trainer.fit(module, token_loader(n=8, seq=16))
        assert isinstance(module.seen, ActivationOffload) == on
        results[on] = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    if offload:
        assert results[True].keys() == results[False].keys()
        for name, value in results[False].items():
            assert torch.equal(results[True][name], value), name


def test_the_hooks_are_gone_after_the_context():
    with offload_activations() as hooks:
        assert torch._C._autograd._top_saved_tensors_default_hooks(False)[0].__self__ is hooks
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
