"""Reading a Hugging Face checkpoint folder one tensor at a time.

Sharded safetensors (with their index) come first, then single files, then ``.bin`` as a fallback;
every tensor is handed out on its own so that a caller can quantize it and let it go before the next.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read; the message names the file and the fix."""


_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of ``folder`` in load order; every shard an index names must exist."""
    for index_name in _INDEXES:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index} is not a valid shard index ({err}); re-download or re-save the model.") from err
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index.name} lists shards that are missing from {folder}: {missing}. The download is incomplete.")
            return [folder / s for s in shards]
    for single in _SINGLES:
        if (folder / single).is_file():
            return [folder / single]
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"No weights in {folder}: expected {_INDEXES[0]}, {_SINGLES[0]} or {_SINGLES[1]} (found {found[:10]}). "
        "For a GGUF file pass gguf_file=..."
    )


def count_tensors(files: list[Path]) -> int:
    total = 0
    for file in files:
        if file.suffix == ".safetensors":
            with _open_safetensors(file) as handle:
                total += len(handle.keys())
        else:
            total += len(_load_bin(file))
    return total


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs on the CPU, one at a time, in file order."""
    for file in files:
        if file.suffix == ".safetensors":
            with _open_safetensors(file) as handle:
                for key in handle.keys():
                    try:
                        yield key, handle.get_tensor(key)
                    except SafetensorError as err:
                        raise CheckpointError(f"{file} is corrupted at tensor {key!r} ({err}); re-download this shard.") from err
        else:
            state = _load_bin(file)
            for key in list(state):
                yield key, state.pop(key)


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} cannot be read as safetensors ({err}); it is truncated or corrupted. Re-download it.") from err


def _load_bin(file: Path) -> dict[str, Tensor]:
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # torch raises several types for damaged zip/pickle files
        raise CheckpointError(f"{file} cannot be loaded ({type(err).__name__}: {err}); it is truncated or corrupted.") from err
