"""Host side of the Triton kernels for GPUs (CUDA, and Intel XPU through Intel's Triton backend):
output allocation, launch settings and grids. The kernels themselves are in ``triton_jit``."""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_nf4.format.codebooks import midpoints
from lightning_nf4.kernels import reference

DEVICE_TYPES = ("cuda", "xpu")


@lru_cache(maxsize=1)
def _kernels():
    """The Triton kernels, imported on first use; None where Triton is missing (plain PyTorch serves)."""
    try:
        from lightning_nf4.kernels import triton_jit
    except ImportError:
        return None
    return triton_jit


def quantize_4bit(weight: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    kernels = _kernels()
    if kernels is None:
        return reference.quantize_4bit(weight, code, blocksize)
    weight = weight.contiguous()
    n = weight.numel()
    num_blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(num_blocks, dtype=torch.float32, device=weight.device)
    mids = midpoints(code.float()).contiguous()
    rows = max(1, 4096 // blocksize)
    grid = (-(-num_blocks // rows),)
    kernels.quantize_kernel[grid](weight, mids, packed, absmax, n, num_blocks, BLOCKSIZE=blocksize, ROWS=rows, num_warps=4)
    return packed, absmax


# Dequantize launch settings (outputs per program, warps). Each card and size class times the
# candidates once, on first use (one setting is not best everywhere: benchmarks/NOTES.md). Rows are
# capped at 32 bytes (64 outputs): wider rows hit a misaligned-address fault in Triton 3.6's interleaved
# store (seen on an H200 at blocksize 256). DEQUANT_CONFIG forces one setting.
DEQUANT_CANDIDATES = ((4096, 4), (8192, 8), (4096, 8), (8192, 4))
DEQUANT_CONFIG: Optional[dict] = None  # e.g. {"outputs": 4096, "num_warps": 4}; None: timed per card
_dequantize_choice: dict[tuple, tuple[int, int]] = {}


def shuffles(device: torch.device) -> bool:
    """Whether the kernels look NF4 codes up with warp shuffles (inline PTX: NVIDIA GPUs only) rather
    than with gathers from the code table (Intel XPU, AMD)."""
    return device.type == "cuda" and torch.version.hip is None


def _dequantize_key(device: torch.device, numel: int, nested: bool, half: int, dtype: torch.dtype) -> tuple:
    return device.type, device.index, max(numel, 1).bit_length(), nested, half, dtype


def _choose(key: tuple, device: torch.device, launch) -> tuple[int, int]:
    """The fastest candidate for ``key``, timed once; the first one while a CUDA graph is captured."""
    if DEQUANT_CONFIG is not None:
        return DEQUANT_CONFIG["outputs"], DEQUANT_CONFIG["num_warps"]
    choice = _dequantize_choice.get(key)
    if choice is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return DEQUANT_CANDIDATES[0]
        from triton.testing import do_bench

        times = {c: do_bench(lambda c=c: launch(c), warmup=5, rep=20, return_mode="median") for c in DEQUANT_CANDIDATES}
        choice = _dequantize_choice[key] = min(times, key=times.get)
    return choice


def dequantize_4bit(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    numel: int,
    dtype: torch.dtype,
    nested_absmax: Optional[Tensor] = None,
    nested_code: Optional[Tensor] = None,
    offset: Optional[Tensor] = None,
    nested_blocksize: int = 256,
) -> Tensor:
    kernels = _kernels()
    nested = nested_absmax is not None
    if kernels is None:
        if nested:
            absmax = reference.dequantize_blockwise_8bit(absmax, nested_absmax, nested_code, nested_blocksize, offset)
        return reference.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    half = min(32, blocksize // 2)
    num_rows = -(-numel // (2 * half))
    args = (
        packed, absmax, code,
        nested_absmax if nested else absmax, nested_code if nested else code, offset if nested else absmax,
        out, numel, blocksize, nested_blocksize,
    )

    shuffle = shuffles(packed.device)

    def grid(outputs: int) -> tuple[int]:
        return (-(-num_rows // (outputs // (2 * half))),)

    def launch(setting: tuple[int, int]) -> Any:
        outputs, warps = setting
        return kernels.dequantize_kernel[grid(outputs)](
            *args, NESTED=nested, HALF=half, OUTPUTS=outputs, SHUFFLE=shuffle, EVEN=numel % outputs == 0, num_warps=warps,
            enable_fp_fusion=False,  # code * nested_absmax + offset rounds twice, as the reference does
        )

    device = packed.device
    setting = _choose(_dequantize_key(device, numel, nested, half, dtype), device, launch)
    constexprs = (nested, half, setting[0], shuffle, numel % setting[0] == 0)
    # Triton specialises a compiled kernel on the integer arguments and on each address's 16-byte alignment: a call
    # that matches all of them may reuse that kernel's launcher directly (no per-call argument binding).
    # The direct launch takes the addresses as ints: Triton's launcher would otherwise call data_ptr() and ask the
    # driver about every tensor argument on every call (host time that a training step pays hundreds of times).
    addresses = tuple(t.data_ptr() for t in args[:7])
    key = (device.index, setting, numel, blocksize, nested_blocksize, dtype, constexprs, *(a % 16 == 0 for a in addresses[:6]))
    fast = _dequantize_launchers.get(key) if FAST_LAUNCH else False
    if fast:
        fast(*addresses, *args[7:], *constexprs)
        return out
    compiled = launch(setting)
    if fast is None and FAST_LAUNCH and device.type == "cuda" and not _capturing(device):
        _dequantize_launchers[key] = _checked_dequantize_launch(kernels, compiled, grid(setting[0]), device, addresses, args, constexprs, out)
    return out


# launchers checked once per specialisation: (device, setting, sizes, dtype, constexprs, alignments) -> launch, or False
_dequantize_launchers: dict[tuple, Any] = {}
DEQUANTIZE_PARAMETERS = ("packed_ptr", "absmax_ptr", "code_ptr", "nested_absmax_ptr", "nested_code_ptr", "offset_ptr", "out_ptr",
                         "numel", "blocksize", "nested_blocksize", "NESTED", "HALF", "OUTPUTS", "SHUFFLE", "EVEN")


def _checked_dequantize_launch(kernels, compiled, grid: tuple[int, ...], device: torch.device, addresses: tuple, args: tuple,
                               constexprs: tuple, expected: Tensor) -> Any:
    """The compiled kernel's direct launcher, if it gives Triton's launch's result bit for bit; False otherwise."""
    def make() -> Any:
        return _direct_launcher(compiled, grid, device.index if device.index is not None else torch.cuda.current_device())

    def again(launch) -> Tensor:
        out = torch.empty_like(expected)
        launch(*addresses[:6], out.data_ptr(), *args[7:], *constexprs)  # as dequantize_4bit calls it
        return out

    return _checked_launch(kernels.dequantize_kernel, DEQUANTIZE_PARAMETERS, make, again, expected)


def _checked_launch(kernel, parameters: tuple[str, ...], make: Callable[[], Any], run: Callable[[Any], Tensor],
                    expected: Tensor) -> Any:
    """``make()``'s launch if ``kernel`` still takes ``parameters`` (the order a direct launch passes them in) and
    ``run(launch)`` equals Triton's own launch's result ``expected`` bit for bit; False otherwise, and on any error:
    the caller then keeps Triton's launch."""
    try:
        if tuple(kernel.arg_names) != parameters:
            return False
        launch = make()
        if launch is None:
            return False
        return launch if torch.equal(run(launch), expected) else False
    except Exception:  # noqa: BLE001 - Triton's own launch stays
        return False


_group_tables: dict[tuple, Tensor] = {}
GROUP_MAX_MEMBERS = 16  # one kernel specialization per member count


def _groupable(packed: list[Tensor], absmax: list[Tensor], nested_absmax: list[Tensor], numels: list[int]) -> bool:
    # The group kernel is told (and relies on) 16-byte aligned statistics and numels that are multiples
    # of 64: true of every LLM projection; anything else takes one launch per weight.
    tensors = [*packed, *absmax, *nested_absmax]
    return (
        0 < len(packed) <= GROUP_MAX_MEMBERS and all(n % 64 == 0 for n in numels)
        and all(t.data_ptr() % 16 == 0 and t.is_contiguous() for t in tensors)
    )


def _group_table(device: torch.device, packed, absmax, nested_absmax, offsets, numels) -> Optional[Tensor]:
    """Per weight: addresses of packed, absmax, nested absmax and offset, output start, numel; built once
    per set of weights (their addresses do not change while they train on one device; FSDP2 gathers into
    new buffers each time) and kept on the device."""
    nested = bool(nested_absmax)
    addresses = tuple(
        (p.data_ptr(), a.data_ptr(), nested_absmax[i].data_ptr() if nested else a.data_ptr(), offsets[i].data_ptr() if nested else a.data_ptr())
        for i, (p, a) in enumerate(zip(packed, absmax))
    )
    key = (device, addresses, tuple(numels))
    table = _group_tables.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None  # building the table copies from the host, which a graph capture forbids
        starts = [0]
        for n in numels[:-1]:
            starts.append(starts[-1] + n)
        rows = [[*a, start, n] for a, start, n in zip(addresses, starts, numels)]
        if len(_group_tables) > 1024:
            _group_tables.clear()
        # From pinned memory without blocking: a copy from pageable memory waits for the stream to drain, which
        # under FSDP2 (fresh all-gather buffers, so a new table, every layer and pass) stalls the host each
        # layer and leaves no all-gather overlapped with compute.
        host = torch.tensor(rows, dtype=torch.int64, device="cpu")
        if device.type == "cuda":
            host = host.pin_memory()
        table = _group_tables[key] = host.to(device, non_blocking=True)
    return table


def dequantize_4bit_group(
    packed: list[Tensor],
    absmax: list[Tensor],
    code: Tensor,
    blocksize: int,
    numels: list[int],
    dtype: torch.dtype,
    nested_absmax: list[Tensor],
    nested_code: Optional[Tensor],
    offsets: list[Tensor],
    nested_blocksize: int = 256,
) -> Tensor:
    """All weights in one launch: a QLoRA step is bound by host time per launch, not by the GPU."""
    kernels = _kernels()
    device = packed[0].device
    table = None
    if kernels is not None and _groupable(packed, absmax, nested_absmax, numels):
        table = _group_table(device, packed, absmax, nested_absmax, offsets, numels)
    if table is None:
        parts = [
            dequantize_4bit(p, a, code, blocksize, n, dtype, *nested, nested_blocksize)
            for p, a, n, nested in reference.group_members(packed, absmax, numels, nested_absmax, nested_code, offsets)
        ]
        return torch.cat(parts)
    nested = bool(nested_absmax)
    out = torch.empty(sum(numels), dtype=dtype, device=device)
    half = min(32, blocksize // 2)
    shuffle = shuffles(device)

    def launch(setting: tuple[int, int]) -> None:
        outputs, warps = setting
        rows = outputs // (2 * half)
        programs = sum(-(-(-(-n // (2 * half))) // rows) for n in numels)
        kernels.dequantize_group_kernel[(programs,)](
            table, code, nested_code if nested else code, out, blocksize, nested_blocksize,
            MEMBERS=len(numels), NESTED=nested, HALF=half, OUTPUTS=outputs, SHUFFLE=shuffle,
            EVEN=all(n % outputs == 0 for n in numels), num_warps=warps, enable_fp_fusion=False,
        )

    launch(_choose(_dequantize_key(device, max(numels), nested, half, dtype), device, launch))
    return out


def dequantize_launch_config(device: torch.device, numel: int, nested: bool, dtype: torch.dtype = torch.bfloat16, blocksize: int = 64) -> Optional[dict]:
    """The setting timed best for this size class on ``device`` (None before its first dequantize)."""
    choice = _dequantize_choice.get(_dequantize_key(torch.device(device), numel, nested, min(32, blocksize // 2), dtype))
    return None if choice is None else {"outputs": choice[0], "num_warps": choice[1]}


def quantize_blockwise_8bit(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    kernels = _kernels()
    if kernels is None:
        return reference.quantize_blockwise_8bit(x, code, blocksize)
    x = x.reshape(-1).float().contiguous()
    n = x.numel()
    num_blocks = -(-n // blocksize)
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks, dtype=torch.float32, device=x.device)
    lut = reference.nearest_code_lut(code, x.device)
    rows = max(1, 4096 // blocksize)
    kernels.quantize_8bit_kernel[(-(-num_blocks // rows),)](x, lut, q, absmax, n, num_blocks, BLOCKSIZE=blocksize, ROWS=rows, num_warps=4, enable_fp_fusion=False)
    return q, absmax


# -- gemv (one token) --------------------------------------------------------------------------------
# Launch settings (rows per program: 1, 2 or 4; quantization blocks per loop step; warps; pipeline stages;
# split-K parts): timed per card and weight shape on first use, as for dequantize, because the best setting
# moves with the number of rows (programs in flight) and of blocks per row (loop length). The kernel is at its
# best with one 16-byte group of each row per thread and step (blocks per step == 16 * warps for blocksize 64).
# Split-K (more programs for weights with few rows) is a candidate, though on an H200 it lost at every 8B shape
# (benchmarks/results_h200_gemv_rows.md). GEMV_CONFIG forces one setting.
GEMV_CANDIDATES: tuple[tuple[int, int, int, int, int], ...] = (
    (4, 32, 2, 3, 1), (4, 16, 1, 3, 1), (4, 32, 4, 3, 1), (4, 64, 4, 3, 1), (2, 64, 4, 3, 1), (1, 32, 2, 3, 1),
    (2, 128, 8, 3, 1), (2, 32, 2, 3, 1), (4, 16, 1, 3, 4), (4, 32, 2, 3, 2),
)
GEMV_ROWS = (1, 2, 4)  # rows per program the kernel takes
GEMV_CONFIG: Optional[dict] = None  # e.g. {"rows": 4, "blocks_per_step": 16, "num_warps": 4, "num_stages": 3, "split": 1}
FAST_LAUNCH = True  # launch prepared gemv plans through the compiled kernel's launcher (checked once per plan)
_gemv_choice: dict[tuple, tuple[int, int, int, int, int]] = {}


def _gemv_setting(setting: tuple[int, int, int, int, int], blocks_per_row: int) -> tuple[int, int, int, int, int]:
    """``setting`` fitted to a row of ``blocks_per_row`` blocks: the kernel has no mask along K, so blocks per step
    and split parts are halved until each part is a whole number of steps."""
    rows, step, warps, stages, split = setting
    if rows not in GEMV_ROWS:
        raise ValueError(f"gemv setting {setting}: rows per program must be one of {GEMV_ROWS}, got {rows}; "
                         "pick another setting (GEMV_CANDIDATES lists the timed ones).")
    while split > 1 and blocks_per_row % split:
        split //= 2
    while (blocks_per_row // split) % step:
        step //= 2
    return rows, step, warps, stages, split


def _gemv_key(device: torch.device, out_features: int, in_features: int, nested: bool, dtype: torch.dtype, blocksize: int) -> tuple:
    return device.type, device.index, out_features, in_features, nested, dtype, blocksize


def gemv_launch_config(device: torch.device, out_features: int, in_features: int, nested: bool = True,
                       dtype: torch.dtype = torch.bfloat16, blocksize: int = 64) -> Optional[dict]:
    """The gemv setting used for this shape on ``device`` (None before its first timed call). ``"cuda"`` means the
    current card, as for tensors: choices are kept per card index."""
    if GEMV_CONFIG is not None:
        return dict(GEMV_CONFIG)
    device = torch.device(device)
    if device.index is None and device.type in DEVICE_TYPES:
        device = torch.device(device.type, getattr(torch, device.type).current_device())
    choice = _gemv_choice.get(_gemv_key(device, out_features, in_features, nested, dtype, blocksize))
    return None if choice is None else dict(zip(("rows", "blocks_per_step", "num_warps", "num_stages", "split"), choice))


_gemv_shapes: dict[tuple, tuple] = {}
_gemv_op_specs: dict[tuple, tuple] = {}  # the op's per-call lookup: (device, out, in, blocksize, nested, dtype) -> shape


def _gemv_shape(out_features: int, in_features: int, blocksize: int, nested: bool, dtype: torch.dtype, shuffle: bool,
                setting: tuple[int, int, int, int, int]) -> tuple:
    """(fitted setting, grid, grid of the split-K sum, kernel keywords, x pairs) of a weight shape: worked out once,
    since the op's kernel (``gemv_4bit``) needs it on every call."""
    key = (out_features, in_features, blocksize, nested, dtype, shuffle, setting)
    spec = _gemv_shapes.get(key)
    if spec is None:
        pairs = {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)
        blocks_per_row = in_features // blocksize
        rows, step, warps, stages, split = fitted = _gemv_setting(setting, blocks_per_row)
        meta = dict(NESTED=nested, X_PAIRS=pairs, BLOCKSIZE=blocksize, BLOCKS_PER_ROW=blocks_per_row, BLOCKS_PER_STEP=step,
                    ROWS=rows, SHUFFLE=shuffle, EVEN=out_features % rows == 0, SPLIT=split, num_warps=warps, num_stages=stages)
        spec = _gemv_shapes[key] = (fitted, (-(-out_features // rows), split), (-(-out_features // 1024),), meta, pairs)
    return spec


class GemvLaunch:
    """One weight's gemv, prepared once: setting, grid, fixed arguments and specialisation, so that a call
    builds no tuples and looks nothing up but the input. ``__call__(x)`` returns ``W @ x``.

    After its first launch the plan calls the compiled kernel's launcher directly, skipping Triton's per-call
    argument binding and cache lookup (its checks were made once, for these very arguments). That is checked
    once against Triton's own launch, bit for bit; any difference or error falls back to Triton's launch."""

    __slots__ = ("kernels", "out_features", "in_features", "dtype", "pairs", "setting", "grid", "head",
                 "tail", "meta", "split_grid", "compiled", "sum_compiled", "fast", "device", "device_index", "__weakref__")

    def __init__(self, kernels, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out_features: int,
                 in_features: int, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], offset: Optional[Tensor],
                 nested_blocksize: int, dtype: torch.dtype, setting: tuple[int, int, int, int, int]) -> None:
        nested = nested_absmax is not None
        self.kernels, self.out_features, self.in_features, self.dtype = kernels, out_features, in_features, dtype
        self.device = packed.device
        self.device_index = packed.get_device()
        self.setting, self.grid, self.split_grid, self.meta, self.pairs = _gemv_shape(
            out_features, in_features, blocksize, nested, dtype, shuffles(self.device), setting)
        self.head = (packed, absmax, code, nested_absmax if nested else absmax, nested_code if nested else code,
                     offset if nested else absmax)  # the plan holds the weight's tensors: their addresses stay valid
        self.tail = (out_features, nested_blocksize)
        self.compiled = self.sum_compiled = None
        self.fast = None  # the direct launcher once checked; False once it failed

    def _x(self, x: Tensor) -> Tensor:
        """``x`` as the kernel reads it (bf16/fp16 as 32-bit words of two values); a wrong input is an error here,
        before any launch, since a direct launch checks nothing."""
        if x.dtype != self.dtype or x.numel() != self.in_features or x.get_device() != self.device_index:
            self._wrong(x)
        x = x.contiguous()
        if self.pairs:
            x = (x if x.storage_offset() % 2 == 0 else x.clone()).view(torch.int32)
        return x

    def _wrong(self, x: Tensor):
        raise ValueError(
            f"gemv_4bit: x must hold {self.in_features} values (the weight's in_features) of {self.dtype} on "
            f"{self.device}, the dtype and device this launch was prepared for; got shape {list(x.shape)}, {x.dtype}, "
            f"on {x.device}. Reshape x to [{self.in_features}] and cast or move it, or prepare another launch."
        )

    def _outputs(self) -> tuple[Tensor, Tensor]:
        out = torch.empty(self.out_features, dtype=self.dtype, device=self.device)
        if self.setting[4] == 1:
            return out, out
        return out, torch.empty(self.setting[4] * self.out_features, dtype=torch.float32, device=self.device)

    def triton_launch(self, x: Tensor) -> Tensor:
        """Through Triton's own ``kernel[grid](...)``: binds and checks the arguments on every call."""
        out, partial = self._outputs()
        self.compiled = self.kernels.gemv_kernel[self.grid](self._x(x), *self.head, partial, *self.tail, **self.meta)
        if partial is not out:
            self.sum_compiled = self.kernels.gemv_split_sum_kernel[self.split_grid](
                partial, out, self.out_features, SPLIT=self.setting[4], BLOCK=1024, num_warps=4)
        return out

    def __call__(self, x: Tensor) -> Tensor:
        fast = self.fast
        if fast and FAST_LAUNCH:
            return fast(x)
        out = self.triton_launch(x)
        if fast is None and FAST_LAUNCH and self.compiled is not None and not _capturing(self.device):
            self.fast = _checked_fast_launch(self, x, out)
        return out


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _direct_launcher(compiled, grid: tuple[int, ...], device_index: int):
    """``launch(*args)`` of one compiled Triton kernel for a fixed grid, as ``JITFunction.run`` ends (``args``: all
    the kernel's parameters in order, constexprs included). None where this Triton's objects lack that form."""
    try:
        from triton.runtime.driver import driver

        try:
            from triton import knobs

            def hooks():
                return knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        except ImportError:  # before Triton 3.4 the hooks lived on CompiledKernel
            from triton.compiler.compiler import CompiledKernel

            def hooks():
                return CompiledKernel.launch_enter_hook, CompiledKernel.launch_exit_hook

        run, function, packed_metadata, metadata_of = compiled.run, compiled.function, compiled.packed_metadata, compiled.launch_metadata
        get_stream = driver.active.get_current_stream
    except Exception:  # noqa: BLE001 - an unknown layout of Triton's internals: keep Triton's own launch
        return None
    g0, g1, g2 = (*grid, 1, 1)[:3]

    def launch(*args):
        stream = get_stream(device_index)
        enter, leave = hooks()
        if _no_hook(enter) and _no_hook(leave):  # nothing to call: no launch metadata to build for it
            return run(g0, g1, g2, stream, function, packed_metadata, None, None, None, *args)
        return run(g0, g1, g2, stream, function, packed_metadata, metadata_of(grid, stream, *args), enter, leave, *args)

    return launch


def _no_hook(hook) -> bool:
    """Whether a Triton launch hook calls nothing: None, or (Triton 3.6+) an empty ``HookChain``."""
    return hook is None or getattr(hook, "calls", None) == []


GEMV_PARAMETERS = ("x_ptr", "packed_ptr", "absmax_ptr", "code_ptr", "nested_absmax_ptr", "nested_code_ptr", "offset_ptr",
                   "out_ptr", "N", "nested_blocksize", "NESTED", "X_PAIRS", "BLOCKSIZE", "BLOCKS_PER_ROW", "BLOCKS_PER_STEP",
                   "ROWS", "SHUFFLE", "EVEN", "SPLIT")


def _checked_fast_launch(plan: GemvLaunch, x: Tensor, expected: Tensor):
    """The plan's direct launch, if it gives Triton's launch's result bit for bit; False otherwise (kept)."""
    return _checked_launch(plan.kernels.gemv_kernel, GEMV_PARAMETERS, lambda: _direct_gemv(plan), lambda fast: fast(x), expected)


def _direct_gemv(plan: GemvLaunch) -> Optional[Callable[[Tensor], Tensor]]:
    """``fast(x)``: the plan's gemv (and split-sum) through the compiled kernels' launchers; None where this Triton's
    objects lack the form ``_direct_launcher`` knows."""
    meta, split, device_index = plan.meta, plan.setting[4], plan.device_index
    constexprs = tuple(meta[k] for k in GEMV_PARAMETERS[10:])
    gemv = _direct_launcher(plan.compiled, plan.grid, device_index)
    total = _direct_launcher(plan.sum_compiled, plan.split_grid, device_index) if split > 1 else None
    if gemv is None or (split > 1 and total is None):
        return None
    # Addresses as ints (the plan holds the tensors): Triton's launcher would otherwise call data_ptr() and ask
    # the driver about each tensor argument on every call.
    head = tuple(t.data_ptr() for t in plan.head)
    n, nested_blocksize, dtype, device, in_features = plan.out_features, plan.tail[1], plan.dtype, plan.device, plan.in_features

    def fast(x: Tensor) -> Tensor:
        # The launcher reads only addresses, so x needs no int32 view here; what Triton's launch would check
        # or specialise on is checked instead (an unaligned or strided x takes Triton's launch).
        if x.dtype != dtype or x.numel() != in_features or x.get_device() != device_index:
            plan._wrong(x)
        address = x.data_ptr()
        if address % 16 or not x.is_contiguous():
            return plan.triton_launch(x)
        out = torch.empty(n, dtype=dtype, device=device)
        if split == 1:
            gemv(address, *head, out.data_ptr(), n, nested_blocksize, *constexprs)
        else:
            partial = torch.empty(split * n, dtype=torch.float32, device=device)
            gemv(address, *head, partial.data_ptr(), n, nested_blocksize, *constexprs)
            total(partial.data_ptr(), out.data_ptr(), n, split, 1024)
        return out

    return fast


def gemv_plan(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    out_features: int,
    in_features: int,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: Optional[Tensor],
    nested_blocksize: int,
    dtype: torch.dtype,
    setting: Optional[tuple[int, int, int, int, int]] = None,
) -> Optional[GemvLaunch]:
    """A prepared gemv for this weight and input dtype (the setting timed for its shape unless given); None where
    the Triton kernel does not serve it (no Triton, or rows not a whole number of quantization blocks)."""
    kernels = _kernels()
    if kernels is None or in_features % blocksize:
        return None
    weight = (packed, absmax, code, blocksize, out_features, in_features, nested_absmax, nested_code, offset, nested_blocksize, dtype)
    if setting is None:
        setting = _choose_gemv(kernels, weight)
    return GemvLaunch(kernels, *weight, setting)


def _choose_gemv(kernels, weight: tuple) -> tuple[int, int, int, int, int]:
    """The fastest of GEMV_CANDIDATES for this weight's shape, timed once per card (``_time_gemv_settings``); the
    first one while a CUDA graph is captured or off CUDA (the interpreter). ``weight``: GemvLaunch's arguments
    after ``kernels``."""
    if GEMV_CONFIG is not None:
        c = GEMV_CONFIG
        return c["rows"], c["blocks_per_step"], c["num_warps"], c.get("num_stages", 3), c.get("split", 1)
    packed, blocksize, out_features, in_features, nested_absmax, dtype = weight[0], weight[3], weight[4], weight[5], weight[6], weight[10]
    device = packed.device
    key = _gemv_key(device, out_features, in_features, nested_absmax is not None, dtype, blocksize)
    choice = _gemv_choice.get(key)
    if choice is None:
        if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return GEMV_CANDIDATES[0]
        settings = list(dict.fromkeys(_gemv_setting(c, in_features // blocksize) for c in GEMV_CANDIDATES))
        times, failed = _time_gemv_settings(kernels, weight, settings)
        if not times:
            raise RuntimeError(f"gemv_4bit: no launch setting ran on {device} for {out_features}x{in_features}") from failed
        choice = _gemv_choice[key] = min(times, key=times.get)
    return choice


GEMV_TIMING_BYTES = 128 << 20  # weight copies the timing cycles through: more than any card's L2, as decoding sees
GEMV_TIMING_ROUNDS = 5


def gemv_timing_copies(weight_bytes: int, budget: int = GEMV_TIMING_BYTES) -> int:
    """How many copies of a weight the first-use timing reads in turn: enough that L2 holds none when it is read
    again (each layer's weight is read once a token), 2 to 64."""
    return min(64, max(2, -(-budget // max(weight_bytes, 1))))


def _time_gemv_settings(kernels, weight: tuple, settings: list) -> tuple[dict, Optional[BaseException]]:
    """GPU microseconds per call of each setting, as a decode step sees them: each timed batch launches over copies of
    the weight's codes and scales (L2 cold), queued behind a GPU sleep so that the host's launch cost stays out of the
    time, settings interleaved over GEMV_TIMING_ROUNDS rounds, median per setting. A single ``do_bench`` launch per
    rep picked settings 1.4x slower than the best at small shapes (benchmarks/results_h200_gemv_rows.md)."""
    packed, absmax, nested_absmax = weight[0], weight[1], weight[6]
    device, dtype, in_features = packed.device, weight[10], weight[5]
    nbytes = packed.nbytes + absmax.nbytes + (0 if nested_absmax is None else nested_absmax.nbytes)
    x = torch.randn(in_features, device=device).to(dtype)
    try:
        copies = [weight] + [(packed.clone(), absmax.clone(), *weight[2:6], None if nested_absmax is None else nested_absmax.clone(),
                              *weight[7:]) for _ in range(gemv_timing_copies(nbytes) - 1)]
    except torch.cuda.OutOfMemoryError:
        copies = [weight]  # no room for copies: L2-warm times, a weaker guide for weights that fit in L2
    plans, failed = {}, None
    for setting in settings:
        try:
            plans[setting] = [GemvLaunch(kernels, *c, setting) for c in copies]
            for plan in plans[setting][:2]:  # compiles: the weight's own alignment, then the copies' (one for all)
                plan.triton_launch(x)
        except Exception as err:  # noqa: BLE001 - a setting this card cannot run (e.g. out of resources) is not chosen
            plans.pop(setting, None)
            failed = err
    launches = max(8, len(copies))
    samples: dict = {setting: [] for setting in plans}
    host_s = 1e-3  # the host's time to queue one batch, measured on each: the sleep in front lasts about 4x that
    stream = torch.cuda.current_stream(device)
    sleep = getattr(torch.cuda, "_sleep", lambda cycles: None)  # private; without it the times include host gaps
    for _ in range(GEMV_TIMING_ROUNDS):
        for setting, ps in plans.items():
            for _attempt in range(4):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                sleep(int(min(1 << 32, max(1 << 20, 8e9 * host_s))))  # cycles: 4x host_s at 2 GHz
                began = time.perf_counter()
                start.record(stream)
                for i in range(launches):
                    ps[i % len(ps)].triton_launch(x)
                end.record(stream)
                host_s = time.perf_counter() - began
                starved = start.query()  # the GPU reached the launches before the host had queued them all
                end.synchronize()
                if not starved:
                    break
            samples[setting].append(start.elapsed_time(end) * 1e3 / launches)
    return {s: sorted(v)[len(v) // 2] for s, v in samples.items()}, failed


def gemv_4bit(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    out_features: int,
    in_features: int,
    nested_absmax: Optional[Tensor] = None,
    nested_code: Optional[Tensor] = None,
    offset: Optional[Tensor] = None,
    nested_blocksize: int = 256,
) -> Tensor:
    """One token, ``W @ x``, read straight from NF4: the weight is read once (a quarter of the bf16 bytes)
    and no dequantized copy is written. Falls back to dequantize + matmul where the layout does not fit.
    The op's kernel: it works its launch out per call (from per-shape caches); ``NF4Linear`` keeps a
    ``gemv_plan`` per layer instead."""
    kernels = _kernels()
    if kernels is None or in_features % blocksize:
        w = dequantize_4bit(packed, absmax, code, blocksize, out_features * in_features, x.dtype, nested_absmax, nested_code, offset, nested_blocksize)
        return w.view(out_features, in_features) @ x
    dtype, device, nested = x.dtype, packed.device, nested_absmax is not None
    key = (device, out_features, in_features, blocksize, nested, dtype)
    spec = _gemv_op_specs.get(key) if GEMV_CONFIG is None else None
    if spec is None:
        weight = (packed, absmax, code, blocksize, out_features, in_features, nested_absmax, nested_code, offset, nested_blocksize, dtype)
        spec = _gemv_shape(out_features, in_features, blocksize, nested, dtype, shuffles(device), _choose_gemv(kernels, weight))
        if GEMV_CONFIG is None and _gemv_key(device, out_features, in_features, nested, dtype, blocksize) in _gemv_choice:
            _gemv_op_specs[key] = spec  # kept once the setting is the timed one (not a capture's stand-in)
    _, grid, split_grid, meta, pairs = spec
    out = torch.empty(out_features, dtype=dtype, device=device)
    split = meta["SPLIT"]
    partial = out if split == 1 else torch.empty(split * out_features, dtype=torch.float32, device=device)
    x = x.contiguous()
    if pairs:
        x = (x if x.storage_offset() % 2 == 0 else x.clone()).view(torch.int32)
    kernels.gemv_kernel[grid](
        x, packed, absmax, code, nested_absmax if nested else absmax, nested_code if nested else code,
        offset if nested else absmax, partial, out_features, nested_blocksize, **meta,
    )
    if split > 1:
        kernels.gemv_split_sum_kernel[split_grid](partial, out, out_features, SPLIT=split, BLOCK=1024, num_warps=4)
    return out
