"""NF4Linear: numerics against a float reference, bitsandbytes state-dict interchange, devices."""

import copy
import logging
import math

import pytest
import torch
from torch import nn

import lightning_nf4 as L
from lightning_nf4 import NF4Linear

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def make(in_f=70, out_f=100, bias=True, **kw):
    linear = nn.Linear(in_f, out_f, bias=bias)
    return linear, NF4Linear.from_linear(linear, **kw)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_backward_match_dequantized_reference(compute_dtype):
    linear, layer = make(compute_dtype=compute_dtype)
    x = torch.randn(4, 7, 70, requires_grad=True)
    out = layer(x.to(compute_dtype))
    assert out.dtype == compute_dtype and out.shape == (4, 7, 100)
    assert layer(x).dtype == torch.float32  # outside autocast the output keeps the input's dtype
    w = layer.dequantize(compute_dtype).detach().requires_grad_(False)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(x_ref.to(compute_dtype), w, linear.bias.to(compute_dtype))
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[compute_dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=tol, rtol=tol)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert linear.bias.grad is not None  # the bias stays trainable unless a callback freezes it


def _reachable_tensors(obj, depth: int = 4) -> list[torch.Tensor]:
    """Tensors held by ``obj``: itself, or inside its tuples, lists, dicts, slots and attributes (a few levels)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0 or obj is None or isinstance(obj, (int, float, str, bool, torch.dtype, torch.Size, torch.device)):
        return []
    if isinstance(obj, (tuple, list)):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    else:
        slots = [getattr(obj, name, None) for cls in type(obj).__mro__ for name in getattr(cls, "__slots__", ())]
        children = slots + list(getattr(obj, "__dict__", {}).values())
    return [t for child in children for t in _reachable_tensors(child, depth - 1)]


def test_backward_saves_no_float_weight(monkeypatch):
    """What autograd stores for the matmul between forward and backward holds no float copy of the weight, and
    the copy the forward made is dead once forward returns. The layer's own saved-tensor hooks are the innermost
    (an outer ``saved_tensors_hooks`` would see nothing), so the test watches what they are given and return."""
    import weakref

    from lightning_nf4.layers import linear as linear_module

    _, layer = make(1024, 1024, compute_dtype=torch.float32)
    x = torch.randn(2, 1024, requires_grad=True)
    offered, stored = [], []
    original = linear_module._Redequantize.pack

    def recording(self, tensor):
        kept = original(self, tensor)
        offered.append((tuple(tensor.shape), weakref.ref(tensor)))
        stored.append([(tuple(t.shape), t.dtype) for t in _reachable_tensors(kept)])  # shapes only: no reference kept
        return kept

    monkeypatch.setattr(linear_module._Redequantize, "pack", recording)
    out = layer(x)
    weights = [ref for shape, ref in offered if shape == (1024, 1024)]
    assert weights, f"the float weight was never offered to the saved-tensor hooks: {[s for s, _ in offered]}"
    assert all(ref() is None for ref in weights), "a float weight outlived the forward"
    floats = [(shape, dtype) for kept in stored for shape, dtype in kept if dtype.is_floating_point and math.prod(shape) >= 1024 * 1024]
    assert not floats, f"autograd stores a float weight-sized tensor: {floats}"
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ layer.dequantize(torch.float32), rtol=1e-5, atol=1e-5)


def test_autocast_sets_compute_dtype():
    _, layer = make(compute_dtype=torch.float32)
    x = torch.randn(3, 70)
    assert layer(x).dtype == torch.float32
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_weight_is_a_frozen_parameter_not_a_buffer():
    _, layer = make()
    assert list(layer.buffers()) == []
    names = {n: p.requires_grad for n, p in layer.named_parameters()}
    assert names == {"weight": False, "bias": True}
    assert layer.weight.dtype == torch.uint8


def test_to_moves_scales_and_keeps_their_dtype():
    _, layer = make()
    before = layer.dequantize()
    layer.to(torch.float16)  # a dtype cast must not touch the fp32 statistics
    assert layer.quant.nested.absmax.dtype == torch.float32 and layer.bias.dtype == torch.float16
    assert torch.equal(layer.dequantize(), before)
    moved = copy.deepcopy(layer).to("meta")
    assert moved.weight.device.type == "meta" and moved.quant.absmax.device.type == "meta"


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_bitsandbytes_state_dict_loads_into_nf4linear(double_quant, bias):
    bnb = pytest.importorskip("bitsandbytes")
    linear = nn.Linear(130, 48, bias=bias)
    ref = bnb.nn.Linear4bit(130, 48, bias=bias, compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, compress_statistics=double_quant, quant_type="nf4")._quantize("cpu")
    if bias:
        ref.bias = nn.Parameter(linear.bias.data.clone())
    state = ref.state_dict()
    ours = NF4Linear(130, 48, bias=bias, compute_dtype=torch.float32)
    ours.load_state_dict(state)
    assert ours.double_quant == double_quant
    x = torch.randn(5, 130)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x)) or torch.allclose(ours(x), ref(x), atol=1e-6)
    assert torch.equal(ours.dequantize(torch.float32), bnb.functional.dequantize_4bit(ref.weight.data, ref.weight.quant_state))
    for key, value in ours.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4linear_state_dict_loads_into_bitsandbytes(double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    linear, ours = make(130, 48, double_quant=double_quant, compute_dtype=torch.float32)
    state = ours.state_dict()
    ref = bnb.nn.Linear4bit(130, 48, compute_dtype=torch.float32, quant_type="nf4")
    quant_stats = {k[len("weight."):]: v for k, v in state.items() if k.startswith("weight.")}
    ref.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], quant_stats, device="cpu", module=ref)
    ref.bias = nn.Parameter(state["bias"])
    x = torch.randn(5, 130)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), atol=1e-6, rtol=0)
    assert torch.equal(bnb.functional.dequantize_4bit(ref.weight.data, ref.weight.quant_state), ours.dequantize(torch.float32))


def test_float_state_dict_is_quantized_on_load():
    linear, expected = make()
    layer = NF4Linear(70, 100)
    layer.load_state_dict(linear.state_dict())
    assert torch.equal(layer.weight, expected.weight)
    assert torch.equal(layer.dequantize(), expected.dequantize())


def test_meta_construction_then_assign_load():
    _, source = make()
    with torch.device("meta"):
        layer = NF4Linear(70, 100)
    assert layer.weight.device.type == "meta" and layer.bias.device.type == "meta"
    layer.load_state_dict(source.state_dict(), assign=True)
    assert layer.weight.device.type == "cpu" and layer.bias.device.type == "cpu"
    x = torch.randn(2, 70)
    assert torch.equal(layer(x), source(x))


def test_load_errors_are_clear():
    _, source = make()
    state = source.state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for weight: checkpoint has shape \\(100, 70\\), this layer is \\[100, 71\\]"):
        NF4Linear(71, 100).load_state_dict(state)
    broken = {k: v for k, v in state.items() if k != "weight.absmax"}
    with pytest.raises(RuntimeError, match="Missing keys for the NF4 weight weight: \\['weight.absmax'\\]"):
        NF4Linear(70, 100).load_state_dict(broken)
    no_state = {"weight": state["weight"], "bias": state["bias"]}
    with pytest.raises(RuntimeError, match="no 'weight.quant_state.bitsandbytes__nf4'"):
        NF4Linear(70, 100).load_state_dict(no_state)
    with pytest.raises(RuntimeError, match="Missing key"):
        NF4Linear(70, 100).load_state_dict({"bias": state["bias"]})


@pytest.mark.parametrize("stray", ["0.weight.bogus", "0.lora_A.default.weight", "0.bogus", "0.bias.extra", "0._extra_state"])
@pytest.mark.parametrize("quantized_source", [True, False])
def test_unexpected_keys_are_reported_as_nn_linear_does(stray, quantized_source):
    """A key under an NF4Linear's prefix that it does not own is an unexpected key, as for nn.Linear: strict
    loading raises; non-strict loading loads the weight and returns the key among unexpected_keys."""
    linear, layer = make()
    float_model, nf4_model = nn.Sequential(linear), nn.Sequential(layer)
    source = nf4_model if quantized_source else float_model
    state = dict(source.state_dict(), **{stray: torch.zeros(3)})
    unexpected = rf"Unexpected key\(s\) in state_dict: \"{stray}\""
    if not quantized_source:
        with pytest.raises(RuntimeError, match=unexpected):
            nn.Sequential(nn.Linear(70, 100)).load_state_dict(state)
    with pytest.raises(RuntimeError, match=unexpected):
        nn.Sequential(NF4Linear(70, 100)).load_state_dict(state)
    target = nn.Sequential(NF4Linear(70, 100))
    result = target.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [stray] and result.missing_keys == []
    if not quantized_source:
        assert nn.Sequential(nn.Linear(70, 100)).load_state_dict(state, strict=False).unexpected_keys == [stray]
    assert torch.equal(target[0].dequantize(), layer.dequantize())
    # the bitsandbytes keys themselves are expected: a strict load of the real state dict reports nothing
    assert not any(nn.Sequential(NF4Linear(70, 100)).load_state_dict(nf4_model.state_dict()))


def test_unexpected_bias_without_a_bias_is_reported():
    linear, layer = make(bias=True)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"bias\""):
        NF4Linear(70, 100, bias=False).load_state_dict(layer.state_dict())
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"bias\""):
        nn.Linear(70, 100, bias=False).load_state_dict(linear.state_dict())


def test_from_linear_rejects_non_linear_and_bad_dtype():
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        NF4Linear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(L.NF4FormatError, match=r"model\.proj\.weight has dtype torch\.float64"):
        NF4Linear.from_linear(nn.Linear(64, 64, dtype=torch.float64), name="model.proj")
    with pytest.raises(ValueError, match="compute_dtype"):
        NF4Linear(64, 64, compute_dtype=torch.int8)


def _track_dequantize(monkeypatch, layer):
    """Weak references to every weight ``NF4Weight.dequantize`` returns from now on."""
    import weakref

    made = []
    original = type(layer.quant).dequantize

    def tracking(self, *args, **kwargs):
        w = original(self, *args, **kwargs)
        made.append(weakref.ref(w))
        return w

    monkeypatch.setattr(type(layer.quant), "dequantize", tracking)
    return made


def _count_dequantize(monkeypatch, layer):
    calls = []
    original = type(layer.quant).dequantize

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(layer.quant), "dequantize", counting)
    return calls


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recompute_serves_backward(monkeypatch, use_reentrant):
    """Under non-reentrant checkpointing the recompute's dequantized weight serves the backward (2 passes
    instead of 3); gradients equal the plain path's exactly either way."""
    from torch.utils.checkpoint import checkpoint

    _, layer = make(256, 128, compute_dtype=torch.float32)
    x = torch.randn(5, 256, requires_grad=True)
    grad = torch.randn(5, 128)
    layer(x).backward(grad)
    expected, x.grad = x.grad.clone(), None
    calls = _count_dequantize(monkeypatch, layer)
    checkpoint(layer, x, use_reentrant=use_reentrant).backward(grad)
    assert torch.equal(x.grad, expected)
    assert len(calls) == (3 if use_reentrant else 2)
    calls.clear()
    layer(x).backward(grad)  # without checkpointing backward dequantizes again
    assert len(calls) == 2


def test_checkpoint_first_pass_keeps_no_float_weight(monkeypatch):
    """The checkpointed forward must not hold its dequantized weight until backward."""
    from torch.utils.checkpoint import checkpoint

    _, layer = make(1024, 1024, compute_dtype=torch.float32)
    x = torch.randn(2, 1024, requires_grad=True)
    made = _track_dequantize(monkeypatch, layer)
    out = checkpoint(layer, x, use_reentrant=False)
    assert len(made) == 1 and made[0]() is None
    out.sum().backward()
    assert len(made) == 2 and x.grad is not None


@pytest.mark.parametrize("grouped", [False, True])
def test_plain_forward_keeps_no_float_weight_and_backward_rebuilds_it(monkeypatch, grouped):
    """Without checkpointing, the forward's dequantized weight dies with the forward (autograd keeps how to
    rebuild it, not the tensor), and backward dequantizes once more; gradients equal dense autograd's."""
    from lightning_nf4.layers import DequantGroup

    _, layer = make(512, 256, compute_dtype=torch.float32)
    if grouped:  # a group of one member still hands out a view of the round's flat buffer
        layer._group = DequantGroup([layer])
    x = torch.randn(3, 512, requires_grad=True)
    dense = layer.dequantize(torch.float32).clone()
    made = _track_dequantize(monkeypatch, layer)
    rounds = _track_group_rounds(monkeypatch)
    out = layer(x)
    assert len(made) == (0 if grouped else 1) and len(rounds) == (1 if grouped else 0)
    assert all(ref() is None for ref in made + rounds), "the forward's float weight outlived it"
    grad = torch.randn_like(out)
    out.backward(grad)
    assert len(made) == (1 if grouped else 2) and len(rounds) == (1 if grouped else 0)  # backward rebuilds one weight
    assert all(ref() is None for ref in made + rounds)
    torch.testing.assert_close(x.grad, grad @ dense)


def _track_group_rounds(monkeypatch):
    """Weak references to every flat buffer a group dequantize (``ops.dequantize_4bit_group``) returns from now on."""
    import weakref

    from lightning_nf4.kernels import ops

    made = []
    original = ops.dequantize_4bit_group

    def tracking(*args, **kwargs):
        flat = original(*args, **kwargs)
        made.append(weakref.ref(flat))
        return flat

    monkeypatch.setattr(ops, "dequantize_4bit_group", tracking)
    return made


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("simd", [None, False])
def test_one_token_gemv_on_cpu_matches_dequantized_matvec(double_quant, blocksize, dtype, simd):
    """The fused CPU gemv (reads the packed codes, no float weight) through NF4Linear's 1-token path, within
    rounding of the exact product with the dequantized weight (fp32 accumulation, one rounding to the dtype, the
    bias added in the dtype: ``tests.cpu_paths.assert_gemv_within_rounding``), with the AVX-512 path where the
    CPU has it and the portable one; a layout it does not take (in_features not whole blocks) falls back."""
    from lightning_nf4.kernels import cpu

    cpu.set_simd(simd)
    try:
        _check_cpu_gemv(double_quant, blocksize, dtype)
    finally:
        cpu.set_simd(None)


def _check_cpu_gemv(double_quant, blocksize, dtype):
    from lightning_nf4.kernels import cpu
    from tests.cpu_paths import assert_gemv_within_rounding

    torch.manual_seed(0)
    for out_features, in_features in ((96, 512), (7, 256), (40, 100)):
        layer = NF4Linear.from_linear(nn.Linear(in_features, out_features), blocksize=blocksize,
                                      double_quant=double_quant, compute_dtype=dtype)
        x = torch.randn(1, 1, in_features).to(dtype)
        with torch.no_grad():
            out = layer(x)
        assert out.shape == (1, 1, out_features) and out.dtype == dtype
        fused = cpu.has_gemv(in_features, blocksize)
        assert fused == (cpu.available() and in_features % blocksize == 0)
        # the fused gemv scales the codes in fp32; the fallback multiplies by the weight dequantized to the dtype
        assert_gemv_within_rounding(out, x, layer.dequantize(torch.float32 if fused else dtype), layer.bias)
