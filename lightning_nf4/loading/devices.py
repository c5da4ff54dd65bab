"""Turning a device argument into a device that exists, or a clear error saying what does."""

from __future__ import annotations

from typing import Union

import torch


def _count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = getattr(torch, kind, None)
    return backend.device_count() if backend is not None and backend.is_available() else 0


def available_devices() -> list[str]:
    found = ["cpu"]
    for kind in ("cuda", "xpu", "mps"):
        n = _count(kind) if kind != "mps" else int(torch.backends.mps.is_available())
        found += [f"{kind}:{i}" for i in range(n)] if kind != "mps" else (["mps"] if n else [])
    return found


def resolve_device(device: Union[str, torch.device, int, None]) -> torch.device:
    """``None`` means CPU; ``"cuda"``/``"xpu"`` mean device 0 of that kind, an index the current accelerator's; it must exist."""
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"Unknown device {device!r}; available here: {available_devices()}.") from err
    if device.type in ("cpu", "meta"):
        return device
    count = _count(device.type)
    index = device.index or 0
    if index >= count:
        raise ValueError(f"Device {device} is not available (found {count} {device.type} device(s)); available here: {available_devices()}.")
    return torch.device(device.type, index)
