"""Grouped dequantization: one launch per decoder layer gives the same numbers as one per weight."""

import copy

import pytest
import torch
from torch import nn

from lightning_nf4 import NF4Linear, NF4Precision
from lightning_nf4.kernels import ops
from lightning_nf4.layers import DequantGroup, group_nf4_layers
from tests.lightning_models import tiny_llama


def nf4_llama(group: bool, layers: int = 2):
    torch.manual_seed(0)
    model = tiny_llama()
    if layers != 2:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(model.config.__class__(**{**model.config.to_dict(), "num_hidden_layers": layers}))
    NF4Precision(device="cpu", group_dequantize=group).convert_module(model)
    return model


class Spy:
    """Counts calls through a module-level function while calling it for real."""

    def __init__(self, monkeypatch, owner, name):
        self.calls = 0
        original = getattr(owner, name)

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)


def test_precision_groups_each_decoder_layer():
    model = nf4_llama(group=True, layers=3)
    groups = {id(m._group) for m in model.modules() if isinstance(m, NF4Linear)}
    assert len(groups) == 3 and None not in {m._group for m in model.modules() if isinstance(m, NF4Linear)}
    for layer in model.model.layers:
        members = [m for m in layer.modules() if isinstance(m, NF4Linear)]
        assert len(members) == 7 and all(m._group is members[0]._group for m in members)
    ungrouped = nf4_llama(group=False)
    assert all(m._group is None for m in ungrouped.modules() if isinstance(m, NF4Linear))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_grouped_training_step_equals_ungrouped_exactly(checkpointing):
    grouped, plain = nf4_llama(True), nf4_llama(False)
    ids = torch.randint(0, 128, (2, 16))
    grads = []
    for model in (grouped, plain):
        model.model.embed_tokens.weight.requires_grad_(True)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), model.model.embed_tokens.weight.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])


def test_one_group_call_per_decoder_layer(monkeypatch):
    model = nf4_llama(True, layers=3).eval()
    group_calls = Spy(monkeypatch, ops, "dequantize_4bit_group")
    single = Spy(monkeypatch, type(next(m for m in model.modules() if isinstance(m, NF4Linear)).quant), "dequantize")
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (1, 8)))
    assert group_calls.calls == 3 and single.calls == 0
    # every slice was taken: nothing of the round is kept alive after the forward
    assert all(not m._group._ready for m in model.modules() if isinstance(m, NF4Linear))


def _block(n: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(n)])


def test_grouping_rule_outermost_list_elements_of_two_to_eight_layers():
    model = nn.Module()
    model.layers = nn.ModuleList([_block(3), _block(1), _block(9)])
    model.head = _block(2)  # not in a ModuleList
    NF4Precision(device="cpu", group_dequantize=False).convert_module(model)
    assert group_nf4_layers(model) == 1
    assert all(isinstance(m._group, DequantGroup) for m in model.layers[0])
    assert model.layers[1][0]._group is None
    assert all(m._group is None for m in model.layers[2])
    assert all(m._group is None for m in model.head)


def test_repeated_and_out_of_order_calls_give_each_layers_own_weight():
    torch.manual_seed(0)
    block = nn.ModuleList([_block(3)])
    NF4Precision(device="cpu", group_dequantize=False).convert_module(block)
    layers = list(block[0])
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = [layer(x) for layer in layers]
        group_nf4_layers(nn.Sequential(block))
        order = [2, 0, 0, 1, 2, 1, 1]  # a repeat starts a new round; the order never matters
        for i in order:
            assert torch.equal(layers[i](x), expected[i])


def test_requantizing_a_member_drops_the_round():
    torch.manual_seed(0)
    block = nn.ModuleList([_block(2)])
    NF4Precision(device="cpu", group_dequantize=False).convert_module(block)
    group_nf4_layers(nn.Sequential(block))
    first, second = block[0]
    x = torch.randn(3, 64)
    with torch.no_grad():
        first(x)  # the round now holds the second layer's old weight
        second.load_state_dict({"weight": torch.randn(64, 64), "bias": second.bias.detach()})
        alone = copy.deepcopy(second)
        alone._group = None
        assert torch.equal(second(x), alone(x))


@pytest.mark.parametrize("double_quant", [True, False])
def test_group_op_equals_one_weight_at_a_time(double_quant):
    from lightning_nf4 import quantize_nf4

    torch.manual_seed(0)
    qs = [quantize_nf4(torch.randn(*shape), 64, double_quant) for shape in ((8, 64), (5, 70), (3, 128))]
    nested = [q.nested for q in qs] if double_quant else []
    args = (
        [q.packed for q in qs], [q.absmax for q in qs], qs[0].code, 64, [q.numel for q in qs], torch.bfloat16,
        [n.absmax for n in nested], nested[0].code if nested else None, [n.offset for n in nested],
    )
    flat = ops.dequantize_4bit_group(*args)
    assert torch.equal(flat, torch.cat([q.dequantize(torch.bfloat16).reshape(-1) for q in qs]))
    torch.library.opcheck(ops._dequantize_4bit_group, tuple(a if not isinstance(a, list) else [t.reshape(-1) if isinstance(t, torch.Tensor) else t for t in a] for a in args))


def test_auto_groups_on_gpus_only():
    model = tiny_llama()
    NF4Precision(device="cpu").convert_module(model)  # "auto": no launch cost to save on CPU
    assert all(m._group is None for m in model.modules() if isinstance(m, NF4Linear))
    assert not ops.launches_kernels("cpu") and ops.launches_kernels("cuda") and ops.launches_kernels("xpu")
    from lightning_nf4.plugins.precision import NF4PrecisionError

    with pytest.raises(NF4PrecisionError, match="group_dequantize must be True, False or .auto."):
        NF4Precision(group_dequantize="yes")


def test_groups_survive_pickling_and_deepcopy():
    """ddp_spawn pickles the model into each process; copies keep one group per decoder layer."""
    import pickle

    model = nf4_llama(True).eval()
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        layers = [m for m in clone.modules() if isinstance(m, NF4Linear)]
        assert len({id(m._group) for m in layers}) == 2
        assert all(m in m._group.layers for m in layers)
        with torch.no_grad():
            assert torch.equal(clone(input_ids=ids).logits, expected)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_round_outlives_the_step_that_used_it(monkeypatch, checkpointing):
    """Every flat buffer a group dequantizes (one per decoder layer and pass) is freed by the end of the training
    step: a round's weights are taken once and dropped, none is kept for later rounds."""
    import weakref

    model = nf4_llama(True)
    model.model.embed_tokens.weight.requires_grad_(True)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rounds = []
    original = ops.dequantize_4bit_group

    def tracking(*args, **kwargs):
        flat = original(*args, **kwargs)
        rounds.append(weakref.ref(flat))
        return flat

    monkeypatch.setattr(ops, "dequantize_4bit_group", tracking)
    ids = torch.randint(0, 128, (2, 16))
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        del loss
    assert len(rounds) == 2 * (4 if checkpointing else 2)  # forward (and the recompute) of 2 layers, 2 steps
    assert all(ref() is None for ref in rounds), f"{sum(ref() is not None for ref in rounds)} round buffers alive"
