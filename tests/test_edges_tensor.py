"""Edges of ``NF4Tensor`` (lightning_nf4/format/tensor.py) that the FSDP tests do not reach: weights whose last
quantization block is partial or whose byte count is odd (one rank holds them whole: any layout), uneven row
splits, and the ops that must refuse what they cannot do on the NF4 layout rather than return a wrong weight.

Every kept weight is compared part by part (packed codes, absmax, nested absmax, tables) with an independent
slice of the unsharded weight, and its dequantized values with the unsharded weight's rows, bit for bit."""

import pytest
import torch

from lightning_nf4 import quantize_nf4
from lightning_nf4.format.tensor import NF4ShardingError, NF4Tensor
from tests.test_fsdp import OneRankMesh


def _same_bytes(a, b):
    pa, pb = a.tensors(), b.tensors()
    return len(pa) == len(pb) and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(pa, pb))


def _expected_rows(quant, start, end):
    """Rows ``start:end`` of ``quant`` in its own layout, computed from the format's definition (whole blocks,
    two codes per byte, one nested scale per 256 blocks), independently of tensor.py."""
    cols = quant.shape[1]
    first, last = start * cols, end * cols  # element range
    b0, b1 = first // quant.blocksize, -(-last // quant.blocksize)
    expected = {"packed": quant.packed[first // 2: -(-last // 2)], "absmax": quant.absmax[b0:b1]}
    if quant.nested is not None:
        expected["nested"] = quant.nested.absmax[b0 // 256: -(-b1 // 256)]
    return expected


def _check_rows(piece, quant, start, end):
    assert type(piece) is NF4Tensor and piece.shape == (end - start, quant.shape[1]) and piece.dtype == quant.dtype
    want = _expected_rows(quant, start, end)
    assert torch.equal(piece.quant.packed, want["packed"]) and torch.equal(piece.quant.absmax, want["absmax"])
    if quant.nested is not None:
        assert torch.equal(piece.quant.nested.absmax, want["nested"])
        assert torch.equal(piece.quant.nested.offset, quant.nested.offset)
    assert torch.equal(piece.dequantize(), quant.dequantize()[start:end])


# shapes whose element count is odd and/or ends in a partial block (a partial nested group too, with double quant)
ODD_SHAPES = [(33, 17), (3, 5), (100, 70), (1, 3)]


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_one_rank_shards_pads_and_gathers_any_layout_byte_for_byte(shape, double_quant):
    """On one rank FSDP2 chunks each weight into one shard, copies it into fresh storage and all-gathers it as one
    byte buffer: the weight that comes back is the original, byte for byte, whatever its layout."""
    quant = quantize_nf4(torch.randn(shape, dtype=torch.bfloat16), double_quant=double_quant)
    tensor = NF4Tensor(quant)
    (shard,) = torch.chunk(tensor, 1, dim=0)
    assert _same_bytes(shard.quant, quant)
    _check_rows(shard, quant, 0, shape[0])
    padded = tensor.new_zeros(shard.shape)  # FSDP's fresh storage for the shard
    assert [(p.shape, p.dtype) for p in padded.quant.tensors()] == [(p.shape, p.dtype) for p in quant.tensors()]
    assert not padded.quant.packed.any() and not padded.quant.absmax.any()
    padded.copy_(shard)
    assert _same_bytes(padded.quant, quant)
    (buffer,), meta = padded.fsdp_pre_all_gather(OneRankMesh(1), tensor.shape, (shape[1], 1), None, None)
    whole, _ = padded.fsdp_post_all_gather((buffer.clone(),), meta, torch.float32)
    assert whole.shape == shape and whole.dtype == torch.float32
    assert _same_bytes(whole.quant, quant)
    assert torch.equal(whole.dequantize(), quant.dequantize(torch.float32))


@pytest.mark.parametrize("double_quant", [True, False])
def test_uneven_row_splits_keep_each_pieces_rows(double_quant):
    """``split`` with a size that does not divide the rows, ``split`` with explicit sizes, and slices: each piece
    is its rows of the weight; the last piece ends in a partial block and on an odd byte."""
    # 129 x 33 (blocksize 64): every 64 rows start on a whole block; the last row is 33 codes, half a block, odd bytes
    # with double quant, 1025 x 96: every 512 rows start on a whole group of 256 blocks; the last row is 1.5 blocks
    shape, step = ((1025, 96), 512) if double_quant else ((129, 33), 64)
    quant = quantize_nf4(torch.randn(shape), double_quant=double_quant)
    tensor = NF4Tensor(quant)
    pieces = tensor.split(step)
    bounds = [(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]
    assert len(pieces) == len(bounds)
    for piece, (start, end) in zip(pieces, bounds):
        _check_rows(piece, quant, start, end)
    sizes = [step, shape[0] - step]
    for piece, start, n in zip(tensor.split(sizes), [0, step], sizes):
        _check_rows(piece, quant, start, start + n)
    _check_rows(tensor[step:], quant, step, shape[0])
    _check_rows(tensor.narrow(0, step, shape[0] - step), quant, step, shape[0])
    _check_rows(tensor[:step], quant, 0, step)


def test_split_with_unequal_sizes_keeps_each_pieces_rows():
    quant = quantize_nf4(torch.randn(200, 32), double_quant=False)  # two rows a block
    tensor = NF4Tensor(quant)
    sizes = [2, 6, 100, 92]
    pieces = tensor.split(sizes)
    assert len(pieces) == 4
    for piece, (start, n) in zip(pieces, [(0, 2), (2, 6), (8, 100), (108, 92)]):
        _check_rows(piece, quant, start, start + n)


def test_a_range_that_splits_a_block_or_scale_group_is_refused():
    """A piece that is not the weight's end must hold whole blocks (whole groups of 256 with double quant);
    otherwise its scales would be shared with the next piece."""
    plain = NF4Tensor(quantize_nf4(torch.randn(8, 96), double_quant=False))  # 96 codes a row: 1.5 blocks
    with pytest.raises(NF4ShardingError, match="do not fall on whole scale groups"):
        plain.narrow(0, 0, 1)
    with pytest.raises(NF4ShardingError, match="do not fall on whole scale groups"):
        plain.narrow(0, 1, 2)
    _check_rows(plain.narrow(0, 0, 2), plain.quant, 0, 2)  # 192 codes: three whole blocks
    nested = NF4Tensor(quantize_nf4(torch.randn(512, 64)))  # 256 rows = one group of 256 blocks
    with pytest.raises(NF4ShardingError, match="do not fall on whole scale groups"):
        nested.narrow(0, 0, 128)
    _check_rows(nested.narrow(0, 0, 256), nested.quant, 0, 256)


def test_copy_between_different_layouts_is_refused_with_the_layouts_named():
    """Same shape, other layout: the codes would be read with the wrong scales (a double-quantized weight's uint8
    scale codes copied into float scales converts them silently)."""
    w = torch.randn(64, 128)
    nested = NF4Tensor(quantize_nf4(w, 64, double_quant=True))
    plain = NF4Tensor(quantize_nf4(w, 64, double_quant=False))
    coarse = NF4Tensor(quantize_nf4(w, 128, double_quant=False))
    for dst, src in ((plain, nested), (nested, plain), (plain, coarse), (coarse, plain)):
        before = [p.clone() for p in dst.quant.tensors()]
        with pytest.raises(NF4ShardingError, match="cannot copy an NF4 weight"):
            dst.copy_(src)
        assert all(torch.equal(a, b) for a, b in zip(dst.quant.tensors(), before))  # nothing was written
    with pytest.raises(NotImplementedError, match="quantize_nf4"):
        plain.copy_(w)


def test_ops_the_layout_cannot_answer_are_refused():
    """Row ops on another dim, on a flat view, with a step; zeros of another row length; a cast to an integer
    dtype; views and strides that are not the weight's: each raises instead of returning wrong bytes."""
    tensor = NF4Tensor(quantize_nf4(torch.randn(64, 128), double_quant=False))
    with pytest.raises(NotImplementedError, match="dim 0"):
        tensor.split(64, dim=1)
    with pytest.raises(NotImplementedError, match="dim 0"):
        tensor.narrow(1, 0, 64)
    with pytest.raises(NotImplementedError, match="dim 0"):
        tensor.view(-1).split(128 * 32)
    with pytest.raises(NotImplementedError, match="step 1"):
        tensor[::2]
    with pytest.raises(NotImplementedError, match="keeps the row length"):
        tensor.new_zeros((64, 64))
    with pytest.raises(NotImplementedError, match="keeps the row length"):
        tensor.new_zeros((64 * 128,))
    with pytest.raises(NotImplementedError, match="cannot become torch.int8"):
        tensor.to(torch.int8)
    with pytest.raises(RuntimeError, match="invalid for an NF4 weight"):
        tensor.view(7, -1)
    with pytest.raises(RuntimeError, match="invalid for an NF4 weight"):
        tensor.view(100, 100)
    with pytest.raises(NotImplementedError, match="as_strided"):
        torch.as_strided(tensor, (64, 128), (1, 64))
    with pytest.raises(NotImplementedError, match="as_strided"):
        torch.as_strided(tensor, (64, 128), (128, 1), 128)
    assert torch.as_strided(tensor, (64, 128), (128, 1)).quant is tensor.quant


def test_views_detach_and_casts_keep_shape_dtype_and_bytes():
    quant = quantize_nf4(torch.randn(256, 128))  # two groups of 256 blocks: splits in halves
    tensor = NF4Tensor(quant)
    assert tensor.view(-1, 128).shape == (256, 128) and tensor.view(256, -1).shape == (256, 128)
    assert tensor.view(-1, 64).shape == (512, 64) and tensor.view(-1, 64).quant is quant
    flat = tensor.view(-1)
    assert flat.detach().shape == (256 * 128,) and flat.detach().quant is quant  # FSDP keeps flat views of shards
    half = tensor.to(torch.float16)
    for piece in (*half.split(128), half.detach(), half.narrow(0, 0, 128), half.view(-1)):
        assert piece.dtype == torch.float16, piece
    torch.testing.assert_close(half.split(128)[1].dequantize(), quant.dequantize(torch.float16)[128:], rtol=0, atol=0)
    on_meta = tensor.to("meta")  # a device move carries every part
    assert on_meta.device.type == "meta" and all(p.device.type == "meta" for p in on_meta.quant.tensors())
    assert on_meta.shape == tensor.shape and on_meta.quant.shape == quant.shape


def test_a_regather_into_buffers_the_weight_does_not_view_is_refused():
    """FSDP gathers again into the same buffers: the weight built the first time must view them, or it would keep
    serving the previous step's bytes."""
    quant = quantize_nf4(torch.randn(128, 256))
    shards = torch.chunk(NF4Tensor(quant), 2)
    inputs = [s.fsdp_pre_all_gather(OneRankMesh(2), torch.Size((128, 256)), (256, 1), None, None) for s in shards]
    gathered = tuple(torch.cat([i[0][k] for i in inputs]) for k in range(len(inputs[0][0])))
    whole, _ = shards[0].fsdp_post_all_gather(gathered, inputs[0][1], torch.float32)
    assert _same_bytes(whole.quant, quant)
    elsewhere = tuple(t.clone() for t in gathered)
    with pytest.raises(RuntimeError, match="does not view"):
        shards[0].fsdp_post_all_gather(elsewhere, inputs[0][1], torch.float32, out=whole)
    assert shards[0].fsdp_post_all_gather(gathered, inputs[0][1], torch.float32, out=whole) is None


def test_negative_slice_bounds_count_from_the_end():
    quant = quantize_nf4(torch.randn(256, 64), double_quant=False)
    tensor = NF4Tensor(quant)
    _check_rows(tensor[-64:], quant, 192, 256)
    _check_rows(tensor[:-64], quant, 0, 192)
    _check_rows(tensor[-300:64], quant, 0, 64)


def test_a_reversed_or_empty_slice_has_no_rows():
    """As a plain tensor: ``t[128:64]`` is empty (it used to fail with an integer overflow inside the layout)."""
    tensor = NF4Tensor(quantize_nf4(torch.randn(256, 64)))
    for empty in (tensor[128:64], tensor[300:], tensor[-1:-2]):
        assert type(empty) is NF4Tensor and empty.shape == (0, 64) and empty.quant.packed.numel() == 0


def test_one_rank_gather_of_a_one_column_weight_with_odd_rows():
    quant = quantize_nf4(torch.randn(3, 1), double_quant=False)
    tensor = NF4Tensor(quant)
    (buffer,), meta = tensor.fsdp_pre_all_gather(OneRankMesh(1), tensor.shape, (1, 1), None, None)
    whole, _ = tensor.fsdp_post_all_gather((buffer.clone(),), meta, torch.float32)
    assert whole.shape == (3, 1) and torch.equal(whole.dequantize(), quant.dequantize())


@pytest.mark.parametrize("double_quant", [False, True])
def test_new_zeros_reads_as_zeros(double_quant):
    """FSDP's padding and empty slices come from ``new_zeros``; with double quantization every value read -2.6
    (the nested offset was kept, and a scale decodes to ``code * 0 + offset``)."""
    tensor = NF4Tensor(quantize_nf4(torch.randn(64, 128) + 2, 64, double_quant))
    zeros = tensor.new_zeros((16, 128))
    assert torch.equal(zeros.dequantize(torch.float32), torch.zeros(16, 128))


def test_a_view_dequantizes_in_its_own_shape():
    """``reshape``/``view`` gave a tensor of the new shape whose ``dequantize()`` (and compiled read) had the old one."""
    quant = quantize_nf4(torch.randn(32, 64), 64, True)
    tensor = NF4Tensor(quant)
    for shape in [(64, 32), (-1,), (2048,)]:
        view = tensor.view(*shape) if -1 not in shape else tensor.view(-1)
        assert torch.equal(view.dequantize(torch.float32), quant.dequantize(torch.float32).reshape(view.shape))
    from lightning_nf4.format.tensor import dequantize_weight

    assert dequantize_weight(tensor.reshape(64, 32), torch.float32).shape == (64, 32)


def test_a_layer_in_the_nf4_tensor_form_loads_its_own_keep_vars_state_and_keeps_the_form():
    """``load_state_dict(state_dict(keep_vars=True))`` failed on ``aten.view.dtype``; loading also turned the layer
    back into packed-bytes form (a new, plain parameter) where it held an NF4Tensor."""
    from torch import nn

    from lightning_nf4 import NF4Linear

    source, target = NF4Linear.from_linear(nn.Linear(64, 32)), NF4Linear.from_linear(nn.Linear(64, 32))
    source.to_nf4_tensor(), target.to_nf4_tensor()
    target.load_state_dict(source.state_dict(keep_vars=True))
    assert isinstance(target.weight, NF4Tensor) and torch.equal(target.dequantize(), source.dequantize())
    plain = NF4Linear.from_linear(nn.Linear(64, 32))
    plain.load_state_dict(source.state_dict())
    assert not isinstance(plain.weight, NF4Tensor) and torch.equal(plain.dequantize(), source.dequantize())


def test_double_quantization_of_scales_that_overflow_their_mean_is_refused_by_name():
    """Finite weights near float32's limit: the mean of their scales is inf; the quantizer failed with an IndexError
    (bitsandbytes returns NaN weights)."""
    from lightning_nf4.format import NF4FormatError

    with pytest.raises(NF4FormatError, match=r"w: its block scales \(up to 3e\+38\) overflow float32 .*double_quant=False"):
        quantize_nf4(torch.full((2, 64), 3e38), 64, True, name="w")
    assert torch.isfinite(quantize_nf4(torch.full((2, 64), 3e38), 64, False).dequantize()).all()


def test_data_assignment_moves_the_layout_or_is_refused():
    """``a.weight.data = b.weight.data`` on the NF4Tensor form kept a's old weight (its codes and scales live in
    ``quant``, which ``.data`` did not touch); a float tensor there was taken without effect."""
    from torch import nn

    from lightning_nf4 import NF4Linear

    torch.manual_seed(0)
    a, b = NF4Linear.from_linear(nn.Linear(64, 32)), NF4Linear.from_linear(nn.Linear(64, 32))
    a.to_nf4_tensor(), b.to_nf4_tensor()
    a.weight.data = b.weight.data
    assert torch.equal(a.dequantize(), b.dequantize()) and isinstance(a.weight.data, NF4Tensor)
    with pytest.raises(TypeError, match=r"takes another NF4Tensor of shape \(32, 64\), got a Tensor"):
        a.weight.data = torch.randn(32, 64)
