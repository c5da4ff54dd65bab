"""Reading Lightning checkpoints without running code from them.

``torch.load(weights_only=False)`` unpickles arbitrary objects, so a checkpoint someone shared can run code on
the machine that loads it. Everything here loads with ``weights_only=True``: tensors, containers, numbers,
strings and the few types torch allows by default (dtypes, devices, ``torch.Size`` ...), plus
``CHECKPOINT_GLOBALS``. The package's own checkpoints (Lightning's, adapter-only or full, written with
``NF4Precision`` and ``LoRACallback``) need nothing more today: even the random-number states kept for exact
resume are stored as plain tensors (``lightning_nf4.callbacks.rng``). A type the package starts to store in its
checkpoints goes into ``CHECKPOINT_GLOBALS``, and only a type whose unpickling cannot run code belongs there.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Union

import torch

CHECKPOINT_GLOBALS: list[Any] = []


class UntrustedCheckpointError(pickle.UnpicklingError):
    """The file needs objects a weights-only load refuses: not a checkpoint of this package, treat it as untrusted."""


def _existing(path: Union[str, os.PathLike]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (or is not a file); pass the .ckpt written by fit.")
    return path


def _unsafe_globals(path: Path) -> list[str]:
    """The globals ``path``'s pickle asks for beyond those a weights-only load is allowed here."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in CHECKPOINT_GLOBALS}
    return [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]


def check_checkpoint(path: Union[str, os.PathLike]) -> Path:
    """Fail fast, before any model is built: the file exists and asks for nothing a weights-only load refuses.
    Reads only the pickle's list of globals, not the tensors."""
    path = _existing(path)
    if not zipfile.is_zipfile(path):
        with path.open("rb") as handle:
            magic = handle.read(4)
        if magic == b"PK\x03\x04":  # a zip's first entry, but no readable end: cut short or damaged
            raise ValueError(
                f"{str(path)!r} is a damaged or truncated checkpoint (the start of torch.save's zip archive, without its "
                "directory at the end): copy it again, or use another checkpoint."
            )
        if _is_safetensors(path):
            raise ValueError(
                f"{str(path)!r} is a safetensors file (adapter or model weights), not a Lightning checkpoint: pass the .ckpt "
                "that fit's ModelCheckpoint wrote. An exported adapter opens with peft.PeftModel.from_pretrained(base, folder)."
            )
        raise untrusted_error(path, pickle.UnpicklingError("not a zip archive"))
    verify_archive(path)
    try:
        needs = _unsafe_globals(path)
    except (RuntimeError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{str(path)!r} cannot be read as a PyTorch checkpoint ({type(err).__name__}: {str(err)[:200]}).") from err
    if needs:
        raise untrusted_error(path, pickle.UnpicklingError(f"needs {needs}"))
    return path


_VERIFIED: dict[str, tuple[int, int]] = {}  # archives whose records matched in this process: (size, mtime_ns) then


def verify_archive(path: Union[str, os.PathLike]) -> None:
    """Check every record of a ``torch.save`` archive against its CRC-32: ``torch.load`` does not, so a flipped bit in
    a tensor loads as another value. Reads the whole file once: one verified in this process and not written since
    (same size and modification time) is not read again, as when the CLI checks a checkpoint and Lightning restores it."""
    stat = os.stat(path)
    key, stamp = str(Path(path).resolve()), (stat.st_size, stat.st_mtime_ns)
    if _VERIFIED.get(key) == stamp:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{str(path)!r} is a damaged checkpoint ({err}): copy it again, or use another checkpoint.") from err
    if damaged is not None:
        raise ValueError(
            f"{str(path)!r} is damaged: its record {damaged!r} does not match its checksum (a changed byte). Copy it again, "
            "or use another checkpoint."
        )
    _VERIFIED[key] = stamp


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and a JSON object."""
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8 and head[8:9] == b"{"


def load_checkpoint(path: Union[str, os.PathLike], map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint, loaded weights-only; raises ``UntrustedCheckpointError`` for a file that would need more."""
    path = _existing(path)
    if zipfile.is_zipfile(path):
        verify_archive(path)
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise untrusted_error(path, err) from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:  # not a torch.save zip, truncated, ...
        raise ValueError(f"{str(path)!r} cannot be read as a PyTorch checkpoint ({type(err).__name__}: {str(err)[:200]}).") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint: it has no 'state_dict' (found {type(checkpoint).__name__}).")
    return checkpoint


def untrusted_error(path: Union[str, os.PathLike], err: BaseException) -> UntrustedCheckpointError:
    """The error for a file whose weights-only load failed, naming what it asked to construct when that is known."""
    if not zipfile.is_zipfile(path):
        what = "it is not the zip archive torch.save writes but an old-style pickle or another file"
    else:
        needs = _unsafe_globals(path)
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(err), re.DOTALL)
        what = f"it needs {needs}" if needs else f"the weights-only unpickler refused it: {(detail.group(1) if detail else str(err))[:200].strip()}"
    return UntrustedCheckpointError(
        f"{str(path)!r} was not loaded: it is not a checkpoint written by lightning-nf4 ({what}; unpickling it "
        "unrestricted can run arbitrary code). Treat the file as untrusted. If you wrote it yourself and trust it, "
        "load it once with torch.load(path, weights_only=False) and save only its 'state_dict' and plain data again."
    )
