"""Edges of ``NF4Linear`` the main tests leave open: ``reset_parameters`` (how a meta-built layer gets values),
the state dict with ``keep_vars``, a checkpoint in another NF4 layout, and a bias of the wrong shape."""

import math
import sys

import pytest
import torch
from torch import nn

from lightning_nf4 import NF4Linear
from lightning_nf4.format import quantize_nf4
from tests import isolated


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reset_parameters_draws_what_nn_linear_draws_then_quantizes(dtype):
    """A layer built on ``meta`` and given storage by ``to_empty`` gets its values from ``reset_parameters``
    (what a sharded strategy calls). From the same seed it must hold the NF4 quantization of the very weight
    ``nn.Linear`` draws, in the layer's dtype, and ``nn.Linear``'s bias (bound ``1/sqrt(in_features)``, not
    ``out_features``): a wrong bound, a skipped quantization or a float32 draw all change these numbers."""
    in_features, out_features = 256, 48  # unequal, so in/out mix-ups show
    layer = NF4Linear(in_features, out_features, dtype=dtype, device="meta")
    layer.to_empty(device="cpu")
    torch.manual_seed(7)
    layer.reset_parameters()
    torch.manual_seed(7)
    ref = nn.Linear(in_features, out_features, dtype=dtype)
    expected = quantize_nf4(ref.weight.detach(), 64, True)
    assert layer.quant.dtype == dtype and layer.dequantize().dtype == dtype
    assert torch.equal(layer.weight, expected.packed) and torch.equal(layer.quant.absmax, expected.absmax)
    assert torch.equal(layer.dequantize(), expected.dequantize())
    assert torch.equal(layer.bias, ref.bias)
    assert layer.bias.abs().max() <= 1 / math.sqrt(in_features)
    assert not layer.weight.requires_grad


def test_reset_parameters_keeps_the_layers_nf4_layout():
    """``reset_parameters`` quantizes with the layer's own block size and double quantization."""
    layer = NF4Linear(128, 32, blocksize=128, double_quant=False)
    layer.reset_parameters()
    assert layer.quant.blocksize == 128 and layer.quant.nested is None
    assert layer.quant.absmax.numel() == 128 * 32 // 128 and layer.dequantize().abs().sum() > 0


def test_state_dict_with_keep_vars_holds_the_same_tensors():
    """``state_dict(keep_vars=True)`` (used by checkpointing and FSDP code) hands the packed Parameter itself for
    ``weight`` and, for every bitsandbytes part, the same values as a plain ``state_dict()``: not the packed codes
    under ``weight.absmax`` and friends."""
    layer = NF4Linear.from_linear(nn.Linear(130, 48))
    plain, kept = layer.state_dict(), layer.state_dict(keep_vars=True)
    assert plain.keys() == kept.keys()
    assert kept["weight"] is layer.weight and kept["bias"] is layer.bias
    for key in plain:
        assert kept[key].dtype == plain[key].dtype and torch.equal(kept[key], plain[key]), key
    fresh = NF4Linear(130, 48)
    fresh.load_state_dict(kept)
    assert torch.equal(fresh.dequantize(), layer.dequantize())


def test_loading_another_nf4_layout_adopts_its_block_size():
    """A checkpoint quantized with block size 128 and no double quantization, loaded into a default layer
    (64, double): the layer takes the checkpoint's layout, and its attributes say so. A float weight loaded
    afterwards, or ``reset_parameters``, then quantizes in that layout too, as the layer reports it."""
    source = NF4Linear.from_linear(nn.Linear(256, 32), blocksize=128, double_quant=False)
    layer = NF4Linear(256, 32)
    layer.load_state_dict(source.state_dict())
    assert (layer.blocksize, layer.double_quant) == (128, False)
    assert (layer.quant.blocksize, layer.quant.nested) == (128, None)
    assert "blocksize=128, double_quant=False" in repr(layer)
    float_weight = torch.randn(32, 256)
    layer.load_state_dict({"weight": float_weight, "bias": torch.zeros(32)})
    assert torch.equal(layer.dequantize(torch.float32), quantize_nf4(float_weight, 128, False).dequantize(torch.float32))


def test_a_bias_of_the_wrong_shape_is_an_error_not_a_broadcast():
    """A one-element bias would broadcast into ``copy_`` silently; like ``nn.Linear``, the load must fail with a
    size mismatch and leave the bias as it was."""
    layer = NF4Linear.from_linear(nn.Linear(64, 16))
    before = layer.bias.detach().clone()
    state = dict(layer.state_dict(), bias=torch.ones(1))
    with pytest.raises(RuntimeError, match=r"size mismatch for bias: checkpoint has shape \(1,\), this layer has \(16,\)"):
        layer.load_state_dict(state)
    assert torch.equal(layer.bias, before)
    with pytest.raises(RuntimeError, match="size mismatch for bias"):
        nn.Linear(64, 16).load_state_dict({"weight": torch.zeros(16, 64), "bias": torch.ones(1)})



def test_one_token_that_needs_grad_gets_its_gradient():
    """A single token (``x.numel() == in_features``) takes the matrix-vector kernel only without autograd; when
    it needs a gradient (a batch of one token in training) the input's gradient is ``grad_out @ W`` as for any
    batch, computed here from the dequantized weight."""
    layer = NF4Linear.from_linear(nn.Linear(128, 64), compute_dtype=torch.float32)
    x = torch.randn(1, 128, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn(1, 64)
    out.backward(grad_out)
    w = layer.dequantize(torch.float32)
    torch.testing.assert_close(out.detach(), x.detach() @ w.t() + layer.bias.detach())
    torch.testing.assert_close(x.grad, grad_out @ w)


def test_a_float_weight_with_stray_nf4_parts_is_refused():
    """A float ``weight`` next to NF4 parts (``weight.absmax`` ...) but without the quant state is a damaged
    checkpoint: loading it must name the stray parts, not quantize the float weight and drop them."""
    source = NF4Linear.from_linear(nn.Linear(64, 16))
    state = {"weight": torch.randn(16, 64), "bias": torch.zeros(16), "weight.absmax": source.state_dict()["weight.absmax"]}
    with pytest.raises(RuntimeError, match=r"float weight given together with \['absmax'\] but no quant state"):
        NF4Linear(64, 16).load_state_dict(state)

_META_FIRST = r"""
import torch
from lightning_nf4 import NF4Linear
from lightning_nf4.format import quantize_nf4
failures = []
for double_quant in (True, False):  # the first NF4 layers this process builds, under a meta device context
    try:
        with torch.device("meta"):
            layer = NF4Linear(70, 100, double_quant=double_quant)
        assert layer.weight.is_meta and layer.quant.absmax.is_meta
    except Exception as err:
        failures.append(f"meta build, double_quant={double_quant}: {type(err).__name__}: {err}")
try:  # later work on the CPU
    q = quantize_nf4(torch.randn(100, 70), 64, False)
    assert q.code.device.type == "cpu" and q.dequantize(torch.float32).shape == (100, 70)
except Exception as err:
    failures.append(f"CPU quantize afterwards: {type(err).__name__}: {err}")
print(failures or "ok")
"""


def test_building_the_first_layer_under_a_meta_device_context():
    """``with torch.device("meta"): NF4Linear(...)`` (as test_linear's meta construction does, there after other
    tests have filled the caches) must work as the first thing a process does, with or without double
    quantization, and leave CPU quantization working afterwards. A fresh interpreter: the tables are cached
    per process."""
    done = isolated.run([sys.executable, "-c", _META_FIRST], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.stdout + done.stderr)[-2000:]


_UNDER_A_DEFAULT_DEVICE = """
import torch
from lightning_nf4 import NF4Linear
from lightning_nf4.format import quantize_nf4
from lightning_nf4.layers.group import DequantGroup
from lightning_nf4.kernels import cpu

assert cpu.available(), "the C library is not built; this check needs it"
torch.manual_seed(0)
layers = [NF4Linear.from_linear(torch.nn.Linear(256, n, dtype=torch.bfloat16)) for n in (64, 96)]
w = torch.randn(96, 256)
one, many = torch.randn(1, 256, dtype=torch.bfloat16), torch.randn(5, 256, dtype=torch.bfloat16)

def results():
    q = quantize_nf4(w, 64, True)
    group = DequantGroup(layers)
    return [q.packed, q.absmax, q.dequantize(torch.float32), layers[0](one), layers[0](many), group.weight(layers[1], torch.bfloat16)]

outside = results()
with torch.device("meta"):  # the C kernels must write into host memory they allocate, never a default device's
    inside = results()
assert all(b.device.type == "cpu" and torch.equal(a, b) for a, b in zip(outside, inside))
print("ok")
"""


def test_the_cpu_kernels_allocate_host_memory_under_a_default_device():
    """Lightning's configure_model runs under ``torch.device(root_device)``: a CPU kernel called there (quantize,
    dequantize, the 1-token product, a group's dequantize) must still allocate what its C code writes on the host
    (``meta`` stands in for the GPU here). A child process, since a C write through a meta pointer crashes it."""
    done = isolated.run([sys.executable, "-c", _UNDER_A_DEFAULT_DEVICE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.stdout + done.stderr)[-2000:]


def test_gemv_setting_with_rows_the_kernel_does_not_take_is_refused_by_name():
    """The gemv kernel takes 1, 2 or 4 rows per program (one accumulator each); a forced setting with another
    count is an error that names the allowed counts, not a kernel compiled to compute the wrong rows."""
    from lightning_nf4.kernels import triton_kernels as tk

    assert tk._gemv_setting((4, 32, 2, 3, 1), 64) == (4, 32, 2, 3, 1)
    assert tk._gemv_setting((2, 32, 2, 3, 4), 40) == (2, 2, 2, 3, 4)  # 40 blocks: 4 parts of 10, steps of 2
    with pytest.raises(ValueError, match=r"rows per program must be one of \(1, 2, 4\), got 8"):
        tk._gemv_setting((8, 16, 4, 3, 1), 64)


def test_gemv_first_use_timing_reads_more_than_l2_holds():
    """The first-use timing cycles through copies of the weight that together outgrow any card's L2 (a decode step
    reads each weight cold), 2 to 64 of them: an 8B q projection (8.7 MB) gets 16, an 8192x8192 weight 4."""
    from lightning_nf4.kernels import triton_kernels as tk

    assert tk.GEMV_TIMING_BYTES >= 100 << 20  # H100 and H200: 50 MB of L2
    for nbytes in (2_200_000, 8_700_000, 34_600_000, 10, 1 << 30):
        copies = tk.gemv_timing_copies(nbytes)
        assert 2 <= copies <= 64
        assert copies * nbytes >= tk.GEMV_TIMING_BYTES or copies == 64
    assert tk.gemv_timing_copies(8_700_000) == 16 and tk.gemv_timing_copies(34_600_000) == 4


# -- the weight replaced from outside -------------------------------------------------------------------------------


def _layer(out_features=32, in_features=64, scale=1.0, seed=0, bias=False):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(scale)
    return NF4Linear.from_linear(linear, compute_dtype=torch.float32)


def test_setting_quant_replaces_codes_and_scales_together():
    """``layer.quant = q`` kept the layer's old codes under q's scales (16.5 off)."""
    layer, new = _layer(), quantize_nf4(torch.randn(32, 64) * 3, 64, False)
    layer.quant = new
    assert torch.equal(layer.dequantize(), new.dequantize()) and not layer.double_quant
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), nn.functional.linear(x, new.dequantize()))
    with pytest.raises(ValueError, match=r"the layout is \(64, 64\), this layer is \[32, 64\]"):
        layer.quant = quantize_nf4(torch.randn(64, 64), 64, False)


def test_a_weight_replaced_by_other_codes_or_floats_is_refused_not_misread():
    """Tying as for ``nn.Linear`` (``b.weight = a.weight``) read a's codes with b's scales (output 157 against 1.6);
    a float tensor in ``weight`` (assigned, or written by ``vector_to_parameters`` through ``.data``) was read as
    codes; codes of a smaller layer were read past their end. Codes that only moved or were copied still work."""
    a, b = _layer(), _layer(scale=100.0, seed=1)
    b.weight = a.weight
    with pytest.raises(RuntimeError, match=r"replaced by other packed codes .*Share the NF4Linear module itself"):
        b(torch.randn(2, 64))
    c = _layer()
    c.weight = nn.Parameter(torch.randn(32, 64), requires_grad=False)
    with pytest.raises(RuntimeError, match=r"replaced by a torch.float32 tensor of shape \(32, 64\)"):
        c.dequantize()
    d = _layer(bias=True)
    vector = nn.utils.parameters_to_vector(d.parameters())  # the float bias makes it a float vector
    nn.utils.vector_to_parameters(vector, d.parameters())  # an identity for nn.Linear; floats into the codes here
    with pytest.raises(TypeError, match="NF4 codes must be uint8"):
        d(torch.randn(2, 64))
    big = _layer(128, 256)
    with pytest.raises(ValueError, match=r"16 bytes of codes \(need 16384\)"):
        torch.ops.lightning_nf4.dequantize_4bit(_layer(4, 8).weight, big.quant.absmax, big.quant.code, 64, 128 * 256, torch.float32)
    e, x = _layer(), torch.randn(2, 64)
    expected = e(x)
    e.weight = nn.Parameter(e.weight.detach().clone(), requires_grad=False)  # the same codes, copied
    assert torch.equal(e(x), expected)


def test_torch_func_transforms_run_through_the_ops():
    """``vmap``, ``grad`` and ``jacrev`` wrap tensors in objects without storage: the C kernels were handed them
    ("Cannot access data pointer"). Under a transform the ops go through the dispatcher, and autograd keeps the
    weight itself instead of re-dequantizing it."""
    layer = _layer(16, 64, bias=True)
    weight, bias = layer.dequantize(torch.float32), layer.bias.detach()
    x = torch.randn(5, 64)
    torch.testing.assert_close(torch.func.vmap(layer)(x), nn.functional.linear(x, weight, bias))
    grad = torch.func.grad(lambda v: layer(v).sum())(x[:3])
    torch.testing.assert_close(grad, weight.sum(0).expand(3, 64))
    jacobian = torch.func.jacrev(layer)(x[0])
    torch.testing.assert_close(jacobian, weight)


def test_constructor_arguments_it_cannot_hold_are_named_with_the_fix():
    """float64 (a weight NF4 cannot be quantized from; it failed only at state_dict()), a layer without features (it
    failed at forward with a ZeroDivisionError), a dtype given as a string; numpy's integers are integers."""
    import numpy as np

    from lightning_nf4 import NF4Linear, dequantize_model

    with pytest.raises(ValueError, match=r"dtype \(what the weight is quantized from.*torch.float32, torch.bfloat16, torch.float16; got torch.float64"):
        NF4Linear(64, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"at least one input and one output feature, got in_features=0"):
        NF4Linear(0, 8)
    with pytest.raises(ValueError, match=r"compute_dtype must be .*got the string 'bfloat16': pass torch.bfloat16"):
        NF4Linear(64, 64, compute_dtype="bfloat16")
    assert NF4Linear(64, 64, blocksize=np.int64(64)).blocksize == 64
    model = torch.nn.Sequential(NF4Linear.from_linear(torch.nn.Linear(64, 64), compute_dtype=torch.float32))
    with pytest.raises(ValueError, match=r"dtype must be torch.float32, torch.bfloat16 or torch.float16 \(or its name\), got 'half-ish'"):
        dequantize_model(model, "half-ish")
    assert dequantize_model(model, "bfloat16")[0].weight.dtype == torch.bfloat16


def test_reset_parameters_draws_a_new_weight_in_the_nf4_tensor_form_too():
    """``reset_parameters`` (what init flows after ``to_empty`` call) on a layer holding its weight as an ``NF4Tensor``
    (the form nf4_fsdp shards): a new weight in that form, of the same source dtype (it failed: ``_quant`` is None)."""
    from lightning_nf4.format.tensor import NF4Tensor

    layer = NF4Linear.from_linear(nn.Linear(64, 32).to(torch.bfloat16))
    layer.to_nf4_tensor()
    before = layer.dequantize(torch.float32)
    torch.manual_seed(1)
    layer.reset_parameters()
    assert isinstance(layer.weight, NF4Tensor) and layer.quant.dtype == torch.bfloat16
    assert not torch.equal(layer.dequantize(torch.float32), before)
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).shape == (2, 32)
