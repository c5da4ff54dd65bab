"""``NF4Tensor``: an ``NF4Weight`` as a ``torch.Tensor`` subclass, so FSDP2 can shard and all-gather it.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards a parameter by calling tensor ops on it (``chunk``,
``new_zeros``, ``narrow``, ``copy_``, ``view``) and all-gathers it through the parameter's own
``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` hooks when it has them. This class answers those ops
on the NF4 layout itself: a row shard of the ``[out, in]`` weight is a slice of the packed codes, of the
absmax codes and of the nested absmax, while the code tables and the nested offset stay whole on every
rank. The packed bytes never become a float tensor, whatever mixed-precision policy FSDP is given: the
outer dtype is only the dtype the weight dequantizes to.

A stacked ``[experts, out, in]`` weight (transformers' MoE experts) also answers what its experts module does with
it: one expert (``weight[i]``), transposes, and the matmuls (``mm``, ``bmm``, ``baddbmm``, ``_grouped_mm``), which
dequantize the operand for that call only, so autograd saves the NF4 tensor, not a float copy.

Rows shard evenly or not at all: a shard must hold whole quantization blocks (``blocksize`` elements)
and, with double quantization, whole groups of scales (``blocksize * 256`` elements). A layout that
cannot split is refused with ``NF4ShardingError`` naming the weight and the fix.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import replace
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_nf4.format.quantized import NF4FormatError, NF4Weight, NestedStats

aten = torch.ops.aten


class NF4ShardingError(NF4FormatError):
    """An NF4 weight that cannot be split into the row shards asked for; the message says how to fix it."""


def shard_granularity(quant: NF4Weight) -> int:
    """Elements a row shard must be a multiple of: whole blocks, and whole groups of nested scales."""
    unit = quant.blocksize * (quant.nested.blocksize if quant.nested is not None else 1)
    return math.lcm(unit, 2)  # two codes per byte


def check_shardable(quant: NF4Weight, world_size: int, name: str = "weight") -> None:
    """Raise ``NF4ShardingError`` unless ``quant`` splits into ``world_size`` equal row shards on whole
    blocks and scale groups. One rank holds the whole weight: any layout."""
    if world_size <= 1:
        return
    rows, cols = quant.shape[0], math.prod(quant.shape[1:])
    if rows % world_size:
        raise NF4ShardingError(
            f"{name}: {rows} rows do not split evenly across {world_size} ranks. NF4 weights shard by rows in equal "
            "parts; use a world size that divides the layer's out_features, or keep this layer in float "
            "(NF4Precision(skip_modules=[...]))."
        )
    per_rank = rows // world_size * cols
    unit = shard_granularity(quant)
    if per_rank % unit:
        dq = f" x {quant.nested.blocksize} nested scales" if quant.nested is not None else ""
        hint = (" Quantizing without double quantization lowers the unit to one block: NF4Precision(double_quant=False), "
                "or BitsAndBytesConfig(bnb_4bit_use_double_quant=False) for a model loaded in NF4 (the plugin keeps its "
                "weights as loaded); or") if quant.nested is not None else ""
        raise NF4ShardingError(
            f"{name}: a shard of {per_rank} elements ({rows // world_size} of {rows} rows) would split a scale group: "
            f"the scales of {quant.blocksize}-element blocks{dq} need shards of a multiple of {unit} elements.{hint} "
            f"{'use' if hint else 'Use'} fewer ranks, or keep this layer in float (NF4Precision(skip_modules=[...]))."
        )


def _row_slices(quant: NF4Weight, row_ranges: list[tuple[int, int]]) -> list[NF4Weight]:
    """Row ranges of ``quant`` as ``NF4Weight`` views (no copy); every range must split on whole scale groups."""
    cols = math.prod(quant.shape[1:])
    unit = shard_granularity(quant)
    out = []
    for start, end in row_ranges:
        first, count = start * cols, (end - start) * cols
        if first % unit or (count % unit and end != quant.shape[0]):
            raise NF4ShardingError(
                f"rows {start}:{end} of an NF4 weight of shape {tuple(quant.shape)} do not fall on whole scale groups "
                f"({unit} elements); shard it with check_shardable first."
            )
        block0, blocks = first // quant.blocksize, -(-count // quant.blocksize)
        nested = quant.nested
        if nested is not None:
            g0, groups = block0 // nested.blocksize, -(-blocks // nested.blocksize)
            nested = replace(nested, absmax=nested.absmax[g0:g0 + groups])
        out.append(replace(
            quant, packed=quant.packed[first // 2:(first + count + 1) // 2], absmax=quant.absmax[block0:block0 + blocks],
            shape=torch.Size((end - start, *quant.shape[1:])), nested=nested,
        ))
    return out


class NF4Tensor(Tensor):
    """A frozen NF4 weight that behaves as a tensor of its logical shape and dequantized dtype.

    Holds an ``NF4Weight`` (``.quant``). Supports the ops FSDP2 uses to shard, pad, move and all-gather a
    parameter, and the indexing, transposes and matmuls of MoE experts; any other op raises, rather than silently
    working on the packed bytes.
    """

    quant: NF4Weight
    transposed: bool  # the last two dims swapped (a ``weight.t()`` on the way to a matmul); the bytes are not

    @staticmethod
    def __new__(cls, quant: NF4Weight, shape: Optional[torch.Size] = None, dtype: Optional[torch.dtype] = None, transposed: bool = False) -> "NF4Tensor":
        shape = torch.Size(shape if shape is not None else _shape(quant.shape, transposed))
        return Tensor._make_wrapper_subclass(cls, shape, dtype=dtype or quant.dtype, device=quant.device, requires_grad=False)

    def __init__(self, quant: NF4Weight, shape: Optional[torch.Size] = None, dtype: Optional[torch.dtype] = None, transposed: bool = False) -> None:
        self.quant = quant
        self.transposed = transposed

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:  # no tensor ops: printing must work on any rank, sharded or not
        flag = ", transposed" if self.transposed else ""
        return f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}{flag}, quant={self.quant!r})"

    @property
    def data(self) -> Tensor:  # as Tensor.data: a detached alias
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value: Tensor) -> None:
        """``param.data = other``: the layout (codes and scales, in ``quant``) must follow, or the weight keeps its old
        values; only another NF4 weight of the same shape fits."""
        if not isinstance(value, NF4Tensor) or value.shape != self.shape:
            raise TypeError(f"an NF4Tensor's .data takes another NF4Tensor of shape {tuple(self.shape)}, got a "
                            f"{type(value).__name__} of shape {tuple(value.shape)}; quantize float weights with quantize_nf4.")
        torch._C.TensorBase.data.__set__(self, value)
        self.quant = value.quant

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The float weight, in this tensor's shape (a view, such as FSDP's flat one, keeps its own)."""
        weight = self.quant.dequantize(dtype or self.dtype)
        return weight.transpose(-2, -1) if self.transposed else weight.view(self.shape)

    def share_memory_(self) -> "NF4Tensor":
        """Move the codes and scales to shared memory (``Module.share_memory()``; the wrapper has no storage of its own)."""
        self.quant = _map_tensors(self.quant, lambda x: x.share_memory_())
        return self

    def is_shared(self) -> bool:
        return all(x.is_shared() for x in self.quant.tensors())

    def _alias(self, quant: Optional[NF4Weight] = None, shape: Optional[torch.Size] = None, dtype: Optional[torch.dtype] = None) -> "NF4Tensor":
        quant = quant or self.quant
        return NF4Tensor(quant, shape if shape is not None else _shape(quant.shape, self.transposed), dtype or self.dtype, self.transposed)

    # -- torch.compile: the inner tensors are the packed codes and the statistics ---------------
    def __tensor_flatten__(self) -> tuple[list[str], Any]:
        names = ["packed", "absmax", "code"] + (["nested_absmax", "nested_code", "nested_offset"] if self.quant.nested is not None else [])
        return names, (self.quant.shape, self.quant.dtype, self.quant.blocksize, self.quant.nested.blocksize if self.quant.nested else None, self.shape, self.dtype, self.transposed)

    def __getattr__(self, name: str) -> Tensor:
        quant = self.__dict__.get("quant")
        if quant is not None:
            if name in ("packed", "absmax", "code"):
                return getattr(quant, name)
            if name in ("nested_absmax", "nested_code", "nested_offset") and quant.nested is not None:
                return getattr(quant.nested, name[len("nested_"):])
        raise AttributeError(name)

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, Tensor], meta: Any, outer_size: Any, outer_stride: Any) -> "NF4Tensor":
        shape, dtype, blocksize, nested_blocksize, outer_shape, outer_dtype, transposed = meta
        nested = None
        if nested_blocksize is not None:
            nested = NestedStats(inner["nested_absmax"], inner["nested_code"], inner["nested_offset"], nested_blocksize)
        quant = NF4Weight(inner["packed"], inner["absmax"], inner["code"], shape, dtype, blocksize, nested)
        return NF4Tensor(quant, outer_shape, outer_dtype, transposed)

    # -- FSDP2 all-gather hooks ----------------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...], module: Any, mp_policy: Any) -> tuple[tuple[Tensor, ...], Any]:
        """Send this rank's row shard as its raw parts (uint8 codes, scales); tables travel as metadata.
        On a mesh of one rank FSDP2 copies a single input only, so the parts go as one byte buffer."""
        q = self.quant
        parts: tuple[Tensor, ...] = (q.packed.view(-1), q.absmax) + ((q.nested.absmax,) if q.nested is not None else ())
        if mesh.size() == 1:
            # float parts first, so each stays 4-byte aligned inside the buffer
            order = sorted(range(len(parts)), key=lambda i: -parts[i].element_size())
            buffer = torch.cat([parts[i].contiguous().view(torch.uint8).view(-1) for i in order])
            return (buffer,), (q, outer_size[0], [(i, parts[i].dtype, parts[i].numel()) for i in order])
        return parts, (q, outer_size[0], None)

    def fsdp_post_all_gather(
        self, outputs: tuple[Tensor, ...], metadata: Any, param_dtype: torch.dtype, *, out: Optional[Tensor] = None
    ) -> Optional[tuple["NF4Tensor", tuple[Tensor, ...]]]:
        """The whole weight, built on the all-gather buffers themselves (no copy). When FSDP gathers again
        into the same buffers (``out``), the weight built the first time already sees the new bytes."""
        shard, rows, layout = metadata  # rows: the whole weight's (the byte count cannot tell them when it is odd)
        if layout is not None:  # one rank: the parts are views into the single buffer
            (buffer,) = outputs
            views: list[Optional[Tensor]] = [None] * len(layout)
            offset = 0
            for index, dtype, numel in layout:
                size = numel * dtype.itemsize
                views[index] = buffer[offset:offset + size].view(dtype)
                offset += size
            parts = tuple(v for v in views if v is not None)
        else:
            parts = tuple(outputs)
        packed, absmax, *rest = parts
        if out is not None:
            if not (isinstance(out, NF4Tensor) and out.quant.packed.untyped_storage() is packed.untyped_storage()):
                raise RuntimeError("FSDP re-gathered an NF4 weight into buffers its unsharded tensor does not view")
            return None
        nested = replace(shard.nested, absmax=rest[0]) if shard.nested is not None else None
        quant = replace(shard, packed=packed.view(-1, 1), absmax=absmax, nested=nested, shape=torch.Size((rows, *shard.shape[1:])))
        return NF4Tensor(quant, dtype=param_dtype), tuple(outputs)

    # -- the ops table ---------------------------------------------------------------------------
    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        handler = _OPS.get(func)
        if handler is None and getattr(func, "_schema", None) is not None and func._schema.name in _DEQUANTIZED_FOREIGN:
            handler = _OPS[func] = _dequantized_args(func)
        if handler is None:
            raise NotImplementedError(
                f"NF4Tensor does not support {func}: a frozen NF4 weight supports the ops FSDP2 uses to shard and move it "
                "(split, narrow, new_zeros, copy_, view, to, detach) and an experts module's indexing and matmuls. "
                "Dequantize it first (layer.dequantize() or weight.dequantize()) for other math on it."
            )
        return handler(*args, **kwargs)


class _BoundHook:
    """A hook bound to one tensor that states its signature: FSDP2 calls ``inspect.signature`` on the hook before
    every all-gather of every parameter, and on a plain bound method that re-derives the signature each time."""

    __slots__ = ("_fn", "_tensor", "__signature__")

    def __init__(self, fn: Callable[..., Any], tensor: Tensor, signature: inspect.Signature) -> None:
        self._fn, self._tensor, self.__signature__ = fn, tensor, signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(self._tensor, *args, **kwargs)


class _HookWithSignature:
    """Method descriptor handing out ``_BoundHook``s; the signature (without ``self``) is derived once."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        signature = inspect.signature(fn)
        self._bound_signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        self.__doc__ = fn.__doc__

    def __get__(self, tensor: Optional[Tensor], owner: Optional[type] = None) -> Any:
        return self._fn if tensor is None else _BoundHook(self._fn, tensor, self._bound_signature)


NF4Tensor.fsdp_pre_all_gather = _HookWithSignature(NF4Tensor.fsdp_pre_all_gather)  # type: ignore[method-assign]

_OPS: dict[Any, Callable[..., Any]] = {}


def _implements(*ops: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for op in ops:
            _OPS[op] = fn
        return fn
    return register


def _map_tensors(quant: NF4Weight, fn: Callable[[Tensor], Tensor]) -> NF4Weight:
    nested = quant.nested
    if nested is not None:
        nested = replace(nested, absmax=fn(nested.absmax), code=fn(nested.code), offset=fn(nested.offset))
    return replace(quant, packed=fn(quant.packed), absmax=fn(quant.absmax), code=fn(quant.code), nested=nested)


@_implements(aten.detach.default, aten.alias.default)
def _detach(t: NF4Tensor) -> NF4Tensor:
    return t._alias(shape=t.shape)


@_implements(aten.clone.default)
def _clone(t: NF4Tensor, memory_format: Any = None) -> NF4Tensor:
    return t._alias(_map_tensors(t.quant, torch.clone), shape=t.shape)


def _check_rows(t: NF4Tensor, dim: int, op: str) -> None:
    if dim not in (0, -t.dim()) or t.shape != t.quant.shape or t.transposed:
        raise NotImplementedError(f"NF4Tensor.{op} works on dim 0 of the [out_features, in_features] weight only, got dim {dim}.")


@_implements(aten.split.Tensor)
def _split(t: NF4Tensor, split_size: int, dim: int = 0) -> list[NF4Tensor]:
    _check_rows(t, dim, "split")
    rows = t.shape[0]
    ranges = [(s, min(s + split_size, rows)) for s in range(0, rows, split_size)]
    return [t._alias(q) for q in _row_slices(t.quant, ranges)]


@_implements(aten.split_with_sizes.default)
def _split_with_sizes(t: NF4Tensor, sizes: list[int], dim: int = 0) -> list[NF4Tensor]:
    _check_rows(t, dim, "split")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [t._alias(q) for q in _row_slices(t.quant, [(s, s + n) for s, n in zip(starts, sizes)])]


@_implements(aten.slice.Tensor)
def _slice(t: NF4Tensor, dim: int = 0, start: Optional[int] = None, end: Optional[int] = None, step: int = 1) -> NF4Tensor:
    _check_rows(t, dim, "narrow")
    if step != 1:
        raise NotImplementedError("NF4Tensor slices rows with step 1 only.")
    rows = t.shape[0]
    start, end = _clamp_index(0 if start is None else start, rows), _clamp_index(rows if end is None else end, rows)
    if end <= start:  # an empty range, as a plain tensor gives one
        return _new_zeros(t, [0, *t.shape[1:]])
    return t._alias(_row_slices(t.quant, [(start, end)])[0])


def _clamp_index(index: int, rows: int) -> int:
    """A slice bound as Python reads it: negative counts from the end; out of range clamps to the ends."""
    return max(0, min(index + rows if index < 0 else index, rows))


@_implements(aten.new_zeros.default)
def _new_zeros(t: NF4Tensor, size: list[int], dtype: Any = None, layout: Any = None, device: Any = None, pin_memory: Any = None) -> NF4Tensor:
    """Zeroed storage of ``size`` rows in ``t``'s layout (FSDP pads shards with it; all-zero scales)."""
    q = t.quant
    if len(size) != len(q.shape) or tuple(size[1:]) != tuple(q.shape[1:]):
        raise NotImplementedError(f"NF4Tensor.new_zeros keeps the row length {tuple(q.shape[1:])}, got size {tuple(size)}.")
    numel = math.prod(size)
    blocks = -(-numel // q.blocksize)
    device = device or q.device
    zeros = lambda n, like: torch.zeros(n, dtype=like.dtype, device=device)  # noqa: E731
    nested = q.nested
    if nested is not None:  # zero offset too: a scale decodes to code * 0 + offset, and the weight must read as zeros
        nested = replace(nested, absmax=zeros(-(-blocks // nested.blocksize), nested.absmax), code=nested.code.to(device),
                         offset=torch.zeros_like(nested.offset, device=device))
    quant = replace(
        q, packed=torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8, device=device), absmax=zeros(blocks, q.absmax),
        code=q.code.to(device), shape=torch.Size(size), nested=nested,
    )
    return NF4Tensor(quant, dtype=t.dtype)


@_implements(aten.copy_.default)
def _copy(dst: NF4Tensor, src: Any, non_blocking: bool = False) -> NF4Tensor:
    if not isinstance(src, NF4Tensor):
        raise NotImplementedError("An NF4Tensor can only be copied from another NF4Tensor; quantize a float tensor with quantize_nf4 first.")
    a, b = dst.quant, src.quant
    if a.shape != b.shape or a.blocksize != b.blocksize or a.double_quant != b.double_quant:
        raise NF4ShardingError(f"cannot copy an NF4 weight of shape {tuple(b.shape)} (blocksize {b.blocksize}) into one of shape {tuple(a.shape)} (blocksize {a.blocksize}).")
    for d, s in zip(a.tensors(), b.tensors()):
        d.copy_(s, non_blocking=non_blocking)
    return dst


@_implements(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(t: NF4Tensor, size: list[int]) -> NF4Tensor:
    numel = t.numel()
    shape = [numel // max(1, -math.prod(size)) if s == -1 else s for s in size] if -1 in size else list(size)
    if math.prod(shape) != numel:
        raise RuntimeError(f"shape {list(size)} is invalid for an NF4 weight of {numel} elements")
    if t.transposed and list(shape) != list(t.shape):
        # the bytes stay in the untransposed layout: a view of other dims would not say which element is where
        raise NotImplementedError(
            f"NF4Tensor: a transposed weight {tuple(t.shape)} cannot be viewed as {tuple(shape)}; view or reshape it "
            "before transposing, or dequantize it first (t.dequantize())."
        )
    # A flat view (FSDP keeps one of each shard) shares the weight; the layout stays [rows, cols].
    return t._alias(shape=torch.Size(shape))


@_implements(aten.expand.default)
def _expand(t: NF4Tensor, size: list[int], implicit: bool = False) -> NF4Tensor:
    """The no-op expand ``torch.matmul`` makes of a stacked weight whose batch dims already match (``x @ w.mT``)."""
    if len(size) != t.dim() or any(s not in (-1, d) for s, d in zip(size, t.shape)):
        raise NotImplementedError(f"NF4Tensor cannot be expanded from {tuple(t.shape)} to {tuple(size)}; dequantize it first (t.dequantize()).")
    return t._alias()


@_implements(aten.as_strided.default)
def _as_strided(t: NF4Tensor, size: list[int], stride: list[int], storage_offset: Optional[int] = None) -> NF4Tensor:
    contiguous = [math.prod(size[i + 1:]) for i in range(len(size))]
    if list(size) != list(t.quant.shape) or list(stride) != contiguous or (storage_offset or 0) != 0:
        raise NotImplementedError(f"NF4Tensor.as_strided only re-states the whole contiguous weight {tuple(t.quant.shape)}, got {tuple(size)}.")
    return t._alias()


@_implements(aten._to_copy.default)
def _to_copy(t: NF4Tensor, dtype: Optional[torch.dtype] = None, device: Any = None, non_blocking: bool = False, **_: Any) -> NF4Tensor:
    """Device moves carry the NF4 bytes; a dtype changes only what the weight dequantizes to."""
    if dtype is not None and not dtype.is_floating_point:
        raise NotImplementedError(f"NF4Tensor cannot become {dtype}; it dequantizes to a float dtype.")
    quant = t.quant
    if device is not None and torch.device(device) != quant.device:
        quant = _map_tensors(quant, lambda x: x.to(device, non_blocking=non_blocking))
    return NF4Tensor(quant, t.shape, dtype or t.dtype, t.transposed)


@_implements(aten.is_pinned.default)
def _is_pinned(t: NF4Tensor, device: Any = None) -> bool:
    return bool(t.quant.packed.is_pinned())


@_implements(aten._pin_memory.default)
def _pin_memory(t: NF4Tensor, device: Any = None) -> NF4Tensor:
    return NF4Tensor(_map_tensors(t.quant, lambda x: x.pin_memory()), t.shape, t.dtype, t.transposed)


# -- stacked weights (MoE experts): one expert, transposes, and the matmuls that read them ----------------
def _shape(shape: torch.Size, transposed: bool) -> torch.Size:
    return torch.Size((*shape[:-2], shape[-1], shape[-2])) if transposed else torch.Size(shape)


def expert_slice(quant: NF4Weight, index: int) -> NF4Weight:
    """Matrix ``index`` of a stacked ``[experts, out, in]`` weight, as an ``NF4Weight`` over the same bytes. An
    expert must start on a block; when it does not start on a group of nested scales, its scales are decoded
    (a float32 absmax of the expert's blocks only) rather than sliced."""
    experts = quant.shape[0]
    if not -experts <= index < experts:
        raise IndexError(f"index {index} is out of range for {experts} experts")
    index %= experts
    per = math.prod(quant.shape[1:])
    if (index * per) % shard_granularity(quant) == 0 and (per % shard_granularity(quant) == 0 or index == experts - 1):
        sliced = _row_slices(quant, [(index, index + 1)])[0]
        return replace(sliced, shape=quant.shape[1:])
    if per % quant.blocksize:
        raise NotImplementedError(
            f"an expert of {per} elements does not hold whole {quant.blocksize}-element blocks, so it cannot be read "
            "alone; quantize this weight with a blocksize that divides it."
        )
    first, blocks = index * per // quant.blocksize, per // quant.blocksize
    nested = quant.nested
    g0, g1 = first // nested.blocksize, -(-(first + blocks) // nested.blocksize)
    decoded = _decode_scales(quant.absmax[g0 * nested.blocksize:g1 * nested.blocksize], nested.absmax[g0:g1], nested)
    skip = first - g0 * nested.blocksize
    return replace(
        quant, packed=quant.packed[index * per // 2:(index + 1) * per // 2], absmax=decoded[skip:skip + blocks].contiguous(),
        shape=quant.shape[1:], nested=None,
    )


def _decode_scales(codes: Tensor, nested_absmax: Tensor, nested: NestedStats) -> Tensor:
    from lightning_nf4.kernels import reference

    return reference.dequantize_blockwise_8bit(codes, nested_absmax, nested.code, nested.blocksize, nested.offset)


@_implements(aten.select.int)
def _select(t: NF4Tensor, dim: int, index: int) -> Tensor:
    """One expert of a stacked weight (of its transpose too: transformers' grouped-matmul fallback loops over one).
    An expert that does not hold whole blocks cannot be read alone: it comes dequantized from the whole weight, in the
    dtype the weight was quantized from (as ``index`` gives experts; autocast casts it for its matmul)."""
    if t.dim() < 3 or dim not in (0, -t.dim()) or t.shape != _shape(t.quant.shape, t.transposed):
        raise NotImplementedError(
            f"NF4Tensor indexes the first dim of a stacked [experts, out, in] weight only, got dim {dim} of shape {tuple(t.shape)}."
        )
    if math.prod(t.quant.shape[1:]) % t.quant.blocksize:
        return t.dequantize(t.quant.dtype)[index]
    return NF4Tensor(expert_slice(t.quant, int(index)), dtype=t.dtype, transposed=t.transposed)


@_implements(aten.t.default)
def _t(t: NF4Tensor) -> NF4Tensor:
    return _transpose(t, 0, 1)


@_implements(aten.transpose.int)
def _transpose(t: NF4Tensor, dim0: int, dim1: int) -> NF4Tensor:
    dims = sorted(d % t.dim() for d in (dim0, dim1))
    if t.dim() < 2 or dims != [t.dim() - 2, t.dim() - 1] or t.shape != _shape(t.quant.shape, t.transposed):
        raise NotImplementedError(f"NF4Tensor transposes its last two dims only, got dims {dim0}, {dim1} of shape {tuple(t.shape)}.")
    return NF4Tensor(t.quant, _shape(t.shape, True), t.dtype, not t.transposed)


@_implements(aten.permute.default)
def _permute(t: NF4Tensor, dims: list[int]) -> NF4Tensor:
    """``weight.T`` and other permutes that swap the last two dims (or none)."""
    order = [d % t.dim() for d in dims]
    keep = list(range(t.dim() - 2))
    if order == keep + [t.dim() - 2, t.dim() - 1]:
        return t._alias(shape=t.shape)
    if order == keep + [t.dim() - 1, t.dim() - 2]:
        return _transpose(t, -2, -1)
    raise NotImplementedError(f"NF4Tensor permutes its last two dims only, got {list(dims)} for shape {tuple(t.shape)}.")


def _dequantized_args(func: Any) -> Callable[..., Any]:
    """``func`` run on the float weight: the weight is dequantized for this call only, so autograd saves the NF4
    tensor (its bytes) for the backward, not a float copy. It dequantizes to the dtype of the float tensor it meets
    (the activations: float32 outside autocast, as an ``NF4Linear`` computes), else to its own."""
    def run(*args: Any, **kwargs: Any) -> Any:
        values = list(args) + list(kwargs.values())
        dtype = next((a.dtype for a in values if isinstance(a, Tensor) and not isinstance(a, NF4Tensor) and a.is_floating_point()), None)
        plain = [a.dequantize(dtype) if isinstance(a, NF4Tensor) else a for a in args]
        return func(*plain, **{k: v.dequantize(dtype) if isinstance(v, NF4Tensor) else v for k, v in kwargs.items()})
    return run


for _op in (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.matmul.default, aten._grouped_mm.default,
            aten.mm.out, aten.addmm.out, aten.bmm.out):
    _OPS[_op] = _dequantized_args(_op)


@_implements(aten.zeros_like.default)
def _zeros_like(t: NF4Tensor, dtype: Optional[torch.dtype] = None, layout: Any = None, device: Any = None, pin_memory: Any = None,
                memory_format: Any = None) -> Tensor:
    """A plain float tensor of the weight's logical shape (a gradient buffer, as grouped-matmul fallbacks make one)."""
    return torch.zeros(t.shape, dtype=dtype or t.dtype, device=device or t.device)


@_implements(aten.empty_like.default)
def _empty_like(t: NF4Tensor, dtype: Optional[torch.dtype] = None, layout: Any = None, device: Any = None, pin_memory: Any = None,
                memory_format: Any = None) -> Tensor:
    """With a device named and the dtype kept (``Module.to_empty``'s call): the weight's NF4 layout on that device,
    uninitialized, for ``load_state_dict`` to fill; a float tensor in its place would run the model on garbage experts.
    Otherwise a float buffer of the logical shape, as ``zeros_like`` (grouped-matmul fallbacks' fake outputs)."""
    if device is not None and dtype in (None, t.dtype):
        return NF4Tensor(t.quant.to_empty(device), t.shape, t.dtype, t.transposed)
    return _zeros_like(t, dtype, layout, device, pin_memory, memory_format)


@_implements(aten.index.Tensor)
def _index(t: NF4Tensor, indices: list[Optional[Tensor]]) -> Tensor:
    """``weight[expert_ids]`` (transformers' batched experts): the experts gathered as float matrices, in the dtype
    the weight was quantized from (what the float model held; autocast casts them for its matmul)."""
    return t.dequantize(t.quant.dtype)[tuple(indices)]


# Ops of other libraries that take a stacked weight (transformers' grouped-matmul fallback and its backward).
_DEQUANTIZED_FOREIGN = {"transformers::grouped_mm_fallback", "transformers::grouped_mm_fallback_backward"}


# -- the dequantize op: how compiled code reads an NF4Tensor -------------------------------------
@torch.library.custom_op("lightning_nf4::dequantize_nf4_tensor", mutates_args=())
def dequantize_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The float weight of an ``NF4Tensor``. An op rather than a method so that torch.compile traces it
    (through this class's ops table, on the packed codes and scales) where it cannot follow ``.quant``."""
    raise TypeError(f"dequantize_nf4_tensor expects an NF4Tensor, got a {type(weight).__name__}.")


@dequantize_weight.register_fake
def _(weight: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty(weight.shape, dtype=dtype, device=weight.device)


@_implements(torch.ops.lightning_nf4.dequantize_nf4_tensor.default)
def _dequantize(t: NF4Tensor, dtype: torch.dtype) -> Tensor:
    return t.dequantize(dtype)
