"""Bit-exactness of the NF4 format against bitsandbytes, and the format's error handling."""

import logging

import pytest
import torch

import lightning_nf4 as L
from lightning_nf4.format import NF4FormatError, code_table, dynamic_map, from_bnb_tensors, to_bnb_tensors
from lightning_nf4.kernels import cpu, reference

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
try:
    import bitsandbytes.functional as F
except ImportError:  # the format's own checks below run without the reference
    F = None
needs_bitsandbytes = pytest.mark.skipif(F is None, reason="needs bitsandbytes, the reference (pip install -e '.[test]')")

SHAPES = [(64, 64), (100, 70), (33, 17), (1, 1), (3, 5), (256, 1000)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [32, 64, 128, 256, 1024, 4096]


def formula_dequantize(packed, absmax, blocksize, numel):
    """The format's definition, written independently of the package: code[nibble] * absmax."""
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:numel].long()
    return code_table()[nibbles] * absmax.repeat_interleave(blocksize)[:numel]


def bnb_absmax(state):
    if state.nested:
        return state.state2.code[state.absmax.long()] * state.state2.absmax.repeat_interleave(256)[: state.absmax.numel()] + state.offset
    return state.absmax


@needs_bitsandbytes
def test_code_tables_match_bitsandbytes():
    assert torch.equal(code_table("nf4"), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map(signed=True))


@needs_bitsandbytes
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_is_bit_exact(shape, dtype, blocksize, double_quant):
    w = (torch.randn(shape) * 0.02).to(dtype)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    ours = L.quantize_nf4(w, blocksize, double_quant)
    assert torch.equal(ours.packed, packed)
    assert ours.packed.shape == packed.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(ours.absmax, state.absmax)
    assert ours.dtype == dtype and ours.shape == w.shape
    if double_quant:
        assert torch.equal(ours.nested.absmax, state.state2.absmax)
        assert torch.equal(ours.nested.offset, state.offset)
        assert torch.equal(ours.nested.code, state.state2.code)
    # dequantize equals the format's formula on bitsandbytes' own state, rounded once to dtype
    expected = formula_dequantize(packed, bnb_absmax(state), blocksize, w.numel()).to(dtype).view(shape)
    assert torch.equal(ours.dequantize(), expected)


@needs_bitsandbytes
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_matches_bitsandbytes_default_blocksize(dtype, double_quant):
    w = (torch.randn(300, 257) * 0.02).to(dtype)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(L.quantize_nf4(w, 64, double_quant).dequantize(), F.dequantize_4bit(packed, state))


def test_native_and_reference_kernels_agree():
    if not cpu.available():
        pytest.skip("native CPU kernels not built")
    for dtype in DTYPES:
        w = (torch.randn(513, 129) * 3).to(dtype)
        p_ref, a_ref = reference.quantize_4bit(w, code_table(), 64)
        p_nat, a_nat = cpu.quantize_4bit(w, code_table(), 64)
        assert torch.equal(p_ref, p_nat) and torch.equal(a_ref, a_nat)
        for out_dtype in DTYPES:
            ref = reference.dequantize_4bit(p_ref, a_ref, code_table(), 64, w.numel(), out_dtype)
            assert torch.equal(cpu.dequantize_4bit(p_ref, a_ref, code_table(), 64, w.numel(), out_dtype), ref)


def test_zero_blocks_dequantize_to_zero():
    w = torch.randn(8, 64)
    w[2:5] = 0
    for double_quant in (False, True):
        out = L.quantize_nf4(w, 64, double_quant).dequantize()
        assert not out.isnan().any()
        assert torch.equal(out[2:5], torch.zeros(3, 64))
    assert torch.equal(L.quantize_nf4(torch.zeros(4, 64)).dequantize(), torch.zeros(4, 64))


def test_error_is_nf4_sized():
    w = torch.randn(512, 512) * 0.02
    q = L.quantize_nf4(w)
    err = (q.dequantize() - w).norm() / w.norm()
    assert 0.05 < err < 0.12  # NF4 on normal weights: about 0.09 (bitsandbytes: 0.092)
    assert q.nbytes * 8 / w.numel() < 4.2  # double quantization: about 4.13 bits per weight


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_named(bad):
    w = torch.randn(4, 128)
    w[3, 100] = bad
    with pytest.raises(NF4FormatError, match=r"layer\.q_proj\.weight contains NaN or Inf.*elements 448\.\.511"):
        L.quantize_nf4(w, name="layer.q_proj.weight")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.complex64, torch.float64, torch.bool])
def test_unsupported_dtype(dtype):
    with pytest.raises(NF4FormatError, match=r"w has dtype .*float32, bfloat16 or float16"):
        L.quantize_nf4(torch.zeros(4, 64, dtype=dtype), name="w")


@pytest.mark.parametrize("blocksize", [0, 16, 48, 8192, 100, True])
def test_bad_blocksize(blocksize):
    with pytest.raises(NF4FormatError, match="blocksize must be a power of two between 32 and 4096"):
        L.quantize_nf4(torch.randn(4, 64), blocksize)


def test_empty_weight():
    with pytest.raises(NF4FormatError, match="empty"):
        L.quantize_nf4(torch.zeros(0, 64))


def test_meta_device_quantize_gives_shapes_only():
    q = L.quantize_nf4(torch.empty(100, 70, device="meta"))
    assert q.packed.device.type == "meta" and q.packed.shape == (3500, 1)
    assert q.absmax.shape == (110,) and q.nested.absmax.shape == (1,)


def test_serialization_round_trip_and_corruption():
    q = L.quantize_nf4(torch.randn(100, 70))
    tensors = to_bnb_tensors(q)
    back = from_bnb_tensors(dict(tensors))
    assert torch.equal(back.dequantize(), q.dequantize())

    missing = dict(tensors)
    del missing["nested_absmax"]
    with pytest.raises(NF4FormatError, match=r"Missing keys .*w\.nested_absmax"):
        from_bnb_tensors(missing, "w")
    truncated = dict(tensors, **{"": tensors[""][:-10]})
    with pytest.raises(NF4FormatError, match="packed weight has 3490 bytes, expected 3500"):
        from_bnb_tensors(truncated, "w")
    garbage = dict(tensors, **{"quant_state.bitsandbytes__nf4": torch.tensor([0xFF, 0x00, 0x12], dtype=torch.uint8)})
    with pytest.raises(NF4FormatError, match="corrupted"):
        from_bnb_tensors(garbage, "w")
    fp4 = {k.replace("nf4", "fp4"): v for k, v in tensors.items()}
    with pytest.raises(NF4FormatError, match="only NF4"):
        from_bnb_tensors(fp4, "w")


_DROP = object()


def _with_meta(tensors, **changes):
    """A copy of the bnb suffix dict whose quant-state JSON has ``changes`` applied (``_DROP`` deletes a field)."""
    import json

    key = "quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(tensors[key].tolist()).decode("utf-8"))
    for field, value in changes.items():
        if value is _DROP:
            meta.pop(field, None)
        else:
            meta[field] = value
    return dict(tensors, **{key: torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)})


@pytest.mark.parametrize(
    "field, value",
    [
        ("nested_offset", _DROP), ("nested_offset", float("nan")), ("nested_offset", float("inf")),
        ("nested_offset", "0.01"), ("nested_offset", None), ("nested_offset", True), ("nested_offset", -1.0),
        ("blocksize", "abc"), ("blocksize", None), ("blocksize", 0), ("blocksize", 64.0), ("blocksize", True), ("blocksize", 48),
        ("shape", "x"), ("shape", None), ("shape", []), ("shape", [100, "70"]), ("shape", [100, 70.0]), ("shape", [-100, -70]),
        ("shape", [7000, 0]), ("shape", {"a": 1}),
        ("nested_blocksize", 0), ("nested_blocksize", -256), ("nested_blocksize", "256"), ("nested_blocksize", None),
        ("nested_blocksize", 255), ("nested_blocksize", _DROP),
        ("nested_dtype", _DROP), ("nested_dtype", "int8"), ("nested_dtype", 5),
        ("dtype", ["float32"]), ("dtype", 5), ("dtype", _DROP), ("quant_type", 4), ("quant_type", None),
    ],
)
def test_damaged_quant_state_field_is_named(field, value):
    """Every JSON field of the quant state is type- and range-checked: a damaged one is an NF4FormatError naming
    the field and the fix, never a silently wrong weight or a raw ValueError/TypeError/ZeroDivisionError."""
    tensors = to_bnb_tensors(L.quantize_nf4(torch.randn(100, 70), 64, double_quant=True))
    with pytest.raises(NF4FormatError, match=rf"w\.quant_state\.bitsandbytes__nf4.*'{field}'.*re-(export|quantize)"):
        from_bnb_tensors(_with_meta(tensors, **{field: value}), "w")


def test_quant_state_must_match_the_tensors_present():
    """Double quantization is told by the tensors and the JSON together; when they disagree the blob is refused."""
    dq = to_bnb_tensors(L.quantize_nf4(torch.randn(100, 70), 64, double_quant=True))
    plain = to_bnb_tensors(L.quantize_nf4(torch.randn(100, 70), 64, double_quant=False))
    nested_fields = ("nested_blocksize", "nested_dtype", "nested_offset")
    # uint8 absmax (scale codes) with every nested field gone: was read as float scales, off by up to 200
    no_nested_meta = _with_meta(dq, **dict.fromkeys(nested_fields, _DROP))
    with pytest.raises(NF4FormatError, match=r"w\.absmax is uint8.*nested"):
        from_bnb_tensors(no_nested_meta, "w")
    no_nested_tensors = {k: v for k, v in no_nested_meta.items() if not k.startswith("nested_")}
    with pytest.raises(NF4FormatError, match=r"w\.absmax is uint8.*nested"):
        from_bnb_tensors(no_nested_tensors, "w")
    # nested tensors beside a blob that does not describe them
    stray = dict(plain, nested_absmax=dq["nested_absmax"], nested_quant_map=dq["nested_quant_map"])
    with pytest.raises(NF4FormatError, match=r"nested_absmax.*nested_quant_map.*not double-quantized"):
        from_bnb_tensors(stray, "w")
    # a blob that says double-quantized over float scales
    fake_nested = _with_meta(dict(plain, nested_absmax=dq["nested_absmax"], nested_quant_map=dq["nested_quant_map"]),
                             nested_blocksize=256, nested_dtype="float32", nested_offset=0.01)
    with pytest.raises(NF4FormatError, match=r"w\.absmax .*float32.*uint8"):
        from_bnb_tensors(fake_nested, "w")
    # sizes: nested_absmax and both code tables
    with pytest.raises(NF4FormatError, match=r"nested_absmax has 2 entries, expected 1"):
        from_bnb_tensors(dict(dq, nested_absmax=torch.ones(2)), "w")
    with pytest.raises(NF4FormatError, match=r"quant_map has 15 entries, expected 16"):
        from_bnb_tensors(dict(dq, quant_map=dq["quant_map"][:15]), "w")
    with pytest.raises(NF4FormatError, match=r"nested_quant_map has 255 entries, expected 256"):
        from_bnb_tensors(dict(dq, nested_quant_map=dq["nested_quant_map"][:255]), "w")
    # a shape that disagrees with the packed bytes
    with pytest.raises(NF4FormatError, match="packed weight has 3500 bytes, expected 3550"):
        from_bnb_tensors(_with_meta(dq, shape=[100, 71]), "w")
    # the valid blobs still load, to the same weight
    assert torch.equal(from_bnb_tensors(dq, "w").dequantize(), from_bnb_tensors(dict(dq), "w").dequantize())
    assert from_bnb_tensors(plain, "w").nested is None and from_bnb_tensors(dq, "w").nested is not None


@needs_bitsandbytes
def test_quant_state_from_bitsandbytes_loads():
    """A blob bitsandbytes itself writes (nested_dtype 'float32', shape as a list) passes the checks."""
    w = torch.randn(100, 70)
    for double_quant in (False, True):
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        tensors = {"": packed, **state.as_dict(packed=True)}
        assert torch.equal(from_bnb_tensors(tensors, "w").dequantize(), L.quantize_nf4(w, 64, double_quant).dequantize())


def test_custom_ops_pass_opcheck_and_compile():
    """The ops stay traceable: schema, fake kernels and autograd registration check out (opcheck), and
    torch.compile(fullgraph=True) of an NF4Linear forward matches eager."""
    from lightning_nf4 import NF4Linear
    from lightning_nf4.kernels import ops

    w = torch.randn(64, 128)
    q = L.quantize_nf4(w, 64, True)
    torch.library.opcheck(ops._dequantize_4bit, (q.packed.view(-1), q.absmax, q.code, 64, w.numel(), torch.bfloat16, *q.nested_args()))
    torch.library.opcheck(ops._quantize_4bit, (w, q.code, 64))
    torch.library.opcheck(ops._quantize_blockwise_8bit, (q.nested.absmax.repeat(300), q.nested.code, 256))
    torch.library.opcheck(ops._gemv_4bit, (torch.randn(128), q.packed.view(-1), q.absmax, q.code, 64, 64, 128, *q.nested_args()))
    layer = NF4Linear.from_linear(torch.nn.Linear(128, 64), compute_dtype=torch.float32)
    x = torch.randn(3, 128, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x))
    grad = torch.autograd.grad(compiled(x).sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(layer(x).sum(), x)[0])
