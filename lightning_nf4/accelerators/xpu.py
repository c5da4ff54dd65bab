"""``XPUAccelerator``: a Lightning accelerator for Intel GPUs on native ``torch.xpu`` (PyTorch >= 2.5).

Registering an accelerator is not enough for ``Trainer(accelerator="xpu")`` to train on the XPU: Lightning's
``_AcceleratorConnector`` only knows its own device types. For any other accelerator it

* picks ``SingleDeviceStrategy(device="cpu")`` for one device (the model would silently stay on the CPU);
* maps ``strategy="ddp"`` (and the other DDP names) to ``DDPStrategy``, which uses ``torch.cuda.stream``;
* builds ``MixedPrecision(..., device="cuda")`` for ``precision="16-mixed"/"bf16-mixed"``, so autocast and
  the grad scaler target CUDA and XPU runs in fp32;
* reports a missing device with a generic "accelerator is not available" message;
* never chooses XPU for ``accelerator="auto"`` or ``"gpu"``.

``_patch_accelerator_connector`` wraps those connector methods so that, when the accelerator is an
``XPUAccelerator`` and only then, one device gets ``SingleDeviceStrategy(xpu:i)``, the DDP family gets
``XPUDDPStrategy`` with the same arguments, mixed precision autocasts on "xpu", and a missing XPU gives an
error that says what was found. Other accelerators go through Lightning's code unchanged.
``NF4Precision`` needs no help: it takes its autocast device from ``trainer.strategy.root_device``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import MutableSequence
from types import ModuleType
from typing import Any, Optional, Union

import torch
from lightning.fabric.accelerators.registry import _AcceleratorRegistry
from lightning.fabric.utilities.device_parser import _check_data_type, _check_unique, _normalize_parse_gpu_string_input
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.types import _DEVICE
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_nf4.devices import major_minor

_NATIVE_XPU_MIN_TORCH = (2, 5)


class XPUUnavailableError(MisconfigurationException):
    """XPU was asked for and this process has none; the message says what it found instead."""


# -- what this machine has ------------------------------------------------------------------------
def _xpu_module() -> Optional[ModuleType]:
    return getattr(torch, "xpu", None)


def xpu_available() -> bool:
    xpu = _xpu_module()
    try:
        return bool(xpu is not None and xpu.is_available() and xpu.device_count() > 0)
    except Exception:  # a broken driver stack must read as "no XPU", not crash the Trainer
        return False


def xpu_device_count() -> int:
    return int(torch.xpu.device_count()) if xpu_available() else 0


def _xpu_compiled() -> bool:
    xpu = _xpu_module()
    try:
        return bool(xpu is not None and xpu._is_compiled())
    except Exception:
        return False


def _found_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if xpu_available():
        found += [f"xpu:{i}" for i in range(xpu_device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def xpu_unavailable_message() -> str:
    version = torch.__version__
    if major_minor(version) < _NATIVE_XPU_MIN_TORCH:
        build = f"torch {version} is older than 2.5, the first release with native torch.xpu"
        hint = "install torch>=2.5 from PyTorch's XPU index (pip install torch --index-url https://download.pytorch.org/whl/xpu)"
    elif _xpu_compiled():
        build = f"torch {version} is built with XPU support but sees no Intel GPU"
        hint = "check the Intel GPU driver (Level Zero) is installed and the device is visible (sycl-ls, ZE_AFFINITY_MASK)"
    else:
        build = f"torch {version} is built without XPU support"
        hint = "install PyTorch's XPU wheel (pip install torch --index-url https://download.pytorch.org/whl/xpu)"
    found = _found_devices()
    other = "accelerator='cuda'" if any(d.startswith("cuda") for d in found) else "accelerator='cpu'"
    return f"XPU requested but torch.xpu.is_available() is False; found: {', '.join(found)}. {build}; {hint}, or use {other}."


def _require_xpu() -> None:
    if not xpu_available():
        raise XPUUnavailableError(xpu_unavailable_message())


# -- devices="..." ----------------------------------------------------------------------------------
def parse_xpu_ids(devices: Union[int, str, list[int], tuple[int, ...]]) -> list[int]:
    """Lightning's ``devices=`` forms for XPU: "auto", N, -1 / "-1" (all), [0, 2], "0,2", "3"; checked against the machine."""
    if isinstance(devices, str) and devices.strip() == "auto":
        _require_xpu()
        return list(range(xpu_device_count()))
    _check_data_type(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("", "[]"):
            raise MisconfigurationException(f"devices={devices!r} asks for no XPU; use accelerator='cpu' to train without one.")
        try:
            devices = _normalize_parse_gpu_string_input(text)
        except ValueError:
            raise MisconfigurationException(
                f"devices={devices!r} is not a device count or a comma-separated list of XPU indices (e.g. 2, '0,1', -1, 'auto')."
            ) from None
    _require_xpu()
    count = xpu_device_count()
    found = f"found {count} XPU device(s): {', '.join(f'xpu:{i}' for i in range(count))}"
    if isinstance(devices, int):
        if devices == -1:
            return list(range(count))
        if devices < 0:
            raise MisconfigurationException(f"devices={devices} is not valid: use a positive count, a list of indices, or -1 for all XPUs.")
        if devices == 0:
            raise MisconfigurationException("devices=0 asks for no XPU; use accelerator='cpu' to train without one.")
        if devices > count:
            raise MisconfigurationException(f"Requested {devices} XPU devices but {found}.")
        return list(range(devices))
    assert isinstance(devices, (MutableSequence, tuple))
    ids = list(devices)
    if not ids:
        raise MisconfigurationException("devices=[] asks for no XPU; use accelerator='cpu' to train without one.")
    negative = [i for i in ids if i < 0]
    if negative:
        raise MisconfigurationException(f"XPU indices must be >= 0, got {ids}; use devices=-1 for all XPUs.")
    _check_unique(ids)
    missing = [i for i in ids if i >= count]
    if missing:
        raise MisconfigurationException(f"Requested XPU indices {ids} but {found}.")
    return ids


# -- optional IPEX ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _load_ipex() -> Optional[ModuleType]:
    """Import intel_extension_for_pytorch only if it is installed for this torch's major.minor.

    The version is read from the package metadata before importing, because a mismatched IPEX aborts
    the process at import (IPEX 2.8 under torch 2.13 does), which no ``except`` can catch.
    """
    try:
        ipex_version = importlib.metadata.version("intel-extension-for-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return None
    if major_minor(ipex_version) != major_minor(torch.__version__):
        rank_zero_info(
            f"intel_extension_for_pytorch {ipex_version} does not match torch {torch.__version__}; using native torch.xpu without it."
        )
        return None
    try:
        module = importlib.import_module("intel_extension_for_pytorch")
    except Exception as err:  # an optional extra: never a reason to fail
        rank_zero_warn(f"intel_extension_for_pytorch {ipex_version} is installed but failed to import ({err}); using native torch.xpu.")
        return None
    rank_zero_info(f"Using intel_extension_for_pytorch {ipex_version} with torch {torch.__version__}.")
    return module


# -- the accelerator ----------------------------------------------------------------------------------
class XPUAccelerator(Accelerator):
    """Accelerator for Intel GPUs (``torch.xpu``). ``Trainer(accelerator="xpu", devices=...)`` selects it."""

    def setup_device(self, device: torch.device) -> None:
        if device.type != "xpu":
            raise MisconfigurationException(f"XPUAccelerator needs an xpu device, got {device}.")
        _require_xpu()
        index = device.index if device.index is not None else 0
        count = xpu_device_count()
        if index >= count:
            raise XPUUnavailableError(f"{device} requested but found {count} XPU device(s): {', '.join(f'xpu:{i}' for i in range(count))}.")
        _load_ipex()
        torch.xpu.set_device(index)

    def setup(self, trainer: Any) -> None:
        torch.xpu.empty_cache()

    def get_device_stats(self, device: _DEVICE) -> dict[str, Any]:
        """``torch.xpu.memory_stats`` (flat ``"allocated_bytes.all.current"``-style keys) plus the headline counters."""
        stats = dict(torch.xpu.memory_stats(device))
        stats["memory_allocated"] = torch.xpu.memory_allocated(device)
        stats["max_memory_allocated"] = torch.xpu.max_memory_allocated(device)
        stats["memory_reserved"] = torch.xpu.memory_reserved(device)
        return stats

    def teardown(self) -> None:
        if xpu_available():
            torch.xpu.empty_cache()

    @staticmethod
    def parse_devices(devices: Union[int, str, list[int]]) -> list[int]:
        return parse_xpu_ids(devices)

    @staticmethod
    def get_parallel_devices(devices: list[int]) -> list[torch.device]:
        return [torch.device("xpu", i) for i in devices]

    @staticmethod
    def auto_device_count() -> int:
        return xpu_device_count()

    @staticmethod
    def is_available() -> bool:
        return xpu_available()

    @staticmethod
    def name() -> str:
        return "xpu"

    @classmethod
    def register_accelerators(cls, accelerator_registry: _AcceleratorRegistry) -> None:
        entry = dict.get(accelerator_registry, cls.name())  # the registry's own get() instantiates
        if entry is not None and _qualname(entry["accelerator"]) != _qualname(cls):
            rank_zero_warn(
                f"accelerator 'xpu' is already registered to {_qualname(entry['accelerator'])}; lightning_nf4 leaves it. "
                "Pass accelerator=lightning_nf4.accelerators.XPUAccelerator() to use this one."
            )
            return
        accelerator_registry.register(cls.name(), cls, description=cls.__name__, override=True)


def _qualname(obj: type) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


# -- making Lightning's connector choose XPU-correct strategy and precision ------------------------------
_PATCHED = "_lightning_nf4_xpu_patched"
_PATCH_NAMES = (
    "_choose_auto_accelerator",
    "_choose_gpu_accelerator_backend",
    "_set_parallel_devices_and_init_accelerator",
    "_choose_strategy",
    "_init_strategy",
    "_check_and_init_precision",
)


def _flag_is_xpu(flag: Any) -> bool:
    if isinstance(flag, XPUAccelerator):
        return True
    if not isinstance(flag, str):
        return False
    from lightning.pytorch.accelerators import AcceleratorRegistry

    entry = dict.get(AcceleratorRegistry, flag)
    return entry is not None and isinstance(entry["accelerator"], type) and issubclass(entry["accelerator"], XPUAccelerator)


def _patch_accelerator_connector() -> bool:
    """Wrap ``_AcceleratorConnector`` so an ``XPUAccelerator`` gets XPU strategies and precision; idempotent.

    Returns False (with a warning) when this Lightning version lacks one of the methods: then only an explicit
    ``strategy=XPUDDPStrategy()`` / ``SingleDeviceStrategy("xpu:0")`` gives a correct XPU setup.
    """
    from lightning.pytorch.plugins import MixedPrecision
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
    from lightning.pytorch.trainer.connectors import accelerator_connector as module

    from lightning_nf4.strategies.xpu_ddp import XPUDDPStrategy, check_xccl

    connector = module._AcceleratorConnector
    if getattr(connector, _PATCHED, False):
        return True
    missing = [name for name in _PATCH_NAMES if not hasattr(connector, name)]
    if missing:
        rank_zero_warn(
            f"lightning_nf4: this Lightning's _AcceleratorConnector lacks {missing}; accelerator='xpu' needs an explicit "
            "strategy (XPUDDPStrategy() or SingleDeviceStrategy('xpu:0')) and precision plugin."
        )
        return False

    choose_auto = connector._choose_auto_accelerator
    choose_gpu = connector._choose_gpu_accelerator_backend
    init_accelerator = connector._set_parallel_devices_and_init_accelerator
    choose_strategy = connector._choose_strategy
    init_strategy = connector._init_strategy
    init_precision = connector._check_and_init_precision

    def _choose_auto_accelerator() -> str:
        choice = choose_auto()
        return "xpu" if choice == "cpu" and _flag_is_xpu("xpu") and xpu_available() else choice

    def _choose_gpu_accelerator_backend() -> str:
        try:
            return choose_gpu()
        except MisconfigurationException:
            if _flag_is_xpu("xpu") and xpu_available():
                return "xpu"
            raise

    def _set_parallel_devices_and_init_accelerator(self: Any) -> None:
        if _flag_is_xpu(self._accelerator_flag):
            _require_xpu()  # before Lightning's generic "accelerator is not available"
        init_accelerator(self)

    def _choose_strategy(self: Any) -> Any:
        choice = choose_strategy(self)
        if (
            isinstance(self.accelerator, XPUAccelerator)
            and type(choice) is SingleDeviceStrategy
            and choice.root_device.type != "xpu"
        ):
            return SingleDeviceStrategy(device=self._parallel_devices[0])
        return choice

    def _init_strategy(self: Any) -> None:
        flag = self._strategy_flag
        entry = dict.get(StrategyRegistry, flag) if isinstance(flag, str) else None
        if isinstance(self.accelerator, XPUAccelerator) and entry is not None and entry["strategy"] is DDPStrategy:
            self.strategy = XPUDDPStrategy(**entry["init_params"])
        else:
            init_strategy(self)
        if not isinstance(self.accelerator, XPUAccelerator):
            return
        if type(self.strategy) is DDPStrategy:
            raise MisconfigurationException(
                "DDPStrategy does not run on XPU (it builds DDP inside a CUDA stream). Pass "
                "lightning_nf4.strategies.XPUDDPStrategy(...) with the same arguments, or strategy='ddp'."
            )
        if isinstance(self.strategy, XPUDDPStrategy) and not self.strategy._process_group_backend:
            check_xccl()  # fail at Trainer(...) rather than after the processes are launched

    def _check_and_init_precision(self: Any) -> Any:
        if (
            isinstance(self.accelerator, XPUAccelerator)
            and self._precision_plugin_flag is None
            and self._precision_flag in ("16-mixed", "bf16-mixed")
            and (isinstance(self.strategy, XPUDDPStrategy) or type(self.strategy) is SingleDeviceStrategy)
        ):
            self._validate_precision_choice()
            rank_zero_info(f"Using {self._precision_flag} Automatic Mixed Precision (AMP) on xpu")
            return MixedPrecision(self._precision_flag, device="xpu")
        return init_precision(self)

    connector._choose_auto_accelerator = staticmethod(_choose_auto_accelerator)
    connector._choose_gpu_accelerator_backend = staticmethod(_choose_gpu_accelerator_backend)
    connector._set_parallel_devices_and_init_accelerator = _set_parallel_devices_and_init_accelerator
    connector._choose_strategy = _choose_strategy
    connector._init_strategy = _init_strategy
    connector._check_and_init_precision = _check_and_init_precision
    setattr(connector, _PATCHED, True)
    return True
