"""Reading a Hugging Face checkpoint folder one tensor at a time.

Sharded safetensors (with their index) come first, then single files, then ``.bin`` as a fallback;
every tensor is handed out on its own so that a caller can quantize it and let it go before the next.
"""

from __future__ import annotations

import json
import pickle
import math
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Optional

import torch
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read; the message names the file and the fix."""


_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")


def _add_variant(name: str, variant: Optional[str]) -> str:
    """transformers' file name of a weights variant: ``model.safetensors`` -> ``model.fp16.safetensors``."""
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def checkpoint_files(folder: Path, use_safetensors: Optional[bool] = None, variant: Optional[str] = None) -> list[Path]:
    """The weight files of ``folder`` in load order; every shard an index names must exist. ``use_safetensors`` as
    in transformers: True reads safetensors only, False ``.bin`` only, None prefers safetensors. ``variant`` reads
    ``model.<variant>.safetensors`` (and its index) instead, as transformers does."""
    indexes, singles = _INDEXES, _SINGLES
    if use_safetensors is not None:
        keep = 0 if use_safetensors else 1
        indexes, singles = (_INDEXES[keep],), (_SINGLES[keep],)
    indexes = tuple(_add_variant(name, variant) for name in indexes)
    singles = tuple(_add_variant(name, variant) for name in singles)
    for single, index_name in zip(singles, indexes):  # transformers' order: per format, the single file before an index
        if (folder / single).is_file():
            return [folder / single]
        index = folder / index_name
        if index.is_file():
            shards = _shards_of(index)
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index.name} lists shards that are missing from {folder}: {missing}. The download is incomplete.")
            return [folder / s for s in shards]
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    asked = ", ".join(f"{k}={v!r}" for k, v in (("use_safetensors", use_safetensors), ("variant", variant)) if v is not None)
    asked = f" ({asked})" if asked else ""
    hint = " For a GGUF file pass gguf_file=..."
    if variant is not None and any(checkpoint_name in found for checkpoint_name in (*_INDEXES, *_SINGLES)):
        hint = " The folder has weights without the variant: pass variant=None to load them."
    raise CheckpointError(
        f"No weights in {folder}{asked}: expected {' or '.join((*indexes, *singles))} (found {found[:10]}).{hint}"
    )


def _shards_of(index: Path) -> list[str]:
    """The shard files an index maps tensors to: a non-empty ``weight_map`` of tensor names to paths inside the
    index's folder (one reaching outside it would read another model's weights)."""
    def invalid(why: str) -> CheckpointError:
        return CheckpointError(f"{index} is not a valid shard index ({why}); re-download or re-save the model.")

    try:
        content = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise invalid(str(err)) from err
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise invalid('no "weight_map" of tensor names to shard files')
    names = list(weight_map.values())
    folder = index.parent.resolve()
    odd = [n for n in names if not isinstance(n, str) or not n or not (folder / n).resolve().is_relative_to(folder)]
    if odd:
        raise invalid(f"shard paths must lie inside its folder, got {odd[:3]}")
    return sorted(set(names))


_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _safetensors_header(file: Path, handle: BinaryIO) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and where its data starts, checked against the file size."""
    size = file.stat().st_size
    raw = handle.read(8)
    if len(raw) < 8:
        raise CheckpointError(f"{file} is truncated (no safetensors header); re-download it.")
    length = struct.unpack("<Q", raw)[0]
    if length > size - 8:
        raise CheckpointError(f"{file} is truncated or not safetensors (header of {length} bytes in a {size}-byte file); re-download it.")
    try:
        header = json.loads(handle.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} has a corrupted safetensors header ({err}); re-download it.") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a corrupted safetensors header (not a JSON object); re-download it.")
    header.pop("__metadata__", None)
    data_start = 8 + length
    end = _check_layout(file, header)
    if data_start + end > size:
        raise CheckpointError(f"{file} is truncated: its header needs {data_start + end} bytes, the file has {size}. Re-download it.")
    if data_start + end < size:
        raise CheckpointError(f"{file} has {size - data_start - end} bytes that its header does not describe; the file is corrupted. Re-download it.")
    return header, data_start


def _check_layout(file: Path, header: dict[str, Any]) -> int:
    """The checks the safetensors library makes: each tensor's byte range fits its dtype and shape, and the ranges
    follow one another from 0 with no gap or overlap (a damaged offset would otherwise read shifted bytes as
    weights). Returns the data's length."""
    def broken(name: str, why: str) -> CheckpointError:
        return CheckpointError(f"{file}: the header's entry for {name!r} {why}; the file is corrupted. Re-download it.")

    position = 0
    try:
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{file}: a header entry has no data_offsets ({err!r}); the file is corrupted. Re-download it.") from err
    for name, entry in entries:
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise broken(name, f"has no valid shape ({shape!r})")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise broken(name, f"has no valid data_offsets ({offsets!r})")
        begin, stop = offsets
        dtype = _ST_DTYPES.get(entry.get("dtype"))  # another dtype fails when that tensor is read, with its own message
        if begin != position or stop < begin or (dtype is not None and stop - begin != math.prod(shape) * dtype.itemsize):
            raise broken(name, f"places {stop - begin} bytes at {begin} for a {entry.get('dtype')} tensor of shape {shape} after {position} bytes")
        position = stop
    return position


def first_float_dtype(files: Sequence[Path]) -> Optional[torch.dtype]:
    """What transformers' ``dtype="auto"`` takes when the config names none: the dtype of the first floating-point
    tensor (not float8) of the first weight file, in the order its reader lists the keys; read from the header."""
    if not files:
        return None
    file = files[0]
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with open(file, "rb") as handle:
            header = _safetensors_header(file, handle)[0]
        with safe_open(str(file), framework="pt") as reader:
            dtypes = [_ST_DTYPES.get(header[key].get("dtype")) for key in reader.keys()]
    else:
        dtypes = [tensor.dtype for tensor in _load_bin(file).values()]
    return next((d for d in dtypes if d is not None and d.is_floating_point and d.itemsize > 1), None)


def count_tensors(files: list[Path]) -> int:
    total = 0
    for file in files:
        if file.suffix == ".safetensors":
            with open(file, "rb") as handle:
                total += len(_safetensors_header(file, handle)[0])
        else:
            total += len(_load_bin(file))
    return total


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs on the CPU, one at a time, in file order.

    safetensors files are read tensor by tensor into fresh memory rather than memory-mapped, so the
    process holds one tensor of the checkpoint at a time, not a whole shard.
    """
    for file in files:
        if file.suffix == ".safetensors":
            yield from _read_safetensors(file)
        else:
            state = _load_bin(file)
            for key in list(state):
                yield key, state.pop(key)


def _read_safetensors(file: Path) -> Iterator[tuple[str, Tensor]]:
    with open(file, "rb") as handle:
        header, data_start = _safetensors_header(file, handle)
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = _ST_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise CheckpointError(f"{file}: tensor {name!r} has dtype {entry['dtype']}, which lightning-nf4 cannot read.")
            begin, stop = entry["data_offsets"]
            buffer = torch.empty(stop - begin, dtype=torch.uint8, device="cpu")  # host memory, whatever the default device
            handle.seek(data_start + begin)
            if handle.readinto(memoryview(buffer.numpy())) != stop - begin:
                raise CheckpointError(f"{file} ended inside tensor {name!r}; the file is truncated. Re-download it.")
            yield name, buffer.view(dtype).reshape(entry["shape"])


class CheckpointIndex:
    """Where every tensor of a checkpoint lies, so that any one can be read on its own, in any order: what a
    rank needs to fill one sharding unit at a time from a model built on ``meta``.

    safetensors tensors are read from their byte range into fresh memory; ``.bin`` files are memory-mapped.
    """

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self._where: dict[str, tuple[Path, dict[str, Any], int]] = {}
        self._bins: dict[Path, dict[str, Tensor]] = {}
        for file in files:
            if file.suffix == ".safetensors":
                with open(file, "rb") as handle:
                    header, data_start = _safetensors_header(file, handle)
                for name, entry in header.items():
                    self._where[name] = (file, entry, data_start)
            else:
                for name in _load_bin(file):
                    self._where[name] = (file, {}, -1)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def read(self, name: str) -> Tensor:
        """The tensor ``name`` on the CPU, in fresh memory (no view of a mapped file)."""
        file, entry, data_start = self._where[name]
        if data_start < 0:
            return self._bin(file)[name].clone()
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {entry['dtype']}, which lightning-nf4 cannot read.")
        begin, stop = entry["data_offsets"]
        buffer = torch.empty(stop - begin, dtype=torch.uint8, device="cpu")  # host memory, whatever the default device
        with open(file, "rb") as handle:
            handle.seek(data_start + begin)
            if handle.readinto(memoryview(buffer.numpy())) != stop - begin:
                raise CheckpointError(f"{file} ended inside tensor {name!r}; the file is truncated. Re-download it.")
        return buffer.view(dtype).reshape(entry["shape"])

    def _bin(self, file: Path) -> dict[str, Tensor]:
        """A ``.bin`` file's tensors, memory-mapped once."""
        if file not in self._bins:
            self._bins[file] = _load_bin(file)
        return self._bins[file]

    def same_values(self, first: str, second: str, chunk: int = 16 << 20) -> bool:
        """Whether two tensors of the checkpoint hold the same values, without holding either whole: ``.bin``
        names of one storage (how torch.save writes tied weights) are equal unread; safetensors ranges are
        compared bytes by bytes, ``chunk`` bytes at a time."""
        (file_a, entry_a, start_a), (file_b, entry_b, start_b) = self._where[first], self._where[second]
        if start_a < 0 or start_b < 0 or entry_a.get("dtype") != entry_b.get("dtype") or entry_a.get("shape") != entry_b.get("shape"):
            if start_a < 0 and start_b < 0 and file_a == file_b:
                tensors = self._bin(file_a)
                a, b = tensors[first], tensors[second]
                if a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.storage_offset() == b.storage_offset() \
                        and a.shape == b.shape and a.stride() == b.stride():
                    return True
                return a.shape == b.shape and bool(torch.equal(a, b))  # memory-mapped: paged in, not copied
            a, b = self.read(first), self.read(second)
            return a.shape == b.shape and bool(torch.equal(a.to(b.dtype), b))
        (begin_a, stop_a), (begin_b, _) = entry_a["data_offsets"], entry_b["data_offsets"]
        with open(file_a, "rb") as handle_a, open(file_b, "rb") as handle_b:
            handle_a.seek(start_a + begin_a)
            handle_b.seek(start_b + begin_b)
            total = stop_a - begin_a
            for done in range(0, total, chunk):
                size = min(chunk, total - done)
                if handle_a.read(size) != handle_b.read(size):
                    return False
        return True


def _load_bin(file: Path) -> dict[str, Tensor]:
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"{file} cannot be loaded (UnpicklingError: {err}); it is truncated or corrupted.") from err
        # an intact file whose pickle asks for more than tensors: it could run code, so it is not read here
        asks = str(err).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0].split(". Please use", 1)[0]
        raise CheckpointError(
            f"{file} holds more than weights (its pickle asks for: {asks}), and a pickle that builds other objects can run "
            "code, so lightning-nf4 reads .bin files weights-only. If you trust the file, re-save the model as "
            "safetensors where it loads (transformers: model.save_pretrained(folder), safe_serialization is the default)."
        ) from err
    except Exception as err:  # torch raises several types for damaged zip/pickle files
        raise CheckpointError(f"{file} cannot be loaded ({type(err).__name__}: {err}); it is truncated or corrupted.") from err
