"""Intel XPU support (issue 5), tested up to the device boundary. No Intel GPU was used.

What is simulated, and only this: the ``torch.xpu`` functions the accelerator calls are replaced, per test, by
a fake machine with N devices (``is_available``, ``device_count``, ``set_device``, ``empty_cache``,
``memory_stats``, ``memory_allocated``, ``max_memory_allocated``, ``memory_reserved``; ``set_device`` refuses an
index >= N), and ``torch.distributed.is_xccl_available`` is made to return True where a test needs the xccl
backend. Where a test needs the process group or the DDP wrapper, Lightning's ``_init_dist_connection`` and
the ``DistributedDataParallel`` class used by ``XPUDDPStrategy`` are replaced by recorders, so no xccl group and
no XPU tensor is ever made. ``torch.cuda.stream``/``Stream`` are replaced by functions that fail the test, to
prove the XPU path never touches CUDA. The "no XPU" tests use this machine as it is (CPU build of torch), with
``torch.xpu._is_compiled`` or ``torch.__version__`` patched only to reach the other two wordings.

What is real: Lightning's ``Trainer`` construction (registry look-up, device parsing, strategy and precision
selection by its ``_AcceleratorConnector`` with our patch), ``XPUDDPStrategy.setup_environment`` up to the
process-group call, ``NF4Precision``'s device binding and the ``torch.autocast("xpu")`` object it builds, and
one real single-process gloo DDP wrap on CPU through ``XPUDDPStrategy._setup_model``, and a real gloo DDP on the
CPU on which ``XPUDDPStrategy`` (its root device an XPU) registers a DDP comm hook that the backward then runs.

Not run: no ``fit`` on XPU (a CPU build cannot hold XPU tensors, and faking the numerics would prove nothing),
no xccl collective, no IPEX import (a fake module stands in for a version-matched IPEX).
"""

import importlib.metadata
import sys
import types
import warnings
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.fabric.accelerators.registry import _AcceleratorRegistry
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import AcceleratorRegistry, CPUAccelerator
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from lightning_utilities.core.rank_zero import rank_zero_only
from torch import nn

import lightning_nf4.accelerators  # noqa: F401  (registers "xpu"; lightning_nf4/__init__ does the same)
import lightning_nf4.accelerators.xpu as xpu_mod
import lightning_nf4.strategies.xpu_ddp as xpu_ddp_mod
from lightning_nf4 import NF4Linear, NF4Precision
from lightning_nf4.accelerators import XPUAccelerator, XPUUnavailableError
from lightning_nf4.strategies import XCCLUnavailableError, XPUDDPStrategy
from tests import isolated


class FakeXPU:
    """A machine with ``count`` Intel GPUs, as far as ``torch.xpu``'s Python functions tell."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.count = count
        self.set_device_calls: list = []
        self.empty_cache_calls = 0
        self.stats_devices: list = []
        for name, fn in {
            "is_available": lambda: count > 0,
            "device_count": lambda: count,
            "set_device": self._set_device,
            "empty_cache": self._empty_cache,
            "memory_stats": self._memory_stats,
            "memory_allocated": lambda device=None: 3 * 2**20,
            "max_memory_allocated": lambda device=None: 5 * 2**20,
            "memory_reserved": lambda device=None: 8 * 2**20,
        }.items():
            monkeypatch.setattr(torch.xpu, name, fn)

    def _set_device(self, device) -> None:
        index = torch.device("xpu", device).index if isinstance(device, int) else torch.device(device).index
        if index >= self.count:
            raise RuntimeError(f"invalid device ordinal {index}")
        self.set_device_calls.append(index)

    def _empty_cache(self) -> None:
        self.empty_cache_calls += 1

    def _memory_stats(self, device=None) -> dict:
        self.stats_devices.append(device)
        return {"allocated_bytes.all.current": 3 * 2**20, "allocated_bytes.all.peak": 5 * 2**20, "num_alloc_retries": 0}


@pytest.fixture(autouse=True)
def _keep_rank_zero(monkeypatch):
    # DDPStrategy.set_world_ranks writes the process rank into Lightning's rank_zero_only; undo it after each test.
    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0))


@pytest.fixture
def fake_xpu(monkeypatch):
    def make(count: int = 4) -> FakeXPU:
        return FakeXPU(monkeypatch, count)

    return make


@pytest.fixture
def xccl(monkeypatch):
    monkeypatch.setattr(dist, "is_xccl_available", lambda: True)


@pytest.fixture
def no_cuda_streams(monkeypatch):
    def touched(*args, **kwargs):
        raise AssertionError("torch.cuda stream API touched on the XPU path")

    monkeypatch.setattr(torch.cuda, "stream", touched)
    monkeypatch.setattr(torch.cuda, "Stream", touched)


def make_trainer(**kw) -> pl.Trainer:
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    defaults.update(kw)
    return pl.Trainer(**defaults)


# -- registration ------------------------------------------------------------------------------------
def test_registered_under_xpu():
    assert AcceleratorRegistry["xpu"]["accelerator"] is XPUAccelerator
    assert XPUAccelerator.name() == "xpu"
    for name, method in {"ddp_xpu": "popen", "ddp_spawn_xpu": "spawn", "ddp_fork_xpu": "fork", "ddp_notebook_xpu": "fork"}.items():
        strategy = StrategyRegistry.get(name)
        assert type(strategy) is XPUDDPStrategy and strategy._start_method == method
    assert xpu_mod._patch_accelerator_connector() is True  # idempotent: already patched at import


@pytest.mark.timeout(360)  # its subprocess stops at 300 s
def test_import_lightning_nf4_registers_xpu():
    """Fails until lightning_nf4/__init__.py imports lightning_nf4.accelerators."""
    code = (
        "import lightning_nf4\n"
        "from lightning.pytorch.accelerators import AcceleratorRegistry\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "assert 'xpu' in AcceleratorRegistry and 'ddp_xpu' in StrategyRegistry\n"
        "import sys; assert 'intel_extension_for_pytorch' not in sys.modules\n"
    )
    isolated.run([sys.executable, "-c", code], check=True, timeout=300)


def test_registration_leaves_a_foreign_xpu_accelerator():
    class OtherXPU(CPUAccelerator):
        pass

    registry = _AcceleratorRegistry()
    registry.register("xpu", OtherXPU)
    with pytest.warns(UserWarning, match="already registered"):
        XPUAccelerator.register_accelerators(registry)
    assert registry["xpu"]["accelerator"] is OtherXPU

    fresh = _AcceleratorRegistry()
    XPUAccelerator.register_accelerators(fresh)
    XPUAccelerator.register_accelerators(fresh)  # twice is fine
    assert fresh["xpu"]["accelerator"] is XPUAccelerator

    strategies = _StrategyRegistry()
    XPUDDPStrategy.register_strategies(strategies)
    XPUDDPStrategy.register_strategies(strategies)
    assert set(strategies) == {"ddp_xpu", "ddp_spawn_xpu", "ddp_fork_xpu", "ddp_notebook_xpu"}


# -- no XPU on this machine (real, not simulated) --------------------------------------------------------
def test_no_xpu_error_says_what_was_found():
    assert not torch.xpu.is_available(), "this test expects a machine without an Intel GPU"
    with pytest.raises(XPUUnavailableError) as err:
        make_trainer(accelerator="xpu")
    message = str(err.value)
    assert message.startswith("XPU requested but torch.xpu.is_available() is False; found: cpu")
    assert f"torch {torch.__version__}" in message
    if not torch.xpu._is_compiled():
        assert "built without XPU support" in message and "download.pytorch.org/whl/xpu" in message

    with pytest.raises(XPUUnavailableError, match="found: cpu"):
        XPUAccelerator().setup_device(torch.device("xpu", 0))
    with pytest.raises(XPUUnavailableError, match="found: cpu"):
        XPUAccelerator.parse_devices(1)
    assert XPUAccelerator.is_available() is False and XPUAccelerator.auto_device_count() == 0
    # The other accelerators are untouched: "auto" still gives the CPU here.
    assert isinstance(make_trainer(accelerator="auto").accelerator, CPUAccelerator)


def test_no_xpu_error_other_wordings(monkeypatch):
    monkeypatch.setattr(torch.xpu, "_is_compiled", lambda: True)
    assert "built with XPU support but sees no Intel GPU" in xpu_mod.xpu_unavailable_message()
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    assert "older than 2.5" in xpu_mod.xpu_unavailable_message()


# -- device parsing (simulated: 4 XPUs) -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        ("auto", [0, 1, 2, 3]), (1, [0]), (2, [0, 1]), (4, [0, 1, 2, 3]), (-1, [0, 1, 2, 3]), ("-1", [0, 1, 2, 3]),
        ("3", [0, 1, 2]), (" 2 ", [0, 1]), ([1, 3], [1, 3]), ((2,), [2]), ([0], [0]), ("0,1", [0, 1]),
        ("1, 3", [1, 3]), ("2,", [2]),
    ],
)
def test_parse_devices(fake_xpu, devices, expected):
    fake_xpu(4)
    assert XPUAccelerator.parse_devices(devices) == expected
    assert XPUAccelerator.get_parallel_devices(expected) == [torch.device("xpu", i) for i in expected]


@pytest.mark.parametrize(
    ("devices", "error", "match"),
    [
        (5, MisconfigurationException, r"Requested 5 XPU devices but found 4 XPU device\(s\): xpu:0, xpu:1, xpu:2, xpu:3"),
        ("8", MisconfigurationException, "Requested 8 XPU devices but found 4"),
        ([0, 4], MisconfigurationException, r"Requested XPU indices \[0, 4\] but found 4"),
        ("2,7", MisconfigurationException, r"Requested XPU indices \[2, 7\]"),
        (-2, MisconfigurationException, "-2 is not valid.*-1 for all"),
        ("-3", MisconfigurationException, "-3 is not valid"),
        ([-1], MisconfigurationException, "must be >= 0"),
        ([1, 1], MisconfigurationException, "must be unique"),
        (0, MisconfigurationException, "asks for no XPU"),
        ([], MisconfigurationException, "asks for no XPU"),
        ("", MisconfigurationException, "asks for no XPU"),
        ("two", MisconfigurationException, "not a device count"),
        (True, TypeError, "must be an int"),
        (1.5, TypeError, "must be an int"),
        ([0, "1"], TypeError, "sequence of str"),
    ],
)
def test_parse_devices_errors(fake_xpu, devices, error, match):
    fake_xpu(4)
    with pytest.raises(error, match=match):
        XPUAccelerator.parse_devices(devices)


# -- the accelerator at the device boundary ---------------------------------------------------------------
def test_setup_device_teardown_and_stats(fake_xpu):
    machine = fake_xpu(2)
    accelerator = XPUAccelerator()
    assert XPUAccelerator.is_available() and XPUAccelerator.auto_device_count() == 2
    accelerator.setup_device(torch.device("xpu", 1))
    accelerator.setup_device(torch.device("xpu"))  # no index means device 0
    assert machine.set_device_calls == [1, 0]
    with pytest.raises(XPUUnavailableError, match=r"xpu:5 requested but found 2 XPU device\(s\): xpu:0, xpu:1"):
        accelerator.setup_device(torch.device("xpu", 5))
    with pytest.raises(MisconfigurationException, match="needs an xpu device, got cpu"):
        accelerator.setup_device(torch.device("cpu"))

    stats = accelerator.get_device_stats(torch.device("xpu", 1))
    assert machine.stats_devices == [torch.device("xpu", 1)]
    assert stats == {
        "allocated_bytes.all.current": 3 * 2**20, "allocated_bytes.all.peak": 5 * 2**20, "num_alloc_retries": 0,
        "memory_allocated": 3 * 2**20, "max_memory_allocated": 5 * 2**20, "memory_reserved": 8 * 2**20,
    }
    accelerator.setup(trainer=None)
    accelerator.teardown()
    assert machine.empty_cache_calls == 2


def test_teardown_without_xpu_is_a_no_op():
    XPUAccelerator().teardown()  # real machine: no XPU, nothing to free, no error


# -- IPEX: optional, version-checked before import -----------------------------------------------------------
@pytest.fixture
def ipex_cache():
    xpu_mod._load_ipex.cache_clear()
    yield
    xpu_mod._load_ipex.cache_clear()


def _fake_ipex_version(monkeypatch, version):
    real = importlib.metadata.version

    def version_of(name):
        return version if name == "intel-extension-for-pytorch" else real(name)

    monkeypatch.setattr(importlib.metadata, "version", version_of)


def test_ipex_absent(ipex_cache):
    assert xpu_mod._load_ipex() is None  # not installed here


def test_ipex_mismatched_is_never_imported(monkeypatch, ipex_cache):
    _fake_ipex_version(monkeypatch, "2.8.10+xpu")
    monkeypatch.setattr(torch, "__version__", "2.13.0+xpu")
    real_import = xpu_mod.importlib.import_module

    def guarded(name, *args):
        assert name != "intel_extension_for_pytorch", "a mismatched IPEX must not be imported"
        return real_import(name, *args)

    monkeypatch.setattr(xpu_mod.importlib, "import_module", guarded)
    assert xpu_mod._load_ipex() is None


def test_ipex_matched_is_used(monkeypatch, ipex_cache):
    fake = types.ModuleType("intel_extension_for_pytorch")
    _fake_ipex_version(monkeypatch, "2.8.10+xpu")
    monkeypatch.setattr(torch, "__version__", "2.8.0+xpu")
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", fake)
    assert xpu_mod._load_ipex() is fake


def test_ipex_import_failure_is_a_warning(monkeypatch, ipex_cache):
    _fake_ipex_version(monkeypatch, "2.8.10+xpu")
    monkeypatch.setattr(torch, "__version__", "2.8.0+xpu")
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", None)  # makes the import raise ImportError
    with pytest.warns(UserWarning, match="failed to import"):
        assert xpu_mod._load_ipex() is None


def test_setup_device_tries_ipex_lazily(fake_xpu, monkeypatch):
    fake_xpu(1)
    calls = []
    monkeypatch.setattr(xpu_mod, "_load_ipex", lambda: calls.append(1))
    XPUAccelerator().setup_device(torch.device("xpu", 0))
    assert calls == [1]


# -- Trainer construction: accelerator, devices, strategy, precision ------------------------------------------
@pytest.mark.parametrize(("devices", "root"), [(1, 0), ([2], 2), ("3,", 3), ("1", 0)])
def test_trainer_single_xpu(fake_xpu, devices, root):
    fake_xpu(4)
    trainer = make_trainer(accelerator="xpu", devices=devices)
    assert isinstance(trainer.accelerator, XPUAccelerator)
    # Lightning alone would pick SingleDeviceStrategy(device="cpu") here.
    assert type(trainer.strategy) is SingleDeviceStrategy
    assert trainer.strategy.root_device == torch.device("xpu", root)
    assert trainer.num_devices == 1 and trainer.device_ids == [root]


def test_trainer_auto_and_gpu_pick_xpu(fake_xpu):
    fake_xpu(1)
    for accelerator in ("auto", "gpu"):
        trainer = make_trainer(accelerator=accelerator)
        assert isinstance(trainer.accelerator, XPUAccelerator)
        assert trainer.strategy.root_device == torch.device("xpu", 0)


def test_trainer_accepts_accelerator_instance(fake_xpu, xccl):
    fake_xpu(2)
    trainer = make_trainer(accelerator=XPUAccelerator(), devices=2)
    assert type(trainer.strategy) is XPUDDPStrategy


def test_trainer_too_many_devices(fake_xpu, xccl):
    fake_xpu(2)
    with pytest.raises(MisconfigurationException, match="Requested 4 XPU devices but found 2"):
        make_trainer(accelerator="xpu", devices=4, strategy="ddp")


@pytest.mark.parametrize(
    ("kw", "start_method", "ddp_kwargs"),
    [
        (dict(devices=2, strategy="ddp"), "popen", {}),
        (dict(devices=4, strategy="ddp"), "popen", {}),
        (dict(devices=4), "popen", {}),  # strategy="auto" with several devices
        (dict(devices=-1, strategy="ddp"), "popen", {}),
        (dict(devices=2, strategy="ddp_spawn"), "spawn", {}),
        (dict(devices=2, strategy="ddp_find_unused_parameters_true"), "popen", {"find_unused_parameters": True}),
        (dict(devices=2, strategy="ddp_xpu"), "popen", {}),
        (dict(devices=1, num_nodes=2), "popen", {}),  # multi-node, one XPU per node
    ],
)
def test_trainer_ddp_resolves_to_xpu_strategy(fake_xpu, xccl, kw, start_method, ddp_kwargs):
    fake_xpu(4)
    trainer = make_trainer(accelerator="xpu", **kw)
    strategy = trainer.strategy
    assert type(strategy) is XPUDDPStrategy
    assert strategy._start_method == start_method and strategy._ddp_kwargs == ddp_kwargs
    n = len(XPUAccelerator.parse_devices(kw["devices"]))
    assert strategy.parallel_devices == [torch.device("xpu", i) for i in range(n)]
    assert strategy.num_nodes == kw.get("num_nodes", 1)
    assert strategy._get_process_group_backend() == "xccl"


def test_trainer_strategy_instances(fake_xpu, xccl):
    fake_xpu(2)
    trainer = make_trainer(accelerator="xpu", devices=2, strategy=XPUDDPStrategy(static_graph=True))
    assert type(trainer.strategy) is XPUDDPStrategy and trainer.strategy._ddp_kwargs == {"static_graph": True}
    with pytest.raises(MisconfigurationException, match="DDPStrategy does not run on XPU.*XPUDDPStrategy"):
        make_trainer(accelerator="xpu", devices=2, strategy=DDPStrategy())


def test_cpu_selection_unchanged():
    assert type(make_trainer(accelerator="cpu", devices=2, strategy="ddp").strategy) is DDPStrategy
    single = make_trainer(accelerator="cpu", devices=1).strategy
    assert type(single) is SingleDeviceStrategy and single.root_device == torch.device("cpu")
    precision = make_trainer(accelerator="cpu", precision="bf16-mixed").precision_plugin
    assert type(precision) is MixedPrecision and precision.device == "cpu"


# -- precision: autocast follows the XPU root device ---------------------------------------------------------
def test_nf4_precision_autocasts_on_xpu(fake_xpu):
    fake_xpu(2)
    plugin = NF4Precision()
    trainer = make_trainer(accelerator="xpu", devices=[1], plugins=plugin)
    assert trainer.precision_plugin is plugin
    device = plugin._resolve_device(types.SimpleNamespace(_trainer=trainer))  # what convert_module does
    assert device == torch.device("xpu", 1)
    plugin._bind_device(device)
    ctx = plugin.autocast_context_manager()
    assert ctx.device == "xpu" and ctx.fast_dtype == torch.bfloat16

    fp16 = NF4Precision(compute_dtype=torch.float16)
    fp16._bind_device(device)
    ctx = fp16.autocast_context_manager()
    assert ctx.device == "xpu" and ctx.fast_dtype == torch.float16 and fp16.scaler is not None


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)])
def test_lightning_mixed_precision_targets_xpu(fake_xpu, precision, dtype):
    fake_xpu(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning alone would build a CUDA GradScaler that warns and disables itself
        plugin = make_trainer(accelerator="xpu", devices=1, precision=precision).precision_plugin
    assert type(plugin) is MixedPrecision and plugin.device == "xpu"
    ctx = plugin.autocast_context_manager()
    assert ctx.device == "xpu" and ctx.fast_dtype == dtype
    if precision == "16-mixed":
        assert plugin.scaler._device == "xpu"


# -- XPU DDP at the process-group and DDP-wrapper boundary --------------------------------------------------------
def test_setup_environment_inits_xccl_on_the_local_xpu(fake_xpu, xccl, monkeypatch):
    machine = fake_xpu(2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    calls = []
    monkeypatch.setattr("lightning.pytorch.strategies.ddp._init_dist_connection", lambda env, backend, **kw: calls.append((backend, kw)))
    strategy = make_trainer(accelerator="xpu", devices=2, strategy="ddp").strategy
    strategy.setup_environment()
    assert machine.set_device_calls == [1]
    assert strategy.root_device == torch.device("xpu", 1) and strategy.global_rank == 1
    assert calls == [("xccl", {"timeout": strategy._timeout, "device_id": torch.device("xpu", 1)})]
    assert strategy.process_group_backend == "xccl"


def test_xccl_needs_torch_2_8(fake_xpu, xccl, monkeypatch):
    fake_xpu(2)
    strategy = make_trainer(accelerator="xpu", devices=2, strategy="ddp").strategy
    monkeypatch.setattr(torch, "__version__", "2.7.1+xpu")
    with pytest.raises(XCCLUnavailableError, match="from 2.8 on; this is torch 2.7.1"):
        strategy._get_process_group_backend()
    with pytest.raises(XCCLUnavailableError, match="from 2.8 on"):  # already at Trainer(...)
        make_trainer(accelerator="xpu", devices=2, strategy="ddp")


def test_xccl_missing_from_build(fake_xpu):
    fake_xpu(2)
    assert not dist.is_xccl_available()  # real: this CPU build has no XCCL
    with pytest.raises(XCCLUnavailableError, match=r"is_xccl_available\(\) is False"):
        make_trainer(accelerator="xpu", devices=2, strategy="ddp")
    strategy = XPUDDPStrategy(parallel_devices=[torch.device("xpu", 0), torch.device("xpu", 1)])
    with pytest.raises(XCCLUnavailableError, match=r"is_xccl_available\(\) is False"):
        strategy._get_process_group_backend()


def test_explicit_backend_is_kept(fake_xpu):
    fake_xpu(2)
    strategy = make_trainer(accelerator="xpu", devices=2, strategy=XPUDDPStrategy(process_group_backend="ccl")).strategy
    assert strategy._get_process_group_backend() == "ccl"


class RecordingDDP:
    def __init__(self, module, device_ids=None, **kwargs):
        self.module, self.device_ids, self.kwargs = module, device_ids, kwargs


def test_setup_model_wraps_without_cuda(fake_xpu, xccl, no_cuda_streams, monkeypatch):
    fake_xpu(2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(xpu_ddp_mod, "DistributedDataParallel", RecordingDDP)
    strategy = make_trainer(accelerator="xpu", devices=2, strategy="ddp_find_unused_parameters_true").strategy
    model = nn.Linear(2, 2)
    wrapped = strategy._setup_model(model)
    assert wrapped.module is model and wrapped.device_ids == [1] and wrapped.kwargs == {"find_unused_parameters": True}


def test_lightning_ddp_setup_model_uses_cuda_streams(no_cuda_streams):
    """The premise of the override: Lightning 2.6's own DDPStrategy opens a CUDA stream for any device ids."""
    strategy = DDPStrategy(parallel_devices=[torch.device("xpu", 0)])
    with pytest.raises(AssertionError, match="torch.cuda stream API touched"):
        strategy._setup_model(nn.Linear(2, 2))


_REAL_DDP_CHECK = """
import torch, torch.distributed as dist
from datetime import timedelta
from torch import nn
from lightning_nf4 import NF4Linear
from lightning_nf4.strategies import XPUDDPStrategy

def touched(*args, **kwargs):
    raise AssertionError("torch.cuda stream API touched on the XPU path")
torch.cuda.stream = torch.cuda.Stream = touched
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=60))
strategy = XPUDDPStrategy(parallel_devices=[torch.device("cpu")])
model = nn.Sequential(NF4Linear.from_linear(nn.Linear(64, 32)), nn.Linear(32, 4))
model._ddp_params_and_buffers_to_ignore = ["0.weight"]  # frozen NF4 bytes: no start-up broadcast
wrapped = strategy._setup_model(model)
assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and wrapped.device_ids is None
assert wrapped.parameters_to_ignore == {"0.weight"}
wrapped(torch.randn(3, 64)).sum().backward()
assert model[1].weight.grad is not None
del wrapped  # the DDP Reducer must die before its process group: freed after, gloo's destructor can wait forever
dist.destroy_process_group()
print("ok")
"""


def test_setup_model_real_ddp_on_cpu_with_nf4():
    """The same code path builds a real DistributedDataParallel (gloo, one process) around a model holding
    NF4 weights. In a child process with a timeout: a process group must never outlive its test, and a
    stuck gloo teardown must fail this test rather than hang the suite."""
    done = isolated.run([sys.executable, "-c", _REAL_DDP_CHECK], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


_COMM_HOOK_CHECK = """
import torch, torch.distributed as dist
from datetime import timedelta
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from lightning.pytorch.strategies import DDPStrategy
from lightning_nf4.strategies import XPUDDPStrategy

calls = []
def counting_hook(state, bucket):
    calls.append(bucket.buffer().numel())
    return default_hooks.allreduce_hook(state, bucket)

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=60))
seen = {}
for cls in (DDPStrategy, XPUDDPStrategy):
    calls.clear()
    strategy = cls(parallel_devices=[torch.device("xpu", 0)], ddp_comm_hook=counting_hook)
    assert strategy.root_device == torch.device("xpu", 0)
    model = nn.Linear(8, 4)
    strategy.model = DistributedDataParallel(model)  # a real DDP on the CPU stands in for the one on the XPU
    strategy._register_ddp_hooks()
    strategy.model(torch.randn(3, 8)).sum().backward()
    seen[cls.__name__] = sum(calls)
    assert model.weight.grad is not None
    del strategy, model  # the DDP Reducer must die before its process group
dist.destroy_process_group()
print(seen)
assert seen == {"DDPStrategy": 0, "XPUDDPStrategy": 36}, seen  # 8 x 4 weights + 4 biases through the hook
print("ok")
"""


def test_xpu_ddp_registers_the_comm_hook():
    """``XPUDDPStrategy(ddp_comm_hook=...)`` on an XPU root device registers the hook with DDP, and gradients go
    through it; Lightning's own DDPStrategy registers hooks for CUDA only (nothing on XPU: the premise). Real
    DDP and gloo on the CPU, one process, in a child process with a timeout."""
    root = Path(__file__).resolve().parent.parent
    done = isolated.run([sys.executable, "-c", _COMM_HOOK_CHECK], capture_output=True, text=True, timeout=180, cwd=root)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-1000:] + done.stderr[-3000:]


def test_connector_patch_warns_when_lightnings_private_names_change(monkeypatch):
    """The accelerator-connector patch relies on private method names; a Lightning whose connector lacks one gets
    a warning naming it and the workaround, and is left unpatched. The installed Lightning has them all."""
    from lightning.pytorch.trainer.connectors import accelerator_connector

    real = accelerator_connector._AcceleratorConnector
    assert all(hasattr(real, name) for name in xpu_mod._PATCH_NAMES) and getattr(real, xpu_mod._PATCHED)
    renamed = type("_AcceleratorConnector", (), {name: staticmethod(lambda *a: None) for name in xpu_mod._PATCH_NAMES if name != "_init_strategy"})
    monkeypatch.setattr(accelerator_connector, "_AcceleratorConnector", renamed)
    with pytest.warns(UserWarning, match=r"lacks \['_init_strategy'\]; accelerator='xpu' needs an explicit strategy"):
        assert xpu_mod._patch_accelerator_connector() is False
    assert not getattr(renamed, xpu_mod._PATCHED, False)
    complete = type("_AcceleratorConnector", (), {name: staticmethod(lambda *a: None) for name in xpu_mod._PATCH_NAMES})
    monkeypatch.setattr(accelerator_connector, "_AcceleratorConnector", complete)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xpu_mod._patch_accelerator_connector() is True
    assert getattr(complete, xpu_mod._PATCHED)
