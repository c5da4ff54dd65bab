"""Edges of ``lightning_nf4.loading.checkpoint`` the main tests leave open: the dtypes read from safetensors
headers, which file of a folder is read, ``.bin`` shard indexes, and damaged headers named as such."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_nf4.loading.checkpoint import CheckpointError, CheckpointIndex, checkpoint_files, iter_tensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.f16": torch.randn(7, generator=g).to(torch.float16),
        "c.f32": torch.randn(2, 2, generator=g),
        "d.i64": torch.arange(6).reshape(2, 3),
        "e.u8": torch.arange(9, dtype=torch.uint8),
    }


def test_every_dtype_reads_back_as_safetensors_wrote_it(tmp_path):
    """bf16 and fp16 have the same width, so a swapped dtype table would give wrong values of the right size:
    each tensor read one at a time, or through the index, equals safetensors' own ``load_file``."""
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    files = checkpoint_files(tmp_path)
    expected = load_file(str(tmp_path / "model.safetensors"))
    got = dict(iter_tensors(files))
    index = CheckpointIndex(files)
    assert got.keys() == expected.keys() == set(index.names())
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
        assert torch.equal(index.read(name), value), name


def test_safetensors_is_preferred_to_bin_and_a_bin_index_is_followed(tmp_path):
    """With both ``model.safetensors`` and ``pytorch_model.bin`` present the safetensors file is read; a folder of
    ``.bin`` shards with ``pytorch_model.bin.index.json`` gives all its shards, each once, in order."""
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    assert checkpoint_files(tmp_path) == [tmp_path / "model.safetensors"]
    shards = tmp_path / "shards"
    shards.mkdir()
    torch.save({"x": torch.ones(2)}, shards / "pytorch_model-00001-of-00002.bin")
    torch.save({"y": torch.full((2,), 2.0)}, shards / "pytorch_model-00002-of-00002.bin")
    weight_map = {"x": "pytorch_model-00001-of-00002.bin", "y": "pytorch_model-00002-of-00002.bin"}
    (shards / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    files = checkpoint_files(shards)
    assert files == [shards / "pytorch_model-00001-of-00002.bin", shards / "pytorch_model-00002-of-00002.bin"]
    assert {k: v.tolist() for k, v in iter_tensors(files)} == {"x": [1.0, 1.0], "y": [2.0, 2.0]}


@pytest.mark.parametrize("content,why", [
    ('{"weight_map": {}}', "no \"weight_map\""),
    ('{"weight_map": ["model-00001-of-00001.safetensors"]}', "no \"weight_map\""),
    ('["model-00001-of-00001.safetensors"]', "no \"weight_map\""),
    ('{"metadata": {}}', "no \"weight_map\""),
    ('{"weight_map": {"w": ["model-00001-of-00001.safetensors"]}}', "must lie inside its folder"),
    ('{"weight_map": {"w": "../other/model-00001-of-00001.safetensors"}}', "must lie inside its folder"),
    ('{"weight_map": ', "Expecting value"),
], ids=["empty_map", "map_a_list", "index_a_list", "no_map", "file_a_list", "file_outside", "cut_off"])
def test_a_malformed_shard_index_is_named_with_the_fix(tmp_path, content, why):
    """transformers fails on these with IndexError, AttributeError or TypeError, and reads a shard named outside the
    folder; here each is a CheckpointError naming the index and what is wrong with it."""
    model = tmp_path / "model"
    (tmp_path / "other").mkdir()
    model.mkdir()
    for folder in (model, tmp_path / "other"):
        save_file({"w": torch.ones(2)}, str(folder / "model-00001-of-00001.safetensors"))
    (model / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json is not a valid shard index \(.*{why}.*re-save the model"):
        checkpoint_files(model)


def test_an_index_may_name_shards_in_a_subfolder(tmp_path):
    (tmp_path / "part").mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "part" / "a.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "part/a.safetensors"}}))
    assert checkpoint_files(tmp_path) == [tmp_path / "part" / "a.safetensors"]


def test_damaged_headers_are_named_for_what_they_are(tmp_path):
    """A header length longer than the file, and data cut off after a whole header, each give their own message."""
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(tmp_path / "model.safetensors"))
    good = (tmp_path / "model.safetensors").read_bytes()
    assert struct.unpack("<Q", good[:8])[0] > 10
    bad = tmp_path / "long"
    bad.mkdir()
    # a header length that fits the file (8 + length) but not the 8-byte length field in front of it
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(good) - 4) + good[8:])
    with pytest.raises(CheckpointError, match="truncated or not safetensors"):
        list(iter_tensors(checkpoint_files(bad)))
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(good[:-10])  # whole header, the data short by less than the header
    with pytest.raises(CheckpointError, match=r"is truncated: its header needs \d+ bytes, the file has"):
        CheckpointIndex(checkpoint_files(cut))
