"""Damaged files are refused with what is wrong, never loaded as other values: a changed byte in a checkpoint's
tensor data (``torch.load`` checks no checksum), a truncated checkpoint, safetensors headers whose offsets do not
fit, and NF4 scale tensors whose values cannot be right. Changes no check can see (a flipped bit in the packed codes)
are out of reach without checksums of our own; bitsandbytes checks none either."""

import json
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from lightning_nf4 import quantize_nf4
from lightning_nf4.checkpoint_io import check_checkpoint, load_checkpoint
from lightning_nf4.format import NF4FormatError, from_bnb_tensors, to_bnb_tensors
from lightning_nf4.loading.checkpoint import CheckpointError, count_tensors, iter_tensors


def _checkpoint(path):
    torch.save({"state_dict": {"w": torch.arange(4096, dtype=torch.float32)}, "epoch": 0}, path)
    return path


def _flip_a_data_byte(path):
    with zipfile.ZipFile(path) as archive:  # the largest tensor record, a byte in its middle
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as handle:  # the record's data follows its local header (30 bytes, name, extra)
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        handle.seek(info.header_offset + 30 + name_length + extra_length + info.file_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x10]))


def test_a_changed_byte_in_a_checkpoint_is_found_by_its_checksum(tmp_path):
    path = _checkpoint(tmp_path / "a.ckpt")
    check_checkpoint(path)
    _flip_a_data_byte(path)
    assert not torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.arange(4096, dtype=torch.float32))
    with pytest.raises(ValueError, match="does not match its checksum"):
        check_checkpoint(path)
    with pytest.raises(ValueError, match="does not match its checksum"):
        load_checkpoint(path)


def test_a_checkpoint_is_read_for_its_checksums_once_until_it_is_written_again(tmp_path, monkeypatch):
    """The CLI checks a checkpoint before building the model and Lightning's restore checks it again: a second full
    read of a many-GB file for nothing. A file written since is read again."""
    reads = []
    testzip = zipfile.ZipFile.testzip
    monkeypatch.setattr(zipfile.ZipFile, "testzip", lambda archive: reads.append(archive.filename) or testzip(archive))
    path = _checkpoint(tmp_path / "a.ckpt")
    check_checkpoint(path)
    load_checkpoint(path)
    assert len(reads) == 1
    _flip_a_data_byte(path)
    with pytest.raises(ValueError, match="does not match its checksum"):
        load_checkpoint(path)
    assert len(reads) == 2


def test_a_truncated_checkpoint_is_called_truncated_not_untrusted(tmp_path):
    path = _checkpoint(tmp_path / "a.ckpt")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="damaged or truncated checkpoint"):
        check_checkpoint(path)
    with pytest.raises(ValueError, match="cannot be read as a PyTorch checkpoint"):
        load_checkpoint(path)


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


@pytest.mark.parametrize("damage", ["offsets shifted", "one offset changed", "entry without offsets", "bytes appended"])
def test_a_safetensors_header_that_does_not_fit_its_data_is_refused(tmp_path, damage):
    """The library's own checks: shifted offsets read neighbouring bytes as weights, and loaded here without them."""
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(8, 8), "b": torch.randn(8, 8)}, str(path))

    def shift(header):
        for entry in header.values():
            if isinstance(entry, dict) and "data_offsets" in entry and entry["data_offsets"][0] > 0:
                entry["data_offsets"] = [o - 4 for o in entry["data_offsets"]]

    edits = {
        "offsets shifted": shift,
        "one offset changed": lambda h: h["b"].update(data_offsets=[h["b"]["data_offsets"][0], h["b"]["data_offsets"][1] + 4]),
        "entry without offsets": lambda h: h["a"].pop("data_offsets"),
    }
    if damage == "bytes appended":
        path.write_bytes(path.read_bytes() + b"\0" * 16)
    else:
        _rewrite_header(path, edits[damage])
    with pytest.raises(CheckpointError, match="corrupted"):
        count_tensors([path])
    with pytest.raises(CheckpointError, match="corrupted"):
        list(iter_tensors([path]))


@pytest.mark.parametrize("damage", ["quant_map", "nested_quant_map", "nested_absmax nan", "nested_absmax negative", "absmax inf"])
def test_nf4_scale_tensors_with_impossible_values_are_refused(damage):
    nested = damage != "absmax inf"
    tensors = to_bnb_tensors(quantize_nf4(torch.randn(64, 128), 64, nested))
    tensors = {k: v.clone() for k, v in tensors.items()}
    if damage == "quant_map":
        tensors["quant_map"][3] += 1e-3
    elif damage == "nested_quant_map":
        tensors["nested_quant_map"][10] = float("nan")
    elif damage == "nested_absmax nan":
        tensors["nested_absmax"][0] = float("nan")
    elif damage == "nested_absmax negative":
        tensors["nested_absmax"][0] = -tensors["nested_absmax"][0]
    else:
        tensors["absmax"][1] = float("inf")
    with pytest.raises(NF4FormatError, match="quant_map is not|NaN, infinite or negative"):
        from_bnb_tensors(tensors, "layer.weight")
