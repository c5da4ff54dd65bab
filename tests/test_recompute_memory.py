"""``low_memory_recompute``: under activation checkpointing a layer's recompute keeps no dequantized weight, and its
backward dequantizes each projection again, one at a time. The same gradients as without it; at most one dequantized
projection alive in a layer's backward (all seven without it); eager, compiled, and under NF4FSDPStrategy."""

import json
import sys
from pathlib import Path

import pytest
import torch

from lightning_nf4 import LoRACallback, NF4Linear, NF4Precision
from lightning_nf4.format.tensor import NF4Tensor
from lightning_nf4.layers.linear import set_low_memory_recompute
from lightning_nf4.plugins.precision import NF4PrecisionError
from tests.lightning_models import tiny_llama
from tests.recompute_worker import DequantLedger
from tests import isolated

WORKER = Path(__file__).with_name("recompute_worker.py")


def qlora_llama(low_memory: bool, group: bool, compute_dtype: torch.dtype = torch.float32, compile: bool = False):
    """A 2-layer Llama from a config, NF4 base, LoRA on all 7 projections (B drawn, so both factors get gradients),
    HF gradient checkpointing (non-reentrant), frozen embeddings: layer 0's q/k/v inputs need no gradient."""
    model = tiny_llama()
    NF4Precision(device="cpu", compute_dtype=compute_dtype, group_dequantize=group, low_memory_recompute=low_memory).convert_module(model)
    LoRACallback(r=4, alpha=8, dropout=0.0, compile=compile or None).inject(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x; the older name before
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def step(model, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def projection_sizes(model) -> list[int]:
    """Elements of each NF4 projection of one decoder layer (7 for Llama)."""
    return [m.in_features * m.out_features for m in model.model.layers[0].modules() if isinstance(m, NF4Linear)]


# -- the option ------------------------------------------------------------------------------------------------------
def test_precision_option_sets_the_layers_and_auto_leaves_them_to_the_strategy():
    for value, expected in ((True, True), (False, False), ("auto", False)):
        model = tiny_llama()
        precision = NF4Precision(device="cpu", low_memory_recompute=value)
        precision.convert_module(model)
        layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
        assert len(layers) == 14 and all(m.low_memory_recompute is expected for m in layers), value
        precision.apply_low_memory_recompute(model, default=True)  # what a sharded strategy calls
        assert all(m.low_memory_recompute is (True if value == "auto" else value) for m in layers), value
    assert set_low_memory_recompute(model, False) == 14 and not any(m.low_memory_recompute for m in layers)
    with pytest.raises(NF4PrecisionError, match="low_memory_recompute must be True, False or 'auto'"):
        NF4Precision(low_memory_recompute="on")
    with pytest.raises(TypeError, match="enabled must be True or False"):
        set_low_memory_recompute(model, 1)


# -- same gradients -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [True, False], ids=["grouped", "ungrouped"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_gradients_are_bit_for_bit_the_same(autocast, group):
    """The same kernels on the same values: only when each weight is dequantized changes, so bit-for-bit equal
    loss and gradients. The backward's dequantize calls show which path ran: 2 layers x 7 projections x (recompute
    + backward) with the option; without it, the recompute's only (one group call per layer, or one per weight)."""
    compute_dtype = torch.bfloat16 if autocast else torch.float32
    results = {}
    for low_memory in (False, True):
        model = qlora_llama(low_memory, group, compute_dtype)
        with DequantLedger() as ledger:
            results[low_memory] = (*step(model, autocast), ledger.backward_made)
    (loss, grads, made), (loss_lm, grads_lm, made_lm) = results[False], results[True]
    assert made == (2 if group else 14) and made_lm == 2 * 7 * 2
    assert torch.equal(loss, loss_lm)
    assert grads.keys() == grads_lm.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert torch.equal(grad, grads_lm[name]), name


# -- memory ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [True, False], ids=["grouped", "ungrouped"])
def test_one_dequantized_projection_alive_in_backward(group):
    """Without the option the recompute keeps all seven dequantized projections for the layer's backward (the
    group's one buffer, or seven); with it, at most one is alive at any time of any backward."""
    peaks = {}
    for low_memory in (False, True):
        model = qlora_llama(low_memory, group, torch.bfloat16)
        with DequantLedger() as ledger:
            step(model, autocast=True)
        peaks[low_memory] = ledger
    sizes = projection_sizes(model)
    assert len(sizes) == 7
    assert peaks[False].backward_peak == sum(sizes)
    assert peaks[True].backward_peak <= max(sizes) and peaks[True].backward_peak_storages == 1
    assert peaks[True].backward_made == 2 * 7 * 2  # each projection in the recompute, and again in its backward


# -- compiled ---------------------------------------------------------------------------------------------------------
def _saved_by(layer: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What autograd keeps for backward from one call of ``layer`` (no hooks of its own run when compiled)."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    return saved


@pytest.mark.parametrize("nf4_tensor", [False], ids=["packed-weight"])  # NF4Tensor (FSDP2's form): not yet, see linear.py
def test_compiled_layer_saves_no_float_weight(nf4_tensor):
    """Compiled code takes _NF4Matmul. Left alone, the compiler keeps the forward's dequantized weight for the
    backward (it sees the backward dequantize the same weight); with the option nothing of the weight's size in a
    float dtype is kept."""
    torch._dynamo.reset()
    layer = NF4Linear.from_linear(torch.nn.Linear(256, 384, bias=False), compute_dtype=torch.float32)
    layer.low_memory_recompute = True
    if nf4_tensor:
        layer.to_nf4_tensor()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(8, 256, requires_grad=True)
    saved = _saved_by(compiled, x)
    big_floats = [(type(t).__name__, tuple(t.shape), t.dtype) for t in saved
                  if t.dtype.is_floating_point and not isinstance(t, NF4Tensor) and t.numel() >= 256 * 384]
    assert not big_floats, f"compiled code keeps a float weight for backward: {big_floats}"
    torch.testing.assert_close(x.grad, torch.ones(8, 384) @ layer.dequantize(torch.float32), rtol=1e-5, atol=1e-5)


def test_compiled_checkpointed_llama_with_the_option_matches_eager():
    torch._dynamo.reset()
    eager_loss, eager = step(qlora_llama(False, True), autocast=False)
    compiled_loss, compiled = step(qlora_llama(True, True, compile=True), autocast=False)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled.keys() == eager.keys()
    for name, grad in compiled.items():
        torch.testing.assert_close(grad, eager[name], rtol=1e-4, atol=1e-5)  # fp32; inductor's fused order


# -- sharded: NF4FSDPStrategy, two gloo ranks, in a subprocess with a timeout ----------------------------------------
@pytest.mark.timeout(860)  # two two-rank runs, each stopped at 400 s
def test_sharded_fit_with_the_option_keeps_one_projection_and_trains_the_same(tmp_path):
    """Under NF4FSDPStrategy(activation_checkpointing=True) each weight is an all-gathered NF4Tensor and each
    decoder layer's weights are grouped: with the option a rank holds at most one dequantized projection in any
    backward, and the fit ends with the same adapters, bit for bit. Without it, at least all seven: more here,
    as this model runs with its KV cache on, which holds each recompute's keys and values, whose graph holds
    the layer's dequantized block until the step ends."""
    figures, states = {}, {}
    for flag in ("off", "on"):
        done = isolated.run([sys.executable, str(WORKER), str(tmp_path / flag), flag], capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-4000:]
        figures[flag] = [json.loads((tmp_path / flag / f"dequant_rank{r}.json").read_text()) for r in (0, 1)]
        states[flag] = [torch.load(tmp_path / flag / f"rank{r}.pt")["trainable"] for r in (0, 1)]
    sizes = [256 * 256, 128 * 256, 128 * 256, 256 * 256, 512 * 256, 512 * 256, 256 * 512]  # fsdp_worker's shardable_llama
    for rank in (0, 1):
        off, on = figures["off"][rank], figures["on"][rank]
        assert off["backward_peak"] >= sum(sizes), off
        assert on["backward_made"] > 0 and on["backward_peak"] <= max(sizes) and on["backward_peak_storages"] == 1, on
    trained = states["off"][0]
    assert trained and any("lora_B" in n and v.abs().max() > 0 for n, v in trained.items())
    for state in (states["off"][1], *states["on"]):
        assert state.keys() == trained.keys()
        for name, value in state.items():
            assert torch.equal(value, trained[name]), name
