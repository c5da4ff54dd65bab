"""Which devices exist here, and why a named one cannot be used: one answer for the loader, the plugin and
``load_from_checkpoint``, so that a missing GPU reads the same wherever it is named."""

from __future__ import annotations

import re
from typing import Optional, Union

import torch

DeviceLike = Union[str, torch.device, int]


def major_minor(version: str) -> tuple[int, int]:
    """``(2, 13)`` of ``"2.13.0+cpu"`` (torch's, IPEX's); ``(0, 0)`` for a version that does not start so."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _count(kind: str) -> int:
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    backend = getattr(torch, kind, None)
    return backend.device_count() if backend is not None and backend.is_available() else 0


def available_devices() -> list[str]:
    found = ["cpu"]
    for kind in ("cuda", "xpu"):
        found += [f"{kind}:{i}" for i in range(_count(kind))]
    return found + (["mps"] if _count("mps") else [])


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why ``device`` cannot be used in this process (with the fix), or None when it can."""
    if device.type in ("cpu", "meta"):
        return None
    count = _count(device.type)
    index = device.index or 0
    if index < count:
        return None
    if count:
        return f"found {count} {device.type} device(s), so index {index} is out of range"
    if device.type in ("cuda", "xpu"):
        built = (torch.version.cuda or torch.version.hip) if device.type == "cuda" else getattr(torch.version, "xpu", None)
        if not built:
            return (
                f"this PyTorch build ({torch.__version__}) has no {device.type.upper()} support; install the PyTorch wheel "
                "for your GPU before lightning-nf4 (pip install torch --index-url ...)"
            )
        return f"no {device.type.upper()} device is visible; check the driver and {device.type.upper()}_VISIBLE_DEVICES"
    return f"found 0 {device.type} device(s)"


def parse_device(device: DeviceLike) -> torch.device:
    """``torch.device(device)``, with an error that lists what is here instead of torch's bare one."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Unknown device {device!r}; available here: {available_devices()}.") from err


def resolve_device(device: Optional[DeviceLike]) -> torch.device:
    """``None`` means CPU; ``"cuda"``/``"xpu"`` mean device 0 of that kind, an index the current accelerator's; it must exist."""
    if device is None:
        return torch.device("cpu")
    device = parse_device(device)
    reason = unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"Device {device} is not available: {reason}; available here: {available_devices()}.")
    return device if device.type in ("cpu", "meta") else torch.device(device.type, device.index or 0)
