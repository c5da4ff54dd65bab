"""The one seam between the NF4 format and device code: ``torch.library`` custom ops.

Each op has a plain-PyTorch body that works on any device, a fake (meta) implementation so that
``torch.compile`` can trace it, and faster kernels registered per device type: native C on CPU,
Triton on CUDA and Intel XPU (see ``triton_kernels``). Callers never branch on the device.

Callers use the module-level functions (``ops.dequantize_4bit(...)``). In eager mode, for plain
tensors, these call the registered device kernel directly: a Python custom op's dispatcher round trip
costs 10-40 us per call, longer than a small dequantize runs on a GPU, and a QLoRA step makes
hundreds of calls. Under ``torch.compile``, and for tensor subclasses (fake, meta, functional), they
go through ``torch.ops.lightning_nf4.*`` as usual.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_nf4.kernels import cpu, reference

# Per op, the kernels registered for each device type; the eager fast path reads them.
_KERNELS: dict[object, dict[str, Callable]] = {}


def _register(op: torch.library.CustomOpDef, device_type: str, kernel: Callable) -> None:
    op.register_kernel(device_type)(kernel)
    _KERNELS.setdefault(op, {})[device_type] = kernel


_PLAIN = (Tensor, torch.nn.Parameter)  # Parameter adds no dispatch behaviour; subclasses such as FakeTensor do


def in_functorch() -> bool:
    """Under torch.func (vmap, grad, jacrev) tensors made inside are wrappers without storage: no pointer to read."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _direct(op: torch.library.CustomOpDef, tensor: Tensor) -> Callable:
    """The device kernel to call without the dispatcher, or the op itself where tracing needs it."""
    if type(tensor) in _PLAIN and not torch.compiler.is_compiling() and not in_functorch():
        kernel = _KERNELS.get(op, {}).get(tensor.device.type)
        if kernel is not None:
            return kernel
    return op


# -- quantize_4bit ---------------------------------------------------------------------------------
@torch.library.custom_op("lightning_nf4::quantize_4bit", mutates_args=())
def _quantize_4bit(weight: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    return reference.quantize_4bit(weight, code, blocksize)


@_quantize_4bit.register_fake
def _(weight: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    n = weight.numel()
    return weight.new_empty((n + 1) // 2, dtype=torch.uint8), weight.new_empty(-(-n // blocksize), dtype=torch.float32)


def _quantize_4bit_cpu(weight: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    if cpu.supports(weight.dtype):
        return cpu.quantize_4bit(weight, code, blocksize)
    return reference.quantize_4bit(weight, code, blocksize)


def quantize_4bit(weight: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Packed uint8 codes ``[(numel + 1) // 2]`` and fp32 absmax ``[ceil(numel / blocksize)]``."""
    return _direct(_quantize_4bit, weight)(weight, code, blocksize)


# -- dequantize_4bit -------------------------------------------------------------------------------
@torch.library.custom_op("lightning_nf4::dequantize_4bit", mutates_args=())
def _dequantize_4bit(
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
    return _dequantize_4bit_plain(packed, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code, offset, nested_blocksize)


@_dequantize_4bit.register_fake
def _(packed, absmax, code, blocksize, numel, dtype, nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256):
    return packed.new_empty(numel, dtype=dtype)


def _dequantize_4bit_cpu(packed, absmax, code, blocksize, numel, dtype, nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256):
    if cpu.supports(dtype):
        return cpu.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code, offset, nested_blocksize)
    return _dequantize_4bit_plain(packed, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code, offset, nested_blocksize)


def _dequantize_4bit_plain(packed, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code, offset, nested_blocksize):
    """The plain-PyTorch dequantize (any device): the op's own body, the CPU fallback, and what compiled code traces."""
    absmax = _decode_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    return reference.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype)


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
    """Flat ``[numel]`` tensor of ``dtype``. With ``nested_*`` given, ``absmax`` holds uint8 codes
    of the double-quantized statistics and is decoded first (fused into one pass on GPU)."""
    # The plain-PyTorch body, for the compiler to fuse, where the weight is whole blocks (every real model's): over a
    # partial last block inductor (torch 2.13, CPU) reads garbage scales for it (1e27 off), so the op runs there.
    if COMPILED_DEQUANTIZE == "fused" and numel % blocksize == 0 and _traced(packed):
        return _dequantize_4bit_plain(packed, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code, offset, nested_blocksize)
    return _direct(_dequantize_4bit, packed)(packed, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code, offset, nested_blocksize)


# How compiled code dequantizes: "fused" traces the plain-PyTorch form, which the compiler turns into a kernel of
# its own launched from the compiled graph; "op" keeps the custom op (its tuned Triton kernel, but a Python
# dispatch and launch of about 0.1 ms per weight, which made a compiled 8B step host-bound: benchmarks/NOTES.md).
COMPILED_DEQUANTIZE = "fused"


def _traced(tensor: Tensor) -> bool:
    """Whether this call is being traced by torch.compile (dynamo, or AOTAutograd's fake/functional tensors)."""
    return torch.compiler.is_compiling() or (type(tensor) not in _PLAIN and not tensor.is_meta)


def _decode_absmax(
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: Optional[Tensor],
    nested_blocksize: int,
) -> Tensor:
    if nested_absmax is None:
        return absmax
    if nested_code is None or offset is None:
        raise ValueError("Double-quantized absmax needs nested_code and offset as well as nested_absmax.")
    return reference.dequantize_blockwise_8bit(absmax, nested_absmax, nested_code, nested_blocksize, offset)


# -- dequantize_4bit_group (several weights in one launch) -------------------------------------------
@torch.library.custom_op("lightning_nf4::dequantize_4bit_group", mutates_args=())
def _dequantize_4bit_group(
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
    return _group_by_parts(packed, absmax, code, blocksize, numels, dtype, nested_absmax, nested_code, offsets, nested_blocksize)


def _group_by_parts(packed, absmax, code, blocksize, numels, dtype, nested_absmax, nested_code, offsets, nested_blocksize):
    parts = [
        reference.dequantize_4bit(p, _decode_absmax(a, *nested, nested_blocksize), code, blocksize, n, dtype)
        for p, a, n, nested in reference.group_members(packed, absmax, numels, nested_absmax, nested_code, offsets)
    ]
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=code.device)


@_dequantize_4bit_group.register_fake
def _(packed, absmax, code, blocksize, numels, dtype, nested_absmax, nested_code, offsets, nested_blocksize=256):
    return code.new_empty(sum(numels), dtype=dtype)


def _dequantize_4bit_group_cpu(packed, absmax, code, blocksize, numels, dtype, nested_absmax, nested_code, offsets, nested_blocksize=256):
    if not cpu.supports(dtype):
        return _group_by_parts(packed, absmax, code, blocksize, numels, dtype, nested_absmax, nested_code, offsets, nested_blocksize)
    out = torch.empty(sum(numels), dtype=dtype, device="cpu")
    start = 0
    for p, a, n, nested in reference.group_members(packed, absmax, numels, nested_absmax, nested_code, offsets):
        cpu.dequantize_4bit(p, a, code, blocksize, n, dtype, *nested, nested_blocksize, out=out[start:start + n])
        start += n
    return out


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
    """Several NF4 weights of one blocksize and kind dequantized into one flat ``dtype`` tensor, in order
    (one kernel launch on GPU). With double quantization ``nested_absmax`` and ``offsets`` hold one
    entry per weight; without, they are empty and ``nested_code`` is None."""
    return _direct(_dequantize_4bit_group, packed[0])(packed, absmax, code, blocksize, numels, dtype, nested_absmax, nested_code, offsets, nested_blocksize)


# -- quantize_blockwise_8bit (double quantization of the absmax) ------------------------------------
@torch.library.custom_op("lightning_nf4::quantize_blockwise_8bit", mutates_args=())
def _quantize_blockwise_8bit(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    return reference.quantize_blockwise_8bit(x, code, blocksize)


@_quantize_blockwise_8bit.register_fake
def _(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    n = x.numel()
    return x.new_empty(n, dtype=torch.uint8), x.new_empty(-(-n // blocksize), dtype=torch.float32)


def quantize_blockwise_8bit(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """8-bit codes (same shape as ``x``, flattened) and fp32 absmax per ``blocksize`` values."""
    return _direct(_quantize_blockwise_8bit, x)(x, code, blocksize)


# -- gemv_4bit (one token, straight from NF4) ---------------------------------------------------------
@torch.library.custom_op("lightning_nf4::gemv_4bit", mutates_args=())
def _gemv_4bit(
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
    w = _dequantize_4bit(packed, absmax, code, blocksize, out_features * in_features, x.dtype, nested_absmax, nested_code, offset, nested_blocksize)
    return w.view(out_features, in_features) @ x


@_gemv_4bit.register_fake
def _(x, packed, absmax, code, blocksize, out_features, in_features, nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256):
    return x.new_empty(out_features)


def _gemv_4bit_cpu(x, packed, absmax, code, blocksize, out_features, in_features, nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256):
    if cpu.has_gemv(in_features, blocksize):
        return cpu.gemv_4bit(x, packed, absmax, code, blocksize, out_features, in_features, nested_absmax, nested_code, offset, nested_blocksize)
    w = _dequantize_4bit_cpu(packed, absmax, code, blocksize, out_features * in_features, x.dtype, nested_absmax, nested_code, offset, nested_blocksize)
    return w.view(out_features, in_features) @ x


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
    """``W @ x`` for a single token ``x[in_features]`` (generation); GPUs read the packed weight directly."""
    return _direct(_gemv_4bit, x)(x, packed, absmax, code, blocksize, out_features, in_features, nested_absmax, nested_code, offset, nested_blocksize)


def gemv_plan(
    dtype: torch.dtype,
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
) -> Optional[Callable[[Tensor], Tensor]]:
    """A prepared eager ``gemv_4bit`` for one weight and input dtype, ``plan(x) -> W @ x``, for a layer to keep:
    the launch setting, grid and fixed arguments are worked out once instead of per token. None where the
    device's registered kernel is not the Triton one (the CPU's C kernel has no per-call setup to save), or
    where the Triton kernel does not serve this layout. Eager only: compiled code calls ``gemv_4bit``."""
    from lightning_nf4.kernels import triton_kernels

    registered = _KERNELS.get(_gemv_4bit, {}).get(packed.device.type)
    if getattr(registered, "__wrapped__", registered) is not triton_kernels.gemv_4bit:
        return None
    check_codes(packed, absmax, blocksize, out_features * in_features, nested_absmax, nested_blocksize)  # once per plan
    return triton_kernels.gemv_plan(packed, absmax, code, blocksize, out_features, in_features, nested_absmax, nested_code,
                                    offset, nested_blocksize, dtype)


# Per layer (weakly: a deep-copied or deleted layer takes nothing along), the prepared gemv of its current NF4
# weight: (weak reference to the weight's layout object, input dtype, plan or None).
_PREPARED: "weakref.WeakKeyDictionary[object, tuple]" = weakref.WeakKeyDictionary()


def prepared_gemv(owner: object, quant: Any, dtype: torch.dtype, out_features: int, in_features: int) -> Optional[Callable[[Tensor], Tensor]]:
    """``owner``'s prepared eager gemv for the NF4 weight ``quant`` (an ``NF4Weight``) and inputs of ``dtype``, made on
    first use and kept while ``quant`` lives and stays ``owner``'s (a moved or reloaded weight is a new ``quant``);
    None where ``gemv_plan`` has none (then call ``gemv_4bit``)."""
    entry = _PREPARED.get(owner)
    if entry is not None and entry[0]() is quant and entry[1] == dtype:
        return entry[2]
    held = weakref.ref(owner)

    def forget(dead: weakref.ref) -> None:  # the plan holds the weight's tensors: it goes when the weight does
        who = held()
        if who is not None and _PREPARED.get(who, (None,))[0] is dead:
            del _PREPARED[who]

    plan = gemv_plan(dtype, quant.packed, quant.absmax, quant.code, quant.blocksize, out_features, in_features, *quant.nested_args())
    _PREPARED[owner] = (weakref.ref(quant, forget), dtype, plan)
    return plan


def launches_kernels(device_type: str) -> bool:
    """Whether dequantizing on ``device_type`` is a kernel launch with host cost of its own (GPUs), so
    that batching several weights into one call pays; on CPU the work is the same either way."""
    return device_type in _KERNELS.get(_dequantize_4bit_group, {}) and device_type != "cpu"


# -- argument checks ---------------------------------------------------------------------------------
def check_codes(packed: Tensor, absmax: Tensor, blocksize: int, numel: int, nested_absmax: Optional[Tensor] = None,
                nested_blocksize: int = 256) -> None:
    """What the device kernels read by pointer must be there: uint8 codes for ``numel`` values, a scale per block
    (fp32, or uint8 codes with a nested scale per ``nested_blocksize`` of them). A short tensor would be read past
    its end, and a float one read as codes."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"NF4 codes must be uint8 (two 4-bit codes per byte), got {packed.dtype}: a float weight is not "
                        "packed codes; quantize it first (quantize_nf4).")
    blocks = -(-numel // blocksize)
    scales = torch.uint8 if nested_absmax is not None else torch.float32
    if packed.numel() * 2 < numel or absmax.numel() < blocks or absmax.dtype != scales or (
            nested_absmax is not None and nested_absmax.numel() < -(-blocks // nested_blocksize)):
        raise ValueError(
            f"NF4 layout does not hold {numel} values: {packed.numel()} bytes of codes (need {-(-numel // 2)}), {absmax.numel()} "
            f"{absmax.dtype} scales (need {blocks} {scales})"
            + (f", {nested_absmax.numel()} nested scales (need {-(-blocks // nested_blocksize)})" if nested_absmax is not None else "")
            + ". Codes and scales come from different weights; pass the layout quantize_nf4 made."
        )


def _checked_dequantize(kernel: Callable) -> Callable:
    @functools.wraps(kernel)  # ``__wrapped__``: what is registered underneath (gemv_plan asks)
    def run(packed, absmax, code, blocksize, numel, dtype, nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256):
        check_codes(packed, absmax, blocksize, numel, nested_absmax, nested_blocksize)
        return kernel(packed, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code, offset, nested_blocksize)
    return run


def _checked_group(kernel: Callable) -> Callable:
    @functools.wraps(kernel)  # ``__wrapped__``: what is registered underneath (gemv_plan asks)
    def run(packed, absmax, code, blocksize, numels, dtype, nested_absmax, nested_code, offsets, nested_blocksize=256):
        for p, a, n, (nested, _, _) in reference.group_members(packed, absmax, numels, nested_absmax, nested_code, offsets):
            check_codes(p, a, blocksize, n, nested, nested_blocksize)
        return kernel(packed, absmax, code, blocksize, numels, dtype, nested_absmax, nested_code, offsets, nested_blocksize)
    return run


def _checked_gemv(kernel: Callable) -> Callable:
    @functools.wraps(kernel)  # ``__wrapped__``: what is registered underneath (gemv_plan asks)
    def run(x, packed, absmax, code, blocksize, out_features, in_features, nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256):
        check_codes(packed, absmax, blocksize, out_features * in_features, nested_absmax, nested_blocksize)
        if x.numel() != in_features:
            raise ValueError(f"gemv_4bit: the input has {x.numel()} values, the weight takes {in_features} (in_features).")
        return kernel(x, packed, absmax, code, blocksize, out_features, in_features, nested_absmax, nested_code, offset, nested_blocksize)
    return run


# -- registration ------------------------------------------------------------------------------------
def _register_all() -> None:
    """CPU kernels now; Triton for the GPU device types (importing Triton waits for first use). The kernels that
    read codes by pointer check their arguments first (``check_codes``)."""
    from lightning_nf4.kernels import triton_kernels

    _register(_quantize_4bit, "cpu", _quantize_4bit_cpu)
    _register(_dequantize_4bit, "cpu", _checked_dequantize(_dequantize_4bit_cpu))
    _register(_dequantize_4bit_group, "cpu", _checked_group(_dequantize_4bit_group_cpu))
    _register(_gemv_4bit, "cpu", _checked_gemv(_gemv_4bit_cpu))
    for device_type in triton_kernels.DEVICE_TYPES:
        _register(_quantize_4bit, device_type, triton_kernels.quantize_4bit)
        _register(_dequantize_4bit, device_type, _checked_dequantize(triton_kernels.dequantize_4bit))
        _register(_dequantize_4bit_group, device_type, _checked_group(triton_kernels.dequantize_4bit_group))
        _register(_quantize_blockwise_8bit, device_type, triton_kernels.quantize_blockwise_8bit)
        _register(_gemv_4bit, device_type, _checked_gemv(triton_kernels.gemv_4bit))


_register_all()
