"""Edges of the NF4 format (lightning_nf4/format/quantized.py) and of its bitsandbytes state-dict form
(lightning_nf4/format/bnb_state.py) that tests/test_format.py does not reach: odd element counts, all-zero
weights, dtypes other than float32, other packed storage dtypes, moves of the statistics alone, and quant-state
blobs or tensors damaged in ways that must be refused with an NF4FormatError naming the weight."""

import json
from dataclasses import replace

import pytest
import torch

from lightning_nf4.format import NF4FormatError, from_bnb_tensors, to_bnb_tensors
from lightning_nf4.format.bnb_state import QUANT_STATE_KEY, required_parts
from lightning_nf4.format.quantized import float_dtype, quantize_nf4


def _same(a, b):
    """Two NF4Weights with the same layout and the same bytes, part by part."""
    return (a.shape == b.shape and a.dtype == b.dtype and a.blocksize == b.blocksize and a.double_quant == b.double_quant
            and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors())))


def _blob(meta: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def _meta(tensors) -> dict:
    return json.loads(bytes(tensors[QUANT_STATE_KEY].tolist()).decode("utf-8"))


# -- quantized.py ----------------------------------------------------------------------------------------------
def test_float_dtype_reads_dtypes_and_their_names():
    for name in ("bfloat16", "torch.bfloat16"):
        assert float_dtype(name) is torch.bfloat16
    assert float_dtype(torch.float16) is torch.float16 and float_dtype("float32") is torch.float32
    for other in ("float64", "torch.int8", torch.float64, "bf16", 5, None, "torch."):
        assert float_dtype(other) is None, other


@pytest.mark.parametrize("double_quant", [True, False])
def test_block_count_and_bytes_are_the_layouts(double_quant):
    """``num_blocks`` counts a partial last block; ``nbytes`` is every stored part's bytes (computed here from the
    layout: half a byte a code, a float32 or uint8 scale a block, float32 tables)."""
    q = quantize_nf4(torch.randn(100, 70), 64, double_quant)  # 7000 codes: 109 whole blocks and a partial one
    assert q.num_blocks == 110 == q.absmax.numel()
    expected = 3500 + 16 * 4 + (110 * 1 + 1 * 4 + 256 * 4 + 4 if double_quant else 110 * 4)
    assert q.nbytes == expected


def test_moving_the_statistics_alone_and_then_the_codes():
    """``to(stats_only=True)`` leaves the packed codes where they are (their owner moves them); a later whole
    move still moves them; ``with_packed`` brings the statistics to the new codes' device."""
    q = quantize_nf4(torch.randn(64, 128))
    stats = q.to("meta", stats_only=True)
    assert stats.packed is q.packed and stats.packed.device.type == "cpu"
    assert all(p.device.type == "meta" for p in stats.tensors()[1:])
    whole = stats.to("meta")
    assert all(p.device.type == "meta" for p in whole.tensors())
    assert q.to("cpu") is q
    moved = q.with_packed(q.packed.to("meta"))
    assert all(p.device.type == "meta" for p in moved.tensors())
    assert [p.shape for p in moved.tensors()] == [p.shape for p in q.tensors()]


def test_dequantize_to_an_unsupported_dtype_is_named():
    q = quantize_nf4(torch.randn(8, 64))
    for dtype in (torch.float64, torch.int8):
        with pytest.raises(NF4FormatError, match="Cannot dequantize to torch"):
            q.dequantize(dtype)


def test_non_finite_error_names_the_first_bad_block():
    w = torch.randn(8, 128)
    w[1, 10] = float("nan")  # element 138: block 2
    w[6, 5] = float("inf")  # element 773: block 12
    with pytest.raises(NF4FormatError, match=r"w contains NaN or Inf \(first in elements 128\.\.191 "):
        quantize_nf4(w, name="w")


def test_a_non_tensor_is_a_type_error_naming_the_weight():
    with pytest.raises(TypeError, match="layer.weight: expected a torch.Tensor to quantize, got list"):
        quantize_nf4([[1.0, 2.0]], name="layer.weight")


# -- bnb_state.py: round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(3, 5), (33, 17), (1, 1), (100, 70)])
def test_round_trip_keeps_every_byte_and_the_dtype(shape, dtype, double_quant):
    """Odd element counts (a half-used last byte), partial last blocks, and the original dtype, which is what the
    weight dequantizes to by default."""
    q = quantize_nf4(torch.randn(shape).to(dtype), 64, double_quant)
    back = from_bnb_tensors(to_bnb_tensors(q), "w")
    assert _same(back, q)
    assert back.dequantize().dtype == dtype and torch.equal(back.dequantize(), q.dequantize())


def test_an_all_zero_weight_round_trips():
    """A zero layer (e.g. a freshly initialised one) has absmax mean 0: a nested_offset of exactly 0 is valid."""
    q = quantize_nf4(torch.zeros(64, 128), 64, True)
    tensors = to_bnb_tensors(q)
    assert _meta(tensors)["nested_offset"] == 0.0
    back = from_bnb_tensors(tensors, "w")
    assert _same(back, q) and not back.dequantize().any()


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32, torch.int32])
def test_packed_codes_in_another_storage_dtype_load_to_the_same_bytes(storage):
    """bnb_4bit_quant_storage: bitsandbytes keeps the same packed bytes in a tensor of another dtype."""
    q = quantize_nf4(torch.randn(64, 128), 64, True)
    tensors = to_bnb_tensors(q)
    other = tensors[""].reshape(-1).view(storage).reshape(-1, 1)
    back = from_bnb_tensors(dict(tensors, **{"": other}), "w")
    assert _same(back, q)


def test_float16_scales_without_double_quant_load_as_float32():
    q = quantize_nf4(torch.randn(64, 128), 64, False)
    tensors = to_bnb_tensors(q)
    back = from_bnb_tensors(dict(tensors, absmax=tensors["absmax"].half()), "w")
    assert back.absmax.dtype == torch.float32 and torch.equal(back.absmax, q.absmax.half().float())
    assert torch.equal(back.dequantize(), replace(q, absmax=q.absmax.half().float()).dequantize())


def test_code_tables_in_another_float_dtype_load_as_float32():
    """The layout's tables are float32 (``code``: 16 entries, ``nested.code``: 256), whatever dtype a writer kept."""
    q = quantize_nf4(torch.randn(64, 128), 64, True)
    tensors = to_bnb_tensors(q)
    back = from_bnb_tensors(dict(tensors, quant_map=tensors["quant_map"].double(),
                                 nested_quant_map=tensors["nested_quant_map"].double()), "w")
    assert _same(back, q)


def test_required_parts_follow_the_blob():
    assert required_parts(to_bnb_tensors(quantize_nf4(torch.randn(8, 64), 64, False))[QUANT_STATE_KEY]) == {"absmax", "quant_map"}
    assert required_parts(to_bnb_tensors(quantize_nf4(torch.randn(8, 64), 64, True))[QUANT_STATE_KEY]) == {
        "absmax", "quant_map", "nested_absmax", "nested_quant_map"}
    assert required_parts(torch.tensor([0xFF, 0x00], dtype=torch.uint8)) is None


# -- bnb_state.py: what is refused ----------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", [5, [1, 2], "nf4", None])
def test_a_quant_state_that_is_not_a_json_object_is_named(payload):
    tensors = to_bnb_tensors(quantize_nf4(torch.randn(8, 64)))
    with pytest.raises(NF4FormatError, match=r"w\.quant_state\.bitsandbytes__nf4 is corrupted \(JSON is not an object\)"):
        from_bnb_tensors(dict(tensors, **{QUANT_STATE_KEY: _blob(payload)}), "w")


def test_a_nested_offset_too_large_for_a_float_is_named():
    tensors = to_bnb_tensors(quantize_nf4(torch.randn(8, 64)))
    raw = json.dumps(_meta(tensors)).replace(f'"nested_offset": {_meta(tensors)["nested_offset"]}', '"nested_offset": ' + "9" * 400)
    assert "9" * 400 in raw
    state = torch.tensor(list(raw.encode("utf-8")), dtype=torch.uint8)
    with pytest.raises(NF4FormatError, match=r"field 'nested_offset' .*expected a finite number"):
        from_bnb_tensors(dict(tensors, **{QUANT_STATE_KEY: state}), "w")


def test_another_quant_type_under_the_nf4_key_is_refused():
    tensors = to_bnb_tensors(quantize_nf4(torch.randn(8, 64)))
    with pytest.raises(NF4FormatError, match=r"field 'quant_type' is 'fp4'; only 'nf4' is supported"):
        from_bnb_tensors(dict(tensors, **{QUANT_STATE_KEY: _blob({**_meta(tensors), "quant_type": "fp4"})}), "w")


def test_integer_scales_without_double_quant_are_refused():
    tensors = to_bnb_tensors(quantize_nf4(torch.randn(8, 64), 64, False))
    with pytest.raises(NF4FormatError, match=r"w\.absmax is torch\.int32; a weight without double quantization stores float scales"):
        from_bnb_tensors(dict(tensors, absmax=tensors["absmax"].int()), "w")


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_wrong_number_of_scales_is_named(double_quant):
    tensors = to_bnb_tensors(quantize_nf4(torch.randn(100, 70), 64, double_quant))  # 110 blocks
    for absmax in (tensors["absmax"][:-1], torch.cat([tensors["absmax"], tensors["absmax"][:1]])):
        with pytest.raises(NF4FormatError, match=rf"w: absmax has {absmax.numel()} entries, expected 110"):
            from_bnb_tensors(dict(tensors, absmax=absmax), "w")


def test_the_nested_blocksize_is_read_from_the_blob():
    """A writer with another nested block size: the blob says how many blocks share a nested scale."""
    q = quantize_nf4(torch.randn(256, 256), 64, True)  # 1024 blocks: 4 nested scales of 256 blocks
    tensors = to_bnb_tensors(q)
    with pytest.raises(NF4FormatError, match="nested_absmax has 4 entries, expected 8"):
        from_bnb_tensors(dict(tensors, **{QUANT_STATE_KEY: _blob({**_meta(tensors), "nested_blocksize": 128})}), "w")
    back = from_bnb_tensors(dict(tensors, nested_absmax=tensors["nested_absmax"].repeat_interleave(2),
                                 **{QUANT_STATE_KEY: _blob({**_meta(tensors), "nested_blocksize": 128})}), "w")
    assert back.nested.blocksize == 128
    assert torch.equal(back.dequantize(), q.dequantize())  # each pair of 128-block groups has its old 256-group's scale


def test_a_nested_weight_without_its_nested_fields_is_named():
    dq = to_bnb_tensors(quantize_nf4(torch.randn(100, 70), 64, True))
    meta = {k: v for k, v in _meta(dq).items() if not k.startswith("nested_")}
    with pytest.raises(NF4FormatError, match=r"w\.absmax is uint8.*lacks the nested fields"):
        from_bnb_tensors(dict(dq, **{QUANT_STATE_KEY: _blob(meta)}), "w")
