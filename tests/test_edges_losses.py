"""Edges of ``linear_cross_entropy`` and ``causal_lm_loss`` (lightning_nf4/losses.py) that tests/test_losses.py
does not reach: a loss that is scaled before backward (Lightning divides it by accumulate_grad_batches), very
large vocabularies, inputs that must be refused, and the choice between the chunked and the plain path for heads
and configs that look like, or are, a plain linear head. References are ``F.cross_entropy`` on the whole logits
and the model's own loss."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nf4.losses import LinearCrossEntropyError, causal_lm_loss, chunked_loss_unsupported, default_chunk_size, linear_cross_entropy
from tests.lightning_models import tiny_llama


def _case(n=90, h=32, v=300, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    return hidden, weight, b, labels


@pytest.mark.parametrize("factor", [0.25, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_scaled_loss_scales_every_gradient(factor, reduction):
    """Gradients are computed in forward and only scaled in backward: a loss multiplied before backward (gradient
    accumulation, loss weights, AMP's scaler) must scale the hidden, weight and bias gradients with it."""
    hidden, weight, b, labels = _case(bias=True)
    got = linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction, chunk_size=32, backend="chunked")
    want = F.cross_entropy(F.linear(hidden, weight, b), labels, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got_grads = torch.autograd.grad(got * factor, [hidden, weight, b])
    want_grads = torch.autograd.grad(want * factor, [hidden, weight, b])
    for name, a, w in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6, msg=name)


def test_a_loss_reused_in_two_terms_sums_their_gradients():
    hidden, weight, _, labels = _case()
    got = linear_cross_entropy(hidden, weight, labels, chunk_size=16, backend="chunked")
    want = F.cross_entropy(F.linear(hidden, weight), labels)
    (gh, gw) = torch.autograd.grad(2 * got - 0.5 * got, [hidden, weight])
    (wh, ww) = torch.autograd.grad(1.5 * want, [hidden, weight])
    torch.testing.assert_close(gh, wh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-6)


def test_bf16_bias_gradient_is_summed_over_chunks_in_fp32():
    """Each chunk's bias gradient is added in fp32 and rounded to bf16 once: 512 one-token chunks summed in bf16
    would lose about 15% of the largest entry; the fp32 sum stays within bf16 rounding of the exact one."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 512, 16, 64
    hidden = torch.randn(n, h, generator=g).bfloat16()
    weight = (torch.randn(v, h, generator=g) * 0.3).bfloat16()
    bias = (torch.randn(v, generator=g) * 0.1).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=1, backend="chunked", reduction="sum")
    (got,) = torch.autograd.grad(loss, bias)
    logits = F.linear(hidden, weight, bias.detach()).float()  # the same bf16 logits, the softmax in fp32
    per_token = (torch.softmax(logits, 1) - F.one_hot(labels, v).float()).bfloat16().float()
    want = per_token.sum(0)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=float(want.abs().max()) * 2**-6)


def test_default_chunk_is_at_least_one_token():
    """However large the vocabulary (or small the budget), a chunk holds a token: never 0, which would loop forever
    or fail in range()."""
    assert default_chunk_size(2**26) == 1 and default_chunk_size(2**30) == 1
    assert default_chunk_size(1000, budget_bytes=100) == 1
    assert default_chunk_size(1000, budget_bytes=4000 * 63) == 63  # under 64: not rounded down to 0
    assert default_chunk_size(1000, budget_bytes=4000 * 130) == 128
    hidden, weight, _, labels = _case(n=5, h=8, v=3)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=default_chunk_size(3, budget_bytes=8), backend="chunked")
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(hidden, weight), labels), rtol=1e-6, atol=1e-6)


def test_more_bad_input_is_named():
    hidden, weight, b, labels = _case(bias=True)
    with pytest.raises(LinearCrossEntropyError, match="integer class indices, got dtype torch.bool"):
        linear_cross_entropy(hidden, weight, labels >= 0)
    with pytest.raises(LinearCrossEntropyError, match=r"bias must be \[V\] = \[300\], got \(299,\)"):
        linear_cross_entropy(hidden, weight, labels, bias=b[:-1])
    with pytest.raises(LinearCrossEntropyError, match="hidden and weight must be floating point"):
        linear_cross_entropy(hidden, weight.detach().long(), labels)
    for bad in (-1, 0, 2.0, True):
        with pytest.raises(LinearCrossEntropyError, match="chunk_size must be a positive"):
            linear_cross_entropy(hidden, weight, labels, chunk_size=bad)
    with pytest.raises(LinearCrossEntropyError, match="loss mode must be 'chunked' or 'plain'"):
        causal_lm_loss(tiny_llama(), torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), mode="fused")


def test_auto_on_cpu_is_the_chunked_path():
    hidden, weight, _, labels = _case()
    auto = linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    chunked = linear_cross_entropy(hidden, weight, labels, chunk_size=16, backend="chunked")
    assert torch.equal(auto, chunked)
    for a, c in zip(torch.autograd.grad(auto, [hidden, weight]), torch.autograd.grad(chunked, [hidden, weight])):
        assert torch.equal(a, c)


# -- which path causal_lm_loss takes -----------------------------------------------------------------------------------
def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels, torch.ones_like(ids)


def _chunked_without_warning(model):
    """causal_lm_loss's chunked path, checked against the model's own loss, with any warning an error."""
    ids, labels, mask = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = causal_lm_loss(model, ids, labels, mask, chunk_size=5)
    torch.testing.assert_close(loss, model(input_ids=ids, attention_mask=mask, labels=labels).loss, rtol=1e-5, atol=1e-5)
    return loss


@pytest.mark.parametrize("field", ["logit_scale", "logits_scaling", "output_multiplier_scale", "final_logit_softcapping"])
def test_a_logit_transform_of_one_or_none_is_no_transform(field):
    model = tiny_llama()
    for value in (1, 1.0, None):
        setattr(model.config, field, value)
        assert chunked_loss_unsupported(model) is None, (field, value)
    _chunked_without_warning(model)
    setattr(model.config, field, 2.0)
    assert f"{field}=2.0" in chunked_loss_unsupported(model)


def test_the_head_check_reads_the_last_position_and_passes_once():
    """The check compares the logits HF returned (``logits_to_keep=1``: the last position) with the head applied to
    the captured hidden states; a plain Llama passes it, silently, and is not reported as differing."""
    model = tiny_llama()
    first = _chunked_without_warning(model)
    assert chunked_loss_unsupported(model) is None
    assert torch.equal(_chunked_without_warning(model), first)


def test_a_model_with_the_older_num_logits_to_keep_argument_takes_the_chunked_path():
    from transformers import LlamaForCausalLM

    class Older(LlamaForCausalLM):  # transformers < 4.50 named the argument num_logits_to_keep
        def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=None, num_logits_to_keep=0, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=use_cache,
                                   logits_to_keep=num_logits_to_keep, **kwargs)

    model = Older(tiny_llama().config)
    model.load_state_dict(tiny_llama().state_dict())
    assert chunked_loss_unsupported(model) is None
    _chunked_without_warning(model)


def test_a_linear_subclass_with_its_own_forward_takes_the_plain_path_and_warns_once():
    """A head that is an nn.Linear by type but computes something else (here: scaled logits) is not lm_head(hidden):
    the chunked loss would use its weight alone. It takes the plain path, with one warning per model."""

    class ScaledHead(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5

    model = tiny_llama()
    head = ScaledHead(64, 128, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    assert "ScaledHead, not a plain nn.Linear" in chunked_loss_unsupported(model)
    ids, labels, mask = _batch()
    with pytest.warns(UserWarning, match="takes the plain loss path"):
        loss = causal_lm_loss(model, ids, labels, mask)
    assert torch.equal(loss, model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model
        causal_lm_loss(model, ids, labels, mask)
